"""Peak GPU memory and s/it of real-size training steps (random weights), against tools/plan_memory.py.

    python bench/gpu_memory.py                  # on a CUDA machine: every case below, rows to bench/RESULTS.md
    python bench/gpu_memory.py --tiny           # miniature configs (a CPU works: peak RSS instead of CUDA peak)
    python bench/gpu_memory.py --cases a1,b1 --steps 5 --results /tmp/results.md

Cases (flags as the trainers take them; 1024 px, batch 1, T5 256 tokens, --mixed_precision bf16):
  a1  SD3.5-M full fine-tune, --full_bf16, AdamW8bit, gradient checkpointing
  a2  a1 + --blocks_to_swap at the planner's fit point for 12 GiB (needs library/runtime/block_swap.py)
  a3  a1 + --cpu_offload_checkpointing
  a4  a1 with Adafactor and --fused_backward_pass (gradients freed during backward)
  b1  SD3.5-L LoRA rank 16, --fp8_base, AdamW8bit, gradient checkpointing
  b2, b3, b4  b1 + --blocks_to_swap at the planner's fit point for 16, 12 and 8 GiB (block_swap.py)
(a swap case whose fit point is 0 is reported as such; with --tiny the swap cases swap 1 block, and on a CPU
the host copies count too, so their ratio is not a planner check)
Each case runs in a fresh process: the model is built on ``meta``, materialised on the device with random
values (N(0, 1/fan_in) matrices), then ``--warmup`` + ``--steps`` training steps (flow-matching loss under
autocast, backward, global clip 1.0, optimizer step; fused modes through library.training.fused) are run.
Measured: ``torch.cuda.max_memory_allocated`` from the model's placement on (weights included; after block
swap has moved its blocks to the host), or on a CPU the increase of peak RSS over the resident memory before
the model is built, after one untimed run of the same case (``measure_peak_rss``; glibc told to return freed
memory at once); s/it of the timed steps. The planner predicts the same quantity from the same flags; each row
gives both and their ratio. Every row is appended to --results as soon as it is measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

BASE = ["--resolution", "1024", "--train_batch_size", "1", "--mixed_precision", "bf16", "--gradient_checkpointing",
        "--t5xxl_max_token_length", "256"]
FULL = [*BASE, "--full_bf16", "--optimizer_type", "adamw8bit", "--learning_rate", "1e-5"]
LORA = [*BASE, "--network_module", "networks.lora_sd3", "--network_dim", "16", "--network_alpha", "16", "--fp8_base",
        "--optimizer_type", "adamw8bit", "--learning_rate", "1e-4"]
ADAFACTOR = ["--optimizer_type", "Adafactor", "--optimizer_args", "relative_step=False", "scale_parameter=False",
             "warmup_init=False"]
TINY = ["--resolution", "256", "--train_batch_size", "2", "--t5xxl_max_token_length", "64"]


@dataclass(frozen=True)
class Case:
    name: str
    variant: str
    argv: tuple[str, ...]
    title: str
    swap_budget_gib: float | None = None  # --blocks_to_swap = the planner's fit point for this budget


CASES = (
    Case("a1", "sd35-medium", tuple(FULL), "SD3.5-M full FT, bf16, AdamW8bit, checkpointing"),
    Case("a2", "sd35-medium", tuple(FULL), "SD3.5-M full FT + block swap (12 GiB fit)", 12.0),
    Case("a3", "sd35-medium", (*FULL, "--cpu_offload_checkpointing"), "SD3.5-M full FT + cpu_offload_checkpointing"),
    Case("a4", "sd35-medium", (*FULL, *ADAFACTOR, "--fused_backward_pass"), "SD3.5-M full FT, Adafactor, fused backward"),
    Case("b1", "sd35-large", tuple(LORA), "SD3.5-L LoRA r16, fp8 base, checkpointing"),
    Case("b2", "sd35-large", tuple(LORA), "SD3.5-L LoRA r16 + block swap (16 GiB fit)", 16.0),
    Case("b3", "sd35-large", tuple(LORA), "SD3.5-L LoRA r16 + block swap (12 GiB fit)", 12.0),
    Case("b4", "sd35-large", tuple(LORA), "SD3.5-L LoRA r16 + block swap (8 GiB fit)", 8.0),
)


def miniature(variant: str, heads: int = 4):
    """A few blocks of ``variant`` at ``heads`` heads of 64 (dual attention, qk norm as the real one), 32-patch grid."""
    from library.models.mmdit_config import MMDiTConfig, real_config

    real = real_config(variant)
    return MMDiTConfig(depth=3, hidden_size=64 * heads, num_heads=heads, pos_embed_max_size=32, qk_norm=real.qk_norm,
                       dual_attention_layers=(0, 1) if real.dual_attention_layers else (), pos_embed_base_size=32)


def tiny_argv(argv: tuple[str, ...]) -> list[str]:
    """The case's flags at miniature sizes (:data:`TINY`: 256 px, batch 2, 64 T5 tokens)."""
    sized = {"--resolution", "--train_batch_size", "--t5xxl_max_token_length"}
    out = [a for i, a in enumerate(argv) if a not in sized and (i == 0 or argv[i - 1] not in sized)]
    return [*out, *TINY]


