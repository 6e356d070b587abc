"""Write a miniature SD3 / SD3.5 model set (random weights, real file formats) for tests and demos.

    python tools/make_tiny_model.py --variant sd35-medium --output_dir tiny_models/sd35m
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.errors import UserError  # noqa: E402
from library.models.mmdit_config import VARIANTS  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from library.cli import ArgumentParser

    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS, default="sd35-medium")
    parser.add_argument("--output_dir", required=True, help="folder for the checkpoint, encoders and tokenizers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heads_equal_depth", action="store_true", help="use the real head rule (heads = depth, 64 wide)")
    args = parser.parse_args(argv)
    from library.models.tiny.factory import make_tiny_model

    start = time.perf_counter()
    try:
        files = make_tiny_model(args.output_dir, args.variant, args.seed, heads_equal_depth=args.heads_equal_depth)
    except (UserError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {files.variant} miniature to {Path(args.output_dir)} in {time.perf_counter() - start:.1f} s:")
    for name in ("checkpoint", "clip_l", "clip_g", "t5xxl", "tokenizer_dir"):
        print(f"  {name}: {getattr(files, name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
