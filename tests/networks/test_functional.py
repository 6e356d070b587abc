"""Property and oracle tests for networks.functional (LoRA, LoKr, factorization)."""

from __future__ import annotations

import math

import lycoris.functional.general as lycoris_general
import lycoris.functional.lokr as lycoris_lokr
import lycoris.modules.lokr as lycoris_modules
import pytest
import torch

from networks.functional.factorization import factorization
from networks.functional.lokr import (
    lokr_apply,
    lokr_bake_scalar,
    lokr_bypass,
    lokr_delta,
    lokr_init,
    lokr_rank,
    lokr_scale,
    lokr_shapes,
    merge_lokr,
)
from networks.functional.lora import (
    lora_bypass,
    lora_delta,
    lora_init,
    lora_scale,
    merge_lora,
)

# Hand-computed: 1536 = 2^9·3, 2432 = 2^7·19; a dividing factor is taken as is, -1 is the pair
# closest to sqrt (39.2 for 1536 -> 32·48, 49.3 for 2432 -> 38·64).
FACTORIZATION_TABLE = [
    (1536, -1, (32, 48)), (1536, 2, (2, 768)), (1536, 4, (4, 384)), (1536, 8, (8, 192)),
    (1536, 16, (16, 96)), (2432, -1, (38, 64)), (2432, 2, (2, 1216)), (2432, 4, (4, 608)),
    (2432, 8, (8, 304)), (2432, 16, (16, 152)), (2432, 5, (4, 608)), (360, 16, (15, 24)),
    (4608, -1, (64, 72)), (127, -1, (1, 127)), (1024, -1, (32, 32)), (64, 0, (1, 64)),
]


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randomised(tensors: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    gen = _generator(seed)
    return {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) * 0.1 + 0.05 for k, v in tensors.items()}


# ---------------------------------------------------------------- factorization


@pytest.mark.parametrize(("dimension", "factor", "expected"), FACTORIZATION_TABLE)
def test_factorization_table(dimension: int, factor: int, expected: tuple[int, int]) -> None:
    assert factorization(dimension, factor) == expected


def test_factorization_matches_lycoris() -> None:
    for dimension in range(1, 1200):
        for factor in (-1, 0, 1, 2, 3, 4, 5, 7, 8, 16, 32):
            assert factorization(dimension, factor) == lycoris_general.factorization(dimension, factor)
    for dimension in (1536, 2432, 4608, 6144, 7296, 9728):
        for factor in (-1, 2, 4, 8, 16):
            assert factorization(dimension, factor) == lycoris_general.factorization(dimension, factor)


# ---------------------------------------------------------------- LoRA


def test_lora_init_shapes_zero_delta_and_kaiming_draw() -> None:
    down, up = lora_init(48, 32, 4, generator=_generator(3))
    assert down.shape == (4, 32) and up.shape == (48, 4)
    assert torch.equal(lora_delta(down, up, 2.0), torch.zeros(48, 32))
    reference = torch.empty(4, 32)
    torch.nn.init.kaiming_uniform_(reference, a=math.sqrt(5), generator=_generator(3))
    assert torch.equal(down, reference)


def test_lora_scale() -> None:
    assert lora_scale(16, 32) == 0.5
    assert lora_scale(1, 4) == 0.25
    assert lora_scale(None, 8) == 1.0
    assert lora_scale(0, 8) == 1.0


def test_lora_bypass_equals_merged_forward() -> None:
    gen = _generator(1)
    weight = torch.randn(40, 24, generator=gen)
    down, up = torch.randn(6, 24, generator=gen), torch.randn(40, 6, generator=gen)
    x = torch.randn(3, 5, 24, generator=gen)
    scale = lora_scale(3, 6)
    bypass = lora_bypass(x, x @ weight.t(), down, up, scale)
    merged = x @ merge_lora(weight, down, up, scale, 1.0).t()
    torch.testing.assert_close(bypass, merged, rtol=0, atol=1e-5)
    assert torch.equal(lora_bypass(x, x @ weight.t(), down, up, scale, rank_dropout=0.5, module_dropout=0.5), bypass)


def test_merge_lora_multiplier_and_dtype() -> None:
    gen = _generator(2)
    weight = torch.randn(8, 4, generator=gen).to(torch.bfloat16)
    down, up = torch.randn(2, 4, generator=gen), torch.randn(8, 2, generator=gen)
    merged = merge_lora(weight, down, up, 0.5, multiplier=0.7)
    assert merged.dtype == torch.bfloat16
    expected = (weight.float() + 0.7 * 0.5 * up @ down).to(torch.bfloat16)
    assert torch.equal(merged, expected)


