"""networks.functional.svd: factorisations, rank choosers, kept energy and the quantile clamp."""

from __future__ import annotations

import pytest
import torch

from networks.functional.svd import (
    abs_quantile, choose_rank, clamp_factors, kept_energy, rank_sv_cumulative, rank_sv_fro, rank_sv_ratio,
    svd_of_product, thin_svd, truncate,
)

S = torch.tensor([4.0, 2.0, 1.0, 0.5])
# Σσ = 7.5, cumulative [0.533, 0.8, 0.933, 1]; Σσ² = 21.25, √cumulative [0.868, 0.970, 0.994, 1]


def _low_rank(out: int, inner: int, rank: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(out, rank, generator=gen) @ torch.randn(rank, inner, generator=gen)


@pytest.mark.parametrize("ratio,rank", [(1.0, 1), (2.0, 2), (3.99, 2), (4.0, 3), (8.0, 4), (100.0, 4)])
def test_sv_ratio_keeps_sigma_within_ratio_of_max(ratio, rank):
    assert rank_sv_ratio(S, ratio) == rank


@pytest.mark.parametrize("fraction,rank", [(0.5, 1), (0.8, 1), (0.9, 2), (0.97, 2), (0.99, 3), (1.0, 4)])
def test_sv_fro_is_the_fewest_reaching_the_frobenius_fraction(fraction, rank):
    assert rank_sv_fro(S, fraction) == rank


@pytest.mark.parametrize("fraction,rank", [(0.5, 1), (0.8, 2), (0.9, 3), (0.95, 4), (1.0, 4)])
def test_sv_cumulative_is_the_fewest_reaching_the_sum_fraction(fraction, rank):
    assert rank_sv_cumulative(S, fraction) == rank


def test_choose_rank_caps_and_floors():
    assert choose_rank(S, 10) == 4  # fixed: no more than the singular values
    assert choose_rank(S, 2) == 2
    assert choose_rank(S, 2, "sv_cumulative", 1.0) == 2  # the dynamic rank is capped by the fixed one
    assert choose_rank(S, 10, "sv_fro", 0.9) == 2
    assert choose_rank(torch.zeros(3), 5, "sv_fro", 0.9) == 1  # a zero matrix keeps one (zero) direction


def test_kept_energy_is_the_share_of_squared_singular_values():
    assert kept_energy(S, 2) == pytest.approx(20.0 / 21.25)
    assert kept_energy(S, 4) == pytest.approx(1.0)
    assert kept_energy(torch.zeros(3), 1) == 1.0


def test_truncation_error_is_the_dropped_energy():
    """Eckart–Young: ‖ΔW − up·down‖²_F = Σ dropped σ², so kept energy = 1 − error² / ‖ΔW‖²."""
    delta = torch.randn(24, 40, generator=torch.Generator().manual_seed(3))
    u, s, vh = thin_svd(delta)
    for rank in (1, 5, 24):
        up, down = truncate(u, s, vh, rank)
        assert up.shape == (24, rank) and down.shape == (rank, 40)
        error = (delta - up @ down).pow(2).sum() / delta.pow(2).sum()
        assert float(error) == pytest.approx(1.0 - kept_energy(s, rank), abs=1e-5)


@pytest.mark.parametrize("out,inner,rank", [(48, 20, 5), (6, 30, 9), (30, 7, 12)])
def test_svd_of_product_matches_the_full_svd(out, inner, rank):
    gen = torch.Generator().manual_seed(out)
    up, down = torch.randn(out, rank, generator=gen), torch.randn(rank, inner, generator=gen)
    u, s, vh = svd_of_product(up, down)
    assert s.numel() == min(out, inner, rank)
    reference = torch.linalg.svdvals(up @ down)[: s.numel()]
    assert torch.allclose(s, reference, rtol=1e-4, atol=1e-4)
    assert torch.allclose((u * s) @ vh, up @ down, atol=1e-4)
    assert torch.allclose(u.t() @ u, torch.eye(s.numel()), atol=1e-5)  # orthonormal columns


def test_low_rank_matrix_is_rebuilt_at_its_rank():
    delta = _low_rank(32, 20, 3)
    up, down = truncate(*thin_svd(delta), 3)
    assert (up @ down - delta).abs().max() < 1e-4
    assert kept_energy(thin_svd(delta)[1], 3) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("q", [0.0, 0.3, 0.5, 0.9, 0.99, 1.0])
def test_abs_quantile_matches_torch_quantile(q):
    values = torch.randn(1001, generator=torch.Generator().manual_seed(5))
    assert float(abs_quantile(values, q)) == pytest.approx(float(torch.quantile(values.abs(), q)), rel=1e-6)


def test_clamp_factors_limits_both_at_the_quantile():
    gen = torch.Generator().manual_seed(6)
    up, down = torch.randn(40, 4, generator=gen), torch.randn(4, 50, generator=gen)
    same = clamp_factors(up, down, 1.0)
    assert same[0] is up and same[1] is down
    limit = float(abs_quantile(torch.cat([up.flatten(), down.flatten()]), 0.9))
    clamped_up, clamped_down = clamp_factors(up, down, 0.9)
    assert max(float(clamped_up.abs().max()), float(clamped_down.abs().max())) == pytest.approx(limit)
    changed = int((clamped_up != up).sum() + (clamped_down != down).sum())
    assert 0.05 * 360 < changed <= 0.1 * 360 + 1  # about the top 10 % of the 360 entries
