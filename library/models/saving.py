"""Writing SD3/SD3.5 single-file checkpoints in Stability AI's layout.

The file holds ``model.diffusion_model.*`` (the MMDiT, pos_embed included), the VAE tensors
``first_stage_model.*`` exactly as they were read, and optionally the text encoders under
``text_encoders.*``. Our MMDiT config rides along in the metadata so that miniature models
(which break the heads = depth rule) load back without guessing.
"""

from __future__ import annotations

import os
from typing import Mapping

import torch

from library.models.mmdit_config import MMDIT_CONFIG_METADATA_KEY, MMDIT_PREFIX, MMDiTConfig
from library.models.safetensors_io import save_safetensors

VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "text_encoders."


def _cast(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return dict(tensors)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


def checkpoint_tensors(
    mmdit_state_dict: Mapping[str, torch.Tensor],
    *,
    vae_tensors: Mapping[str, torch.Tensor] | None = None,
    text_encoder_tensors: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint with their SAI keys. ``dtype`` applies to the MMDiT and text
    encoders; the VAE (already prefixed ``first_stage_model.``) passes through unchanged."""
    out = {MMDIT_PREFIX + k: v for k, v in _cast(mmdit_state_dict, dtype).items()}
    for key in vae_tensors or {}:
        if not key.startswith(VAE_PREFIX):
            raise ValueError(f"VAE tensor {key!r} lacks the {VAE_PREFIX!r} prefix")
    out.update(vae_tensors or {})
    for key in text_encoder_tensors or {}:
        if not key.startswith(TEXT_ENCODER_PREFIX):
            raise ValueError(f"text encoder tensor {key!r} lacks the {TEXT_ENCODER_PREFIX!r} prefix")
    out.update(_cast(text_encoder_tensors or {}, dtype))
    return out


def save_sd3_checkpoint(
    path: str | os.PathLike,
    mmdit_state_dict: Mapping[str, torch.Tensor],
    cfg: MMDiTConfig,
    *,
    metadata: Mapping[str, str],
    vae_tensors: Mapping[str, torch.Tensor] | None = None,
    text_encoder_tensors: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Write a single-file checkpoint atomically. ``metadata`` comes from ``modelspec_metadata``
    (or from the file being re-saved); the MMDiT config key is added here."""
    tensors = checkpoint_tensors(
        mmdit_state_dict, vae_tensors=vae_tensors, text_encoder_tensors=text_encoder_tensors, dtype=dtype
    )
    meta = dict(metadata)
    meta[MMDIT_CONFIG_METADATA_KEY] = cfg.to_json()
    save_safetensors(tensors, path, meta)