def test_lora_rank_dropout_keeps_expectation() -> None:
    gen = _generator(4)
    down, up = torch.randn(8, 16, generator=gen), torch.randn(12, 8, generator=gen)
    x = torch.randn(4, 3, 16, generator=gen)
    base = torch.zeros(4, 3, 12)
    expected = lora_bypass(x, base, down, up, 1.0)
    draws = torch.stack([
        lora_bypass(x, base, down, up, 1.0, rank_dropout=0.3, training=True, generator=gen) for _ in range(4000)
    ])
    error = (draws.mean(0) - expected).abs().max() / expected.abs().max()
    assert error < 0.05
    single = lora_bypass(x, base, down, up, 1.0, rank_dropout=0.3, training=True, generator=_generator(9))
    assert not torch.allclose(single, expected)


def test_lora_module_dropout_rate() -> None:
    gen = _generator(5)
    down, up = torch.randn(2, 4, generator=gen), torch.randn(3, 2, generator=gen)
    x, base = torch.randn(2, 4, generator=gen), torch.zeros(2, 3)
    skipped = sum(
        bool(torch.equal(lora_bypass(x, base, down, up, 1.0, module_dropout=0.25, training=True, generator=gen), base))
        for _ in range(4000)
    )
    assert abs(skipped / 4000 - 0.25) < 0.03


# ---------------------------------------------------------------- LoKr

