"""σ sampling for rectified-flow training (σ ∈ [0, 1], σ = 1 is pure noise).

1. Draw u ∈ [0, 1] per sample from a density (the SD3 paper's, drawn with exactly the torch calls
   of diffusers' ``compute_density_for_timestep_sampling``, so one generator gives the same u):
     uniform       u ~ U(0, 1)                                          torch.rand
     logit_normal  u = sigmoid(n), n ~ N(logit_mean, logit_std)         torch.normal
     mode          u = 1 − w − mode_scale·(cos²(π·w/2) − 1 + w), w ~ U(0, 1)
2. σ = shift(u) = s·u / (1 + (s − 1)·u) with s = ``--training_shift`` (1.0 = none).
3. Bounds from ``--min_timestep/--max_timestep`` (0..1000 scale): σ ← lo + (hi − lo)·σ with
   lo = min_timestep/1000, hi = max_timestep/1000. This is sd-scripts' own mapping
   (``u·(t_max − t_min) + t_min``) *without* its floor to integers. An affine map keeps σ continuous
   and keeps the density's shape (squeezed onto [lo, hi]); clamping would instead turn all the mass
   outside the bounds into point masses at lo and hi.

σ stays a continuous float32 (sd-scripts floors it to 1/1000 steps and carries it in bf16); the model
sees σ·1000 (:func:`sigma_to_timesteps`). The analytic CDFs (float64) of every density after shift and
bounds are here too: F_σ(x) = F_u(shift⁻¹((x − lo)/(hi − lo))), shift⁻¹(σ) = σ / (s − (s − 1)·σ).

All of the above (density name and parameters, shift, bounds) is one validated :class:`TimestepSpec`,
passed to both :func:`sample_sigmas` and :func:`sigma_cdf`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping

import torch

from library.flow.precision import float32_region
from library.flow.registry import check_choice
from library.flow.schedules import TRAIN_STEPS, shift_sigma

MODE_SCALE_MAX = 2.0 / (math.pi - 2.0)
"""Largest mode_scale for which the mode map w → u is monotone (SD3 paper: −1 ≤ s ≤ 2/(π − 2))."""
MODE_SCALE_MIN = -1.0


@dataclass(frozen=True)
class DensityParams:
    """Parameters of the u densities (each density reads the ones it needs); :attr:`TimestepSpec.density`."""

    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29


def _draw_uniform(batch: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return torch.rand(size=(batch,), generator=generator, device=device, dtype=torch.float32)


def uniform_u(batch: int, p: DensityParams, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """u ~ U(0, 1)."""
    return _draw_uniform(batch, generator, device)


def logit_normal_u(
    batch: int, p: DensityParams, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """u = sigmoid(n), n ~ N(logit_mean, logit_std)."""
    n = torch.normal(
        mean=p.logit_mean, std=p.logit_std, size=(batch,), generator=generator, device=device, dtype=torch.float32
    )
    return torch.sigmoid(n)


def mode_map(w: torch.Tensor, mode_scale: float) -> torch.Tensor:
    """u = 1 − w − s·(cos²(π·w/2) − 1 + w): decreasing from 1 (w = 0) to 0 (w = 1) for s in range."""
    return 1 - w - mode_scale * (torch.cos(math.pi * w / 2) ** 2 - 1 + w)


def mode_u(batch: int, p: DensityParams, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """u = mode_map(w, mode_scale), w ~ U(0, 1)."""
    return mode_map(_draw_uniform(batch, generator, device), p.mode_scale)


def uniform_u_cdf(x: torch.Tensor, p: DensityParams) -> torch.Tensor:
    """P(u ≤ x) = x on [0, 1]."""
    return x.clamp(0.0, 1.0)


def logit_normal_u_cdf(x: torch.Tensor, p: DensityParams) -> torch.Tensor:
    """P(u ≤ x) = Φ((logit(x) − mean)/std)."""
    z = (torch.logit(x.clamp(0.0, 1.0)) - p.logit_mean) / p.logit_std
    return torch.special.ndtr(z)


def mode_u_cdf(x: torch.Tensor, p: DensityParams, iters: int = 64) -> torch.Tensor:
    """P(u ≤ x) = P(w ≥ g⁻¹(x)) = 1 − g⁻¹(x) for the decreasing map g = :func:`mode_map`.

    g⁻¹ by bisection in float64 (64 halvings: exact to rounding)."""
    x = x.clamp(0.0, 1.0).to(torch.float64)
    lo, hi = torch.zeros_like(x), torch.ones_like(x)
    for _ in range(iters):
        mid = (lo + hi) / 2
        above = mode_map(mid, p.mode_scale) > x  # g(mid) > x  ⇒  root lies right of mid
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return 1 - (lo + hi) / 2


UDraw = Callable[[int, DensityParams, torch.Generator | None, torch.device], torch.Tensor]
UCdf = Callable[[torch.Tensor, DensityParams], torch.Tensor]

TIMESTEP_SAMPLINGS: Mapping[str, UDraw] = MappingProxyType(
    {"uniform": uniform_u, "logit_normal": logit_normal_u, "mode": mode_u}
)
U_CDFS: Mapping[str, UCdf] = MappingProxyType(
    {"uniform": uniform_u_cdf, "logit_normal": logit_normal_u_cdf, "mode": mode_u_cdf}
)


def timestep_bounds(min_timestep: float | None, max_timestep: float | None) -> tuple[float, float]:
    """(lo, hi) on the σ scale from --min_timestep/--max_timestep on the 0..1000 scale (None = 0 / 1000)."""
    t_min = 0.0 if min_timestep is None else float(min_timestep)
    t_max = float(TRAIN_STEPS) if max_timestep is None else float(max_timestep)
    if not 0.0 <= t_min <= t_max <= TRAIN_STEPS:
        raise ValueError(
            f"need 0 <= min_timestep <= max_timestep <= {TRAIN_STEPS}, got min_timestep={min_timestep}, "
            f"max_timestep={max_timestep}"
        )
    return t_min / TRAIN_STEPS, t_max / TRAIN_STEPS


def check_density(sampling: str, shift: float, p: DensityParams) -> None:
    """Raise ValueError for an unknown density name or parameters outside their valid range."""
    check_choice("timestep_sampling", sampling, TIMESTEP_SAMPLINGS)
    if not shift > 0:
        raise ValueError(f"training shift must be > 0, got {shift}")
    if sampling == "logit_normal" and not p.logit_std > 0:
        raise ValueError(f"logit_std must be > 0, got {p.logit_std}")
    if sampling == "mode" and not MODE_SCALE_MIN <= p.mode_scale <= MODE_SCALE_MAX:
        raise ValueError(
            f"mode_scale must lie in [{MODE_SCALE_MIN}, {MODE_SCALE_MAX:.4f}] (2/(π − 2)), where the mode "
            f"density is a monotone map of U(0, 1) onto [0, 1]; got {p.mode_scale}"
        )


def unshift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """Inverse of :func:`shift_sigma`: t = σ / (s − (s − 1)·σ)."""
    return sigma / (shift - (shift - 1) * sigma)


@dataclass(frozen=True)
class TimestepSpec:
    """The σ distribution of :func:`sample_sigmas` / :func:`sigma_cdf`: density, shift and bounds.

    Validated on construction (ValueError: unknown density, shift ≤ 0, a density parameter out of
    range, or bounds outside 0 ≤ min_timestep ≤ max_timestep ≤ 1000)."""

    sampling: str = "uniform"
    shift: float = 1.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    min_timestep: float | None = None
    max_timestep: float | None = None

    def __post_init__(self) -> None:
        check_density(self.sampling, self.shift, self.density)
        timestep_bounds(self.min_timestep, self.max_timestep)

    @property
    def density(self) -> DensityParams:
        """The u density's parameters."""
        return DensityParams(logit_mean=self.logit_mean, logit_std=self.logit_std, mode_scale=self.mode_scale)

    @property
    def bounds(self) -> tuple[float, float]:
        """(lo, hi) on the σ scale (:func:`timestep_bounds`)."""
        return timestep_bounds(self.min_timestep, self.max_timestep)


