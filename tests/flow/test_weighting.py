"""Loss weighting w(σ): diffusers parity, clamping, float32; the --weighting_scheme split."""

from __future__ import annotations

import math

import pytest
import torch

from library.flow.weighting import (
    LOSS_WEIGHTINGS,
    MIN_WEIGHT_SIGMA,
    WEIGHTING_SCHEMES,
    loss_weighting,
    resolve_weighting_scheme,
)

SCHEMES = ["uniform", "logit_normal", "mode", "sigma_sqrt", "cosmap", "none"]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_weights_agree_with_diffusers(scheme: str) -> None:
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    sigmas = torch.linspace(MIN_WEIGHT_SIGMA, 1.0, 1001)
    _, weighting = resolve_weighting_scheme(scheme)
    theirs = compute_loss_weighting_for_sd3(scheme, sigmas)
    torch.testing.assert_close(loss_weighting(weighting, sigmas), theirs.float(), rtol=1e-6, atol=0)


def test_sigma_sqrt_is_clamped_near_zero() -> None:
    sigmas = torch.tensor([0.0, 1e-8, 1e-4, MIN_WEIGHT_SIGMA, 0.5, 1.0])
    weights = loss_weighting("sigma_sqrt", sigmas)
    cap = MIN_WEIGHT_SIGMA**-2
    torch.testing.assert_close(weights, torch.tensor([cap, cap, cap, cap, 4.0, 1.0]))
    assert torch.isfinite(weights).all()


def test_cosmap_is_finite_symmetric_and_peaks_at_half() -> None:
    sigmas = torch.linspace(0, 1, 101, dtype=torch.float64).float()
    weights = loss_weighting("cosmap", sigmas)
    assert torch.isfinite(weights).all()
    torch.testing.assert_close(weights, weights.flip(0), rtol=1e-5, atol=0)
    assert float(weights.max()) == pytest.approx(4 / math.pi, rel=1e-6)
    assert float(weights[0]) == pytest.approx(2 / math.pi, rel=1e-6)


@pytest.mark.parametrize("name", list(LOSS_WEIGHTINGS))
def test_weights_are_float32_under_autocast(name: str) -> None:
    sigmas = torch.rand(16, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        weights = loss_weighting(name, sigmas)
    assert weights.dtype == torch.float32 and weights.shape == (16,)


def test_scheme_split() -> None:
    assert dict(WEIGHTING_SCHEMES) == {
        "uniform": ("uniform", "none"),
        "logit_normal": ("logit_normal", "none"),
        "mode": ("mode", "none"),
        "sigma_sqrt": ("uniform", "sigma_sqrt"),
        "cosmap": ("uniform", "cosmap"),
        "none": ("uniform", "none"),
    }
    assert resolve_weighting_scheme() == ("uniform", "none")
    for scheme, pair in WEIGHTING_SCHEMES.items():
        assert resolve_weighting_scheme(scheme) == pair


def test_explicit_names_win() -> None:
    assert resolve_weighting_scheme("sigma_sqrt", timestep_sampling="logit_normal") == ("logit_normal", "sigma_sqrt")
    assert resolve_weighting_scheme("mode", loss_weighting="cosmap") == ("mode", "cosmap")
    assert resolve_weighting_scheme("cosmap", "mode", "none") == ("mode", "none")


@pytest.mark.parametrize(
    "args,match",
    [
        (("logit_norma",), "did you mean 'logit_normal'"),
        (("uniform", "sigma_sqrt"), "timestep_sampling"),
        (("uniform", None, "logit_normal"), "loss_weighting"),
        (("uniform", None, "cosmapp"), "did you mean 'cosmap'"),
    ],
)
def test_unknown_names_raise(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        resolve_weighting_scheme(*args)
    with pytest.raises(ValueError, match="loss_weighting"):
        loss_weighting("mode", torch.ones(2))
