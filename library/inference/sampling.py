"""Prompt embeddings -> latents: initial noise, classifier-free and skip-layer guidance, samplers.

Used by ``sd3_minimal_inference.py`` and by sample images during training. The guidance matches
diffusers' StableDiffusion3Pipeline: one batched forward for [uncond, cond], v = v_u + g·(v_c − v_u),
and with skip-layer guidance active on steps i with N·start < i < N·stop, + (v_c − v_skip)·scale.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch

from library.flow.samplers import VelocityFn, sample
from library.flow.schedules import make_sigmas
from library.models.prompt_encoding import Conditioning

LATENT_CHANNELS = 16
VAE_SCALE = 8


class _Embeds(NamedTuple):
    context: torch.Tensor
    pooled: torch.Tensor
    mask: torch.Tensor | None


def _embeds(cond: Conditioning, use_mask: bool) -> _Embeds:
    return _Embeds(cond.context, cond.pooled, cond.context_mask if use_mask else None)


@dataclass(frozen=True)
class SamplingParams:
    width: int = 1024
    height: int = 1024
    steps: int = 28
    cfg_scale: float = 5.0
    shift: float = 3.0
    sampler: str = "euler"
    scheduler: str = "normal"
    seed: int = 0
    slg_layers: tuple[int, ...] = field(default_factory=tuple)
    slg_scale: float = 0.0
    slg_start: float = 0.01
    slg_stop: float = 0.2
    # Mask padded text tokens inside the MMDiT's attention (off, as every reference runs unmasked).
    mmdit_attn_mask: bool = False


def initial_noise(batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    """float32 noise (B, 16, H/8, W/8) drawn on the CPU exactly as diffusers does with
    ``generator=torch.Generator("cpu").manual_seed(seed)``."""
    if height % (VAE_SCALE * 2) or width % (VAE_SCALE * 2):
        raise ValueError(f"width and height must be multiples of 16, got {width}x{height}")
    gen = torch.Generator("cpu").manual_seed(seed)
    return torch.randn((batch, LATENT_CHANNELS, height // VAE_SCALE, width // VAE_SCALE), generator=gen)


def slg_active(step: int, steps: int, start: float, stop: float) -> bool:
    """Skip-layer guidance runs on steps strictly inside (steps·start, steps·stop)."""
    return steps * start < step < steps * stop


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def guided_velocity(
    model: torch.nn.Module,
    cond: Conditioning,
    uncond: Conditioning | None,
    params: SamplingParams,
    compute_dtype: torch.dtype | None = None,
) -> VelocityFn:
    """The velocity callable for :func:`library.flow.samplers.sample` with CFG (and SLG).

    Runs under autocast to ``compute_dtype`` (default: the model's weight dtype) unless float32.
    """
    use_cfg = uncond is not None and params.cfg_scale != 1.0
    dtype = compute_dtype or next(model.parameters()).dtype
    c = _embeds(cond, params.mmdit_attn_mask)
    if use_cfg:
        u = _embeds(uncond, params.mmdit_attn_mask)
        both = _Embeds(torch.cat([u.context, c.context]), torch.cat([u.pooled, c.pooled]),
                       None if c.mask is None else torch.cat([u.mask, c.mask]))

    def run(x: torch.Tensor, sigma: torch.Tensor, e: _Embeds, skip: Sequence[int] | None = None) -> torch.Tensor:
        t = (sigma * 1000).float().expand(x.shape[0])
        with _autocast(x.device, dtype):
            return model(x, t, e.context, e.pooled, skip_layers=skip, context_mask=e.mask).float()

    def velocity(x: torch.Tensor, sigma: torch.Tensor, step: int) -> torch.Tensor:
        if not use_cfg:
            return run(x, sigma, c)
        v_u, v_c = run(torch.cat([x, x]), sigma, both).chunk(2)
        v = v_u + params.cfg_scale * (v_c - v_u)
        if params.slg_layers and params.slg_scale and slg_active(step, params.steps, params.slg_start, params.slg_stop):
            v = v + (v_c - run(x, sigma, c, params.slg_layers)) * params.slg_scale
        return v

    return velocity


@torch.no_grad()
def sample_latents(
    model: torch.nn.Module,
    cond: Conditioning,
    uncond: Conditioning | None,
    params: SamplingParams,
    noise: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Run the sampler from seeded noise (or ``noise``) to final latents (float32, model device)."""
    device = cond.context.device
    if noise is None:
        noise = initial_noise(cond.context.shape[0], params.height, params.width, params.seed)
    sigmas = make_sigmas(params.scheduler, params.steps, params.shift)
    gen = torch.Generator("cpu").manual_seed(params.seed + 1)  # ancestral noise, separate stream
    fn = guided_velocity(model, cond, uncond, params, compute_dtype)
    return sample(fn, noise.to(device), sigmas, params.sampler, generator=gen)