def sample_sigmas(
    batch: int,
    spec: TimestepSpec = TimestepSpec(),
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Per-sample training σ, float32 (B,) on ``device`` (module docstring: density, shift, bounds).

    Random numbers are drawn on the generator's device (``device`` without one), then moved."""
    lo, hi = spec.bounds
    device = torch.device(device)
    draw_device = generator.device if generator is not None else device
    with float32_region(draw_device):
        u = TIMESTEP_SAMPLINGS[spec.sampling](batch, spec.density, generator, draw_device).float()
        sigma = shift_sigma(u, float(spec.shift))  # exact identity for shift = 1
        if (lo, hi) != (0.0, 1.0):
            sigma = (lo + (hi - lo) * sigma).clamp(lo, hi)
    return sigma.to(device=device, dtype=torch.float32)


def sigma_cdf(x: torch.Tensor, spec: TimestepSpec = TimestepSpec()) -> torch.Tensor:
    """Analytic CDF P(σ ≤ x) of :func:`sample_sigmas` with the same ``spec``, float64.

    F(x) = F_u(shift⁻¹((x − lo)/(hi − lo))); a degenerate interval lo = hi is a step at lo."""
    lo, hi = spec.bounds
    x = torch.as_tensor(x, dtype=torch.float64)
    if hi == lo:
        return (x >= lo).to(torch.float64)
    unit = ((x - lo) / (hi - lo)).clamp(0.0, 1.0)
    return U_CDFS[spec.sampling](unshift_sigma(unit, float(spec.shift)), spec.density).to(torch.float64)


def sigma_to_timesteps(sigmas: torch.Tensor) -> torch.Tensor:
    """The model's timestep input σ·1000 in float32 (never quantised, never bf16)."""
    return sigmas.float() * TRAIN_STEPS


def validation_sigmas(n: int = 4, device: torch.device | str = "cpu") -> torch.Tensor:
    """n fixed, evenly spaced interior σ for validation loss: i/(n + 1), i = 1..n (n = 4: 0.2 … 0.8)."""
    if n < 1:
        raise ValueError(f"need at least one validation sigma, got n={n}")
    return torch.arange(1, n + 1, dtype=torch.float32, device=device) / (n + 1)
