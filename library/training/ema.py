"""An exponential moving average (EMA) of the trained weights (``--ema``).

After every ``--ema_update_every``-th optimizer step: ``ema ← d·ema + (1 − d)·w`` with ``d = --ema_decay``,
starting from the weights before the first step. ``d = 0`` keeps the raw weights exactly. The average
is kept in float32 (whatever the weights' dtype) on ``--ema_device`` (cpu by default: it costs host
memory, not GPU memory). :meth:`EmaWeights.applied` puts the average into the live tensors for a block
(saving ``<name>_ema`` files, samples with ``--sample_ema``) and restores the raw weights after.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Mapping

import torch

from library.errors import UserError
from library.training.loop import LoopHooks, LoopState

Tensors = Mapping[str, torch.Tensor]


class EmaWeights:
    def __init__(self, tensors: Tensors, decay: float, device: torch.device | str = "cpu") -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay, self.device = float(decay), torch.device(device)
        self.shadow = {name: _copy(t, self.device) for name, t in tensors.items()}

    @torch.no_grad()
    def update(self, tensors: Tensors) -> None:
        """``ema ← d·ema + (1 − d)·w`` for every tensor."""
        for name, average in self.shadow.items():
            value = tensors[name].detach().to(self.device, average.dtype)
            if average.is_floating_point():
                average.mul_(self.decay).add_(value, alpha=1.0 - self.decay)
            else:
                average.copy_(value)

    @contextlib.contextmanager
    def applied(self, tensors: Tensors) -> Iterator[None]:
        """The live ``tensors`` hold the average inside the block; the raw values come back after."""
        with torch.no_grad():
            raw = {name: tensors[name].detach().to("cpu", copy=True) for name in self.shadow}
            for name, average in self.shadow.items():
                tensors[name].copy_(average.to(tensors[name].device, tensors[name].dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for name, value in raw.items():
                    tensors[name].copy_(value.to(tensors[name].device))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: t.cpu() for name, t in self.shadow.items()}

    def load_state_dict(self, state: Tensors) -> None:
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise UserError(f"the saved EMA lacks {len(missing)} tensors (e.g. {missing[0]}): it was saved "
                            "with other trained modules; resume without --ema or from a matching state")
        with torch.no_grad():
            for name, average in self.shadow.items():
                average.copy_(state[name].to(average.device, average.dtype))


def _copy(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    dtype = torch.float32 if tensor.is_floating_point() else tensor.dtype
    return tensor.detach().to(device=device, dtype=dtype, copy=True)


def trained_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters an optimizer updates (requires_grad), by name: what the EMA follows."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


class EmaHooks(LoopHooks):
    """Updates the average every ``every`` optimizer steps (the tensors come from ``tensors()``)."""

    def __init__(self, ema: EmaWeights, tensors: Callable[[], Tensors], every: int = 1) -> None:
        self.ema, self.tensors, self.every = ema, tensors, max(1, every)

    def on_step_end(self, state: LoopState, loss: float, lr: float) -> None:
        if state.global_step % self.every == 0:
            self.ema.update(self.tensors())
