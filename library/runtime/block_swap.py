"""Block swap (``--blocks_to_swap N``): the last N blocks of a module list live in CPU memory and stream
to the compute device around their forward and backward, overlapped with compute. Attached from outside
with hooks; the model is not changed.

Memory. Each swapped block's tensors are packed into one flat host buffer (pinned on CUDA;
:mod:`library.runtime.flat_tensors`) and its parameters point at views of it (``.data``), so the host copy
is the block's only copy while it is parked. The device holds a fixed ring of ``slots`` flat buffers, each
as large as the largest swapped block; swapped block ``j`` always uses slot ``(j - first) % slots`` and,
while live, its parameters point at views of that slot. A block moves with one copy; nothing is allocated
per step.

Order (CUDA: copies on a side stream, events order them against the compute stream). Forward: the first
block's pre-hook prefetches the first swapped block; block ``j``'s pre-hook waits for its copy and
prefetches ``j + 1``. Without a backward to come (no grad, or no output needs grad) a block is parked right
after its forward. With one, the block stays live and each output passes a gate (an identity autograd
Function, one per tensor so autograd's node order and every gradient sum stay as without swap) whose
backward runs just before the block's backward: it releases the blocks after ``j`` (finished: the engine
runs every node recorded after the gate first), makes ``j`` live again (a copy unless still in its slot) and
prefetches ``j - 1``. A block always returns to the same slot, so tensors autograd saved as views of it see
the same values. A callback at the end of the backward releases the rest and waits for the copies.

Gradients (full fine-tuning). The host copy is the canonical weight: the optimizer steps the parked (CPU)
parameters and keeps their state on the CPU. A block's gradients are computed on the device; its release
copies them into a pinned host buffer that becomes ``param.grad``. Gradients accumulated over micro-batches
go back to the device before the block's next backward, so autograd adds to them as without swap. Frozen
blocks (a network over a frozen base) need host→device copies only. On a CPU device the same path runs
(CPU copies, no streams), so the tests cover it.

Change swapped weights only while parked (outside forward/backward): slot contents are dropped at the end
of each backward, by :meth:`BlockSwap.park` and :meth:`BlockSwap.invalidate`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from library.errors import UserError
from library.runtime.flat_tensors import FlatLayout, align_cpu_tensors, allocate_group

__all__ = ["BlockSwap", "align_cpu_tensors", "attach_block_swap", "check_blocks_to_swap", "place_model"]
logger = logging.getLogger(__name__)


def max_blocks_to_swap(depth: int) -> int:
    """Two blocks stay resident (sd-scripts' limit): their compute hides the first swapped block's copy."""
    return max(0, depth - 2)


def check_blocks_to_swap(count: int | None, depth: int, what: str = "--blocks_to_swap") -> int:
    """``count`` (None -> 0) if this model can swap that many blocks, else a UserError naming the maximum."""
    count = count or 0
    limit = max_blocks_to_swap(depth)
    if not 0 <= count <= limit:
        raise UserError(f"{what} {count}: this model has {depth} joint blocks, so at most {limit} can swap "
                        f"(depth - 2); use a value from 0 to {limit}")
    return count


@dataclass
class SwapStats:
    """Cumulative counters for logs and benchmarks."""

    h2d_copies: int = 0
    h2d_bytes: int = 0
    grad_h2d_bytes: int = 0
    grad_d2h_bytes: int = 0
    backward_passes: int = 0


class _BackwardGate(torch.autograd.Function):
    """Identity on one output of a block; its backward runs just before the block's own backward."""

    @staticmethod
    def forward(ctx, swap: "BlockSwap", index: int, tensor: torch.Tensor) -> torch.Tensor:
        ctx.swap, ctx.index = swap, index
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[Any, ...]:
        ctx.swap._before_block_backward(ctx.index)
        return None, None, grad


def _needs_grad(output: Any) -> bool:
    items = output if isinstance(output, (tuple, list)) else (output,)
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in items)


