"""Conv2d targets seen as Linears over their flattened weight (pure tensor helpers).

A Conv2d weight (out, in, kh, kw) is the matrix (out, in·kh·kw) for the adapter math: ΔW is kept
2-D and reshaped to the conv layout only to run the convolution or to save a file. Only
``groups == 1`` convolutions are targeted (the MMDiT's patch embedding is one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ConvSpec:
    """The geometry of a Conv2d target (as ``torch.nn.Conv2d`` stores it)."""

    kernel_size: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    @property
    def kernel_numel(self) -> int:
        return self.kernel_size[0] * self.kernel_size[1]


def as_matrix(tensor: torch.Tensor) -> torch.Tensor:
    """(rows, ...) -> (rows, prod(...)); a 0-d or 1-D tensor is returned as is."""
    if tensor.dim() < 2:
        return tensor
    return tensor.reshape(tensor.shape[0], -1)  # (rows, in, kh, kw) -> (rows, in·kh·kw)


def to_conv_weight(matrix: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """(rows, in·kh·kw) -> (rows, in, kh, kw)."""
    return matrix.reshape(matrix.shape[0], -1, *spec.kernel_size)


def to_pointwise(matrix: torch.Tensor) -> torch.Tensor:
    """(rows, cols) -> (rows, cols, 1, 1): a LoRA up matrix as a 1×1 conv weight."""
    return matrix.reshape(*matrix.shape, 1, 1)


def conv_apply(x: torch.Tensor, matrix: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """conv2d(x, matrix as a (rows, in, kh, kw) kernel) with the target's stride/padding/dilation.

    x: (B, in, H, W) -> (B, rows, h, w).
    """
    if spec.groups != 1:
        raise ValueError(f"grouped convolutions (groups={spec.groups}) are not supported")
    weight = to_conv_weight(matrix, spec)
    return F.conv2d(x, weight, None, spec.stride, spec.padding, spec.dilation, 1)
