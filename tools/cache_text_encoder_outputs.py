"""Encode every training caption (and its augmented variants) ahead of training (same flags as the trainers).

    python tools/cache_text_encoder_outputs.py --pretrained_model_name_or_path sd3.5_medium.safetensors \
        --t5xxl t5xxl_fp16.safetensors --tokenizer_cache_dir tokenizers --dataset_config dataset.toml \
        --shuffle_caption --caption_variants 8

Writes `<stem>_sd3_te.npz` beside each image, keyed by the processed caption texts, token length,
mask flags and encoder identity: editing a caption re-encodes just that image. With caption
shuffling or tag dropout, K variants per image are cached and training draws one per step.
"""

from __future__ import annotations

import argparse
import dataclasses
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
    return parser


def run(ns: argparse.Namespace) -> None:
    from library.cli import data as data_flags
    from library.cli import models as model_flags
    from library.data.dataset import TrainingData
    from library.models.text_encoders import load_text_encoders
    from library.models.tokenizers import load_tokenizers
    from library.training.caching import cache_text_outputs, file_identity, identity_of, process_shard, summary_lines

    blueprint = data_flags.dataset_blueprint(ns)
    ckpt = model_flags.checkpoint_path(ns)
    dev = model_flags.device(ns)
    dtype = model_flags.weight_dtype(ns, dev)
    identity = identity_of(clip_l=file_identity(ns.clip_l or ckpt), clip_g=file_identity(ns.clip_g or ckpt),
                           t5=file_identity(ns.t5xxl or ckpt), dtype=str(dtype))
    options = data_flags.cache_options(ns, encoder_identity=identity, t5_max_length=ns.t5xxl_max_token_length,
                                       apply_lg_attn_mask=ns.apply_lg_attn_mask, apply_t5_attn_mask=ns.apply_t5_attn_mask)
    options = dataclasses.replace(options, cache_text_encoder_outputs=True, cache_dir=None)
    data = TrainingData(blueprint, options, seed=ns.seed or 0)
    encoders = load_text_encoders(ckpt, ns.clip_l, ns.clip_g, ns.t5xxl, dtype=dtype, device=dev,
                                  mmap=not ns.disable_mmap_load_safetensors)
    tokenizers = load_tokenizers(ns.tokenizer_cache_dir, t5_max_length=ns.t5xxl_max_token_length)
    batch = ns.text_encoder_batch_size or 8
    summary = cache_text_outputs(data, encoders, tokenizers, batch_size=batch, shard=process_shard())
    print("\n".join(summary_lines("text-encoder outputs", data, summary)))

def main(argv: list[str] | None = None) -> int:
    from library.cli import run_command

    ns = build_parser().parse_args(argv)
    return run_command(lambda: run(ns))


if __name__ == "__main__":
    sys.exit(main())
