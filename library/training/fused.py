"""Optimizer steps inside backward: ``--fused_backward_pass`` and ``--blockwise_fused_optimizers``.

Both free each gradient as soon as it has been used, so a full fine-tune never holds the whole gradient
(SD3.5-M in bf16: 4.5 GB).

- ``parameter`` (--fused_backward_pass): each parameter is stepped in its post-accumulate-grad hook and
  its gradient freed. Only optimizers whose update of a tensor reads that tensor's gradient and state
  alone qualify (:data:`PER_TENSOR_OPTIMIZERS`: Adafactor, AdamW, Adam, SGD); others are refused with a
  pointer to the blockwise mode.
- ``block`` (--blockwise_fused_optimizers): the optimizer's parameter groups are one per block
  (:func:`block_param_groups`: a joint block, a text-encoder layer, each other module); a group is
  stepped as soon as the last of its gradients has arrived, exactly as if it had an optimizer of its
  own (an optimizer with per-group state such as Prodigy's d or schedule-free's step count keeps it per
  block), then its gradients are freed. Any optimizer works. One optimizer object still holds every
  group, so training states save and resume as usual.
Either way the optimizer is stepped on a *view* of itself restricted to the ready parameters
(:func:`step_subset`), so its state, its learning rates from the scheduler and its saving stay the
ones of the plain run.

Gradient clipping stays one global norm (sd-scripts clips each tensor by its own norm in these modes,
a different function). The coefficient min(1, max_norm / (‖g‖ + 1e-6)) needs the norm of the whole
gradient before the first parameter may be stepped. Options:
  1. keep every gradient until the norm is known: that is the plain path and saves nothing;
  2. use the previous step's norm: not the same function;
  3. norm-then-step (chosen): backward runs twice over one retained graph. Pass 1's hooks compute each
     gradient's norm and free the gradient at once; the global norm and coefficient follow; pass 2's
     hooks scale each gradient by the coefficient and step. Cost: one more backward pass (about +2/3
     of a step's compute). Memory: retaining the graph keeps the saved activations through pass 1,
     which a single backward holds at its start anyway, so the peak does not grow; with gradient
     checkpointing the retained part is only the block inputs.
  ``--max_grad_norm 0`` runs one pass. The update equals the plain optimizer's: the same per-tensor
  norms stacked in parameter order as torch.nn.utils.clip_grad_norm_, the same coefficient, the same
  step per tensor.

Gradient accumulation: with ``--max_grad_norm 0`` the micro-batches accumulate into ``.grad`` as usual
(nothing is saved on those) and the hooks step on the last one. With clipping it is refused: the norm of
the summed gradient needs every micro-batch's gradient first, i.e. the whole gradient kept.
Also refused: several processes (DDP averages gradients after the local hooks have fired) and fp16 loss
scaling (a step taken inside backward cannot be undone when an inf turns up later in the pass).

bf16 weights with ``--fused_backward_pass``: each parameter's step runs on a float32 copy and is written
back with stochastic rounding (:mod:`library.runtime.stochastic_rounding`), so updates smaller than half
a bf16 ulp survive on average. The blockwise mode leaves rounding to the optimizer.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

import torch
from torch import nn

from library.errors import UserError
from library.runtime.stochastic_rounding import stochastic_round_bf16

logger = logging.getLogger(__name__)

MODES = {"parameter": "--fused_backward_pass", "block": "--blockwise_fused_optimizers"}
PER_TENSOR_OPTIMIZERS = frozenset({
    "transformers.optimization.Adafactor", "torch.optim.adamw.AdamW", "torch.optim.adam.Adam", "torch.optim.sgd.SGD",
})


def fused_mode(fused_backward_pass: bool, blockwise_fused_optimizers: bool) -> str | None:
    """The mode the two flags select (None: the plain optimizer step)."""
    if fused_backward_pass and blockwise_fused_optimizers:
        raise UserError("--fused_backward_pass and --blockwise_fused_optimizers exclude each other; pick one")
    return "parameter" if fused_backward_pass else ("block" if blockwise_fused_optimizers else None)


def check_fused(mode: str, *, accumulation: int, max_grad_norm: float, world_size: int = 1,
                loss_scaling: bool = False) -> None:
    """Refuse the combinations the fused modes cannot train correctly (see the module docstring)."""
    flag = MODES[mode]
    if accumulation > 1 and max_grad_norm > 0:
        raise UserError(f"{flag} with --gradient_accumulation_steps {accumulation} and --max_grad_norm "
                        f"{max_grad_norm}: the global clip norm needs every micro-batch's gradient before the first "
                        "step, i.e. the whole gradient kept; use --gradient_accumulation_steps 1 or --max_grad_norm 0")
    if world_size > 1:
        raise UserError(f"{flag} runs optimizer steps inside backward, before gradients are averaged across the "
                        f"{world_size} processes; train on one process or drop the flag")
    if loss_scaling:
        raise UserError(f"{flag} cannot be combined with fp16 loss scaling (a step taken inside backward cannot be "
                        "undone when an inf appears); use --mixed_precision bf16")


def _qualified(optimizer: torch.optim.Optimizer) -> str:
    cls = type(optimizer)
    return f"{cls.__module__}.{cls.__qualname__}"


def check_optimizer(mode: str, optimizer: torch.optim.Optimizer) -> None:
    if mode == "parameter" and _qualified(optimizer) not in PER_TENSOR_OPTIMIZERS:
        raise UserError(f"--fused_backward_pass steps one tensor at a time, which {type(optimizer).__name__} does not "
                        "support; use Adafactor or AdamW, or --blockwise_fused_optimizers (any optimizer)")


def _block_key(name: str, lists: list[str]) -> str:
    for prefix in lists:  # outermost ModuleList first
        if name.startswith(prefix + "."):
            return f"{prefix}.{name[len(prefix) + 1:].split('.')[0]}"
    return name.rsplit(".", 1)[0]  # the owning module


def block_param_groups(module: nn.Module, groups: list[dict]) -> list[dict]:
    """Split each parameter group into one group per block of ``module`` (each item of a ModuleList,
    e.g. ``mmdit.joint_blocks.3``; a parameter outside any list goes with its owning module). The new
    groups keep the other keys (name, lr) of the group they come from."""
    lists = sorted((n for n, m in module.named_modules() if isinstance(m, nn.ModuleList) and n), key=len)
    key_of = {p: _block_key(n, lists) for n, p in module.named_parameters()}
    out = []
    for group in groups:
        blocks: dict[str, list[nn.Parameter]] = {}
        for p in group["params"]:
            blocks.setdefault(key_of.get(p, "?"), []).append(p)
        out.extend({**group, "params": params} for params in blocks.values())
    logger.info("blockwise fused optimizers: %d parameter groups", len(out))
    return out


def step_subset(optimizer: torch.optim.Optimizer, group: dict, params: list[nn.Parameter] | None = None) -> None:
    """``optimizer.step()`` for one of its groups only (``params``: only these of the group)."""
    saved_groups, saved_params = optimizer.param_groups, group["params"]
    if params is not None:
        group["params"] = params
    optimizer.param_groups = [group]
    try:
        optimizer.step()
    finally:
        group["params"] = saved_params
        optimizer.param_groups = saved_groups


class FusedUpdater:
    """Steps ``optimizer`` from post-accumulate-grad hooks on ``params`` (the order of ``params`` is the
    order in which per-tensor norms are stacked, as the plain path's clip does)."""

    def __init__(self, optimizer, params: list[nn.Parameter], mode: str, max_grad_norm: float, seed: int = 0) -> None:
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper -> the optimizer
        check_optimizer(mode, self.optimizer)
        self.mode, self.max_grad_norm, self.seed = mode, max_grad_norm, seed
        self.index = {p: i for i, p in enumerate(params)}
        self.group_of = {p: gi for gi, g in enumerate(self.optimizer.param_groups) for p in g["params"]}
        missing = [i for p, i in self.index.items() if p not in self.group_of]
        if missing:
            raise ValueError(f"{len(missing)} trained parameters are in no optimizer group (e.g. #{missing[0]})")
        self.sizes = [sum(1 for p in g["params"] if p in self.index) for g in self.optimizer.param_groups]
        self.phase = "off"
        self.norms: list[torch.Tensor | None] = []
        self.coef: torch.Tensor | None = None
        self.pending: dict[int, int] = {}
        self.generators: dict[torch.device, torch.Generator] = {}
        self.handles = [p.register_post_accumulate_grad_hook(self._hook) for p in params]

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def backward(self, run_backward: Callable[[bool], None], final: bool) -> float | None:
        """Backpropagate (``run_backward(retain_graph)``) and, on the last micro-batch, step every parameter;
        returns the global gradient norm before clipping (None without clipping)."""
        if not final:  # an earlier micro-batch: accumulate into .grad
            run_backward(False)
            return None
        norm = None
        if self.max_grad_norm > 0:
            self.phase, self.norms = "norm", [None] * len(self.index)
            try:
                run_backward(True)
            finally:
                self.phase = "off"
            norm, self.coef = self._coefficient()
        self.phase = "step"
        try:
            run_backward(False)
            for gi in list(self.pending):  # groups some of whose parameters got no gradient
                self._step_group(gi)
        finally:
            self.phase, self.coef = "off", None
        return None if norm is None else float(norm)

    def _coefficient(self) -> tuple[torch.Tensor, torch.Tensor]:
        norms = [n for n in self.norms if n is not None]
        if not norms:
            return torch.tensor(0.0), torch.tensor(1.0)
        device = norms[0].device
        total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), 2)
        return total, torch.clamp(self.max_grad_norm / (total + 1e-6), max=1.0)

    def _hook(self, p: nn.Parameter) -> None:
        if self.phase == "norm":
            self.norms[self.index[p]] = torch.linalg.vector_norm(p.grad.detach(), 2)
            p.grad = None
        elif self.phase == "step":
            if self.coef is not None:
                p.grad.mul_(self.coef.to(p.grad.device))
            if self.mode == "parameter":
                self._step_parameter(p)
            else:
                gi = self.group_of[p]
                self.pending[gi] = self.pending.get(gi, 0) + 1
                if self.pending[gi] == self.sizes[gi]:
                    self._step_group(gi)

    def _step_group(self, gi: int) -> None:
        group = self.optimizer.param_groups[gi]
        step_subset(self.optimizer, group)
        _free(group["params"])
        self.pending.pop(gi, None)

    def _step_parameter(self, p: nn.Parameter) -> None:
        group = self.optimizer.param_groups[self.group_of[p]]
        if p.dtype != torch.bfloat16:
            step_subset(self.optimizer, group, [p])
            p.grad = None
            return
        grad = p.grad.float()  # step on a float32 copy, then round stochastically back to bf16
        p.grad = None
        p.data = p.data.float()
        p.grad = grad
        step_subset(self.optimizer, group, [p])
        p.grad = None
        p.data = stochastic_round_bf16(p.data, self._generator(p.device))

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self.generators:
            self.generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self.generators[device]


def _free(params: Iterable[nn.Parameter]) -> None:
    for p in params:
        p.grad = None
