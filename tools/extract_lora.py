"""Extract a LoRA from the difference of two SD3 checkpoints (fine-tuned minus original) by SVD.

    python tools/extract_lora.py --model_org sd3.5_medium.safetensors --model_tuned finetuned.safetensors \
        --save_to extracted.safetensors --dim 32 --save_precision bf16
    python tools/extract_lora.py ... --dim 128 --dynamic_method sv_fro --dynamic_param 0.9

Every layer an SD3 LoRA can adapt is compared (MMDiT joint blocks, embedders and final layer incl. the
patch-embedding conv; CLIP-L/CLIP-G/T5 attention and MLP when both checkpoints hold them), one weight
pair at a time. Each ΔW keeps --dim singular values (--conv_dim for the patch conv), or the fewest that
meet --dynamic_method's target, capped by --dim; the report gives the kept energy Σ kept σ² / Σ σ².
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_parser() -> argparse.ArgumentParser:
    from library.cli import ArgumentParser

    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_org", type=Path, required=True, help="the original SD3/SD3.5 checkpoint")
    parser.add_argument("--model_tuned", type=Path, required=True, help="the fine-tuned checkpoint")
    parser.add_argument("--save_to", type=Path, required=True, help="output LoRA .safetensors")
    parser.add_argument("--dim", type=int, default=4, help="rank of each module (the cap with --dynamic_method)")
    parser.add_argument("--conv_dim", type=int, help="rank for the patch-embedding conv (default --dim)")
    parser.add_argument("--dynamic_method", choices=("sv_ratio", "sv_fro", "sv_cumulative"),
                        help="choose each module's rank from its singular values")
    parser.add_argument("--dynamic_param", type=float, help="target of --dynamic_method")
    parser.add_argument("--clamp_quantile", type=float, default=0.99,
                        help="clamp the factors at this quantile of their absolute values (1 = off)")
    parser.add_argument("--min_diff", type=float, default=0.01,
                        help="a text encoder whose largest |ΔW| is not above this is left out")
    parser.add_argument("--save_precision", choices=("float", "fp32", "fp16", "bf16"), default="float",
                        help="dtype of the LoRA factors")
    parser.add_argument("--loading_device", default="cpu", help="device the weights are read to")
    parser.add_argument("--device", "--working_device", dest="working_device", default="cpu",
                        help="device the SVD runs on (cuda is much faster)")
    parser.add_argument("--verbose", action="store_true", help="one report line per module")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def run(ns: argparse.Namespace) -> None:
    from library.training.checkpoints import save_dtype
    from library.training.network_files import BASE_MODEL_VERSION, with_hashes
    from library.models.loading import read_mmdit_config
    from networks.extract import extract_lora
    from networks.lowrank import RankSpec, write_lora

    spec = RankSpec(ns.dim, ns.conv_dim, ns.dynamic_method, ns.dynamic_param, ns.clamp_quantile)
    modules, metadata, report = extract_lora(
        ns.model_org, ns.model_tuned, spec, min_diff=ns.min_diff, loading_device=ns.loading_device,
        working_device=ns.working_device, title=ns.save_to.stem, show_progress=not ns.no_progress,
    )
    metadata = {**metadata, "ss_base_model_version": BASE_MODEL_VERSION[read_mmdit_config(ns.model_org).variant],
                "ss_v2": "False"}
    write_lora(ns.save_to, modules, metadata, save_dtype(ns.save_precision), with_hashes)
    print(f"{ns.save_to}: LoRA of {len(modules)} modules")
    print("\n".join(report.lines(ns.verbose)))


def main(argv: list[str] | None = None) -> int:
    from library.cli import run_command

    ns = build_parser().parse_args(argv)
    return run_command(lambda: run(ns))


if __name__ == "__main__":
    sys.exit(main())
