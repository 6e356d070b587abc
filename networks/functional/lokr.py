"""LoKr (LyCORIS) as pure functions on tensors, for Linear and Conv2d targets.

Tensors use LyCORIS' names: ``lokr_w1`` or ``lokr_w1_a`` (a, r) / ``lokr_w1_b`` (r, c), and
``lokr_w2`` or ``lokr_w2_a`` (b, r) / ``lokr_w2_b`` (r, d), with out = a·b and in = c·d where
(a, b) = factorization(out, factor) and (c, d) = factorization(in, factor):
W1 = w1 or w1_a @ w1_b (the small factor), W2 = w2 or w2_a @ w2_b (the big one) and
ΔW = scale · kron(W1, W2), scale = alpha / rank, or 1 when both W1 and W2 are full matrices.

Layout rules (LyCORIS' ``LokrModule`` for Linear): W1 is split into a/b only when
``decompose_both`` and rank < max(a, c) / 2 and not ``full_matrix``; W2 is split only when
rank < max(b, d) / 2 and not ``full_matrix`` (otherwise it is a full matrix even without
``full_matrix``). Init, drawn in LyCORIS' order (W2 side first, then W1 side): w1, w1_a, w1_b and
w2_a are kaiming-uniform(a=√5); w2 / w2_b are zero, so ΔW starts at exactly 0.

``use_scalar`` (LyCORIS semantics): a 0-d learnable ``scalar`` starting at 0 multiplies ΔW, and
w2 / w2_b are then kaiming-initialised instead of zeroed (ΔW still starts at 0, but both factors
get gradients from the start). On save LyCORIS folds the scalar into w1 (or w1_a) and does not
store it: see ``lokr_bake_scalar``.

Conv2d targets (LyCORIS' ``LokrModule`` on a conv): only the channel dims are factorized,
(a, b) = factorization(out) and (c, d) = factorization(in); the kernel goes with W2, which is kept
here as the matrix (b, d·kh·kw) — LyCORIS saves a full w2 as (b, d, kh, kw) and a low-rank w2_b
already flattened as (r, d·kh·kw). kron(W1, W2 flattened) is the flattened 4-D
kron(W1[:, :, None, None], W2), so ΔW stays the 2-D (out, in·kh·kw) matrix of ``functional.conv``.
The W2 split rule compares the rank with the channel dims (b, d), as LyCORIS does.

Dropout in the bypass (LyCORIS' bypass mode): ``neuron_dropout`` is ``torch`` dropout on the
delta's output, the ``dropout`` LyCORIS applies as ``self.drop(ΔW x)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .conv import ConvSpec, conv_apply
from .factorization import factorization
from .lora import kaiming_uniform, module_dropped

LokrTensors = dict[str, torch.Tensor]


def lokr_shapes(
    out_features: int, in_features: int, factor: int = -1, kernel_numel: int = 1,
) -> tuple[tuple[int, int], tuple[int, int]]:
    """((a, c), (b, d·k)): the full shapes of W1 and W2; ``in_features`` counts channels only and
    ``kernel_numel`` = kh·kw for a conv (1 for a Linear)."""
    a, b = factorization(out_features, factor)
    c, d = factorization(in_features, factor)
    return (a, c), (b, d * kernel_numel)


def _factor_tensors(
    name: str,
    shape: tuple[int, int],
    rank: int,
    split: bool,
    zero_last: bool,
    generator: torch.Generator | None,
    options: dict,
) -> LokrTensors:
    """One Kronecker factor, full or split; ``zero_last`` zeroes the full matrix or its b part."""
    if not split:
        if zero_last:
            return {name: torch.zeros(shape, **options)}
        return {name: kaiming_uniform(shape, generator=generator, **options)}
    first = kaiming_uniform((shape[0], rank), generator=generator, **options)
    if zero_last:
        second = torch.zeros((rank, shape[1]), **options)
    else:
        second = kaiming_uniform((rank, shape[1]), generator=generator, **options)
    return {f"{name}_a": first, f"{name}_b": second}


def lokr_init(
    out_features: int,
    in_features: int,
    rank: int,
    *,
    factor: int = -1,
    full_matrix: bool = False,
    decompose_both: bool = False,
    use_scalar: bool = False,
    kernel_numel: int = 1,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> LokrTensors:
    """Fresh LoKr tensors with LyCORIS names and init (ΔW == 0); adds ``scalar`` when use_scalar.

    For a conv, ``in_features`` is the input channels and ``kernel_numel`` = kh·kw (W2 is (b, d·k)).
    """
    (a, c), (b, dk) = lokr_shapes(out_features, in_features, factor, kernel_numel)
    split_w1 = decompose_both and rank < max(a, c) / 2 and not full_matrix
    split_w2 = rank < max(b, dk // kernel_numel) / 2 and not full_matrix
    options = {"dtype": dtype, "device": device}
    tensors = _factor_tensors("lokr_w2", (b, dk), rank, split_w2, not use_scalar, generator, options)
    tensors.update(_factor_tensors("lokr_w1", (a, c), rank, split_w1, False, generator, options))
    if use_scalar:
        tensors["scalar"] = torch.zeros((), **options)
    return tensors


def lokr_is_full(tensors: LokrTensors) -> bool:
    """True when both W1 and W2 are stored as full matrices."""
    return "lokr_w1" in tensors and "lokr_w2" in tensors


def lokr_rank(tensors: LokrTensors) -> int | None:
    """The rank of the split factor (w1_a's or w2_a's columns); None when both are full."""
    for name in ("lokr_w1_a", "lokr_w2_a"):
        if name in tensors:
            return int(tensors[name].shape[1])
    return None


def lokr_scale(alpha: float | None, rank: int, tensors: LokrTensors) -> float:
    """alpha / rank, but 1.0 when both factors are full; alpha None or 0 means alpha = rank."""
    if lokr_is_full(tensors) or alpha is None or float(alpha) == 0.0:
        return 1.0
    return float(alpha) / rank


def lokr_w1(tensors: LokrTensors) -> torch.Tensor:
    """W1 (a, c) = w1 or w1_a @ w1_b."""
    if "lokr_w1" in tensors:
        return tensors["lokr_w1"]
    return tensors["lokr_w1_a"] @ tensors["lokr_w1_b"]


def lokr_w2(tensors: LokrTensors) -> torch.Tensor:
    """W2 (b, d) = w2 or w2_a @ w2_b."""
    if "lokr_w2" in tensors:
        return tensors["lokr_w2"]
    return tensors["lokr_w2_a"] @ tensors["lokr_w2_b"]


def _total_scale(tensors: LokrTensors, scale: float) -> torch.Tensor | float:
    """scale times the learnable scalar when present."""
    if "scalar" in tensors:
        return tensors["scalar"] * scale
    return scale


def lokr_delta(tensors: LokrTensors, scale: float) -> torch.Tensor:
    """ΔW = scale · (scalar ·) kron(W1, W2), shape (a·b, c·d) = (out, in)."""
    return torch.kron(lokr_w1(tensors), lokr_w2(tensors)) * _total_scale(tensors, scale)


def lokr_apply(x: torch.Tensor, tensors: LokrTensors) -> torch.Tensor:
    """x @ kron(W1, W2)ᵀ without building ΔW: vec⁻¹(x) is (c, d), the result W1 · X · W2ᵀ is (a, b)."""
    w1 = lokr_w1(tensors)
    c = w1.shape[1]
    grid = x.reshape(*x.shape[:-1], c, -1)  # (..., in) -> (..., c, d)
    if "lokr_w2" in tensors:
        right = grid @ tensors["lokr_w2"].t()  # (..., c, b)
    else:
        right = (grid @ tensors["lokr_w2_b"].t()) @ tensors["lokr_w2_a"].t()  # (..., c, r) -> (..., c, b)
    both = w1 @ right  # (a, c) @ (..., c, b) -> (..., a, b)
    return both.reshape(*x.shape[:-1], -1)  # (..., a, b) -> (..., out)


def lokr_output_dropout(
    delta_out: torch.Tensor,
    *,
    channel_dim: int = -1,
    rank_dropout: float = 0.0,
    rank_dropout_scale: bool = False,
    neuron_dropout: float = 0.0,
    training: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Rank dropout (whole output features along ``channel_dim``, one draw per call) then neuron
    dropout (``torch`` dropout, the global RNG) on the delta's output. Training only.

    The rank mask is rescaled by 1 / (1 - p) only when ``rank_dropout_scale`` (LyCORIS rescales by
    1 / mask.mean(); the exact 1 / (1 - p) keeps the expectation unbiased).
    """
    if not training:
        return delta_out
    if rank_dropout > 0.0:
        draw = torch.rand(delta_out.shape[channel_dim], generator=generator, device=delta_out.device)
        keep = (draw > rank_dropout).to(delta_out.dtype)
        if rank_dropout_scale:
            keep = keep / (1.0 - rank_dropout)
        view = [1] * delta_out.dim()
        view[channel_dim] = -1
        delta_out = delta_out * keep.view(view)  # (out,) -> broadcast over channel_dim
    if neuron_dropout > 0.0:
        delta_out = F.dropout(delta_out, p=neuron_dropout, training=True)
    return delta_out


