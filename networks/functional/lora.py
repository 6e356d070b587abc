"""LoRA as pure functions on tensors (Linear layers only: the MMDiT has no LoRA-targeted conv).

Layout (sd-scripts / ComfyUI): ``down`` is (rank, in), ``up`` is (out, rank),
ΔW = scale · up @ down with scale = alpha / rank. ``up`` starts at zero so ΔW starts at zero.
Dropout follows sd-scripts' ``LoRAModule.forward``: rank dropout masks the down projection's output
per (sample, rank) and rescales by 1 / (1 - p); module dropout skips the whole delta with
probability p. Both act only when ``training`` is true.
"""

from __future__ import annotations

import math

import torch


def kaiming_uniform(
    shape: tuple[int, int],
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Same draw as ``torch.nn.init.kaiming_uniform_(t, a=sqrt(5))`` on a 2-D tensor.

    gain = sqrt(2 / (1 + a²)) = sqrt(1/3), bound = gain · sqrt(3 / fan_in) = 1 / sqrt(fan_in),
    fan_in = shape[1].
    """
    bound = 1.0 / math.sqrt(shape[1])
    weight = torch.empty(shape, dtype=dtype, device=device)
    return weight.uniform_(-bound, bound, generator=generator)


def lora_init(
    out_features: int,
    in_features: int,
    rank: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh (down (rank, in), up (out, rank)): down kaiming-uniform(a=√5), up zeros."""
    down = kaiming_uniform((rank, in_features), generator=generator, dtype=dtype, device=device)
    up = torch.zeros((out_features, rank), dtype=dtype, device=device)
    return down, up


def lora_scale(alpha: float | None, rank: int) -> float:
    """alpha / rank; an alpha of None or 0 means alpha = rank (scale 1), as sd-scripts does."""
    if alpha is None or float(alpha) == 0.0:
        return 1.0
    return float(alpha) / rank


def lora_delta(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """ΔW = scale · up @ down, shape (out, in)."""
    return (up @ down) * scale


def module_dropped(
    module_dropout: float,
    training: bool,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> bool:
    """True when this call's delta is skipped (one uniform draw < p, training only)."""
    if not training or module_dropout <= 0.0:
        return False
    draw = torch.rand(1, generator=generator, device=device)
    return bool(draw.item() < module_dropout)


def rank_dropout_mask(
    lx: torch.Tensor,
    rank_dropout: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Keep-mask for the down output lx (batch, ..., rank): one draw per (sample, rank).

    The mask has shape (batch, 1, ..., 1, rank) so every token of a sample shares it; for a
    1-D lx (a single vector) it has shape (rank,).
    """
    rank = lx.shape[-1]
    if lx.dim() == 1:
        mask_shape: tuple[int, ...] = (rank,)
    else:
        mask_shape = (lx.shape[0], *([1] * (lx.dim() - 2)), rank)
    draw = torch.rand(mask_shape, generator=generator, device=lx.device)
    return (draw > rank_dropout).to(lx.dtype)


def lora_bypass(
    x: torch.Tensor,
    base_out: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    scale: float,
    *,
    rank_dropout: float = 0.0,
    module_dropout: float = 0.0,
    training: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """y = base_out + scale · (x @ downᵀ) @ upᵀ, with sd-scripts' rank/module dropout in training.

    x: (..., in); base_out: (..., out) — the frozen layer's output for x. The multiplier of a
    network is folded into ``scale`` by the caller.
    """
    if module_dropped(module_dropout, training, generator, x.device):
        return base_out
    lx = x @ down.t()  # (..., rank)
    if training and rank_dropout > 0.0:
        lx = lx * rank_dropout_mask(lx, rank_dropout, generator)
        scale = scale / (1.0 - rank_dropout)
    return base_out + (lx @ up.t()) * scale


def merge_lora(
    weight: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    scale: float,
    multiplier: float = 1.0,
) -> torch.Tensor:
    """weight + multiplier · ΔW, computed in float32 and returned in weight's dtype."""
    delta = lora_delta(down.float(), up.float(), scale)
    merged = weight.float() + multiplier * delta.to(weight.device)
    return merged.to(weight.dtype)