def _plan_ns(device: str):
    return argparse.Namespace(model=None, swap_buffers=2, device=device)


def planned(variant: str, argv: list[str], tiny: bool, device: str, budget: float | None = None) -> dict:
    """The planner's prediction for the case (and its fit point for ``budget`` GiB)."""
    from tools.plan_memory import plan_of

    ns = _plan_ns(device)
    ns.model, ns.budget = None if tiny else variant, "" if budget is None else str(budget)
    return plan_of(ns, argv, miniature(variant) if tiny else None)


def run_case(case: Case, *, tiny: bool, device: str, steps: int, warmup: int) -> dict:
    """Plan, then measure in a fresh process; returns the row's figures (or why it was skipped). Miniatures
    swap one block in the swap cases (their budgets are for real sizes)."""
    argv = tiny_argv(case.argv) if tiny else list(case.argv)
    if case.swap_budget_gib is not None:
        fits = {} if tiny else planned(case.variant, argv, tiny, device, case.swap_budget_gib)["smallest_blocks_to_swap"]
        fit = 1 if tiny else fits.get(str(case.swap_budget_gib))
        if not fit:
            return {"skipped": f"the planner fits {case.swap_budget_gib:g} GiB with {fit} swapped blocks (see a1/b1)"}
        argv += ["--blocks_to_swap", str(fit)]
    plan = planned(case.variant, argv, tiny, device)
    spec = {"variant": case.variant, "argv": argv, "tiny": tiny, "device": device, "steps": steps, "warmup": warmup}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec), "--json_out", str(out)],
                              env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            return {"skipped": f"failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}", "planned": plan["peak"]}
        measured = json.loads(out.read_text())
    if "skipped" in measured:
        return measured
    return {**measured, "planned": plan["peak"], "argv": argv}


# --- the child: one case, measured


def measure_peak_rss(fn: Callable[[], object]) -> tuple[object, int]:
    """(fn(), increase of this process's peak resident memory over its resident memory before the call).

    Linux: the peak (VmHWM) is reset through /proc/self/clear_refs. Run it in a fresh process with
    ``MALLOC_MMAP_THRESHOLD_=65536`` (glibc returns freed tensors to the system at once)."""
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    result = fn()
    return result, (_status_kib("VmHWM") - before) * 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")




def randomize(module) -> None:
    """Random values for a materialised model: matrices N(0, 1/fan_in), norm scales 1 + N(0, 0.1²), rest N(0, 0.02²)."""
    import torch

    with torch.no_grad():
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if t.dim() >= 2:
                t.normal_(0.0, 1.0 / math.sqrt(t[0].numel()))
            elif name.endswith((".ln_q.weight", ".ln_k.weight")):
                t.normal_(1.0, 0.1)
            else:
                t.normal_(0.0, 0.02)


