"""One training step's math: batch -> (noisy input, σ, conditioning) -> model -> flow-matching loss.

Shared by the full fine-tune and the network trainer. σ, timesteps, noise and the loss are float32
whatever the autocast dtype (DESIGN §4); the model runs under the caller's autocast. Encoder outputs
come from the text cache (dropped captions take the empty prompt's outputs, encoder dropout zeroes
whole encoders per sample) or from live encoders for trainers that train them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping

import torch

from library.data.dataset import BatchData
from library.flow.loss import LossSpec, flow_matching_loss_per_sample, noisy_input
from library.flow.timesteps import TimestepSpec, sample_sigmas, sigma_to_timesteps
from library.models.prompt_encoding import Conditioning, EncoderOutputs, TextLayout, apply_dropout, assemble_conditioning
from library.training.caching import encoder_outputs_from_cache, substitute_dropped, training_latents


@dataclass(frozen=True)
class StepSettings:
    timesteps: TimestepSpec = field(default_factory=TimestepSpec)
    loss: LossSpec = field(default_factory=LossSpec)
    masked_loss: bool = False
    clip_l_dropout_rate: float = 0.0
    clip_g_dropout_rate: float = 0.0
    t5_dropout_rate: float = 0.0
    t5_max_length: int = 256
    apply_lg_attn_mask: bool = False
    apply_t5_attn_mask: bool = False


@dataclass
class StepResult:
    loss: torch.Tensor  # scalar float32, the value to backpropagate
    per_sample: torch.Tensor  # (B,) float32, detached
    sigmas: torch.Tensor  # (B,) float32


LatentEncoder = Callable[[torch.Tensor], torch.Tensor]  # images (B,3,H,W) -> raw VAE latents
TextEncoderFn = Callable[[list[str]], EncoderOutputs]  # live captions -> per-encoder outputs


def batch_latents(batch: BatchData, encode_images: LatentEncoder | None, device: torch.device) -> torch.Tensor:
    """MMDiT-space latents x0 (B, 16, h, w) float32: cached, or encoded now from the batch's images."""
    if batch.latents is not None:
        raw = batch.latents
    elif encode_images is None:
        raise RuntimeError("batch has images but no VAE encoder was given (latents are not cached)")
    else:
        with torch.no_grad():
            raw = encode_images(batch.images)
    return training_latents(raw.to(device=device, dtype=torch.float32))


def batch_encoder_outputs(
    batch: BatchData, empty_text: Mapping[str, torch.Tensor] | None, encode_text: TextEncoderFn | None
) -> EncoderOutputs:
    """Per-encoder outputs of the batch's captions: from the cache (dropped captions -> empty prompt)
    or from live encoders (which see ``""`` for a dropped caption anyway)."""
    cached = None
    if batch.text is not None:
        text = batch.text if empty_text is None else substitute_dropped(batch.text, batch.captions, empty_text)
        cached = encoder_outputs_from_cache(text)
        if cached.clip_l is not None or encode_text is None:
            return cached
    if encode_text is None:
        raise RuntimeError("captions are not cached and no text encoder was given")
    live = encode_text(batch.captions)
    if cached is None:
        return live
    return replace(live, t5=cached.t5, t5_mask=cached.t5_mask)  # --use_t5xxl_cache_only: CLIP live, T5 cached


def conditioning(
    outputs: EncoderOutputs, layout: TextLayout, settings: StepSettings, device: torch.device,
    generator: torch.Generator | None = None,
) -> Conditioning:
    """Encoder dropout per sample (zeros), then the MMDiT's (context, pooled)."""
    rates = (settings.clip_l_dropout_rate, settings.clip_g_dropout_rate, settings.t5_dropout_rate)
    if any(rates):
        outputs = apply_dropout(outputs, clip_l=rates[0] or None, clip_g=rates[1] or None, t5=rates[2] or None,
                                generator=generator)
    return assemble_conditioning(outputs, layout, t5_length=settings.t5_max_length,
                                 apply_lg_attn_mask=settings.apply_lg_attn_mask,
                                 apply_t5_attn_mask=settings.apply_t5_attn_mask, device=device)


def flow_step(
    model: torch.nn.Module,
    x0: torch.Tensor,
    cond: Conditioning,
    settings: StepSettings,
    *,
    loss_weights: torch.Tensor | None = None,
    masks: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> StepResult:
    """σ ~ density, x_σ = (1 − σ)·x0 + σ·ε, v̂ = model(x_σ, σ·1000, context, y), loss (float32)."""
    device = x0.device
    sigmas = sample_sigmas(x0.shape[0], settings.timesteps, generator=generator, device=device)
    gen_device = generator.device if generator is not None else device
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32, device=gen_device).to(device)
    x_sigma = noisy_input(x0, noise, sigmas)
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with ctx:
        pred = model(x_sigma, sigma_to_timesteps(sigmas), cond.context, cond.pooled)
    per_sample = flow_matching_loss_per_sample(
        pred.float(), x0, noise, sigmas, settings.loss,
        mask=masks if settings.masked_loss else None,
        sample_weights=None if loss_weights is None else loss_weights.to(device),
    )
    return StepResult(per_sample.mean(), per_sample.detach(), sigmas)
