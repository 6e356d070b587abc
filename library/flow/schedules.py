"""σ schedules for sampling rectified-flow models (σ = 1 is pure noise, the last entry is 0).

normal: Stability AI / diffusers (``FlowMatchEulerDiscreteScheduler``); simple and beta: ComfyUI's
schedulers of the same names, picked from the model's 1000-entry table of shifted σ.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

TRAIN_STEPS = 1000


def shift_sigma(t: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """The SD3 time shift: s·t / (1 + (s − 1)·t). ``shift`` > 1 moves mass toward noise."""
    return shift * t / (1 + (shift - 1) * t)


def _with_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas.float(), torch.zeros(1)])


def normal_sigmas(steps: int, shift: float) -> torch.Tensor:
    """t_i = linspace(1, shift(1/1000), steps), σ_i = shift(t_i), then 0 (end point shifted twice).

    Rounding follows diffusers' FlowMatchEulerDiscreteScheduler bit for bit: the end point is
    the float32 training table's last entry, the rest is float64 until the final cast.
    """
    t_min = float(shift_sigma(torch.tensor(1.0 / TRAIN_STEPS, dtype=torch.float32), shift))
    t = np.linspace(TRAIN_STEPS * 1.0, TRAIN_STEPS * t_min, steps) / TRAIN_STEPS
    return _with_zero(torch.from_numpy(shift_sigma(t, shift)).float())


def model_sigma_table(shift: float) -> torch.Tensor:
    """ComfyUI's per-model table S_k = shift(k/1000), k = 1..1000, ascending (float32)."""
    return shift_sigma(torch.arange(1, TRAIN_STEPS + 1, dtype=torch.float32) / TRAIN_STEPS, shift)


def simple_sigmas(steps: int, shift: float) -> torch.Tensor:
    """ComfyUI "simple": S[−(1 + ⌊x·1000/steps⌋)] for x = 0..steps−1, then 0."""
    table = model_sigma_table(shift)
    stride = len(table) / steps
    return _with_zero(torch.stack([table[-(1 + int(x * stride))] for x in range(steps)]))


def _betainc(a: float, b: float, x: np.ndarray) -> np.ndarray:
    """Regularised incomplete beta I_x(a, b) by its continued fraction (modified Lentz), float64."""
    from math import lgamma

    x = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)
    swap = x > (a + 1) / (a + b + 2)
    xs = np.where(swap, 1 - x, x)
    aa, bb = np.where(swap, b, a), np.where(swap, a, b)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_front = aa * np.log(xs) + bb * np.log1p(-xs) - np.log(aa) + lgamma(a + b) - lgamma(a) - lgamma(b)
    tiny = 1e-300
    f, c, d = np.full_like(xs, tiny), np.full_like(xs, tiny), np.zeros_like(xs)
    for m in range(0, 300):
        for k in (0, 1):
            if m == 0 and k == 0:
                num = np.ones_like(xs)
            elif k == 0:
                num = m * (bb - m) * xs / ((aa + 2 * m - 1) * (aa + 2 * m))
            else:
                num = -(aa + m) * (aa + bb + m) * xs / ((aa + 2 * m) * (aa + 2 * m + 1))
            d = 1 + num * d
            d = np.where(np.abs(d) < tiny, tiny, d)
            c = 1 + num / c
            c = np.where(np.abs(c) < tiny, tiny, c)
            d = 1 / d
            f = f * c * d
    front = np.exp(log_front) * f
    out = np.where(swap, 1 - front, front)
    return np.where(x <= 0, 0.0, np.where(x >= 1, 1.0, out))


def beta_ppf(q: np.ndarray, a: float, b: float, iters: int = 80) -> np.ndarray:
    """Inverse of the Beta(a, b) CDF by bisection on :func:`_betainc` (float64, |error| < 1e-15)."""
    lo, hi = np.zeros_like(q, dtype=np.float64), np.ones_like(q, dtype=np.float64)
    for _ in range(iters):
        mid = (lo + hi) / 2
        below = _betainc(a, b, mid) < q
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    out = (lo + hi) / 2
    # ComfyUI rounds ppf·999 with rint: the exact median 1/2 of a symmetric Beta is a tie that
    # must not come out a hair low (499.4999… instead of 499.5).
    return np.where((a == b) & (np.asarray(q) == 0.5), 0.5, out)


def beta_sigmas(steps: int, shift: float, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    """ComfyUI "beta": S[rint(BetaPPF(1 − x/steps)·999)], consecutive duplicates dropped, then 0."""
    table = model_sigma_table(shift)
    q = 1 - np.linspace(0, 1, steps, endpoint=False)
    idx = np.rint(beta_ppf(q, alpha, beta) * (len(table) - 1)).astype(np.int64)
    keep = [int(i) for n, i in enumerate(idx) if n == 0 or i != idx[n - 1]]
    return _with_zero(table[keep])


SCHEDULES: dict[str, Callable[[int, float], torch.Tensor]] = {
    "normal": normal_sigmas,
    "simple": simple_sigmas,
    "beta": beta_sigmas,
}


def make_sigmas(scheduler: str, steps: int, shift: float) -> torch.Tensor:
    """σ schedule of ``steps`` steps (steps + 1 values ending in 0) by scheduler name."""
    if scheduler not in SCHEDULES:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULES)}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return SCHEDULES[scheduler](steps, shift)
