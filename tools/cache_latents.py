"""Encode every training image to latents ahead of training (same flags as the trainers).

    python tools/cache_latents.py --pretrained_model_name_or_path sd3.5_medium.safetensors \
        --dataset_config dataset.toml --vae_batch_size 4

Caches go beside the images (`<stem>_<W>x<H>_sd3.npz`, readable by sd-scripts) and record what they
were made from, so a later run re-encodes only changed images. Under `accelerate launch` each
process takes its share of the images. `--debug_dataset` prints the buckets and writes a contact
sheet instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))



def build_parser() -> argparse.ArgumentParser:
    from library.cli import data, models

    from library.cli import ArgumentParser

    parser = ArgumentParser(description=__doc__.splitlines()[0])
    models.add_model_flags(parser)
    data.add_dataset_flags(parser)
    data.add_cache_flags(parser)
    parser.add_argument("--output_dir", type=Path, default=Path("outputs"), help="where --debug_dataset writes")
    return parser


def run(ns: argparse.Namespace) -> None:
    import dataclasses

    import torch

    from library.cli import data as data_flags
    from library.cli import models as model_flags
    from library.data.dataset import TrainingData
    from library.models.vae import load_vae
    from library.training.caching import cache_latents, file_identity, process_shard, summary_lines

    blueprint = data_flags.dataset_blueprint(ns)
    if ns.debug_dataset:
        from library.data.debug_view import write_debug_view

        report, png = write_debug_view(TrainingData(blueprint, seed=ns.seed or 0), ns.output_dir)
        print(report, f"\ncontact sheet: {png}", sep="\n")
        return
    ckpt = model_flags.checkpoint_path(ns)
    dev = model_flags.device(ns)
    vae_dtype = torch.bfloat16 if ns.mixed_precision == "bf16" else torch.float32
    vae_source = ns.vae or ckpt
    options = data_flags.cache_options(ns, vae_identity=file_identity(vae_source, str(vae_dtype)))
    options = dataclasses.replace(options, cache_latents=True, cache_dir=None)  # this tool writes beside images
    data = TrainingData(blueprint, options, seed=ns.seed or 0)
    vae = load_vae(vae_source, dtype=vae_dtype, device=dev, mmap=not ns.disable_mmap_load_safetensors)
    summary = cache_latents(data, vae, batch_size=ns.vae_batch_size, shard=process_shard())
    print("\n".join(summary_lines("latents", data, summary)))

def main(argv: list[str] | None = None) -> int:
    from library.cli import run_command

    ns = build_parser().parse_args(argv)
    return run_command(lambda: run(ns))


if __name__ == "__main__":
    sys.exit(main())