def _warm_up(spec: dict, prepared, device) -> None:
    """On a CPU, the same case once before the baseline (everything it allocates is freed again): code
    pages, thread pools and the shape-keyed caches of the CPU math libraries (oneDNN/MKL primitives and
    scratch, tens of MB at the first use of a shape) are then resident already. They are the CPU's
    counterpart of the CUDA context and library workspaces, which max_memory_allocated does not count."""
    import gc

    train_steps({**spec, "steps": 1, "warmup": 1}, prepared, device)
    gc.collect()


def prepare(spec: dict, device):
    """Everything before the measurement: flags parsed, modules imported, the optimizer class resolved."""
    import importlib

    from library.training.optimizers import resolve_optimizer_class
    from tools.plan_memory import is_network, meta_plan_inputs

    cfg, mcfg, _, _, settings = meta_plan_inputs(_plan_ns(device.type), spec["argv"],
                                                 miniature(spec["variant"]) if spec["tiny"] else None)
    for name in ("library.models.prompt_encoding", "library.training.fused", "library.training.step"):
        importlib.import_module(name)  # imported before the baseline
    resolve_optimizer_class(cfg.optimizer.optimizer_type)
    if is_network(cfg):
        from library.training.network_files import parse_network_args
        from networks.training import resolve_module

        resolve_module(cfg.network.network_module, parse_network_args(cfg.network.network_args))
    return cfg, mcfg, settings


def build(prepared, device):
    """(MMDiT on ``device`` with what is trained attached, trained parameters, block swap note)."""
    import torch

    from library.models.loading import build_mmdit
    from tools.plan_memory import attach_trained, weight_dtype

    cfg, mcfg, settings = prepared
    mmdit = build_mmdit(mcfg, "meta").to(weight_dtype(cfg, device.type)).to_empty(device=device)
    randomize(mmdit)
    mmdit.gradient_checkpointing = settings.gradient_checkpointing
    mmdit.cpu_offload_checkpointing = settings.cpu_offload_checkpointing
    trained, network = attach_trained(cfg, mmdit, network_device=str(device))
    if network is not None:
        randomize_lora(network)
    note = _block_swap(mmdit, settings.blocks_to_swap, device) if settings.blocks_to_swap else None
    torch.manual_seed(0)
    return mmdit, trained, note


def randomize_lora(network) -> None:
    """LoRA up weights start at zero; give them values so that the adapted path does real work."""
    import torch

    with torch.no_grad():
        for name, p in network.named_parameters():
            if ".lora_up." in name:
                p.normal_(0.0, 1e-3)


def _block_swap(mmdit, blocks: int, device) -> str | None:
    """--blocks_to_swap as the trainer attaches it (library/runtime/block_swap.py), or why it cannot run."""
    try:
        from library.runtime.block_swap import attach_block_swap
    except ImportError:
        return "skipped: library.runtime.block_swap is not in this checkout"
    attach_block_swap(mmdit, mmdit.joint_blocks, blocks, device)
    return None


