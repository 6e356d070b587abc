"""fp8 weight storage for frozen Linears (``--fp8_base`` / ``--fp8_base_unet``), attached from outside.

A Linear's weight is stored as ``float8_e4m3fn`` (half the bytes of bf16) and cast to the input's
dtype in each call, so the matmul runs in the compute (autocast) dtype. The module keeps its identity
and its state_dict keys (only its class changes), so adapters hooked onto it, and merging into it,
work as before. Values beyond e4m3's range (±448) are clamped, not turned into NaN. An fp8 input (a
model that casts activations to its weights' dtype) is computed in the dtype the weight had before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from typing import Callable

from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


class Fp8Linear(nn.Linear):
    """A Linear whose weight is stored in fp8 and upcast per call."""

    compute_dtype: torch.dtype = torch.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            x = x.to(self.compute_dtype)
        weight = self.weight.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)


def to_fp8(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` in float8_e4m3fn, clamped to its finite range."""
    return weight.detach().float().clamp(-FP8_MAX, FP8_MAX).to(FP8)


@torch.no_grad()
def store_linears_in_fp8(module: nn.Module, skip: Callable[[str], bool] = lambda name: False) -> int:
    """Turn every plain ``nn.Linear`` inside ``module`` (but those whose path ``skip`` accepts) into an
    :class:`Fp8Linear` (frozen); returns how many. Biases keep their dtype. Call it before adapters
    hook the Linears' ``forward``."""
    count = 0
    for name, child in module.named_modules():
        if type(child) is not nn.Linear or skip(name):
            continue
        dtype = child.weight.dtype
        child.weight = nn.Parameter(to_fp8(child.weight), requires_grad=False)
        child.__class__ = Fp8Linear
        child.compute_dtype = dtype
        count += 1
    return count


def fp8_storage_bytes(module: nn.Module) -> int:
    """Bytes held by the module's parameters (to report what fp8 storage saved)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())
