"""Predict the peak device memory of a training step from shapes alone (the model on the ``meta`` device).

What is counted, and how:
- weights: every parameter and buffer of the model as stored (bf16, fp8 Linears, fp32 adapters), minus
  the last N joint blocks that ``--blocks_to_swap`` keeps in CPU memory, plus the device ring of
  min(``swap_buffers``, N) slots as large as the largest swapped block (library/runtime/block_swap.py;
  its gradients and optimizer state of swapped trained blocks live on the host: not counted).
- activations and gradients: *traced*. One forward + loss + backward runs on ``meta`` tensors under a
  dispatch mode that adds the bytes of every new tensor storage and subtracts them when it is freed:
  the high-water mark of eager PyTorch's own allocation sequence (checkpointing and recomputation,
  adapter branches, fp8 upcasts; fused modes free gradients in post-accumulate-grad hooks, after a norm
  pass for a global clip). Stand-ins on ``meta``: the fused attention kernel (not the L×L math
  fallback), autocast (matmul inputs cast to the half dtype, trained weights' copies cached for the
  forward), and host copies for ``--cpu_offload_checkpointing`` (out of the count).
- optimizer states and step temporaries: per-optimizer rules (:data:`STATE_RULES`) over the trained
  parameters' shapes and dtypes.
Peak = weights + optimizer states + max(forward/backward high-water mark, gradients + step temporaries).
Not counted: the CUDA context and kernel workspaces (cuBLAS, flash attention), allocator rounding and
fragmentation, text encoders and VAE (a planned run caches their outputs), dataloader memory.
bench/gpu_memory.py measures the same quantity (CUDA peak, or peak RSS on a CPU) and compares.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, replace
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GIB = 2**30


@dataclass(frozen=True)
class PlanSettings:
    width: int = 1024  # pixels
    height: int = 1024
    batch_size: int = 1
    text_tokens: int = 77 + 256  # CLIP tokens + --t5xxl_max_token_length
    compute_dtype: torch.dtype = torch.bfloat16
    gradient_checkpointing: bool = False
    cpu_offload_checkpointing: bool = False
    fused: str | None = None  # "parameter" (--fused_backward_pass), "block" (--blockwise_fused_optimizers)
    max_grad_norm: float = 1.0
    optimizer: str = "adamw"
    blocks_to_swap: int = 0
    swap_buffers: int = 2  # device slots of block swap (block_swap.BlockSwap's ``slots``)
    device: str = "cuda"  # which optimizer implementations (foreach, fused kernels) to assume


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes of each part, and the predicted peak."""

    weights: int
    optimizer_states: int
    gradients: int  # of all trained tensors (plain), or the most held at once (fused)
    activations: int  # live at the end of the forward (saved for backward), autocast copies included
    backward_peak: int  # traced high-water mark above weights and states (activations + gradients + temporaries)
    step_temporaries: int
    swap_buffers: int
    peak: int
    settings: PlanSettings


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of live tensor storages created under it (on ``meta``)."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.sizes: dict[int, int] = {}
        for t in exclude:
            self.sizes[t.untyped_storage()._cdata] = 0  # long-lived (weights): never counted

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "meta":
                self.track(t)
        return out

    def track(self, t: torch.Tensor, count: bool = True) -> None:
        storage = t.untyped_storage()
        key, size = storage._cdata, storage.nbytes() if count else 0
        if key in self.sizes:
            return
        self.sizes[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self.sizes.pop(key, 0)


class _Offload(torch.autograd.Function):
    """``.to("cpu")`` of a meta tensor in a trace: an uncounted copy (it lives in host memory)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, tracker: _LiveBytes) -> torch.Tensor:
        with torch.utils._python_dispatch._disable_current_modes():
            out = torch.empty_like(x)
        tracker.track(out, count=False)
        out._offloaded = True
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


_LOW_PRECISION = (F.linear, F.conv2d, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.bmm,
                  torch.addmm, torch.baddbmm, torch.einsum)  # what autocast runs in its half dtype


class _TraceFunctions(TorchFunctionMode):
    """Trace-time stand-ins on ``meta``: flash attention instead of the math fallback, host copies for the
    checkpoint offload, and autocast (fp32 inputs of matmuls cast to the half dtype, trained weights'
    copies cached for the forward, as autocast caches them)."""

    def __init__(self, tracker: _LiveBytes, half: torch.dtype | None) -> None:
        super().__init__()
        self.tracker, self.half = tracker, half
        self.cache: dict[int, torch.Tensor] | None = None  # during the forward only

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.half is not None and (func in _LOW_PRECISION or func is F.scaled_dot_product_attention):
            args = tuple(self._cast(a) for a in args)
        if func is F.scaled_dot_product_attention:
            return _flash(*args, **kwargs)
        if func is torch.Tensor.to and _to_host(args, kwargs):
            return _Offload.apply(args[0], self.tracker)
        if func is torch.Tensor.to and getattr(args[0], "_offloaded", False):
            return args[0].clone()  # back to the device inside the recomputed block: a counted copy
        return func(*args, **kwargs)

    def _cast(self, a):
        if not isinstance(a, torch.Tensor) or a.dtype != torch.float32:
            return a
        if self.cache is None or not (a.is_leaf and a.requires_grad):
            return a.to(self.half)
        if id(a) not in self.cache:
            self.cache[id(a)] = a.to(self.half)
        return self.cache[id(a)]


def _to_host(args: tuple, kwargs: dict) -> bool:
    target = kwargs.get("device", args[1] if len(args) > 1 else None)
    return args[0].device.type == "meta" and isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu"


def _flash(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """The fused attention kernel's memory behaviour: saves q, k, v, the output and a float32 log-sum-exp
    per query (the CPU flash kernel; the CUDA flash and memory-efficient kernels save the same, plus RNG
    seeds that checkpoint's recomputation check does not accept on ``meta``)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]


@dataclass(frozen=True)
class Trace:
    """Live bytes (beyond the weights) at the forward's end, high-water mark, after backward; most gradients."""

    forward_end: int
    peak: int
    after_backward: int
    held_gradients: int
    host_blocks: int = 0  # swapped blocks whose gradients went to the host during the traced backward


def _grad_groups(mmdit: nn.Module, trained: list[nn.Parameter], fused: str | None) -> list[list[nn.Parameter]]:
    if fused != "block":
        return [[p] for p in trained]
    blocks = [[p for p in b.parameters() if p.requires_grad] for b in getattr(mmdit, "joint_blocks", [])]
    inside = {p for block in blocks for p in block}
    return [b for b in blocks if b] + [[p] for p in trained if p not in inside]


class _GradLedger:
    """Post-accumulate-grad hooks that free gradients as the fused modes do, and count what is held."""

    def __init__(self, groups: list[list[nn.Parameter]]) -> None:
        self.groups, self.group_of = groups, {p: i for i, g in enumerate(groups) for p in g}
        self.arrived = [0] * len(groups)
        self.held = self.most = 0
        self.norm_pass = False

    def hook(self, p: nn.Parameter) -> None:
        self.held += p.grad.untyped_storage().nbytes()
        self.most = max(self.most, self.held)
        if self.norm_pass:  # pass 1 of a global clip: norm, then free
            self._free([p])
            return
        gi = self.group_of.get(p)
        if gi is None:  # kept until the optimizer step (a plain step's resident parameter)
            return
        self.arrived[gi] += 1
        if self.arrived[gi] == len(self.groups[gi]):
            self._free(self.groups[gi])

    def _free(self, params: list[nn.Parameter]) -> None:
        for q in params:
            if q.grad is not None:
                self.held -= q.grad.untyped_storage().nbytes()
                q.grad = None


def _run_backward(loss: torch.Tensor, retain_graph: bool = False) -> None:
    """The autograd engine called directly: ``loss.backward()`` would be handled by the trace's function
    mode, and a mode's handler runs with the mode switched off, so checkpointed blocks would be
    recomputed without the trace's attention and autocast stand-ins."""
    from torch.autograd import Variable

    Variable._execution_engine.run_backward((loss,), (torch.ones_like(loss),), retain_graph, False, (), True, True)


def _swapped_groups(mmdit: nn.Module, trained: list[nn.Parameter], blocks_to_swap: int) -> list[list[nn.Parameter]]:
    """Per swapped block (the last ``blocks_to_swap``), its trained parameters (whose gradients and optimizer
    state live on the host under block swap)."""
    wanted = set(trained)
    blocks = list(mmdit.joint_blocks)[len(mmdit.joint_blocks) - blocks_to_swap:] if blocks_to_swap else []
    return [g for g in ([p for p in b.parameters() if p in wanted] for b in blocks) if g]


def swapped_params(mmdit: nn.Module, trained: list[nn.Parameter], blocks_to_swap: int) -> set[nn.Parameter]:
    return {p for g in _swapped_groups(mmdit, trained, blocks_to_swap) for p in g}


def _backward(loss: torch.Tensor, mmdit: nn.Module, trained: list[nn.Parameter], settings: PlanSettings) -> int:
    """Backpropagate as the run would; returns the most gradient bytes alive at once on the device."""
    host = _swapped_groups(mmdit, trained, settings.blocks_to_swap)
    # block swap moves a swapped block's gradients to the host after its backward; fused steps free them
    ledger = _GradLedger(host if settings.fused is None else _grad_groups(mmdit, trained, settings.fused))
    handles = [p.register_post_accumulate_grad_hook(ledger.hook) for p in trained]
    try:
        if settings.fused is not None and settings.max_grad_norm > 0:
            ledger.norm_pass = True
            _run_backward(loss, retain_graph=True)
            ledger.norm_pass = False
        _run_backward(loss)
    finally:
        for handle in handles:
            handle.remove()
    return ledger.most


def trace_step(mmdit: nn.Module, trained: list[nn.Parameter], settings: PlanSettings) -> Trace:
    """Forward + flow-matching-style loss + backward of ``mmdit`` (on ``meta``) at the settings' sizes."""
    mmdit.gradient_checkpointing = settings.gradient_checkpointing
    mmdit.cpu_offload_checkpointing = settings.cpu_offload_checkpointing
    cfg, dtype, b = mmdit.config, settings.compute_dtype, settings.batch_size
    tracker = _LiveBytes(exclude=[*mmdit.parameters(), *mmdit.buffers(), *trained])
    functions = _TraceFunctions(tracker, None if dtype == torch.float32 else dtype)
    with tracker, functions:
        x0 = torch.empty(b, cfg.in_channels, settings.height // 8, settings.width // 8, device="meta")
        noise = torch.empty_like(x0)
        x = x0 + noise  # x_σ (float32, as the step makes it)
        context = torch.empty(b, settings.text_tokens, cfg.context_dim, device="meta")
        pooled, timesteps = torch.empty(b, cfg.pooled_dim, device="meta"), torch.empty(b, device="meta")
        functions.cache = {}
        pred = mmdit(x, timesteps, context, pooled)
        functions.cache = None  # autocast drops its weight copies when the forward's context ends
        loss = (pred.float() - (noise - x0)).square().mean()
        del pred, x, context, pooled
        forward_end = tracker.live
        held = _backward(loss, mmdit, trained, settings)
        del loss, x0, noise
        after = tracker.live
    for p in trained:
        p.grad = None
    return Trace(forward_end, tracker.peak, after, held, _host_blocks(mmdit, trained, settings))


def _host_blocks(mmdit: nn.Module, trained: list[nn.Parameter], settings: PlanSettings) -> int:
    """How many swapped blocks change the trace (those with trained parameters, in a plain full fine-tune)."""
    if settings.fused is not None or not swapped_params(mmdit, trained, settings.blocks_to_swap):
        return 0
    return settings.blocks_to_swap


# --- optimizer states: (state bytes of a tensor, temporaries of its update on a device, whole-group on CUDA)


def _copies(n: int) -> Callable[..., int]:
    return lambda p, device=None: n * p.numel() * p.element_size()


def _bnb_8bit(n: int) -> Callable[[torch.Tensor], int]:
    """bitsandbytes: n uint8 states + an fp32 absmax per 256 values; fp32 states below 4096 elements."""
    return lambda p: n * (p.numel() * 4 if p.numel() < 4096 else p.numel() + 4 * math.ceil(p.numel() / 256))


def _bnb_temp(p: torch.Tensor, device: str) -> int:
    """Fused CUDA kernels update in place; the CPU fallback works on ~6 float32 copies (measured)."""
    return 0 if device == "cuda" else 6 * 4 * p.numel()


def _adafactor_state(p: torch.Tensor) -> int:
    """transformers' Adafactor: fp32 row and column second moments for matrices, a full one for vectors."""
    if p.dim() < 2:
        return 4 * p.numel()
    return 4 * (p.numel() // p.shape[-1] + p.numel() // p.shape[-2])


def _adafactor_temp(p: torch.Tensor, device: str) -> int:
    return 4 * p.numel() * (2 if p.dtype == torch.float32 else 4)  # update, its square; fp32 copies of p and grad


STATE_RULES: dict[str, tuple[Callable, Callable, bool]] = {
    "adamw": (_copies(2), _copies(2), True), "adam": (_copies(2), _copies(2), True),
    "adamw8bit": (_bnb_8bit(2), _bnb_temp, False), "pagedadamw8bit": (_bnb_8bit(2), _bnb_temp, False),
    "lion": (_copies(1), _copies(1), False), "lion8bit": (_bnb_8bit(1), _bnb_temp, False),
    "pagedlion8bit": (_bnb_8bit(1), _bnb_temp, False), "sgdnesterov": (_copies(1), _copies(1), True),
    "sgdnesterov8bit": (_bnb_8bit(1), _bnb_temp, False), "adafactor": (_adafactor_state, _adafactor_temp, False),
    "prodigy": (_copies(4), _copies(2), False), "dadaptadam": (_copies(3), _copies(2), False),
    "adamwschedulefree": (_copies(2), _copies(2), False), "adopt": (_copies(2), _copies(2), False),
}


def optimizer_rule(name: str) -> tuple[Callable, Callable, bool]:
    """The rule of an ``--optimizer_type`` (a class path by its class name); unknown ones count as Adam."""
    return STATE_RULES.get(name.rsplit(".", 1)[-1].lower(), STATE_RULES["adamw"])


def optimizer_bytes(name: str, trained: list[nn.Parameter], device: str, fused: str | None) -> tuple[int, int]:
    """(state bytes, step temporaries) of ``name`` over ``trained``. torch's foreach implementations (used
    on CUDA) update a whole group at once, so their temporaries span every tensor; fused steps go one
    parameter (or block) at a time."""
    states, temp, foreach = optimizer_rule(name)
    total = sum(states(p) for p in trained)
    per_tensor = [temp(p, device) for p in trained]
    if foreach and device == "cuda" and fused is None:
        return total, sum(per_tensor)
    return total, max(per_tensor, default=0)


# --- weights and block swap


def _bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def weight_bytes(mmdit: nn.Module, trained: list[nn.Parameter], settings: PlanSettings) -> tuple[int, int]:
    """(weights resident on the device, swap buffers): the model and any trained adapter tensors, less the
    swapped blocks, plus ``swap_buffers`` copies of the largest swapped block."""
    own = {id(p) for p in mmdit.parameters()}
    total = _bytes([*mmdit.parameters(), *mmdit.buffers()]) + _bytes(p for p in trained if id(p) not in own)
    blocks, n = list(mmdit.joint_blocks), settings.blocks_to_swap
    swapped = [_bytes([*b.parameters(), *b.buffers()]) for b in (blocks[len(blocks) - n:] if n else [])]
    buffers = min(settings.swap_buffers, n) * max(swapped, default=0)
    return total - sum(swapped), buffers


def plan_memory(mmdit: nn.Module, trained: list[nn.Parameter], settings: PlanSettings,
                trace: Trace | None = None) -> MemoryPlan:
    """The plan of one training step. ``trace``: a :func:`trace_step` of the same sizes and modes, reused
    unless the swap changes it (swapped trained blocks of a plain full fine-tune send gradients to the host)."""
    if trace is None or trace.host_blocks != _host_blocks(mmdit, trained, settings):
        trace = trace_step(mmdit, trained, settings)
    weights, buffers = weight_bytes(mmdit, trained, settings)
    host = swapped_params(mmdit, trained, settings.blocks_to_swap)  # stepped on the CPU
    states, temp = optimizer_bytes(settings.optimizer, [p for p in trained if p not in host], settings.device,
                                   settings.fused)
    during = trace.peak + (temp if settings.fused else 0)  # fused steps run inside backward
    after = trace.after_backward + (0 if settings.fused else temp)
    peak = weights + buffers + states + max(during, after)
    return MemoryPlan(weights, states, trace.held_gradients, trace.forward_end, trace.peak, temp, buffers, peak,
                      settings)


def smallest_swap(mmdit: nn.Module, trained: list[nn.Parameter], settings: PlanSettings, budget: int,
                  traces: dict[int, Trace] | None = None) -> int | None:
    """The fewest ``--blocks_to_swap`` (at most depth - 2) whose predicted peak fits ``budget`` bytes
    (binary search: the peak does not grow with the count). ``traces`` (by ``host_blocks``) are reused
    and filled in."""
    traces = {} if traces is None else traces

    def peak(n: int) -> int:
        case = replace(settings, blocks_to_swap=n)
        key = _host_blocks(mmdit, trained, case)
        if key not in traces:
            traces[key] = trace_step(mmdit, trained, case)
        return plan_memory(mmdit, trained, case, traces[key]).peak

    low, high = 0, max(0, len(mmdit.joint_blocks) - 2)
    if peak(high) > budget:
        return None
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if peak(mid) <= budget else (mid + 1, high)
    return low
