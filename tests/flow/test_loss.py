"""Flow-matching loss: objectives, loss types, Huber schedules, masks, weights, reduction, precision."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from library.flow.loss import (
    HUBER_SCHEDULES,
    LOSS_TYPES,
    LossSpec,
    apply_mask,
    denoised_estimate,
    elementwise_loss,
    flow_matching_loss,
    flow_matching_loss_per_sample,
    huber_threshold,
    noisy_input,
    raw_residual,
    resize_mask,
    sd3_residual,
    velocity_target,
)
from library.flow.weighting import loss_weighting

SHAPE = (4, 16, 8, 8)


def _batch(seed: int = 0, shape: tuple[int, ...] = SHAPE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=g) for _ in range(3))  # model_pred, x0, noise


def test_noisy_input_and_velocity() -> None:
    _, x0, noise = _batch()
    torch.testing.assert_close(noisy_input(x0, noise, torch.zeros(4)), x0)
    torch.testing.assert_close(noisy_input(x0, noise, torch.ones(4)), noise)
    sigmas, h = torch.tensor([0.1, 0.3, 0.6, 0.9]), 0.05  # x_σ is linear in σ: dx_σ/dσ = v exactly
    slope = (noisy_input(x0, noise, sigmas + h) - noisy_input(x0, noise, sigmas)) / h
    torch.testing.assert_close(slope, velocity_target(x0, noise), rtol=0, atol=1e-4)


def test_sd3_residual_is_denoised_minus_clean() -> None:
    pred, x0, noise = _batch()
    sigmas = torch.tensor([0.0, 0.25, 0.5, 1.0])
    x_hat0 = denoised_estimate(noisy_input(x0, noise, sigmas), pred, sigmas)
    torch.testing.assert_close(sd3_residual(pred, x0, noise, sigmas), x_hat0 - x0, rtol=0, atol=1e-5)


def test_sd3_l2_equals_sigma_squared_raw_per_sample() -> None:
    pred, x0, noise = _batch(1)
    sigmas = torch.tensor([1e-3, 0.2, 0.7, 1.0])
    sd3 = flow_matching_loss_per_sample(pred, x0, noise, sigmas, LossSpec(objective="sd3"))
    raw = flow_matching_loss_per_sample(pred, x0, noise, sigmas, LossSpec(objective="raw"))
    torch.testing.assert_close(sd3, sigmas**2 * raw, rtol=1e-6, atol=1e-6)


def test_default_loss_matches_the_sd_scripts_recipe() -> None:
    """x̂0 = x_σ − σ·v̂ vs x0, MSE per sample, × w(σ) × loss weight, batch mean (written out by hand)."""
    pred, x0, noise = _batch(2)
    sigmas = torch.tensor([0.1, 0.4, 0.6, 0.95])
    weights = torch.tensor([1.0, 1.0, 0.5, 2.0])
    s = sigmas.view(-1, 1, 1, 1)
    x_hat0 = (1 - s) * x0 + s * noise - s * pred
    cos_w = 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    expected = (((x_hat0 - x0) ** 2).mean(dim=(1, 2, 3)) * cos_w * weights).mean()
    got = flow_matching_loss(pred, x0, noise, sigmas, LossSpec(weighting="cosmap"), sample_weights=weights)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("objective", ["sd3", "raw"])
@pytest.mark.parametrize("loss_type", ["l2", "l1", "huber", "smooth_l1"])
def test_gradients_finite_at_sigma_zero_with_sigma_sqrt(objective: str, loss_type: str) -> None:
    pred, x0, noise = _batch(3, (3, 4, 8, 8))
    pred.requires_grad_(True)
    sigmas = torch.tensor([0.0, 1e-8, 0.5], requires_grad=True)
    spec = LossSpec(objective=objective, loss_type=loss_type, weighting="sigma_sqrt")
    loss = flow_matching_loss(pred, x0, noise, sigmas, spec)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(pred.grad).all() and torch.isfinite(sigmas.grad).all()
    if objective == "sd3":
        assert torch.all(pred.grad[0] == 0)  # σ = 0: x̂0 = x0 whatever the prediction


@pytest.mark.parametrize("schedule", ["constant", "exponential", "snr"])
@pytest.mark.parametrize("loss_type", ["huber", "smooth_l1"])
@pytest.mark.parametrize("objective", ["sd3", "raw"])
def test_huber_schedules_finite_over_sigma(schedule: str, loss_type: str, objective: str) -> None:
    pred, x0, noise = _batch(4)
    pred.requires_grad_(True)
    sigmas = torch.tensor([0.0, 1e-6, 0.5, 1.0])
    c = huber_threshold(sigmas, schedule, huber_c=0.1, huber_scale=1.0)
    assert torch.isfinite(c).all() and torch.all(c > 0)
    spec = LossSpec(objective=objective, loss_type=loss_type, huber_schedule=schedule)
    per_sample = flow_matching_loss_per_sample(pred, x0, noise, sigmas, spec)
    assert torch.isfinite(per_sample).all() and torch.all(per_sample >= 0)
    per_sample.sum().backward()
    assert torch.isfinite(pred.grad).all()


def test_huber_schedule_values() -> None:
    sigmas = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(huber_threshold(sigmas, "constant", 0.1, 2.0), torch.full((3,), 0.2))
    torch.testing.assert_close(huber_threshold(sigmas, "exponential", 0.1, 2.0), 2.0 * 0.1**sigmas)
    exp_c = huber_threshold(torch.tensor([0.3]), "exponential", 0.1, 1.0)
    alpha = -math.log(0.1) / 1000
    assert float(exp_c) == pytest.approx(math.exp(-alpha * 300.0), rel=1e-6)  # sd-scripts' rule at t = 1000σ
    torch.testing.assert_close(huber_threshold(sigmas, "snr", 0.1, 2.0), 2.0 * torch.tensor([1.0, 0.325, 0.1]))


def test_snr_schedule_is_sd_scripts_rule_with_flow_noise_to_signal_ratio() -> None:
    """c = (1 − huber_c)/(1 + ρ)² + huber_c with ρ = 1/√SNR = σ/(1 − σ), SNR = ((1 − σ)/σ)²."""
    sigmas = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    snr = ((1 - sigmas) / sigmas) ** 2
    rho = snr**-0.5
    expected = (1 - 0.1) / (1 + rho) ** 2 + 0.1
    torch.testing.assert_close(huber_threshold(sigmas.float(), "snr", 0.1, 1.0), expected.float(), rtol=1e-6, atol=1e-7)
    assert torch.all(expected[1:] < expected[:-1])  # clean → ≈ l2 (c = 1), noisy → huber_c


def test_huber_loss_properties() -> None:
    r = torch.linspace(-5, 5, 1001)
    c = torch.tensor(0.3)
    huber, l2 = LOSS_TYPES["huber"](r, c), LOSS_TYPES["l2"](r, None)
    naive = 2 * c.double() * (torch.sqrt(r.double() ** 2 + c.double() ** 2) - c.double())
    torch.testing.assert_close(huber.double(), naive, rtol=1e-5, atol=1e-7)
    assert torch.all(huber <= l2 + 1e-7) and torch.all(huber <= 2 * c * r.abs() + 1e-7)
    torch.testing.assert_close(LOSS_TYPES["smooth_l1"](r, c), huber / c, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(LOSS_TYPES["huber"](r, torch.tensor(1e4)), l2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(LOSS_TYPES["smooth_l1"](r, torch.tensor(1e-7)), 2 * r.abs(), rtol=1e-5, atol=1e-6)
    small = torch.tensor([1e-3, -2e-3])
    torch.testing.assert_close(LOSS_TYPES["huber"](small, c), small**2, rtol=1e-4, atol=0)
    assert LOSS_TYPES["huber"](torch.zeros(1), torch.zeros(1)).item() == 0.0


def test_huber_with_large_threshold_equals_l2_loss() -> None:
    pred, x0, noise = _batch(5)
    sigmas = torch.tensor([0.1, 0.4, 0.6, 0.9])
    l2 = flow_matching_loss(pred, x0, noise, sigmas)
    huge_c = LossSpec(loss_type="huber", huber_schedule="constant", huber_c=1e4)
    big = flow_matching_loss(pred, x0, noise, sigmas, huge_c)
    torch.testing.assert_close(big, l2, rtol=1e-5, atol=0)


def test_l1_loss_and_elementwise_shape() -> None:
    r = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(elementwise_loss(r, "l1"), r.abs())
    assert elementwise_loss(r, "huber", torch.rand(4)).shape == SHAPE
    with pytest.raises(ValueError, match="sigmas"):
        elementwise_loss(r, "huber")


def test_all_ones_mask_equals_unmasked() -> None:
    pred, x0, noise = _batch(7)
    sigmas = torch.tensor([0.2, 0.4, 0.6, 0.8])
    plain = flow_matching_loss_per_sample(pred, x0, noise, sigmas)
    masked = flow_matching_loss_per_sample(pred, x0, noise, sigmas, mask=torch.ones(4, 64, 64))
    torch.testing.assert_close(masked, plain, rtol=1e-6, atol=0)


def test_half_mask_is_not_down_weighted() -> None:
    _, x0, noise = _batch(8)
    sigmas = torch.tensor([0.2, 0.4, 0.6, 0.8])
    pred = velocity_target(x0, noise) + 0.5  # uniform error everywhere
    mask = torch.zeros(4, 1, 64, 64)
    mask[..., :32] = 1.0  # left half of the image (pixel grid, 8× the latent grid)
    plain = flow_matching_loss_per_sample(pred, x0, noise, sigmas, LossSpec(objective="raw"))
    masked = flow_matching_loss_per_sample(pred, x0, noise, sigmas, LossSpec(objective="raw"), mask=mask)
    torch.testing.assert_close(masked, plain, rtol=1e-6, atol=0)
    torch.testing.assert_close(plain, torch.full((4,), 0.25))


def test_mask_selects_the_unmasked_region() -> None:
    loss = torch.rand(SHAPE, generator=torch.Generator().manual_seed(9))
    mask = torch.zeros(4, 64, 64)
    mask[:, :32] = 1.0  # top half
    got = apply_mask(loss, mask).mean(dim=(1, 2, 3))
    torch.testing.assert_close(got, loss[:, :, :4].mean(dim=(1, 2, 3)), rtol=1e-6, atol=0)


def test_zero_mask_gives_zero_loss_for_that_sample_only() -> None:
    pred, x0, noise = _batch(10)
    sigmas = torch.tensor([0.2, 0.4, 0.6, 0.8])
    mask = torch.ones(4, 64, 64)
    mask[1] = 0.0
    plain = flow_matching_loss_per_sample(pred, x0, noise, sigmas)
    masked = flow_matching_loss_per_sample(pred, x0, noise, sigmas, mask=mask)
    assert torch.isfinite(masked).all() and masked[1].item() == 0.0
    torch.testing.assert_close(masked[[0, 2, 3]], plain[[0, 2, 3]], rtol=1e-6, atol=0)


def test_resize_mask() -> None:
    mask = torch.zeros(2, 16, 16)
    mask[:, :, :4] = 1.0  # first quarter of the columns
    small = resize_mask(mask, (2, 2))
    assert small.shape == (2, 1, 2, 2)
    torch.testing.assert_close(small[:, 0], torch.tensor([[0.5, 0.0], [0.5, 0.0]]).expand(2, 2, 2))
    torch.testing.assert_close(resize_mask(mask.unsqueeze(1), (2, 2)), small)
    assert resize_mask(torch.ones(1, 4, 4), (8, 8)).shape == (1, 1, 8, 8)
    assert resize_mask(torch.ones(1, 4, 4), (4, 4)).dtype == torch.float32
    with pytest.raises(ValueError, match="mask"):
        resize_mask(torch.ones(2, 3, 4, 4), (2, 2))


def test_sample_weights_and_loss_weighting_scale_per_sample() -> None:
    pred, x0, noise = _batch(11)
    sigmas = torch.tensor([0.1, 0.3, 0.5, 0.7])
    base = flow_matching_loss_per_sample(pred, x0, noise, sigmas)
    weights = torch.tensor([1.0, 0.0, 0.5, 2.0])
    weighted = flow_matching_loss_per_sample(pred, x0, noise, sigmas, sample_weights=weights)
    torch.testing.assert_close(weighted, base * weights)
    scalar = flow_matching_loss_per_sample(pred, x0, noise, sigmas, sample_weights=[0.5])
    torch.testing.assert_close(scalar, base * 0.5)
    for name in ("sigma_sqrt", "cosmap"):
        got = flow_matching_loss_per_sample(pred, x0, noise, sigmas, LossSpec(weighting=name))
        torch.testing.assert_close(got, base * loss_weighting(name, sigmas))
    total = flow_matching_loss(pred, x0, noise, sigmas, sample_weights=weights)
    torch.testing.assert_close(total, (base * weights).mean())
    with pytest.raises(ValueError, match="sample_weights"):
        flow_matching_loss(pred, x0, noise, sigmas, sample_weights=[1.0, 2.0])


def test_float32_under_bf16_autocast() -> None:
    pred, x0, noise = _batch(12)
    sigmas = torch.tensor([0.1, 0.3, 0.5, 0.7])
    spec = LossSpec(loss_type="huber", weighting="cosmap")
    expected = flow_matching_loss(pred, x0, noise, sigmas, spec)
    pred_bf16 = pred.bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = flow_matching_loss(pred_bf16, x0.bfloat16(), noise.bfloat16(), sigmas, spec)
    loss.backward()
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert pred_bf16.grad.dtype == torch.bfloat16
    expected_bf16_inputs = flow_matching_loss(
        pred.bfloat16().float(), x0.bfloat16().float(), noise.bfloat16().float(), sigmas, spec
    )
    torch.testing.assert_close(loss, expected_bf16_inputs, rtol=1e-6, atol=0)
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=0)


def test_raw_residual_is_velocity_error() -> None:
    pred, x0, noise = _batch(13)
    torch.testing.assert_close(raw_residual(pred, x0, noise, torch.rand(4)), pred - (noise - x0))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"objective": "eps"}, "objective"),
        ({"loss_type": "l3"}, "loss_type"),
        ({"loss_type": "huber", "huber_schedule": "linear"}, "huber_schedule"),
        ({"loss_type": "huber", "huber_c": 0.0}, "huber_c"),
        ({"loss_type": "smooth_l1", "huber_scale": -1.0}, "huber_scale"),
        ({"weighting": "logit_normal"}, "loss_weighting"),
        ({"loss_type": "l2", "huber_schedule": "linear"}, "huber_schedule"),
    ],
)
def test_invalid_spec_raises_at_construction(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LossSpec(**kwargs)


def test_spec_defaults_and_immutability() -> None:
    pred, x0, noise = _batch(14)
    sigmas = torch.rand(4, generator=torch.Generator().manual_seed(14))
    spec = LossSpec()
    assert (spec.objective, spec.loss_type, spec.weighting) == ("sd3", "l2", "none")
    assert (spec.huber_c, spec.huber_scale, spec.huber_schedule) == (0.1, 1.0, "snr")
    assert LossSpec(huber_c=0.0).huber_c == 0.0  # the threshold is only checked for a loss type that uses it
    default = flow_matching_loss(pred, x0, noise, sigmas)
    torch.testing.assert_close(default, flow_matching_loss(pred, x0, noise, sigmas, spec), rtol=0, atol=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.loss_type = "l1"  # type: ignore[misc]


def test_shape_mismatch_raises() -> None:
    pred, x0, noise = _batch(15)
    with pytest.raises(ValueError, match="shape"):
        flow_matching_loss(pred[:, :8], x0, noise, torch.rand(4))
    with pytest.raises(ValueError, match="sigmas"):
        flow_matching_loss(pred, x0, noise, torch.rand(4, 1))


def test_registries_are_read_only() -> None:
    with pytest.raises(TypeError):
        HUBER_SCHEDULES["linear"] = HUBER_SCHEDULES["constant"]  # type: ignore[index]
