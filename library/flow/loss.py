"""The flow-matching training loss, all in float32 whatever the caller's autocast.

Noisy input x_σ = (1 − σ)·x0 + σ·ε, velocity target v = ε − x0, prediction v̂ = model(x_σ, σ·1000, …).

Objectives (``--model_prediction_type``) give the residual r = prediction − target that the loss
type is applied to:
  sd3  sd-scripts' SD3 objective: x̂0 = x_σ − σ·v̂ compared with x0. Algebraically
       x̂0 − x0 = σ·(v − v̂), which is how it is computed (no cancellation between x_σ and x0, exact
       zero and zero gradient at σ = 0); with l2 it is σ² times the velocity loss.
  raw  the plain velocity loss, r = v̂ − v.

Loss types (per element, of r; c is the per-sample Huber threshold):
  l2         r²
  l1         |r|
  huber      2c·(√(r² + c²) − c)      sd-scripts' pseudo-Huber: ≈ r² for |r| ≪ c, ≈ 2c·|r| for |r| ≫ c,
                                       → r² as c → ∞, and ≤ min(r², 2c·|r|) everywhere
  smooth_l1  2·(√(r² + c²) − c)       = huber / c: ≈ r²/c for |r| ≪ c, → 2·|r| as c → 0
√(r² + c²) − c is evaluated as r² / (√(r² + c²) + c), which has no cancellation for c ≫ |r|.

Huber threshold schedules (``--huber_schedule``; t = 1000·σ is the timestep), each × huber_scale:
  constant     c = huber_c
  exponential  c = exp(−α·t), α = −ln(huber_c)/1000, i.e. huber_c^σ: 1 at σ = 0, huber_c at σ = 1
  snr          sd-scripts' DDPM rule c = (1 − huber_c)/(1 + ρ)² + huber_c uses ρ = √((1 − ᾱ)/ᾱ),
               the noise-to-signal ratio 1/√SNR. Flow has no ᾱ; its ratio is ρ = σ/(1 − σ)
               (SNR = ((1 − σ)/σ)²), which gives c = (1 − huber_c)·(1 − σ)² + huber_c: a polynomial,
               finite on all of [0, 1], 1 at σ = 0 (clean: ≈ l2) down to huber_c at σ = 1 (pure
               noise), the same direction as on DDPM. (sd-scripts' snr needs ``alphas_cumprod`` and
               fails on SD3.) huber_scale multiplies every schedule alike.

Reduction: per-element loss → optional mask (resized to the latent grid, normalised by its mean per
sample) → mean over C, H, W → × loss weighting w(σ) → × per-sample weight (prior_loss_weight) →
mean over the batch.

The objective, loss type, weighting and Huber settings are one validated :class:`LossSpec`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from library.flow.precision import float32_region
from library.flow.registry import check_choice
from library.flow.weighting import LOSS_WEIGHTINGS, loss_weighting

Objective = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
HuberSchedule = Callable[[torch.Tensor, float, float], torch.Tensor]
LossType = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


def broadcast_sigmas(sigmas: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B,) σ → (B, 1, …, 1) with ``ndim`` dimensions, float32."""
    return sigmas.float().reshape(-1, *([1] * (ndim - 1)))


