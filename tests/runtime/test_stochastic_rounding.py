"""Stochastic rounding to bf16: unbiased on average, always one of the two neighbours, specials kept."""

from __future__ import annotations

import math

import pytest
import torch

from library.runtime.stochastic_rounding import stochastic_round_bf16


def _neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just toward zero (truncation) and one ulp away from zero, as float32."""
    low = (x.view(torch.int32) & ~0xFFFF).view(torch.float32)
    high = ((x.view(torch.int32) & ~0xFFFF) + 0x10000).view(torch.float32)
    return low, high


def test_unbiased_on_average_and_only_neighbours():
    gen = torch.Generator().manual_seed(0)
    base = torch.tensor([1.0, -3.0, 1e-3, -7.5e4, 0.1, 2.0 ** -120], dtype=torch.float32)
    fractions = torch.tensor([0.25, 0.5, 0.9, 0.01, 0.7, 0.33])  # of one bf16 ulp, beyond the truncated value
    low, high = _neighbours(base)
    x = low + fractions * (high - low)  # (6,) float32 values strictly between two bf16 numbers
    n = 40_000
    samples = stochastic_round_bf16(x.expand(n, -1).contiguous(), gen).float()  # (n, 6)
    assert bool(((samples == low) | (samples == high)).all())
    ulp = (high - low).abs()
    mean_error = (samples.double().mean(0) - x.double()).abs()
    p = fractions.double()
    standard_error = ulp.double() * torch.sqrt(p * (1 - p) / n)
    assert bool((mean_error < 5 * standard_error).all()), (mean_error / ulp, standard_error / ulp)
    nearest_error = (x.to(torch.bfloat16).float().double() - x.double()).abs()
    assert bool((nearest_error[:1] > 100 * standard_error[:1]).all())  # round-to-nearest is biased here


def test_small_updates_survive_in_expectation():
    """1000 updates of +1e-4 on a bf16 weight of 1.0: nearest rounding drops each one, SR keeps them."""
    gen = torch.Generator().manual_seed(1)
    sr = torch.ones(2000, dtype=torch.bfloat16)
    nearest = torch.ones(2000, dtype=torch.bfloat16)
    for _ in range(1000):
        sr = stochastic_round_bf16(sr.float() + 1e-4, gen)
        nearest = (nearest.float() + 1e-4).to(torch.bfloat16)
    assert torch.equal(nearest, torch.ones_like(nearest))
    assert math.isclose(float(sr.float().mean()), 1.1, rel_tol=5e-3)


def test_exact_values_specials_and_reproducibility():
    exact = torch.tensor([0.0, -0.0, 1.0, -2.5, 2.0 ** 100], dtype=torch.float32)
    assert torch.equal(stochastic_round_bf16(exact).float(), exact.to(torch.bfloat16).float())
    specials = torch.tensor([float("inf"), float("-inf"), float("nan")])
    out = stochastic_round_bf16(specials).float()
    assert out[0] == float("inf") and out[1] == float("-inf") and math.isnan(float(out[2]))
    x = torch.randn(1000)
    a = stochastic_round_bf16(x, torch.Generator().manual_seed(5))
    b = stochastic_round_bf16(x, torch.Generator().manual_seed(5))
    c = stochastic_round_bf16(x, torch.Generator().manual_seed(6))
    assert a.dtype == torch.bfloat16 and torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(TypeError, match="float32"):
        stochastic_round_bf16(x.double())