class BlockSwap:
    """Swap the last ``count`` of ``blocks`` (an ``nn.ModuleList``) between the host and ``device``.

    Attaching moves the other blocks to ``device`` (the rest of the model is the caller's: see
    :func:`place_model`). Attach after anything that replaces the blocks' tensors (fp8 storage, merges).
    """

    def __init__(self, blocks: Sequence[nn.Module], count: int | None, device: torch.device | str, *,
                 slots: int = 2, what: str = "--blocks_to_swap", name: str = "joint_blocks") -> None:
        self.blocks, self.device, self.what, self.name = blocks, torch.device(device), what, name
        self._cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._num_slots = max(1, slots)
        self._layouts: dict[int, FlatLayout] = {}
        self._host: dict[int, torch.Tensor] = {}
        self._grad_host: dict[int, torch.Tensor] = {}
        self._slots: list[torch.Tensor] = []
        self._holder: list[int | None] = []  # which block's weights each slot holds (valid copies)
        self._ready: list[Any] = []  # per slot: copy-finished event
        self._free: list[Any] = []  # per slot: compute-finished-with-it event
        self._live: set[int] = set()  # blocks whose parameters point at their slot
        self._swapped = range(len(blocks), len(blocks))
        self._in_backward = False
        self._prepared: set[int] = set()  # blocks made ready for their backward in this backward pass
        self._last_forward = -1
        self.stats = SwapStats()
        self._set_count(check_blocks_to_swap(count, len(blocks), what))
        self._handles = []
        for j, block in enumerate(blocks):
            self._handles.append(block.register_forward_pre_hook(functools.partial(self._pre_forward, j)))
            self._handles.append(block.register_forward_hook(functools.partial(self._post_forward, j)))

    @property
    def count(self) -> int:
        return len(self._swapped)

    @property
    def swapped(self) -> range:
        """Indices of the swapped blocks (the last ``count``)."""
        return self._swapped

    def park(self) -> None:
        """Every swapped block back on its host copy, pending copies finished, slot contents dropped."""
        for j in sorted(self._live):
            self._evict(j)
        if self._cuda:
            self._stream.synchronize()
        self.invalidate()

    def invalidate(self) -> None:
        """Forget which blocks the slots hold (call after changing swapped weights in place)."""
        self._holder = [h if h in self._live else None for h in self._holder]

    @contextlib.contextmanager
    def swapping(self, count: int | None) -> Iterator["BlockSwap"]:
        """Swap ``count`` blocks inside the ``with`` (e.g. ``--blocks_to_swap_while_sampling``), then the
        current number again; weights are copied between host and device as blocks change sides."""
        before = self.count
        self._set_count(check_blocks_to_swap(count, len(self.blocks), self.what), logging.DEBUG)
        try:
            yield self
        finally:
            self._set_count(before, logging.DEBUG)

    def remove(self) -> None:
        """Every block back on the device and the hooks removed."""
        self._set_count(0)
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- partition ----------------------------------------------------------------------------------

    def _set_count(self, count: int, level: int = logging.INFO) -> None:
        self.park()
        depth = len(self.blocks)
        new = range(depth - count, depth)
        for j in range(depth - count):  # first, so that CPU copies they leave behind are freed before pinning
            if j in self._swapped:
                self._make_resident(j)
            else:
                self.blocks[j].to(self.device)  # loaded elsewhere (e.g. on the CPU until the swap was attached)
        entering = [j for j in new if j not in self._swapped]
        for j in entering:
            self._layouts.setdefault(j, FlatLayout.of(self.blocks[j]))
        self._host.update(allocate_group({j: self._layouts[j].nbytes for j in entering if j not in self._host},
                                         pinned=self._cuda))
        for j in entering:
            self._make_swapped(j)
        self._swapped = new
        self._alloc_slots()
        if count:
            host = sum(self._layouts[j].nbytes for j in new)
            logger.log(level, "block swap: %s %d-%d (%d of %d) on the CPU (%.1f MiB%s), %d device slots of %.1f MiB",
                       self.name, new.start, depth - 1, count, depth, host / 2**20, " pinned" if self._cuda else "",
                       len(self._slots), self._slots[0].numel() / 2**20)

    def _make_swapped(self, j: int) -> None:
        layout, flat = self._layouts[j], self._host[j]
        layout.pack(flat)
        layout.point(flat)
        for entry in layout.entries:
            grad = entry.get().grad if entry.is_param else None
            if grad is not None:
                entry.get().grad = grad.to(flat.device)

    @torch.no_grad()
    def _make_resident(self, j: int) -> None:
        """Block ``j`` back on the device in tensors of its own (the host buffer is kept for later)."""
        for entry in self._layouts[j].entries:
            grad = entry.get().grad if entry.is_param else None
            entry.point(entry.get().detach().to(self.device, copy=True))
            if grad is not None:
                entry.get().grad = grad.to(self.device)

    def _alloc_slots(self) -> None:
        if not self._swapped:
            self._slots, self._holder, self._ready, self._free = [], [], [], []
            return
        size = max(self._layouts[j].nbytes for j in self._swapped)
        count = min(self._num_slots, len(self._swapped))
        if len(self._slots) >= count and self._slots[0].numel() >= size:
            return
        self._slots = []  # free the old ring (its copies are finished: park() synchronised) before the new one
        self._slots = [torch.empty(size, dtype=torch.uint8, device=self.device) for _ in range(count)]
        self._holder, self._ready, self._free = [None] * count, [None] * count, [None] * count

    # -- moving -------------------------------------------------------------------------------------

    def _slot_of(self, j: int) -> int:
        return (j - self._swapped.start) % len(self._slots)

    def _fetch(self, j: int) -> None:
        """Start copying block ``j`` into its slot (no-op if the slot holds it)."""
        k = self._slot_of(j)
        if self._holder[k] == j:
            return
        if self._holder[k] in self._live:
            self._evict(self._holder[k])
        nbytes = self._layouts[j].nbytes
        with torch.profiler.record_function(f"block_swap.h2d[{j}]"):
            if self._cuda:
                with torch.cuda.stream(self._stream):
                    if self._free[k] is not None:
                        self._stream.wait_event(self._free[k])
                    self._slots[k][:nbytes].copy_(self._host[j], non_blocking=True)
                    self._ready[k] = self._stream.record_event()
            else:
                self._slots[k][:nbytes].copy_(self._host[j])
        self._holder[k] = j
        self.stats.h2d_copies += 1
        self.stats.h2d_bytes += nbytes

    def _activate(self, j: int, backward: bool = False) -> None:
        """Block ``j``'s tensors on its slot, its copy waited for. Before its backward, gradients accumulated
        on the host go to the device, where autograd adds this backward's to them."""
        k = self._slot_of(j)
        if j not in self._live:
            self._fetch(j)
            self._layouts[j].point(self._slots[k])
            self._live.add(j)
        if self._cuda and self._ready[k] is not None:
            torch.cuda.current_stream(self.device).wait_event(self._ready[k])
        if backward:
            for entry in self._layouts[j].entries:
                grad = entry.get().grad if entry.is_param else None
                if grad is not None:
                    entry.get().grad = grad.to(self.device, non_blocking=True, copy=True)
                    self.stats.grad_h2d_bytes += grad.numel() * grad.element_size()

    def _evict(self, j: int) -> None:
        if self._in_backward:
            self._release(j)
        else:  # no backward pending: its tensors simply point at the host copy again
            self._layouts[j].point(self._host[j])
            self._live.discard(j)

    def _grad_buffer(self, j: int) -> torch.Tensor:
        if j not in self._grad_host:  # one allocation for every swapped block that trains
            want = [i for i in self._swapped if i not in self._grad_host and
                    any(e.is_param and e.get().requires_grad for e in self._layouts[i].entries)]
            sizes = {i: self._layouts[i].nbytes for i in sorted(set(want) | {j})}
            self._grad_host.update(allocate_group(sizes, pinned=self._cuda))
        return self._grad_host[j]

    def _release(self, j: int) -> None:
        """Block ``j``'s backward is done: gradients into host buffers, tensors onto the host copy."""
        k, layout = self._slot_of(j), self._layouts[j]
        done = torch.cuda.current_stream(self.device).record_event() if self._cuda else None
        grads = {i: e.get().grad for i, e in enumerate(layout.entries) if e.is_param and e.get().grad is not None}
        layout.point(self._host[j])
        if grads:
            flat = self._grad_buffer(j)
            with torch.cuda.stream(self._stream) if self._cuda else contextlib.nullcontext():
                if done is not None:
                    self._stream.wait_event(done)
                for i, grad in grads.items():
                    host = layout.entries[i].view(flat)
                    if host.data_ptr() != grad.data_ptr():
                        host.copy_(grad, non_blocking=self._cuda)
                    if grad.is_cuda:
                        grad.record_stream(self._stream)  # freed by the next line, still read by the copy
                    layout.entries[i].get().grad = host
                    self.stats.grad_d2h_bytes += host.numel() * host.element_size()
        self._free[k] = done
        self._live.discard(j)

    # -- hooks --------------------------------------------------------------------------------------

    def _pre_forward(self, j: int, module: nn.Module, inputs: Any) -> None:
        if not self._swapped:
            return
        if self._in_backward:  # recomputation inside the backward (gradient checkpointing)
            if j in self._swapped:
                self._activate(j)
            return
        if j == 0 or (j in self._swapped and j <= self._last_forward):  # a new forward pass
            for live in sorted(self._live):  # of a forward whose backward never came
                self._evict(live)
            self._last_forward = -1
            if j == 0:
                self._fetch(self._swapped.start)
        if j not in self._swapped:
            return
        self._last_forward = j
        self._activate(j)
        if j + 1 in self._swapped:
            self._fetch(j + 1)

    def _post_forward(self, j: int, module: nn.Module, inputs: Any, output: Any) -> Any:
        if j not in self._swapped or self._in_backward:
            return None
        if self._cuda:
            self._free[self._slot_of(j)] = torch.cuda.current_stream(self.device).record_event()
        if torch.is_grad_enabled() and _needs_grad(output):
            if isinstance(output, torch.Tensor):
                return _BackwardGate.apply(self, j, output)
            return type(output)(_BackwardGate.apply(self, j, t) if isinstance(t, torch.Tensor) and t.requires_grad
                                else t for t in output)
        self._evict(j)
        return None

    def _before_block_backward(self, j: int) -> None:
        if not self._in_backward:
            self._in_backward = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
        if j in self._prepared:  # another output's gate of this block ran already
            return
        self._prepared.add(j)
        for later in sorted(i for i in self._live if i > j):  # their backward is over
            self._release(later)
        self._activate(j, backward=True)
        if j - 1 in self._swapped:
            self._fetch(j - 1)

    def _end_backward(self) -> None:
        for j in sorted(self._live, reverse=True):
            self._release(j)
        if self._cuda:
            self._stream.synchronize()  # the gradients are on the host before the optimizer reads them
        self._in_backward, self._last_forward = False, -1
        self._prepared.clear()
        self.invalidate()
        self.stats.backward_passes += 1
        logger.debug("block swap: backward %d done (%d block copies, %.1f MiB host->device so far)",
                     self.stats.backward_passes, self.stats.h2d_copies, self.stats.h2d_bytes / 2**20)


