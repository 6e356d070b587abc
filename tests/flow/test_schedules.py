"""σ schedules: normal against diffusers, simple/beta against hand-computed ComfyUI values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from library.flow.schedules import beta_ppf, beta_sigmas, make_sigmas, model_sigma_table, normal_sigmas, simple_sigmas


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.5, 7.0])
@pytest.mark.parametrize("steps", [1, 4, 10, 28])
def test_normal_equals_diffusers(shift, steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    ours = normal_sigmas(steps, shift)
    assert ours.dtype == torch.float32 and ours[-1] == 0 and len(ours) == steps + 1
    assert (ours - sched.sigmas).abs().max().item() <= 1e-6


def _shift(t: float, s: float) -> float:
    return s * t / (1 + (s - 1) * t)


@pytest.mark.parametrize(
    "shift,expected",
    [
        (3.0, [1.0, 0.9, 0.75, 0.5, 0.0]),  # S[999], S[749], S[499], S[249] = shift(1, .75, .5, .25)
        (7.0, [1.0, 5.25 / 5.5, 3.5 / 4.0, 1.75 / 2.5, 0.0]),
    ],
)
def test_simple_hand_computed(shift, expected):
    assert torch.allclose(simple_sigmas(4, shift), torch.tensor(expected), atol=1e-6)


def test_simple_indices_for_odd_steps():
    # 3 steps: stride 333.33 -> indices -1, -334, -667 -> k = 1000, 667, 334
    expected = [_shift(k / 1000, 3.0) for k in (1000, 667, 334)] + [0.0]
    assert torch.allclose(simple_sigmas(3, 3.0), torch.tensor(expected), atol=1e-6)


def test_beta_ppf_matches_scipy():
    from scipy.stats import beta

    q = np.linspace(0, 1, 101)
    assert np.abs(beta_ppf(q, 0.6, 0.6) - beta.ppf(q, 0.6, 0.6)).max() < 1e-9


@pytest.mark.parametrize("shift", [3.0, 7.0])
@pytest.mark.parametrize("steps", [4, 20, 40])
def test_beta_hand_computed(shift, steps):
    from scipy.stats import beta

    idx = np.rint(beta.ppf(1 - np.linspace(0, 1, steps, endpoint=False), 0.6, 0.6) * 999).astype(int)
    picked = [int(i) for n, i in enumerate(idx) if n == 0 or i != idx[n - 1]]
    expected = [_shift((i + 1) / 1000, shift) for i in picked] + [0.0]
    ours = beta_sigmas(steps, shift)
    assert len(ours) == len(expected)
    assert torch.allclose(ours, torch.tensor(expected, dtype=torch.float32), atol=1e-6)
    assert ours[0] == 1.0 and torch.all(ours[:-1] > ours[1:])


def test_table_and_errors():
    table = model_sigma_table(3.0)
    assert len(table) == 1000 and table[-1] == 1.0 and torch.all(table[1:] > table[:-1])
    with pytest.raises(ValueError, match="unknown scheduler"):
        make_sigmas("karras", 10, 3.0)
    with pytest.raises(ValueError, match="at least 1"):
        make_sigmas("normal", 0, 3.0)
