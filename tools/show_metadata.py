"""Show what a .safetensors file is: model variant or network type and ranks, and its training settings.

    python tools/show_metadata.py my_lora.safetensors [more files] [--all] [--json]

Reads the header only (plus the scalar `alpha` tensors of network files), so checkpoints of any size
are described instantly. Works for full checkpoints (SAI single file or bare MMDiT), LoRA/LoKr files
(sd-scripts / LyCORIS keys), diffusers LoRAs, and separate CLIP / T5 / VAE files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_parser() -> argparse.ArgumentParser:
    from library.cli import ArgumentParser

    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", type=Path, nargs="+", help=".safetensors files")
    p.add_argument("--all", action="store_true", help="also print every metadata key and value")
    p.add_argument("--full", action="store_true", help="with --all: do not shorten long values")
    p.add_argument("--json", action="store_true", help="print one JSON object per file instead of text")
    return p


def read_alphas(path: Path, keys: list[str]) -> dict[str, float]:
    """The scalar ``alpha`` tensors of a network file (a few bytes each)."""
    from safetensors import safe_open

    from library.errors import UserError

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: float(f.get_tensor(k).float()) for k in keys}
    except Exception as exc:  # safetensors raises its own error types for corrupt data
        raise UserError(f"{path}: could not read the alpha tensors ({exc}); re-save the file") from None


def show(path: Path, ns: argparse.Namespace) -> None:
    from library.models.file_info import describe, file_summary
    from library.models.safetensors_io import read_header

    header = read_header(path, "safetensors file")
    alpha_keys = [k for k, v in header.items() if k.endswith(".alpha") and k != "__metadata__" and len(v["shape"]) <= 1]
    summary = file_summary(header, read_alphas(path, alpha_keys) if alpha_keys else {})
    metadata = header.get("__metadata__") or {}
    if ns.json:
        print(json.dumps({"file": str(path), **summary, **({"metadata": metadata} if ns.all else {})}, sort_keys=True))
        return
    print(f"== {path}")
    print("\n".join(describe(summary)))
    if ns.all:
        for key in sorted(metadata):
            value = metadata[key]
            shown = value if ns.full or len(value) <= 200 else f"{value[:200]}... ({len(value)} chars)"
            print(f"  {key} = {shown}")


def run(ns: argparse.Namespace) -> None:
    for path in ns.files:
        show(path, ns)


def main(argv: list[str] | None = None) -> int:
    from library.cli import run_command

    ns = build_parser().parse_args(argv)
    return run_command(lambda: run(ns))


if __name__ == "__main__":
    sys.exit(main())
