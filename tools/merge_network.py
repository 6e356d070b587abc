"""Merge LoRA / LoKr networks into an SD3 checkpoint, or several networks into one LoRA.

    python tools/merge_network.py --sd3_model sd3.5_medium.safetensors --save_to merged.safetensors \
        --models style.safetensors detail.safetensors --ratios 0.8 1.0 --save_precision bf16
    python tools/merge_network.py --save_to both.safetensors --models a.safetensors b.safetensors --ratios 1 0.5
    python tools/merge_network.py --save_to both_r32.safetensors --models a.safetensors lokr.safetensors --new_rank 32

With --sd3_model the networks' MMDiT modules and, where the checkpoint holds them, CLIP-L/CLIP-G/T5
modules are folded into the weights tensor by tensor; text encoders in separate files are merged with
--clip_l FILE --clip_l_save_to OUT (likewise --clip_g, --t5xxl). Without --sd3_model the networks
become one LoRA: their ranks are concatenated (exact; LoRA inputs only) or, with --new_rank or
--dynamic_method, their summed ΔW is factorised by SVD (needed for LoKr inputs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ENCODERS = ("clip_l", "clip_g", "t5xxl")


def build_parser() -> argparse.ArgumentParser:
    from library.cli import ArgumentParser

    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sd3_model", "--sd_model", type=Path, help="SD3/SD3.5 checkpoint to merge into")
    for name in ENCODERS:
        parser.add_argument(f"--{name}", type=Path, help=f"separate {name} file (HF key names) to merge into")
        parser.add_argument(f"--{name}_save_to", type=Path, help=f"where the merged {name} file goes")
    parser.add_argument("--save_to", type=Path, required=True, help="output .safetensors (checkpoint or LoRA)")
    parser.add_argument("--models", nargs="+", required=True, help="LoRA / LoKr files to merge")
    parser.add_argument("--ratios", nargs="+", type=float, help="one multiplier per network (default 1.0)")
    parser.add_argument("--save_precision", choices=("float", "fp32", "fp16", "bf16"),
                        help="dtype of the output (default: a checkpoint keeps its dtypes, a LoRA is float)")
    parser.add_argument("--loading_device", default="cpu", help="device the checkpoint tensors are read to")
    parser.add_argument("--working_device", "--device", default="cpu", help="device ΔW is computed and added on")
    parser.add_argument("--new_rank", type=int, help="merge into one LoRA by SVD with this (maximum) rank")
    parser.add_argument("--new_conv_rank", type=int, help="rank for the patch-embedding conv (default --new_rank)")
    parser.add_argument("--dynamic_method", choices=("sv_ratio", "sv_fro", "sv_cumulative"),
                        help="choose each module's rank from its singular values (capped by --new_rank)")
    parser.add_argument("--dynamic_param", type=float, help="target of --dynamic_method")
    parser.add_argument("--clamp_quantile", type=float, default=1.0, help="clamp SVD factors at this quantile")
    parser.add_argument("--verbose", action="store_true", help="one report line per module (SVD merge)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    return parser


def _networks(ns: argparse.Namespace) -> list:
    from library.errors import UserError
    from networks.deltas import read_network

    ratios = ns.ratios or [1.0] * len(ns.models)
    if len(ratios) != len(ns.models):
        raise UserError(f"--ratios has {len(ratios)} values for {len(ns.models)} --models; give one per network")
    return [(read_network(path), ratio) for path, ratio in zip(ns.models, ratios)]


def _model_files(ns: argparse.Namespace) -> list:
    from library.errors import UserError
    from networks.merge import ModelFile

    models = [ModelFile(ns.sd3_model, ns.save_to)] if ns.sd3_model else []
    for name in ENCODERS:
        source, target = getattr(ns, name), getattr(ns, f"{name}_save_to")
        if (source is None) != (target is None):
            raise UserError(f"--{name} and --{name}_save_to go together; give both or neither")
        if source is not None:
            models.append(ModelFile(source, target, name))
    if models and not ns.sd3_model:
        raise UserError("merging into separate text encoder files needs the --sd3_model they belong to")
    return models


def _merge_checkpoint(ns: argparse.Namespace, models: list, networks: list) -> None:
    from library.training.checkpoints import save_dtype
    from networks.merge import Devices, merge_into_models

    changed = merge_into_models(models, networks, save_dtype=save_dtype(ns.save_precision),
                                devices=Devices(ns.loading_device, ns.working_device), show_progress=not ns.no_progress)
    for path, count in changed.items():
        print(f"{path}: {count} weights merged from {len(networks)} network(s)")


def _merge_networks(ns: argparse.Namespace, networks: list) -> None:
    from library.training.checkpoints import save_dtype
    from library.training.network_files import with_hashes
    from networks.lowrank import RankSpec, write_lora
    from networks.merge import merge_to_lora

    spec = None
    if ns.new_rank is not None or ns.dynamic_method is not None:
        spec = RankSpec(ns.new_rank or 10**9, ns.new_conv_rank, ns.dynamic_method, ns.dynamic_param, ns.clamp_quantile)
    modules, metadata, report = merge_to_lora(networks, spec=spec, device=ns.working_device,
                                              show_progress=not ns.no_progress)
    write_lora(ns.save_to, modules, metadata, save_dtype(ns.save_precision or "float"), with_hashes)
    how = "concatenated" if spec is None else "merged by SVD"
    print(f"{ns.save_to}: {len(modules)} modules, {len(networks)} networks {how}")
    if spec is not None:
        print("\n".join(report.lines(ns.verbose)))


def run(ns: argparse.Namespace) -> None:
    networks = _networks(ns)
    models = _model_files(ns)
    if models and (ns.new_rank is not None or ns.dynamic_method is not None):
        from library.errors import UserError

        raise UserError("--new_rank / --dynamic_method make one LoRA of the networks; leave out --sd3_model for that")
    if models:
        _merge_checkpoint(ns, models, networks)
    else:
        _merge_networks(ns, networks)


def main(argv: list[str] | None = None) -> int:
    from library.cli import run_command

    ns = build_parser().parse_args(argv)
    return run_command(lambda: run(ns))


if __name__ == "__main__":
    sys.exit(main())
