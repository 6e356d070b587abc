"""A generation job: many prompts, batched, seeded per image, written as PNGs (and latents).

Every unique prompt and negative prompt is encoded once up front, so the text encoders can be
freed before sampling. Image k of a prompt uses seed ``seed + k`` and its own noise draw, so an
image is reproducible from the seed in its metadata whatever the batch size.
"""

from __future__ import annotations

import datetime
import logging
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch

from library.errors import UserError
from library.inference.images import format_parameters, save_png
from library.inference.pipeline import MODEL_DEFAULTS, ModelSet, encode, render
from library.inference.prompts import PromptSpec
from library.inference.sampling import SamplingParams, initial_noise
from library.models.prompt_encoding import Conditioning
from library.models.safetensors_io import save_safetensors

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationJob:
    prompts: tuple[PromptSpec, ...]
    defaults: SamplingParams  # seed < 0 means "pick one at random"
    output_dir: Path
    negative_prompt: str = ""
    batch_size: int = 1
    images_per_prompt: int = 1
    output_latents: Path | None = None
    model_name: str = ""


def model_default_params(variant: str, shift: float | None, cfg_scale: float | None, base: SamplingParams) -> SamplingParams:
    """Fill unset shift / CFG scale from the detected model's inference defaults."""
    defaults = MODEL_DEFAULTS.get(variant, MODEL_DEFAULTS["sd3-medium"])
    return replace(base, shift=defaults["shift"] if shift is None else shift,
                   cfg_scale=defaults["cfg_scale"] if cfg_scale is None else cfg_scale)


def params_for(spec: PromptSpec, defaults: SamplingParams) -> SamplingParams:
    """The job defaults overridden by a prompt line's inline options."""
    overrides = {"width": spec.width, "height": spec.height, "steps": spec.steps, "seed": spec.seed,
                 "cfg_scale": spec.cfg_scale, "sampler": spec.sampler, "shift": spec.shift}
    params = replace(defaults, **{k: v for k, v in overrides.items() if v is not None})
    if params.seed < 0:
        params = replace(params, seed=random.randint(0, 2**31 - 1))
    validate_params(params)
    return params


def validate_params(params: SamplingParams) -> None:
    from library.flow.samplers import SAMPLERS
    from library.flow.schedules import SCHEDULES

    if params.width % 16 or params.height % 16 or params.width <= 0 or params.height <= 0:
        raise UserError(f"width and height must be positive multiples of 16, got {params.width}x{params.height}")
    if params.sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {params.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if params.scheduler not in SCHEDULES:
        raise UserError(f"unknown scheduler {params.scheduler!r}; choose one of {', '.join(SCHEDULES)}")
    if params.steps < 1:
        raise UserError(f"steps must be at least 1, got {params.steps}")


def _rows(table: dict[str, Conditioning], texts: Sequence[str]) -> Conditioning:
    parts = [table[t] for t in texts]

    def cat(name: str) -> torch.Tensor | None:
        values = [getattr(p, name) for p in parts]
        return None if values[0] is None else torch.cat(values)

    return Conditioning(cat("context"), cat("pooled"), cat("clip_l_mask"), cat("clip_g_mask"), cat("t5_mask"))


def encode_all(models: ModelSet, texts: Sequence[str], chunk: int = 8) -> dict[str, Conditioning]:
    """{text: Conditioning with batch 1} for every unique text, encoded in chunks."""
    unique = list(dict.fromkeys(texts))
    table: dict[str, Conditioning] = {}
    for start in range(0, len(unique), chunk):
        group = unique[start:start + chunk]
        cond = encode(models, group)
        for i, text in enumerate(group):
            pick = slice(i, i + 1)
            table[text] = Conditioning(cond.context[pick], cond.pooled[pick],
                                       *(None if m is None else m[pick] for m in (cond.clip_l_mask, cond.clip_g_mask, cond.t5_mask)))
    return table


def _settings(params: SamplingParams, seed: int, model_name: str) -> dict[str, object]:
    settings: dict[str, object] = {"Steps": params.steps, "Sampler": params.sampler, "Schedule type": params.scheduler,
                                   "CFG scale": params.cfg_scale, "Shift": params.shift, "Seed": seed,
                                   "Size": f"{params.width}x{params.height}", "Model": model_name}
    if params.slg_layers and params.slg_scale:
        settings["SLG"] = f"layers {list(params.slg_layers)} scale {params.slg_scale} ({params.slg_start}-{params.slg_stop})"
    return settings


def run_job(models: ModelSet, job: GenerationJob, table: dict[str, Conditioning] | None = None) -> list[Path]:
    """Render every prompt of ``job``; returns the PNG paths. ``table`` holds pre-encoded texts."""
    plans = [(spec, params_for(spec, job.defaults)) for spec in job.prompts]
    negatives = [spec.negative_prompt or job.negative_prompt for spec in job.prompts]
    table = table if table is not None else encode_all(models, [s.prompt for s in job.prompts] + negatives)
    stamp = datetime.datetime.now().strftime("%Y%m%d%H%M%S")
    written, latents_out, counter = [], {}, 0
    for (spec, params), negative in zip(plans, negatives):
        seeds = [params.seed + k for k in range(job.images_per_prompt)]
        for start in range(0, len(seeds), job.batch_size):
            batch = seeds[start:start + job.batch_size]
            noise = torch.cat([initial_noise(1, params.height, params.width, s) for s in batch])
            cond = _rows(table, [spec.prompt] * len(batch))
            uncond = _rows(table, [negative] * len(batch))
            latents, images = render(models, cond, uncond, replace(params, seed=batch[0]), noise)
            for seed, image, latent in zip(batch, images, latents):
                text = format_parameters(spec.prompt, negative, _settings(params, seed, job.model_name))
                written.append(save_png(image, job.output_dir / f"{stamp}_{counter:04d}_{seed}.png", text))
                latents_out[f"latents_{counter:04d}"] = latent.unsqueeze(0)
                counter += 1
                logger.info("wrote %s", written[-1])
    if job.output_latents is not None:
        save_safetensors(latents_out, job.output_latents, {"format": "sd3 latents (B, 16, H/8, W/8), before VAE decode"})
    return written