def noisy_input(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_σ = (1 − σ)·x0 + σ·ε, float32."""
    s = broadcast_sigmas(sigmas, x0.ndim)
    return (1 - s) * x0.float() + s * noise.float()


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v = ε − x0, float32."""
    return noise.float() - x0.float()


def denoised_estimate(x_sigma: torch.Tensor, model_pred: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x̂0 = x_σ − σ·v̂, float32."""
    return x_sigma.float() - broadcast_sigmas(sigmas, x_sigma.ndim) * model_pred.float()


def sd3_residual(model_pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x̂0 − x0 = σ·(v − v̂)."""
    return broadcast_sigmas(sigmas, x0.ndim) * (velocity_target(x0, noise) - model_pred.float())


def raw_residual(model_pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """v̂ − v."""
    return model_pred.float() - velocity_target(x0, noise)


OBJECTIVES: Mapping[str, Objective] = MappingProxyType({"sd3": sd3_residual, "raw": raw_residual})


def constant_huber_c(sigmas: torch.Tensor, huber_c: float, huber_scale: float) -> torch.Tensor:
    """c = huber_c·scale."""
    return torch.full_like(sigmas, huber_c * huber_scale)


def exponential_huber_c(sigmas: torch.Tensor, huber_c: float, huber_scale: float) -> torch.Tensor:
    """c = exp(−α·1000σ)·scale, α = −ln(huber_c)/1000 (= huber_c^σ·scale)."""
    return torch.exp(math.log(huber_c) * sigmas) * huber_scale


def snr_huber_c(sigmas: torch.Tensor, huber_c: float, huber_scale: float) -> torch.Tensor:
    """c = ((1 − huber_c)/(1 + σ/(1 − σ))² + huber_c)·scale, evaluated as the equal polynomial
    ((1 − huber_c)·(1 − σ)² + huber_c)·scale (finite at σ = 1)."""
    return ((1 - huber_c) * (1 - sigmas.clamp(0.0, 1.0)) ** 2 + huber_c) * huber_scale


HUBER_SCHEDULES: Mapping[str, HuberSchedule] = MappingProxyType(
    {"constant": constant_huber_c, "exponential": exponential_huber_c, "snr": snr_huber_c}
)


def check_huber_params(huber_c: float, huber_scale: float) -> None:
    """Raise ValueError unless huber_c > 0 and huber_scale > 0."""
    if not huber_c > 0 or not huber_scale > 0:
        raise ValueError(f"huber_c and huber_scale must be > 0, got huber_c={huber_c}, huber_scale={huber_scale}")


def huber_threshold(
    sigmas: torch.Tensor, schedule: str = "snr", huber_c: float = 0.1, huber_scale: float = 1.0
) -> torch.Tensor:
    """Per-sample Huber threshold c(σ), float32 (B,)."""
    check_choice("huber_schedule", schedule, HUBER_SCHEDULES)
    check_huber_params(huber_c, huber_scale)
    with float32_region(sigmas.device):
        return HUBER_SCHEDULES[schedule](sigmas.float(), float(huber_c), float(huber_scale))


def _sqrt_excess(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """√(r² + c²) − c as r² / (√(r² + c²) + c) (0 where r = c = 0)."""
    r2 = r * r
    return r2 / (torch.sqrt(r2 + c * c) + c).clamp(min=torch.finfo(torch.float32).tiny)


def l2_loss(r: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
    """r²."""
    return r * r


def l1_loss(r: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
    """|r|."""
    return r.abs()


def huber_loss(r: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    """2c·(√(r² + c²) − c); c broadcasts (per sample: (B, 1, …, 1))."""
    return 2 * c * _sqrt_excess(r, c)


def smooth_l1_loss(r: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    """2·(√(r² + c²) − c)."""
    return 2 * _sqrt_excess(r, c)


LOSS_TYPES: Mapping[str, LossType] = MappingProxyType(
    {"l2": l2_loss, "l1": l1_loss, "huber": huber_loss, "smooth_l1": smooth_l1_loss}
)
THRESHOLD_LOSS_TYPES = frozenset({"huber", "smooth_l1"})


def elementwise_loss(
    residual: torch.Tensor,
    loss_type: str = "l2",
    sigmas: torch.Tensor | None = None,
    *,
    huber_c: float = 0.1,
    huber_scale: float = 1.0,
    huber_schedule: str = "snr",
) -> torch.Tensor:
    """Per-element loss (reduction 'none') of a (B, …) residual; huber/smooth_l1 need ``sigmas``."""
    check_choice("loss_type", loss_type, LOSS_TYPES)
    residual = residual.float()
    c = None
    if loss_type in THRESHOLD_LOSS_TYPES:
        if sigmas is None:
            raise ValueError(f"loss_type {loss_type!r} needs sigmas for its Huber threshold schedule")
        c = broadcast_sigmas(huber_threshold(sigmas, huber_schedule, huber_c, huber_scale), residual.ndim)
    return LOSS_TYPES[loss_type](residual, c)


def resize_mask(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, H, W) or (B, 1, H, W) mask → (B, 1, h, w) float32 on the latent grid ``size`` = (h, w).

    Area averaging when shrinking (each latent cell gets the mean of its pixels), bilinear when
    growing; no resampling when the size already matches."""
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)  # (B, H, W) -> (B, 1, H, W)
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must be (B, H, W) or (B, 1, H, W), got shape {tuple(mask.shape)}")
    mask = mask.float()
    size = (int(size[0]), int(size[1]))
    if tuple(mask.shape[-2:]) == size:
        return mask
    if mask.shape[-2] >= size[0] and mask.shape[-1] >= size[1]:
        return F.interpolate(mask, size=size, mode="area")
    return F.interpolate(mask, size=size, mode="bilinear", align_corners=False)


def apply_mask(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """loss·m / mean(m) per sample (m = mask on the loss's grid), so a partly masked image keeps its
    weight; a sample whose mask is all zero gets zero loss (not NaN)."""
    m = resize_mask(mask.to(loss.device), loss.shape[-2:])
    mean = m.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    return loss * (m / torch.where(mean > 0, mean, torch.ones_like(mean)))


def per_sample_mean(loss: torch.Tensor) -> torch.Tensor:
    """(B, …) → (B,) mean over every dimension but the batch."""
    return loss.mean(dim=tuple(range(1, loss.ndim)))


def _check_shapes(model_pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> None:
    if model_pred.shape != x0.shape or noise.shape != x0.shape:
        raise ValueError(
            f"model_pred, x0 and noise must have one shape, got {tuple(model_pred.shape)}, "
            f"{tuple(x0.shape)}, {tuple(noise.shape)}"
        )
    if sigmas.shape != (x0.shape[0],):
        raise ValueError(f"sigmas must be (B,) = ({x0.shape[0]},), got {tuple(sigmas.shape)}")


def _sample_weights(sample_weights: torch.Tensor | Sequence[float], per_sample: torch.Tensor) -> torch.Tensor:
    weights = torch.as_tensor(sample_weights, dtype=torch.float32, device=per_sample.device).reshape(-1)
    if weights.numel() not in (1, per_sample.numel()):
        raise ValueError(f"sample_weights must hold 1 or B = {per_sample.numel()} values, got {weights.numel()}")
    return weights


@dataclass(frozen=True)
class LossSpec:
    """The loss configuration of :func:`flow_matching_loss` (module docstring: objective, loss type,
    loss weighting w(σ), Huber threshold schedule).

    Validated on construction (ValueError: an unknown name, or huber_c/huber_scale ≤ 0 for a loss type
    that uses the threshold)."""

    objective: str = "sd3"
    loss_type: str = "l2"
    weighting: str = "none"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    huber_schedule: str = "snr"

    def __post_init__(self) -> None:
        check_choice("objective", self.objective, OBJECTIVES)
        check_choice("loss_type", self.loss_type, LOSS_TYPES)
        check_choice("loss_weighting", self.weighting, LOSS_WEIGHTINGS)
        check_choice("huber_schedule", self.huber_schedule, HUBER_SCHEDULES)
        if self.loss_type in THRESHOLD_LOSS_TYPES:
            check_huber_params(self.huber_c, self.huber_scale)


def flow_matching_loss_per_sample(
    model_pred: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    spec: LossSpec = LossSpec(),
    *,
    mask: torch.Tensor | None = None,
    sample_weights: torch.Tensor | Sequence[float] | None = None,
) -> torch.Tensor:
    """Per-sample losses (B,) float32: mean over C, H, W of the (masked) loss × w(σ) × sample weight."""
    _check_shapes(model_pred, x0, noise, sigmas)
    with float32_region(model_pred.device):
        sigmas = sigmas.to(model_pred.device).float()
        residual = OBJECTIVES[spec.objective](model_pred, x0, noise, sigmas)
        loss = elementwise_loss(
            residual,
            spec.loss_type,
            sigmas,
            huber_c=spec.huber_c,
            huber_scale=spec.huber_scale,
            huber_schedule=spec.huber_schedule,
        )
        if mask is not None:
            loss = apply_mask(loss, mask)
        per_sample = per_sample_mean(loss) * loss_weighting(spec.weighting, sigmas)
        if sample_weights is not None:
            per_sample = per_sample * _sample_weights(sample_weights, per_sample)
    return per_sample


def flow_matching_loss(
    model_pred: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    spec: LossSpec = LossSpec(),
    *,
    mask: torch.Tensor | None = None,
    sample_weights: torch.Tensor | Sequence[float] | None = None,
) -> torch.Tensor:
    """The training loss: batch mean of :func:`flow_matching_loss_per_sample`, a float32 scalar."""
    per_sample = flow_matching_loss_per_sample(
        model_pred, x0, noise, sigmas, spec, mask=mask, sample_weights=sample_weights
    )
    return per_sample.mean()
