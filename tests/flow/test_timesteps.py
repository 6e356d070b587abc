"""σ sampling: analytic CDFs (KS tests), diffusers parity, float32 under autocast, continuity, bounds."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from scipy import stats

from library.flow.schedules import shift_sigma
from library.flow.timesteps import (
    MODE_SCALE_MAX,
    DensityParams,
    TimestepSpec,
    mode_u_cdf,
    sample_sigmas,
    sigma_cdf,
    sigma_to_timesteps,
    timestep_bounds,
    unshift_sigma,
    validation_sigmas,
)

N_KS = 100_000
DENSITIES = [
    pytest.param({"sampling": "uniform"}, id="uniform"),
    pytest.param({"sampling": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0}, id="logit_normal-0-1"),
    pytest.param({"sampling": "logit_normal", "logit_mean": 0.5, "logit_std": 0.8}, id="logit_normal-0.5-0.8"),
    pytest.param({"sampling": "mode", "mode_scale": 1.29}, id="mode-1.29"),
    pytest.param({"sampling": "mode", "mode_scale": 0.5}, id="mode-0.5"),
]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ks_pvalue(seed: int, spec: TimestepSpec) -> float:
    samples = sample_sigmas(N_KS, spec, generator=_gen(seed)).double().numpy()
    result = stats.kstest(samples, lambda x: sigma_cdf(torch.from_numpy(np.asarray(x)), spec).numpy())
    return float(result.pvalue)


@pytest.mark.parametrize("shift", [1.0, 3.0, 7.0])
@pytest.mark.parametrize("density", DENSITIES)
def test_samples_follow_the_analytic_cdf(density: dict, shift: float) -> None:
    assert _ks_pvalue(1234, TimestepSpec(shift=shift, **density)) > 0.01


@pytest.mark.parametrize(
    "spec",
    [
        TimestepSpec(sampling="uniform", min_timestep=200, max_timestep=700),
        TimestepSpec(sampling="logit_normal", shift=3.0, min_timestep=100, max_timestep=900),
        TimestepSpec(sampling="mode", mode_scale=1.29, shift=7.0, min_timestep=0, max_timestep=500),
    ],
    ids=["uniform", "logit_normal", "mode"],
)
def test_bounded_samples_follow_the_rescaled_cdf(spec: TimestepSpec) -> None:
    assert _ks_pvalue(99, spec) > 0.01


def test_ks_test_rejects_a_wrong_shift() -> None:
    """The KS check has teeth: samples at shift 3 do not pass as shift 2.5."""
    samples = sample_sigmas(N_KS, TimestepSpec("logit_normal", shift=3.0), generator=_gen(5)).double().numpy()
    wrong_spec = TimestepSpec("logit_normal", shift=2.5)
    wrong = stats.kstest(samples, lambda x: sigma_cdf(torch.from_numpy(x), wrong_spec).numpy())
    assert wrong.pvalue < 1e-6


@pytest.mark.parametrize(
    "scheme,kwargs",
    [
        ("uniform", {}),
        ("logit_normal", {"logit_mean": 0.0, "logit_std": 1.0}),
        ("logit_normal", {"logit_mean": 0.5, "logit_std": 0.8}),
        ("mode", {"mode_scale": 1.29}),
        ("mode", {"mode_scale": 0.5}),
    ],
)
def test_same_stream_as_diffusers_density(scheme: str, kwargs: dict) -> None:
    from diffusers.training_utils import compute_density_for_timestep_sampling

    theirs = compute_density_for_timestep_sampling(
        scheme,
        4096,
        logit_mean=kwargs.get("logit_mean"),
        logit_std=kwargs.get("logit_std"),
        mode_scale=kwargs.get("mode_scale"),
        generator=_gen(7),
    )
    ours = sample_sigmas(4096, TimestepSpec(sampling=scheme, **kwargs), generator=_gen(7))
    torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=1e-6)
    shifted = sample_sigmas(4096, TimestepSpec(sampling=scheme, shift=3.0, **kwargs), generator=_gen(7))
    torch.testing.assert_close(shifted, shift_sigma(theirs.float(), 3.0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal", "mode"])
def test_sigmas_are_float32_under_bf16_autocast(sampling: str) -> None:
    spec = TimestepSpec(sampling=sampling, shift=3.0, min_timestep=10, max_timestep=990)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sigmas = sample_sigmas(1000, spec, generator=_gen(0))
        timesteps = sigma_to_timesteps(sigmas)
    plain = sample_sigmas(1000, spec, generator=_gen(0))
    assert sigmas.dtype == torch.float32 and timesteps.dtype == torch.float32
    torch.testing.assert_close(sigmas, plain, rtol=0, atol=0)
    torch.testing.assert_close(timesteps, plain * 1000, rtol=0, atol=0)


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal", "mode"])
def test_sigmas_are_continuous(sampling: str) -> None:
    spec = TimestepSpec(sampling=sampling, shift=3.0, min_timestep=100, max_timestep=900)
    sigmas = sample_sigmas(N_KS, spec, generator=_gen(3))
    assert sigmas.unique().numel() > 50_000
    off_grid = (sigmas * 1000 - (sigmas * 1000).round()).abs() > 1e-3
    assert off_grid.float().mean() > 0.9


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal", "mode"])
@pytest.mark.parametrize("bounds", [(None, None), (0, 1000), (250, 750), (1, 999), (0, 300), (600, 1000)])
def test_bounds_hold(sampling: str, bounds: tuple) -> None:
    lo, hi = timestep_bounds(*bounds)
    spec = TimestepSpec(sampling=sampling, shift=7.0, min_timestep=bounds[0], max_timestep=bounds[1])
    assert spec.bounds == (lo, hi)
    sigmas = sample_sigmas(20_000, spec, generator=_gen(11))
    assert float(sigmas.min()) >= lo and float(sigmas.max()) <= hi
    assert float(sigmas.max()) - float(sigmas.min()) > 0.5 * (hi - lo)


def test_equal_bounds_give_a_fixed_sigma() -> None:
    sigmas = sample_sigmas(64, TimestepSpec("logit_normal", min_timestep=500, max_timestep=500), generator=_gen(0))
    assert torch.all(sigmas == 0.5)
    cdf = sigma_cdf(torch.tensor([0.49, 0.5, 0.51]), TimestepSpec(min_timestep=500, max_timestep=500))
    assert cdf.tolist() == [0.0, 1.0, 1.0]


def test_generator_draws_on_its_device_then_moves() -> None:
    mode = TimestepSpec(sampling="mode")
    on_meta = sample_sigmas(8, mode, generator=_gen(1), device="meta")
    assert on_meta.device.type == "meta" and on_meta.dtype == torch.float32
    torch.manual_seed(1)
    without = sample_sigmas(8, mode)
    torch.testing.assert_close(without, sample_sigmas(8, mode, generator=_gen(1)))


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shift", [1.0, 3.0, 7.0])
def test_cdf_is_a_cdf(density: dict, shift: float) -> None:
    x = torch.linspace(0, 1, 2001, dtype=torch.float64)
    cdf = sigma_cdf(x, TimestepSpec(shift=shift, **density))
    assert cdf.dtype == torch.float64
    assert float(cdf[0]) == pytest.approx(0.0, abs=1e-12) and float(cdf[-1]) == pytest.approx(1.0, abs=1e-12)
    assert torch.all(cdf[1:] >= cdf[:-1] - 1e-12)


def test_mode_with_zero_scale_is_uniform_and_shift_inverts() -> None:
    x = torch.linspace(0, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(mode_u_cdf(x, DensityParams(mode_scale=0.0)), x, rtol=0, atol=1e-12)
    for s in (0.5, 3.0, 7.0):
        torch.testing.assert_close(unshift_sigma(shift_sigma(x, s), s), x, rtol=0, atol=1e-12)


def test_shift_moves_mass_toward_noise() -> None:
    medians = [
        float(sample_sigmas(20_000, TimestepSpec("logit_normal", shift=s), generator=_gen(4)).median())
        for s in (1, 3, 7)
    ]
    assert medians[0] == pytest.approx(0.5, abs=0.02)
    assert medians[0] < medians[1] < medians[2]
    assert medians[1] == pytest.approx(0.75, abs=0.02)  # shift(0.5) = s/(s + 1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sampling": "lognormal"},
        {"shift": 0.0},
        {"sampling": "logit_normal", "logit_std": 0.0},
        {"sampling": "mode", "mode_scale": MODE_SCALE_MAX + 0.01},
        {"sampling": "mode", "mode_scale": -1.01},
        {"min_timestep": 600, "max_timestep": 500},
        {"min_timestep": -1},
        {"max_timestep": 1001},
    ],
)
def test_invalid_spec_raises_at_construction(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        TimestepSpec(**kwargs)


def test_spec_defaults_density_and_immutability() -> None:
    spec = TimestepSpec()
    assert (spec.sampling, spec.shift, spec.min_timestep, spec.max_timestep) == ("uniform", 1.0, None, None)
    assert spec.density == DensityParams() and spec.bounds == (0.0, 1.0)
    assert TimestepSpec("mode", mode_scale=0.5, logit_std=2.0).density == DensityParams(logit_std=2.0, mode_scale=0.5)
    torch.testing.assert_close(sample_sigmas(16, generator=_gen(2)), sample_sigmas(16, spec, generator=_gen(2)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.shift = 3.0  # type: ignore[misc]


def test_mode_scale_limit_is_where_the_map_stops_being_monotone() -> None:
    assert MODE_SCALE_MAX == pytest.approx(1 / (math.pi / 2 - 1))


def test_validation_sigmas() -> None:
    sigmas = validation_sigmas(4)
    assert sigmas.dtype == torch.float32
    torch.testing.assert_close(sigmas, torch.tensor([0.2, 0.4, 0.6, 0.8]))
    assert validation_sigmas(1).tolist() == [0.5]
    with pytest.raises(ValueError):
        validation_sigmas(0)
