"""Change the rank of a LoRA (or turn a LoKr into a LoRA) by SVD, reporting the kept energy.

    python tools/resize_lora.py --model my_lora_r64.safetensors --save_to my_lora_r16.safetensors --new_rank 16
    python tools/resize_lora.py --model my_lora.safetensors --save_to small.safetensors --new_rank 64 \
        --dynamic_method sv_fro --dynamic_param 0.95 --verbose

Each module's ΔW keeps --new_rank singular values (--new_conv_rank for the patch conv), or the fewest
that meet --dynamic_method's target, capped by --new_rank; a LoRA keeps its alpha / rank scale. The
report gives the kept energy Σ kept σ² / Σ σ² per module (--verbose) and over the whole network.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_parser() -> argparse.ArgumentParser:
    from library.cli import ArgumentParser

    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="LoRA / LoKr .safetensors to resize")
    parser.add_argument("--save_to", type=Path, required=True, help="output LoRA .safetensors")
    parser.add_argument("--new_rank", type=int, default=4, help="rank of each module (the cap with --dynamic_method)")
    parser.add_argument("--new_conv_rank", type=int, help="rank for the patch-embedding conv (default --new_rank)")
    parser.add_argument("--dynamic_method", choices=("sv_ratio", "sv_fro", "sv_cumulative"),
                        help="choose each module's rank from its singular values")
    parser.add_argument("--dynamic_param", type=float, help="target of --dynamic_method")
    parser.add_argument("--save_precision", choices=("float", "fp32", "fp16", "bf16"), default="float",
                        help="dtype of the LoRA factors")
    parser.add_argument("--device", default="cpu", help="device the SVD runs on")
    parser.add_argument("--verbose", action="store_true", help="one report line per module")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def run(ns: argparse.Namespace) -> None:
    from library.errors import UserError
    from library.training.checkpoints import save_dtype
    from library.training.network_files import with_hashes
    from networks.deltas import read_network
    from networks.extract import resize_network
    from networks.lowrank import RankSpec, write_lora

    spec = RankSpec(ns.new_rank, ns.new_conv_rank, ns.dynamic_method, ns.dynamic_param)
    if ns.save_to.resolve() == ns.model.resolve():
        raise UserError(f"--save_to {ns.save_to} is the input; choose another file")
    network = read_network(ns.model)
    modules, metadata, report = resize_network(network, spec, device=ns.device, show_progress=not ns.no_progress)
    write_lora(ns.save_to, modules, metadata, save_dtype(ns.save_precision), with_hashes)
    print(f"{ns.save_to}: {len(modules)} modules resized")
    print("\n".join(report.lines(ns.verbose)))


def main(argv: list[str] | None = None) -> int:
    from library.cli import run_command

    ns = build_parser().parse_args(argv)
    return run_command(lambda: run(ns))


if __name__ == "__main__":
    sys.exit(main())