def lokr_bypass(
    x: torch.Tensor,
    base_out: torch.Tensor,
    tensors: LokrTensors,
    scale: float,
    *,
    conv: ConvSpec | None = None,
    rank_dropout: float = 0.0,
    rank_dropout_scale: bool = False,
    module_dropout: float = 0.0,
    neuron_dropout: float = 0.0,
    training: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """y = base_out + ΔW x: a Linear goes factor by factor (``lokr_apply``, ΔW never built); a
    Conv2d (``conv`` given, x (B, in, H, W)) convolves with ΔW reshaped to the kernel.

    Module dropout skips the delta with probability p; then ``lokr_output_dropout`` (for a conv
    the rank mask drops whole output channels). All dropouts act only when ``training``.
    """
    if module_dropped(module_dropout, training, generator, x.device):
        return base_out
    if conv is None:
        delta_out = lokr_apply(x, tensors) * _total_scale(tensors, scale)  # (..., out)
    else:
        delta_out = conv_apply(x, lokr_delta(tensors, scale), conv)  # (B, out, h, w)
    delta_out = lokr_output_dropout(
        delta_out, channel_dim=-1 if conv is None else 1, rank_dropout=rank_dropout,
        rank_dropout_scale=rank_dropout_scale, neuron_dropout=neuron_dropout, training=training, generator=generator,
    )
    return base_out + delta_out


def merge_lokr(
    weight: torch.Tensor,
    tensors: LokrTensors,
    scale: float,
    multiplier: float = 1.0,
) -> torch.Tensor:
    """weight + multiplier · ΔW, computed in float32 and returned in weight's dtype."""
    as_float = {name: tensor.float() for name, tensor in tensors.items()}
    delta = lokr_delta(as_float, scale).to(weight.device)
    return (weight.float() + multiplier * delta).to(weight.dtype)


def lokr_bake_scalar(tensors: LokrTensors) -> LokrTensors:
    """Fold ``scalar`` into w1 (or w1_a) and drop it, as LyCORIS stores a use_scalar LoKr."""
    if "scalar" not in tensors:
        return dict(tensors)
    baked = {name: tensor for name, tensor in tensors.items() if name != "scalar"}
    first = "lokr_w1" if "lokr_w1" in baked else "lokr_w1_a"
    baked[first] = baked[first] * tensors["scalar"]
    return baked
