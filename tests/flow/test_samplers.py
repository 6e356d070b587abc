"""Sampler steps against their formulas (DESIGN §3), with seeded noise."""

from __future__ import annotations

import math

import pytest
import torch

from library.flow.samplers import dpmpp_2m_step, euler_ancestral_step, euler_step, sample
from library.flow.schedules import normal_sigmas


def _linear_velocity(x: torch.Tensor, sigma: torch.Tensor, step: int) -> torch.Tensor:
    return 0.3 * x - 0.1 * float(sigma) + 0.05 * step


def test_euler_step_formula():
    x, v = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    out = euler_step(x, v, torch.tensor(0.8), torch.tensor(0.6))
    assert torch.allclose(out, x - 0.2 * v, atol=1e-7)


def test_euler_a_step_by_step():
    sigmas = normal_sigmas(6, 3.0)
    x0 = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    ours = sample(_linear_velocity, x0, sigmas, "euler_a", generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    x = x0.clone()
    for i in range(6):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        d = x - s * _linear_velocity(x, sigmas[i], i)
        noise = torch.randn(x.shape, generator=gen)
        if sn == 0:
            x = d
            continue
        s_down = sn * (1 + (sn / s - 1) * 1.0)
        x = (s_down / s) * x + (1 - s_down / s) * d
        x = ((1 - sn) / (1 - s_down)) * x + noise * math.sqrt(sn**2 - s_down**2 * (1 - sn) ** 2 / (1 - s_down) ** 2)
    assert torch.allclose(ours, x, atol=1e-5)


def test_euler_a_with_eta_one_lands_on_sigma_next_marginal():
    # σ_d = σ_next²/σ; the renoise keeps the total noise std at σ_next for the flow parameterisation
    x, v, noise = torch.zeros(1, 1, 64, 64), torch.zeros(1, 1, 64, 64), torch.randn(1, 1, 64, 64)
    out = euler_ancestral_step(x, v, torch.tensor(0.8), torch.tensor(0.5), noise)
    sd = 0.5**2 / 0.8
    assert torch.allclose(out, noise * math.sqrt(0.25 - sd**2 * (0.5 / (1 - sd)) ** 2), atol=1e-6)


def test_dpmpp_2m_step_by_step():
    sigmas = normal_sigmas(5, 3.0)
    x0 = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    ours = sample(_linear_velocity, x0, sigmas, "dpmpp_2m")
    x, old = x0.clone(), None
    for i in range(5):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        d = x - s * _linear_velocity(x, sigmas[i], i)
        if sn == 0:
            x = d
        else:
            h = math.log(s) - math.log(sn)
            dd = d
            if old is not None:
                r = (math.log(float(sigmas[i - 1])) - math.log(s)) / h
                dd = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * old
            x = (sn / s) * x - math.expm1(-h) * dd
        old = d
    assert torch.allclose(ours, x, atol=1e-5)


def test_dpmpp_first_order_equals_euler():
    x, v = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    s, sn = torch.tensor(0.9), torch.tensor(0.7)
    first = dpmpp_2m_step(x, x - s * v, None, None, s, sn)
    assert torch.allclose(first, euler_step(x, v, s, sn), atol=1e-6)


def test_unknown_sampler():
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(_linear_velocity, torch.zeros(1, 1, 2, 2), normal_sigmas(2, 3.0), "heun")
