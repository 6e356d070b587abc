"""Predict a training run's peak GPU memory from its flags: nothing is loaded, the model is built on ``meta``.

    python tools/plan_memory.py --model sd35-medium --resolution 1024 --train_batch_size 1 --mixed_precision bf16 \
        --full_bf16 --optimizer_type adamw8bit --gradient_checkpointing --budget 16,12
    python tools/plan_memory.py --model sd35-large --network_module networks.lora_sd3 --network_dim 16 --fp8_base \
        --mixed_precision bf16 --optimizer_type adamw8bit --gradient_checkpointing --resolution 1024 --budget 16,12
    python tools/plan_memory.py --examples     # the two plans above

Takes the trainers' flags (a launch command can be pasted; with --network_module it plans the network trainer,
MMDiT modules only). --model names a released variant when --pretrained_model_name_or_path is not given (of a
file only the header is read). Prints each part of the peak, the peak with and without gradient checkpointing,
and the smallest --blocks_to_swap that fits each --budget (GiB). How it counts: library/runtime/memory_plan.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EXAMPLES = (
    ["--model", "sd35-medium", "--resolution", "1024", "--train_batch_size", "1", "--mixed_precision", "bf16",
     "--full_bf16", "--optimizer_type", "adamw8bit", "--gradient_checkpointing", "--budget", "24,16,12"],
    ["--model", "sd35-large", "--network_module", "networks.lora_sd3", "--network_dim", "16", "--network_alpha", "16",
     "--fp8_base", "--mixed_precision", "bf16", "--optimizer_type", "adamw8bit", "--gradient_checkpointing",
     "--resolution", "1024", "--train_batch_size", "1", "--budget", "24,16,12"],
)


def build_parser() -> argparse.ArgumentParser:
    from library.cli import ArgumentParser

    p = ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                       epilog="All other flags are the trainers' (see python sd3_train_network.py --help).")
    p.add_argument("--model", choices=("sd3-medium", "sd35-medium", "sd35-large"),
                   help="released variant to plan (instead of --pretrained_model_name_or_path)")
    p.add_argument("--budget", default="24,16,12", help="GPU memory budgets in GiB, comma-separated")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="plan for this device's kernels and optimizer implementations (default cuda)")
    p.add_argument("--swap_buffers", type=int, default=2, help="device slots for swapped blocks (block swap uses 2)")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    p.add_argument("--examples", action="store_true", help="plan SD3.5-M full fine-tune and SD3.5-L LoRA at 1024 px")
    return p


def mmdit_config(cfg, variant: str | None):
    from library.errors import UserError
    from library.models.loading import read_mmdit_config
    from library.models.mmdit_config import real_config

    if variant:
        return real_config(variant)
    if not cfg.model.pretrained_model_name_or_path:
        raise UserError("give --model sd35-medium|sd35-large|sd3-medium or --pretrained_model_name_or_path FILE")
    return read_mmdit_config(cfg.model.pretrained_model_name_or_path)


def weight_dtype(cfg, device: str):
    """The dtype the trainer stores the MMDiT in (trained weights, or the frozen base of a network)."""
    from library.training.setup import PRECISIONS, weight_dtypes

    if is_network(cfg):
        return PRECISIONS[cfg.train.mixed_precision]
    return weight_dtypes(cfg, "cuda" if device == "cuda" else "cpu")[0]


def is_network(cfg) -> bool:
    return cfg.network is not None and bool(cfg.network.network_module)


def attach_trained(cfg, mmdit, network_device: str = "meta"):
    """What the trainer trains on ``mmdit`` -> (trained parameters, network or None): the MMDiT minus frozen
    blocks, or a network (fp8 base Linears with --fp8_base/--fp8_base_unet) built on ``network_device``."""
    import torch

    from library.runtime.fp8 import store_linears_in_fp8
    from library.training.full_finetune import freeze_last_blocks

    if not is_network(cfg):
        mmdit.requires_grad_(True)
        freeze_last_blocks(mmdit, cfg.train.num_last_block_to_freeze)
        return [p for p in mmdit.parameters() if p.requires_grad], None
    from library.training.network_files import parse_network_args
    from networks.training import resolve_module

    net = cfg.network
    module, args = resolve_module(net.network_module, parse_network_args(net.network_args))
    mmdit.requires_grad_(False)
    with torch.device(network_device):
        network = module.create_network(1.0, net.network_dim, net.network_alpha, None, None, mmdit,
                                        neuron_dropout=net.network_dropout, **args)
    if cfg.model.fp8_base or cfg.model.fp8_base_unet:
        store_linears_in_fp8(mmdit.joint_blocks)
    network.to(dtype=torch.float32)
    network.apply_to()
    return [p for p in network.parameters() if p.requires_grad], network


def plan_settings(cfg, ns, device: str):
    import torch

    from library.data.cli_datasets import parse_resolution
    from library.runtime.memory_plan import PlanSettings
    from library.training.fused import fused_mode
    from library.training.setup import PRECISIONS

    width, height = parse_resolution(ns.resolution) if getattr(ns, "resolution", None) else (1024, 1024)
    t, m = cfg.train, cfg.model
    return PlanSettings(width=width, height=height, batch_size=getattr(ns, "train_batch_size", None) or 1,
                        text_tokens=77 + m.t5xxl_max_token_length, compute_dtype=PRECISIONS.get(t.mixed_precision, torch.float32),
                        gradient_checkpointing=t.gradient_checkpointing,
                        cpu_offload_checkpointing=t.cpu_offload_checkpointing,
                        fused=fused_mode(t.fused_backward_pass, t.blockwise_fused_optimizers), max_grad_norm=t.max_grad_norm,
                        optimizer=cfg.optimizer.optimizer_type, blocks_to_swap=m.blocks_to_swap or 0,
                        swap_buffers=ns.swap_buffers, device=device)


def meta_plan_inputs(ns: argparse.Namespace, trainer_argv: list[str], mcfg=None):
    """(run config, MMDiT config, meta MMDiT with what is trained attached, trained parameters, settings)
    from the flags; ``mcfg`` overrides the model's architecture (miniatures)."""
    from library.cli.train import parse_train_args
    from library.errors import UserError
    from library.models.loading import build_mmdit

    cfg, train_ns = parse_train_args(trainer_argv, network=True)
    train_ns.swap_buffers = ns.swap_buffers
    mcfg = mcfg or mmdit_config(cfg, ns.model)
    mmdit = build_mmdit(mcfg, "meta").to(weight_dtype(cfg, ns.device))
    trained, _ = attach_trained(cfg, mmdit)
    settings = plan_settings(cfg, train_ns, ns.device)
    if settings.blocks_to_swap > mcfg.depth - 2:
        raise UserError(f"--blocks_to_swap {settings.blocks_to_swap}: at most {mcfg.depth - 2} for this model")
    if settings.blocks_to_swap and settings.fused and not is_network(cfg):
        raise UserError("--blocks_to_swap cannot be combined with --fused_backward_pass / --blockwise_fused_optimizers "
                        "in a full fine-tune (the trainer refuses it); drop one of them")
    return cfg, mcfg, mmdit, trained, settings


