"""A module's tensors packed into one flat byte buffer, for block swap: one copy moves a whole block.

A :class:`FlatLayout` lists every parameter and buffer of a module (any dtype: fp8 stays fp8) with its
byte offset; each starts on an :data:`ALIGN`-byte boundary, so a view of the buffer reinterpreted as the
tensor's dtype is as aligned as a tensor of its own. Helpers allocate buffers (pinned host memory for
CUDA copies, in one allocation per group: the pinned allocator rounds each allocation up to a power of
two) and re-align CPU tensors read from memory-mapped files.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

ALIGN = 256  # bytes


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


@dataclass(frozen=True)
class FlatEntry:
    """One tensor of a module: where it hangs and where it lies in the flat buffer."""

    module: nn.Module
    name: str
    is_param: bool
    offset: int
    dtype: torch.dtype
    shape: torch.Size

    def get(self) -> torch.Tensor:
        return getattr(self.module, self.name)

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        nbytes = self.shape.numel() * self.dtype.itemsize
        return flat[self.offset:self.offset + nbytes].view(self.dtype).view(self.shape)

    def point(self, tensor: torch.Tensor) -> None:
        """The module's tensor becomes ``tensor`` (a parameter keeps its identity; its grad stays)."""
        if self.is_param:
            self.get().data = tensor
        else:
            setattr(self.module, self.name, tensor)


@dataclass(frozen=True)
class FlatLayout:
    entries: tuple[FlatEntry, ...]
    nbytes: int  # a multiple of ALIGN

    @classmethod
    def of(cls, module: nn.Module) -> "FlatLayout":
        entries, offset = [], 0
        for sub in module.modules():
            owned = [(n, t, True) for n, t in sub.named_parameters(recurse=False)]
            owned += [(n, t, False) for n, t in sub.named_buffers(recurse=False)]
            for name, tensor, is_param in owned:
                entries.append(FlatEntry(sub, name, is_param, offset, tensor.dtype, tensor.shape))
                offset += aligned(tensor.numel() * tensor.element_size())
        return cls(tuple(entries), max(offset, ALIGN))

    def point(self, flat: torch.Tensor) -> None:
        """Every tensor of the module becomes its view of ``flat``."""
        for entry in self.entries:
            entry.point(entry.view(flat))

    @torch.no_grad()
    def pack(self, flat: torch.Tensor) -> None:
        """Copy the module's current tensors into ``flat``."""
        for entry in self.entries:
            entry.view(flat).copy_(entry.get().detach())


def allocate_group(sizes: dict[int, int], pinned: bool) -> dict[int, torch.Tensor]:
    """One host byte buffer sliced into ``{key: buffer of size}`` (pinned for asynchronous CUDA copies)."""
    if not sizes:
        return {}
    flat = torch.empty(sum(sizes.values()), dtype=torch.uint8, pin_memory=pinned)
    out, offset = {}, 0
    for key, size in sizes.items():
        out[key] = flat[offset:offset + size]
        offset += size
    return out


@torch.no_grad()
def align_cpu_tensors(module: nn.Module, alignment: int = 64) -> int:
    """Copy the CPU parameters and buffers of ``module`` that do not start on an ``alignment``-byte boundary
    (tensors read from a memory-mapped file may not); returns how many. CPU matmul kernels round differently
    for misaligned operands, so this keeps results identical with and without block swap (whose buffers are
    aligned), and the aligned kernels are the faster ones."""
    count = 0
    for sub in module.modules():
        for name, tensor in list(sub.named_parameters(recurse=False)) + list(sub.named_buffers(recurse=False)):
            if tensor.device.type != "cpu" or tensor.data_ptr() % alignment == 0:
                continue
            if isinstance(tensor, nn.Parameter):
                tensor.data = tensor.data.clone()
            else:
                setattr(sub, name, tensor.clone())
            count += 1
    return count