def place_model(model: nn.Module, swap: BlockSwap | None, device: torch.device | str) -> nn.Module:
    """``model.to(device)`` for everything but the swapped blocks (which stay on their host copies)."""
    if swap is None or not swap.count:
        return model.to(device)
    skip = {id(m) for j in swap.swapped for m in swap.blocks[j].modules()}
    with torch.no_grad():
        for module in model.modules():
            if id(module) in skip:
                continue
            for _, param in module.named_parameters(recurse=False):
                param.data = param.data.to(device)
                if param.grad is not None:
                    param.grad = param.grad.to(device)
            for name, buffer in module.named_buffers(recurse=False):
                setattr(module, name, buffer.to(device))
    return model


def attach_block_swap(model: nn.Module, blocks: nn.ModuleList, count: int | None, device: torch.device | str, *,
                      what: str = "--blocks_to_swap") -> BlockSwap | None:
    """Swap the last ``count`` of ``blocks`` (inside ``model``) and put the rest of ``model`` on ``device``;
    None (and ``model`` moved whole) when ``count`` is 0."""
    count = check_blocks_to_swap(count, len(blocks), what)
    if not count:
        model.to(device)
        return None
    swap = BlockSwap(blocks, count, device, what=what)
    place_model(model, swap, device)
    return swap