def plan_of(ns: argparse.Namespace, trainer_argv: list[str], mcfg=None) -> dict:
    from library.runtime.memory_plan import GIB, plan_memory, smallest_swap, trace_step

    cfg, mcfg, mmdit, trained, settings = meta_plan_inputs(ns, trainer_argv, mcfg)
    trace = trace_step(mmdit, trained, settings)
    plan = plan_memory(mmdit, trained, settings, trace)
    other = replace(settings, gradient_checkpointing=not settings.gradient_checkpointing, cpu_offload_checkpointing=False)
    other_peak = plan_memory(mmdit, trained, other).peak
    budgets = [float(b) for b in ns.budget.split(",") if b.strip()]
    traces = {trace.host_blocks: trace}
    fits = {b: smallest_swap(mmdit, trained, settings, int(b * GIB), traces) for b in budgets}
    return {
        "title": _title(cfg, mcfg, settings), "rows": plan_rows(plan), "peak_gib": plan.peak / GIB,
        "checkpointing": settings.gradient_checkpointing, "other_checkpointing_peak_gib": other_peak / GIB,
        "smallest_blocks_to_swap": {str(b): n for b, n in fits.items()}, "depth": mcfg.depth, "peak": plan.peak,
        "settings": {k: str(v) for k, v in asdict(settings).items()},
    }


def plan_rows(plan) -> list[tuple[str, float]]:
    """(part, GiB) rows of a plan, for printing."""
    from library.runtime.memory_plan import GIB

    s = plan.settings
    act = "activations (checkpointed)" if s.gradient_checkpointing else "activations"
    rows = [("weights on the device", plan.weights), (f"optimizer states ({s.optimizer})", plan.optimizer_states),
            ("gradients (most held at once)", plan.gradients), (f"{act} at the end of forward", plan.activations),
            ("backward high-water mark (activations + gradients)", plan.backward_peak),
            ("optimizer step temporaries", plan.step_temporaries), ("block swap buffers", plan.swap_buffers),
            ("predicted peak", plan.peak)]
    return [(name, value / GIB) for name, value in rows]


def _title(cfg, mcfg, s) -> str:
    what = f"{cfg.network.network_module} dim {cfg.network.network_dim}" if is_network(cfg) else "full fine-tune"
    flags = [f for f, on in (("fp8 base", cfg.model.fp8_base or cfg.model.fp8_base_unet),
                             ("gradient checkpointing", s.gradient_checkpointing),
                             ("cpu offload", s.cpu_offload_checkpointing), (f"fused {s.fused}", s.fused),
                             (f"blocks_to_swap {s.blocks_to_swap}", s.blocks_to_swap)) if on]
    return (f"{mcfg.variant} (depth {mcfg.depth}), {what}, {s.width}x{s.height}, batch {s.batch_size}, "
            f"{cfg.train.mixed_precision}, {s.optimizer}" + "".join(f", {f}" for f in flags))


def report(plan: dict) -> list[str]:
    lines = [plan["title"], f"{'part':<52} {'GiB':>7}"]
    lines += [f"{name:<52} {gib:>7.2f}" for name, gib in plan["rows"]]
    alt = "without" if plan["checkpointing"] else "with"
    lines.append(f"{'predicted peak ' + alt + ' gradient checkpointing':<52} {plan['other_checkpointing_peak_gib']:>7.2f}")
    for budget, n in plan["smallest_blocks_to_swap"].items():
        lines.append(f"{budget} GiB: " + ("fits without block swap" if n == 0 else f"--blocks_to_swap {n}" if n
                                          else f"does not fit even with --blocks_to_swap {plan['depth'] - 2}"))
    return lines


def main(argv: list[str] | None = None) -> int:
    from library.cli import run_command

    ns, rest = build_parser().parse_known_args(argv)

    def run() -> None:
        for trainer_argv in (EXAMPLES if ns.examples else (rest,)):
            own, more = build_parser().parse_known_args(trainer_argv) if ns.examples else (ns, rest)
            plan = plan_of(own, more)
            print(json.dumps(plan, sort_keys=True) if ns.json else "\n".join(report(plan)) + "\n")

    return run_command(run)


if __name__ == "__main__":
    sys.exit(main())
