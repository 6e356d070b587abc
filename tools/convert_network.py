"""Convert an SD3 LoRA / LoKr file between sd-scripts / ComfyUI keys and diffusers / PEFT keys.

    python tools/convert_network.py --src_path my_lora.safetensors --dst_path my_lora_diffusers.safetensors
    python tools/convert_network.py --src_path my_lora_diffusers.safetensors --dst_path back.safetensors

The direction follows the source (`lora_unet_*` / `lora_te*_*` keys -> diffusers, `transformer.*` /
`text_encoder*.*` keys -> sd-scripts); `--to` makes it explicit. The diffusers file loads with
`StableDiffusion3Pipeline.load_lora_weights` (LoRA) or `transformer.load_lora_adapter` (LoRA, LoKr).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRECISIONS = ("float", "fp16", "bf16")


def build_parser() -> argparse.ArgumentParser:
    from library.cli import ArgumentParser

    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src_path", required=True, help="network file to convert (.safetensors)")
    parser.add_argument("--dst_path", required=True, help="where the converted file goes (.safetensors)")
    parser.add_argument("--to", choices=("diffusers", "sd-scripts"), default=None,
                        help="target layout (default: the other one than the source's)")
    parser.add_argument("--save_precision", choices=PRECISIONS, default=None,
                        help="store the tensors as float, fp16 or bf16 (default: as in the source)")
    return parser


def run(ns: argparse.Namespace) -> None:
    import torch

    from networks.convert import convert_file

    dtype = {None: None, "float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[ns.save_precision]
    layout, count = convert_file(ns.src_path, ns.dst_path, ns.to, dtype)
    print(f"wrote {ns.dst_path} ({layout} layout, {count} tensors)")


def main(argv: list[str] | None = None) -> int:
    from library.cli import run_command

    ns = build_parser().parse_args(argv)
    return run_command(lambda: run(ns))


if __name__ == "__main__":
    sys.exit(main())
