"""Render the same prompts and seeds with every checkpoint or LoRA/LoKr file of a folder into one grid.

    python tools/compare_checkpoints.py --checkpoint_dir out --ckpt_path sd3.5_medium.safetensors \
        --t5xxl t5xxl_fp16.safetensors --tokenizer_cache_dir tokenizers --prompt_file prompts.txt \
        --width 512 --height 512 --steps 28 --seed 42 --bf16

Rows are the prompts, columns the files in the order they were saved (by step, then epoch), each
labelled with its file name and step. Full checkpoints render with their own weights; network files
are applied one at a time to --ckpt_path. The grid goes to CHECKPOINT_DIR/compare_grid.png (--output).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _network_attacher(multiplier: float, device: str):
    """attach(models, path) for library.inference.compare: hook a network in, return its unhook."""

    def attach(models, path: Path):
        from networks.apply import load_network

        network = load_network(str(path), multiplier, models.encoders, models.mmdit)
        network.to(device)
        network.apply_to()
        return network.restore

    return attach


def run(ns: argparse.Namespace) -> None:
    from dataclasses import replace

    from library.cli import compare as cli
    from library.cli import inference as inference_cli
    from library.inference.compare import compare_checkpoints, find_checkpoints
    from library.inference.run import validate_params

    job = cli.compare_job(ns)
    validate_params(replace(job.defaults, cfg_scale=1.0, shift=1.0))
    sources, options = cli.model_sources(ns), inference_cli.load_options(ns)
    candidates = find_checkpoints(ns.checkpoint_dir, ns.pattern)
    print("columns: " + ", ".join(c.path.name for c in candidates))
    attach = _network_attacher(ns.network_multiplier, options.device)
    print(compare_checkpoints(candidates, sources, options, job, attach))


def main(argv: list[str] | None = None) -> int:
    from library.cli import compare as cli
    from library.cli import run_command

    ns = cli.compare_parser().parse_args(argv)
    return run_command(lambda: run(ns))


if __name__ == "__main__":
    sys.exit(main())