def train_steps(spec: dict, prepared, device) -> dict:
    import torch

    from library.models.prompt_encoding import Conditioning
    from library.training.fused import FusedUpdater
    from library.training.optimizers import build_optimizer, parse_optimizer_args
    from library.training.step import StepSettings, flow_step

    cfg, s = prepared[0], prepared[2]
    mmdit, trained, note = build(prepared, device)
    if note:
        return {"skipped": note}
    if device.type == "cuda":  # from here: block swap has moved its blocks to the host, as in a run
        torch.cuda.reset_peak_memory_stats()
    mmdit.train()
    optimizer = build_optimizer(cfg.optimizer.optimizer_type, [{"params": trained, "lr": cfg.train.learning_rate}],
                                cfg.train.learning_rate, parse_optimizer_args(cfg.optimizer.optimizer_args),
                                max_grad_norm=s.max_grad_norm)
    fused = FusedUpdater(optimizer, trained, s.fused, s.max_grad_norm) if s.fused else None
    autocast = None if s.compute_dtype == torch.float32 else s.compute_dtype
    gen = torch.Generator(device).manual_seed(0)
    cfg_m, times = mmdit.config, []
    for i in range(spec["warmup"] + spec["steps"]):
        _sync(device)
        start = time.perf_counter()
        x0 = torch.randn(s.batch_size, cfg_m.in_channels, s.height // 8, s.width // 8, device=device, generator=gen)
        cond = Conditioning(torch.randn(s.batch_size, s.text_tokens, cfg_m.context_dim, device=device, generator=gen),
                            torch.randn(s.batch_size, cfg_m.pooled_dim, device=device, generator=gen))
        result = flow_step(mmdit, x0, cond, StepSettings(), generator=gen, autocast_dtype=autocast)
        _update(result.loss, trained, optimizer, fused, s.max_grad_norm)
        del result, x0, cond
        _sync(device)
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - start)
    return {"s_per_it": sum(times) / max(1, len(times))}


def _update(loss, trained: list, optimizer, fused, max_grad_norm: float) -> None:
    """As the training loop updates: plain (backward, global clip, step) or fused (steps inside backward)."""
    import torch

    if fused is not None:
        fused.backward(lambda retain: loss.backward(retain_graph=retain), True)
        return
    loss.backward()
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(trained, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def child(spec: dict, json_out: Path) -> None:
    import torch

    device = torch.device(spec["device"])
    prepared = prepare(spec, device)
    if device.type == "cuda":
        result = train_steps(spec, prepared, device)
        result["measured"] = torch.cuda.max_memory_allocated()
    else:
        _warm_up(spec, prepared, device)
        result, increase = measure_peak_rss(lambda: train_steps(spec, prepared, device))
        result["measured"] = increase
    json_out.write_text(json.dumps(result))


# --- the parent: rows


def row(case: Case, result: dict, tiny: bool) -> str:
    size = "miniature " if tiny else ""
    if "skipped" in result:
        return f"- {case.name} {size}{case.title}: skipped ({result['skipped']})"
    gib, args = 2**30, result["argv"]
    swap_text = f", --blocks_to_swap {args[args.index('--blocks_to_swap') + 1]}" if "--blocks_to_swap" in args else ""
    return (f"- {case.name} {size}{case.title}{swap_text}: measured {result['measured'] / gib:.3f} GiB, planned "
            f"{result['planned'] / gib:.3f} GiB, planned ÷ measured **{result['planned'] / result['measured']:.3f}**, "
            f"{result['s_per_it']:.2f} s/it")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="miniature configs (runs on a CPU)")
    p.add_argument("--cases", default=",".join(c.name for c in CASES), help="comma-separated case names")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 5; --tiny 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; --tiny 1)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"),
                   help="the file rows are appended to (default bench/RESULTS.md)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--json_out", type=Path, help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.child:
        child(json.loads(ns.child), ns.json_out)
        return 0
    import torch

    from results import header

    device = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and not ns.tiny:
        print("no GPU: real sizes need one; run with --tiny to check the script on a CPU", file=sys.stderr)
        return 2
    steps, warmup = ns.steps or (2 if ns.tiny else 5), ns.warmup if ns.warmup is not None else (1 if ns.tiny else 2)
    wanted = ns.cases.split(",")
    if not ns.results.exists():
        ns.results.write_text("# Benchmark results\n\n")
    _append(ns.results, header("gpu_memory" + (" --tiny" if ns.tiny else "")))
    for case in (c for c in CASES if c.name in wanted):  # each row as soon as it is measured
        line = row(case, run_case(case, tiny=ns.tiny, device=device, steps=steps, warmup=warmup), ns.tiny)
        print(line, flush=True)
        _append(ns.results, [line])
    _append(ns.results, [])
    return 0


def _append(path: Path, lines: list[str]) -> None:
    with open(path, "a") as f:
        f.write("".join(line + "\n" for line in lines))


if __name__ == "__main__":
    sys.exit(main())
