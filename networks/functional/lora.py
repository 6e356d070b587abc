"""LoRA as pure functions on tensors, for Linear targets and Conv2d targets (``conv`` given).

Layout (sd-scripts / ComfyUI): ``down`` is (rank, in), ``up`` is (out, rank),
ΔW = scale · up @ down with scale = alpha / rank. ``up`` starts at zero so ΔW starts at zero.
For a Conv2d target ``in`` is in·kh·kw (the flattened kernel, see ``functional.conv``): the down
projection is a conv with the target's kernel/stride/padding and the up projection a 1×1 conv.
Dropout follows sd-scripts' ``LoRAModule.forward``: neuron dropout (``torch`` dropout with p) on
the down projection's output, then rank dropout masks it per (sample, rank) and rescales by
1 / (1 - p); module dropout skips the whole delta with probability p. All act only in training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .conv import ConvSpec, conv_apply, to_pointwise


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
    channel_dim: int = -1,
) -> torch.Tensor:
    """Keep-mask for the down output lx (batch, ..., rank) or a conv's (batch, rank, h, w)
    (``channel_dim=1``): one draw per (sample, rank).

    The mask is 1 everywhere but the batch and rank dims, so every token / pixel of a sample shares
    it; for a 1-D lx (a single vector) it has shape (rank,).
    """
    rank = lx.shape[channel_dim]
    if lx.dim() == 1:
        mask_shape: list[int] = [rank]
    else:
        mask_shape = [lx.shape[0]] + [1] * (lx.dim() - 1)
        mask_shape[channel_dim] = rank
    draw = torch.rand(mask_shape, generator=generator, device=lx.device)
    return (draw > rank_dropout).to(lx.dtype)


def lora_up_path(
    lx: torch.Tensor,
    up: torch.Tensor,
    scale: float,
    *,
    conv: bool = False,
    rank_dropout: float = 0.0,
    neuron_dropout: float = 0.0,
    training: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """scale · up(lx) for the down output lx, after neuron then rank dropout (training only).

    lx is (..., rank) for a Linear, (B, rank, h, w) for a conv (``conv``; up is then a 1×1 conv).
    Neuron dropout is ``torch.nn.functional.dropout`` (the global RNG, as sd-scripts); the rank
    mask is drawn from ``generator``.
    """
    if training and neuron_dropout > 0.0:
        lx = F.dropout(lx, p=neuron_dropout, training=True)
    if training and rank_dropout > 0.0:
        lx = lx * rank_dropout_mask(lx, rank_dropout, generator, channel_dim=1 if conv else -1)
        scale = scale / (1.0 - rank_dropout)
    if conv:
        return F.conv2d(lx, to_pointwise(up)) * scale  # (B, rank, h, w) -> (B, out, h, w)
    return lx @ (up * scale).t()


def lora_bypass(
    x: torch.Tensor,
    base_out: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    scale: float,
    *,
    conv: ConvSpec | None = None,
    rank_dropout: float = 0.0,
    module_dropout: float = 0.0,
    neuron_dropout: float = 0.0,
    training: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """y = base_out + scale · up(down(x)), with sd-scripts' dropouts in training.

    Linear: x (..., in), base_out (..., out). Conv2d (``conv`` given): x (B, in, H, W), base_out
    (B, out, h, w); down is the target's conv, up a 1×1 conv, and the rank mask is shared by every
    pixel of a sample. The network's multiplier is folded into ``scale`` by the caller.
    """
    if module_dropped(module_dropout, training, generator, x.device):
        return base_out
    if conv is None and not (training and (rank_dropout > 0.0 or neuron_dropout > 0.0)):
        # the common case as one fused GEMM: base_out + lx @ (scale·up)ᵀ (scaling the small up matrix)
        lx = x @ down.t()  # (..., rank)
        flat = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), lx.reshape(-1, lx.shape[-1]), (up * scale).t())
        return flat.view(base_out.shape)
    lx = x @ down.t() if conv is None else conv_apply(x, down, conv)  # (..., rank) or (B, rank, h, w)
    return base_out + lora_up_path(lx, up, scale, conv=conv is not None, rank_dropout=rank_dropout,
                                   neuron_dropout=neuron_dropout, training=training, generator=generator)


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
