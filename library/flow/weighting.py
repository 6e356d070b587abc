"""Per-sample loss weighting w(σ) and the ``--weighting_scheme`` compatibility split.

Weightings (the SD3 paper's, as diffusers' ``compute_loss_weighting_for_sd3``):
  none        1
  sigma_sqrt  σ⁻², with σ clamped to ≥ ``MIN_WEIGHT_SIGMA`` = 1e-3 (one step of the 0..1000
              timestep scale), so the weight is at most 1e6 instead of ∞ at σ = 0. diffusers does
              not clamp; above 1e-3 the two agree exactly.
  cosmap      2 / (π·(1 − 2σ + 2σ²)); the denominator is ≥ 1/2, so no clamp is needed.

sd-scripts' ``--weighting_scheme`` picks both the σ density and the weighting; inside they are two
settings (``--timestep_sampling`` and ``--loss_weighting``), see :func:`resolve_weighting_scheme`.
"""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Callable, Mapping

import torch

from library.flow.precision import float32_region
from library.flow.registry import check_choice
from library.flow.timesteps import TIMESTEP_SAMPLINGS

MIN_WEIGHT_SIGMA = 1e-3


def no_weighting(sigmas: torch.Tensor, min_sigma: float = MIN_WEIGHT_SIGMA) -> torch.Tensor:
    """w = 1."""
    return torch.ones_like(sigmas)


def sigma_sqrt_weighting(sigmas: torch.Tensor, min_sigma: float = MIN_WEIGHT_SIGMA) -> torch.Tensor:
    """w = max(σ, min_sigma)⁻²."""
    return sigmas.clamp(min=min_sigma) ** -2.0


def cosmap_weighting(sigmas: torch.Tensor, min_sigma: float = MIN_WEIGHT_SIGMA) -> torch.Tensor:
    """w = 2 / (π·(1 − 2σ + 2σ²))."""
    return 2.0 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))


LOSS_WEIGHTINGS: Mapping[str, Callable[[torch.Tensor, float], torch.Tensor]] = MappingProxyType(
    {"none": no_weighting, "sigma_sqrt": sigma_sqrt_weighting, "cosmap": cosmap_weighting}
)

WEIGHTING_SCHEMES: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "uniform": ("uniform", "none"),
        "logit_normal": ("logit_normal", "none"),
        "mode": ("mode", "none"),
        "sigma_sqrt": ("uniform", "sigma_sqrt"),
        "cosmap": ("uniform", "cosmap"),
        "none": ("uniform", "none"),
    }
)
"""sd-scripts' --weighting_scheme -> (timestep_sampling, loss_weighting)."""


def resolve_weighting_scheme(
    weighting_scheme: str = "uniform",
    timestep_sampling: str | None = None,
    loss_weighting: str | None = None,
) -> tuple[str, str]:
    """(timestep_sampling, loss_weighting) from ``--weighting_scheme``; explicit names win.

    sigma_sqrt / cosmap / none sample σ uniformly; logit_normal / mode / uniform weight 1."""
    check_choice("weighting_scheme", weighting_scheme, WEIGHTING_SCHEMES)
    sampling, weighting = WEIGHTING_SCHEMES[weighting_scheme]
    sampling = sampling if timestep_sampling is None else timestep_sampling
    weighting = weighting if loss_weighting is None else loss_weighting
    check_choice("timestep_sampling", sampling, TIMESTEP_SAMPLINGS)
    check_choice("loss_weighting", weighting, LOSS_WEIGHTINGS)
    return sampling, weighting


def loss_weighting(name: str, sigmas: torch.Tensor, min_sigma: float = MIN_WEIGHT_SIGMA) -> torch.Tensor:
    """Per-sample loss weight w(σ) by name, float32 with the shape of ``sigmas``."""
    check_choice("loss_weighting", name, LOSS_WEIGHTINGS)
    with float32_region(sigmas.device):
        return LOSS_WEIGHTINGS[name](sigmas.float(), min_sigma)