LOKR_CASES = [  # (out, in, rank, factor, full_matrix, decompose_both, expected names)
    (1536, 1536, 8, -1, False, False, {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    (1536, 1536, 8, 8, True, False, {"lokr_w1", "lokr_w2"}),
    (4608, 1536, 16, 8, True, False, {"lokr_w1", "lokr_w2"}),
    (4608, 1536, 4, 4, False, False, {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    (2432, 2432, 8, -1, False, True, {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}),
    (2432, 2432, 64, -1, False, False, {"lokr_w1", "lokr_w2"}),
    (7296, 2432, 4, 2, True, False, {"lokr_w1", "lokr_w2"}),
    (9728, 2432, 8, 16, False, True, {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
]


@pytest.mark.parametrize(("out_f", "in_f", "rank", "factor", "full", "both", "names"), LOKR_CASES)
def test_lokr_init_layout_and_zero_delta(out_f, in_f, rank, factor, full, both, names) -> None:
    tensors = lokr_init(out_f, in_f, rank, factor=factor, full_matrix=full, decompose_both=both, generator=_generator())
    assert set(tensors) == names
    delta = lokr_delta(tensors, lokr_scale(4, rank, tensors))
    assert delta.shape == (out_f, in_f)
    assert torch.count_nonzero(delta) == 0
    (a, c), (b, d) = lokr_shapes(out_f, in_f, factor)
    w1 = tensors.get("lokr_w1", None)
    assert (w1.shape if w1 is not None else (tensors["lokr_w1_a"].shape[0], tensors["lokr_w1_b"].shape[1])) == (a, c)
    assert torch.count_nonzero(tensors.get("lokr_w1", tensors.get("lokr_w1_a"))) > 0


def test_lokr_scale() -> None:
    full = lokr_init(64, 64, 4, full_matrix=True)
    split = lokr_init(64, 64, 1, factor=2)
    assert lokr_scale(2, 4, full) == 1.0
    assert lokr_scale(2, 1, split) == 2.0 and lokr_rank(split) == 1
    assert lokr_scale(8, 16, lokr_init(1536, 1536, 16)) == 0.5
    assert lokr_scale(None, 16, lokr_init(1536, 1536, 16)) == 1.0 and lokr_rank(full) is None


@pytest.mark.parametrize(("out_f", "in_f", "rank", "factor", "full", "both", "names"), LOKR_CASES)
def test_lokr_delta_matches_lycoris_diff_weight(out_f, in_f, rank, factor, full, both, names) -> None:
    tensors = _randomised(lokr_init(out_f, in_f, rank, factor=factor, full_matrix=full, decompose_both=both), 7)
    alpha = 3.0
    ours = lokr_delta(tensors, lokr_scale(alpha, rank, tensors))
    order = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
    oracle = lycoris_lokr.diff_weight(*(tensors.get(k) for k in order), None, gamma=alpha, backend="torch")
    torch.testing.assert_close(ours, oracle, rtol=0, atol=1e-6)
    hand = torch.kron(tensors["lokr_w1"] if "lokr_w1" in tensors else tensors["lokr_w1_a"] @ tensors["lokr_w1_b"],
                      tensors["lokr_w2"] if "lokr_w2" in tensors else tensors["lokr_w2_a"] @ tensors["lokr_w2_b"])
    torch.testing.assert_close(ours, hand * lokr_scale(alpha, rank, tensors), rtol=0, atol=1e-9)


@pytest.mark.parametrize(("out_f", "in_f", "rank", "factor", "full", "both"), [
    (48, 32, 4, -1, False, False), (64, 96, 2, 4, True, False), (96, 96, 2, -1, False, True), (4608, 1536, 8, 8, False, False),
])
def test_lokr_bypass_equals_merged_forward(out_f, in_f, rank, factor, full, both) -> None:
    gen = _generator(11)
    fresh = lokr_init(out_f, in_f, rank, factor=factor, full_matrix=full, decompose_both=both)
    tensors = {k: v.float() for k, v in _randomised(fresh, 3).items()}
    weight = torch.randn(out_f, in_f, generator=gen) / math.sqrt(in_f)
    x = torch.randn(2, 5, in_f, generator=gen)
    scale = lokr_scale(2.0, rank, tensors)
    bypass = lokr_bypass(x, x @ weight.t(), tensors, scale)
    merged = x @ merge_lokr(weight, tensors, scale, 1.0).t()
    torch.testing.assert_close(bypass, merged, rtol=1e-5, atol=1e-5)
    direct = x @ lokr_delta(tensors, 1.0).t()
    torch.testing.assert_close(lokr_apply(x, tensors), direct, rtol=1e-5, atol=1e-5)


def test_lokr_use_scalar() -> None:
    tensors = lokr_init(64, 48, 2, factor=4, use_scalar=True, generator=_generator(2))
    assert tensors["scalar"].item() == 0.0 and torch.count_nonzero(tensors["lokr_w2_b"]) > 0
    assert torch.count_nonzero(lokr_delta(tensors, 1.0)) == 0
    tensors["scalar"] = torch.tensor(0.3)
    baked = lokr_bake_scalar(tensors)
    assert "scalar" not in baked
    torch.testing.assert_close(lokr_delta(baked, 0.5), lokr_delta(tensors, 0.5))
    x = torch.randn(3, 48, generator=_generator(3))
    torch.testing.assert_close(lokr_bypass(x, torch.zeros(3, 64), tensors, 0.5), x @ lokr_delta(tensors, 0.5).t())


@pytest.mark.parametrize("use_scalar", [False, True])
def test_lokr_init_matches_lycoris_module(use_scalar: bool) -> None:
    base = torch.nn.Linear(96, 64, bias=False)
    torch.manual_seed(123)
    module = lycoris_modules.LokrModule("m", base, lora_dim=2, alpha=1, factor=4, decompose_both=True,
                                        use_scalar=use_scalar)
    ours = lokr_init(64, 96, 2, factor=4, decompose_both=True, use_scalar=use_scalar, generator=_generator(123))
    theirs = {k: v.detach() for k, v in module.named_parameters() if k.startswith("lokr_") or k == "scalar"}
    assert set(ours) == set(theirs)
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name


def test_lokr_dropout() -> None:
    gen = _generator(6)
    tensors = {k: v.float() for k, v in _randomised(lokr_init(16, 12, 2, factor=2), 1).items()}
    x, base = torch.randn(4, 12, generator=gen), torch.zeros(4, 16)
    expected = lokr_bypass(x, base, tensors, 1.0)
    draws = torch.stack([
        lokr_bypass(x, base, tensors, 1.0, rank_dropout=0.3, rank_dropout_scale=True, training=True, generator=gen)
        for _ in range(4000)
    ])
    assert (draws.mean(0) - expected).abs().max() / expected.abs().max() < 0.05
    skipped = sum(
        bool(torch.equal(lokr_bypass(x, base, tensors, 1.0, module_dropout=0.4, training=True, generator=gen), base))
        for _ in range(4000)
    )
    assert abs(skipped / 4000 - 0.4) < 0.03
