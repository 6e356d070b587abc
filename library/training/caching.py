"""Filling the data caches with the models: the encode callables the data layer asks for.

``library/data`` never sees a model; here the VAE and text encoders become plain callables
(images -> raw latents, captions -> per-encoder outputs) and the cache orchestration runs with them.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from library.data.cache_io import CacheSummary
from library.data.dataset import TrainingData
from library.data.latent_cache import encode_missing_latents
from library.data.te_cache import encode_missing_te
from library.models.prompt_encoding import EncoderOutputs, encode_tokens, tokenize_prompts
from library.models.text_encoders import TextEncoders
from library.models.tokenizers import Tokenizers
from library.models.vae import SD3VAE, latents_from_vae_space, sample_posterior

logger = logging.getLogger(__name__)

_OUTPUT_FIELDS = ("clip_l", "clip_l_pooled", "clip_g", "clip_g_pooled", "t5", "clip_l_mask", "clip_g_mask", "t5_mask")


def file_identity(path: str | os.PathLike | None, extra: str = "") -> str:
    """A cheap identity of a model file (name, size, mtime) plus ``extra`` (e.g. the dtype)."""
    if path is None:
        return f"none{extra}"
    stat = Path(path).stat()
    raw = f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{extra}"
    return hashlib.sha1(raw.encode()).hexdigest()[:16]


def vae_encode_fn(vae: SD3VAE, generator: torch.Generator | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """images (B, 3, H, W) in [-1, 1] -> raw posterior samples (B, 16, H/8, W/8), as sd-scripts caches them."""

    @torch.no_grad()
    def encode(images: torch.Tensor) -> torch.Tensor:
        mean, logvar = vae.encode_moments(images)
        return sample_posterior(mean, logvar, generator).cpu()

    return encode


def training_latents(raw: torch.Tensor) -> torch.Tensor:
    """Raw cached VAE latents -> MMDiT latents ((z − 0.0609)·1.5305)."""
    return latents_from_vae_space(raw)


def text_encode_fn(
    encoders: TextEncoders, tokenizers: Tokenizers, *, t5_max_length: int, apply_t5_attn_mask: bool = False,
    parts: Sequence[str] = ("lg", "t5"),
) -> Callable[[list[str]], list[dict[str, torch.Tensor]]]:
    """captions -> one dict of per-encoder outputs (no batch dim) per caption, for the TE cache."""
    wanted = {"lg": ("clip_l", "clip_l_pooled", "clip_g", "clip_g_pooled", "clip_l_mask", "clip_g_mask"),
              "t5": ("t5", "t5_mask")}
    keep = {name for part in parts for name in wanted[part]}

    @torch.no_grad()
    def encode(captions: list[str]) -> list[dict[str, torch.Tensor]]:
        tokens = tokenize_prompts(tokenizers, captions, t5_max_length=t5_max_length)
        out = encode_tokens(encoders, tokens, apply_t5_attn_mask=apply_t5_attn_mask)
        rows = []
        for i in range(len(captions)):
            row = {}
            for name in _OUTPUT_FIELDS:
                value = getattr(out, name)
                if name in keep and value is not None:
                    row[name] = value[i].cpu()
            rows.append(row)
        return rows

    return encode


def empty_prompt_text(encode: Callable[[list[str]], list[dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """The encoder outputs of the empty caption, computed once while the encoders are loaded."""
    return encode([""])[0]


def substitute_dropped(text: Mapping[str, torch.Tensor], captions: Sequence[str],
                       empty: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rows whose caption was dropped (``""``) take the empty caption's cached outputs."""
    dropped = [i for i, c in enumerate(captions) if c == ""]
    out = {k: v.clone() if dropped else v for k, v in text.items()}
    for name, value in out.items():
        for i in dropped:
            value[i] = empty[name].to(value.dtype)
    return out


def encoder_outputs_from_cache(text: Mapping[str, torch.Tensor]) -> EncoderOutputs:
    """Stacked cached outputs (B, ...) -> EncoderOutputs (missing parts are None)."""
    return EncoderOutputs(**{name: text.get(name) for name in _OUTPUT_FIELDS})


def cache_latents(data: TrainingData, vae: SD3VAE, *, batch_size: int, generator: torch.Generator | None = None,
                  progress: bool = True, shard: tuple[int, int] = (0, 1)) -> CacheSummary:
    """Encode the images whose latent cache is missing or stale; ``shard`` = (rank, world size)."""
    items = data.latent_cache_items()[shard[0]::shard[1]]
    summary = encode_missing_latents(items, vae_encode_fn(vae, generator), data.load_for_cache,
                                     batch_size=batch_size, progress=progress,
                                     trust_foreign=data.cache.skip_cache_check)
    _report("latents", summary)
    return summary


def cache_text_outputs(data: TrainingData, encoders: TextEncoders, tokenizers: Tokenizers, *, batch_size: int,
                       progress: bool = True, shard: tuple[int, int] = (0, 1)) -> CacheSummary:
    """Encode the caption variants of images whose text cache is missing or stale."""
    fn = text_encode_fn(encoders, tokenizers, t5_max_length=data.cache.t5_max_length,
                        apply_t5_attn_mask=data.cache.apply_t5_attn_mask, parts=data.cache.te_parts)
    summary = encode_missing_te(data.te_cache_items()[shard[0]::shard[1]], fn, batch_size=batch_size, progress=progress,
                                trust_foreign=data.cache.skip_cache_check)
    _report("text-encoder outputs", summary)
    return summary


def process_shard() -> tuple[int, int]:
    """(rank, world size) under ``accelerate launch`` / torchrun, else (0, 1)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def summary_lines(what: str, data: TrainingData, summary: CacheSummary) -> list[str]:
    """What a cache tool prints: counts, then each skipped image with its reason."""
    failed = {**dict(data.skipped), **summary.failed}
    lines = [f"{what}: {summary.encoded} encoded, {summary.reused} up to date, {len(failed)} failed"]
    return lines + [f"  skipped {path}: {reason}" for path, reason in failed.items()]


def _report(what: str, summary: CacheSummary) -> None:
    logger.info("cached %s: %d encoded, %d reused, %d failed", what, summary.encoded, summary.reused, len(summary.failed))
    for path, reason in list(summary.failed.items())[:20]:
        logger.warning("skipped %s: %s", path, reason)


def identity_of(**parts: Any) -> str:
    """A stable identity string from named parts (paths, dtypes, flags)."""
    return hashlib.sha1(repr(sorted(parts.items())).encode()).hexdigest()[:16]
