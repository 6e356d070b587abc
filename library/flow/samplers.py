"""Samplers for rectified flow: Euler, Euler ancestral (ComfyUI's flow variant) and DPM++ 2M.

Each step is a small pure function of float32 tensors; :func:`sample` runs a schedule with a
velocity callable ``velocity_fn(x, sigma, step_index) -> v`` (guidance happens inside it). The
denoised estimate of a velocity prediction is D = x − σ·v.
"""

from __future__ import annotations

from typing import Callable

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def denoised_from_velocity(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """x̂0 = x − σ·v."""
    return x - sigma * v


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """x ← x + (σ_next − σ)·v."""
    return x + (sigma_next - sigma) * v


def euler_ancestral_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    noise: torch.Tensor,
    eta: float = 1.0,
) -> torch.Tensor:
    """ComfyUI's rectified-flow Euler ancestral step (DESIGN §3): deterministic move to σ_d, then
    renoise to σ_next with fresh ``noise``."""
    denoised = denoised_from_velocity(x, v, sigma)
    if float(sigma_next) == 0.0:
        return denoised
    sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
    ratio = sigma_down / sigma
    x = ratio * x + (1 - ratio) * denoised
    alpha_ratio = (1 - sigma_next) / (1 - sigma_down)
    renoise = (sigma_next**2 - sigma_down**2 * alpha_ratio**2).clamp(min=0).sqrt()
    return alpha_ratio * x + noise * renoise


def dpmpp_2m_step(
    x: torch.Tensor,
    denoised: torch.Tensor,
    old_denoised: torch.Tensor | None,
    sigma_prev: torch.Tensor | None,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
) -> torch.Tensor:
    """DPM++ 2M in t = −log σ. First order on the first step and when σ_next = 0."""
    if float(sigma_next) == 0.0:
        return denoised
    h = torch.log(sigma) - torch.log(sigma_next)
    if old_denoised is not None and sigma_prev is not None:
        h_last = torch.log(sigma_prev) - torch.log(sigma)
        r = h_last / h
        denoised = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
    return (sigma_next / sigma) * x - torch.expm1(-h) * denoised


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, dtype=torch.float32, device=device).to(x.device)


def _run_euler(fn: VelocityFn, x: torch.Tensor, sigmas: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    for i in range(len(sigmas) - 1):
        x = euler_step(x, fn(x, sigmas[i], i).float(), sigmas[i], sigmas[i + 1])
    return x


def _run_euler_a(fn: VelocityFn, x: torch.Tensor, sigmas: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    for i in range(len(sigmas) - 1):
        v = fn(x, sigmas[i], i).float()
        x = euler_ancestral_step(x, v, sigmas[i], sigmas[i + 1], _noise_like(x, generator))
    return x


def _run_dpmpp_2m(fn: VelocityFn, x: torch.Tensor, sigmas: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    old = None
    for i in range(len(sigmas) - 1):
        denoised = denoised_from_velocity(x, fn(x, sigmas[i], i).float(), sigmas[i])
        prev = sigmas[i - 1] if i > 0 else None
        x = dpmpp_2m_step(x, denoised, old, prev, sigmas[i], sigmas[i + 1])
        old = denoised
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": _run_euler,
    "euler_a": _run_euler_a,
    "dpmpp_2m": _run_dpmpp_2m,
}


def sample(
    velocity_fn: VelocityFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    sampler: str = "euler",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Integrate from σ = sigmas[0] to sigmas[-1] (= 0) in float32; returns the final latents."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    sigmas = sigmas.to(device=x.device, dtype=torch.float32)
    return SAMPLERS[sampler](velocity_fn, x.float(), sigmas, generator)
