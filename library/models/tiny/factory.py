"""One call that writes a complete miniature SD3 model set in the real file formats.

For a variant it writes ``<variant>.safetensors`` (all-in-one: MMDiT, VAE, CLIP-L, CLIP-G, T5),
the separate ``clip_l``/``clip_g``/``t5xxl.safetensors`` files with HF key names (as ComfyUI ships
them), and ``tokenizers/`` in ``save_pretrained`` layout. Deterministic by seed, offline, seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from library.models.mmdit_config import VARIANTS, MMDiTConfig
from library.models.modelspec import modelspec_metadata
from library.models.saving import VAE_PREFIX, save_sd3_checkpoint
from library.models.tiny.mmdit import tiny_mmdit_config, tiny_mmdit_state_dict
from library.models.tiny.text import tiny_text_encoder_checkpoint, write_tiny_text_encoder_files
from library.models.tiny.tokenizers import write_tiny_tokenizers
from library.models.tiny.vae import tiny_vae_ldm_state_dict, tiny_vae_metadata

FIXED_DATE = "2026-01-01T00:00:00"


@dataclass(frozen=True)
class TinyModelFiles:
    variant: str
    config: MMDiTConfig
    checkpoint: Path
    clip_l: Path
    clip_g: Path
    t5xxl: Path
    tokenizer_dir: Path


def make_tiny_model(
    out_dir: str | Path,
    variant: str = "sd35-medium",
    seed: int = 0,
    *,
    heads_equal_depth: bool = False,
    dtype: torch.dtype | None = None,
) -> TinyModelFiles:
    """Write a miniature ``variant`` model set under ``out_dir`` and return the paths."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = tiny_mmdit_config(variant, heads_equal_depth=heads_equal_depth)
    te_tensors, te_metadata = tiny_text_encoder_checkpoint(seed)
    vae = {VAE_PREFIX + k: v for k, v in tiny_vae_ldm_state_dict(seed).items()}
    metadata = modelspec_metadata(cfg, title=f"tiny {variant}", resolution=cfg.pos_embed_base_size * 16, date=FIXED_DATE)
    metadata.update(te_metadata)
    metadata.update(tiny_vae_metadata())
    checkpoint = out / f"{variant}.safetensors"
    save_sd3_checkpoint(checkpoint, tiny_mmdit_state_dict(cfg, seed), cfg, metadata=metadata,
                        vae_tensors=vae, text_encoder_tensors=te_tensors, dtype=dtype)
    separate = write_tiny_text_encoder_files(out, seed, dtype)
    separate["all_in_one"].unlink()  # the checkpoint above already holds them
    tokenizers = write_tiny_tokenizers(out / "tokenizers", seed)
    return TinyModelFiles(variant, cfg, checkpoint, separate["clip_l"], separate["clip_g"], separate["t5xxl"], tokenizers)
