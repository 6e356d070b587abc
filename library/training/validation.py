"""Validation loss: the held-out images (``--validation_split``) at fixed σ with fixed noise.

Every evaluation sees the same inputs: the validation data has no augmentation and no caption
randomness (:meth:`TrainingData.validation_data`), its batches come in epoch 0's order, σ are the fixed
values of :func:`library.flow.timesteps.validation_sigmas` (0.2, 0.4, 0.6, 0.8 — independent of the
training shift, so runs with different shifts and stages compare), the noise comes from a generator
seeded with the validation seed at the start of each evaluation, no encoder dropout applies, and the
loss is the run's objective and loss type without loss weighting. Two runs with the same seed and the
same weights therefore give the same number; a change of weights shows. The model runs in eval mode
under ``torch.no_grad`` and no global random stream is consumed.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from library.data.dataset import BatchData, TrainingData
from library.flow.loss import LossSpec, flow_matching_loss_per_sample, noisy_input
from library.flow.timesteps import sigma_to_timesteps, validation_sigmas
from library.models.prompt_encoding import Conditioning
from library.training.loop import LoopHooks, LoopState

logger = logging.getLogger(__name__)

Inputs = Callable[[BatchData], tuple[torch.Tensor, Conditioning]]  # batch -> (x0 latents, conditioning)


@dataclass(frozen=True)
class ValidationPlan:
    every_n_steps: int | None
    every_n_epochs: int | None
    max_steps: int | None  # batches per evaluation (None: all)
    seed: int
    num_sigmas: int = 4


def validation_plan(*, every_n_steps: int | None, every_n_epochs: int | None, max_steps: int | None,
                    seed: int) -> ValidationPlan:
    """sd-scripts' cadence: every epoch unless --validate_every_n_epochs says otherwise, plus every
    --validate_every_n_steps steps when given."""
    return ValidationPlan(every_n_steps, every_n_epochs or 1, max_steps, seed)


def validation_batches(data: TrainingData, max_steps: int | None) -> list:
    """The batches one evaluation uses: epoch 0's order, at most ``max_steps`` of them."""
    batches = data.epoch_batches(0)
    return batches if max_steps is None else batches[:max_steps]


@torch.no_grad()
def validation_loss(model: torch.nn.Module, batches: Iterable[BatchData], inputs: Inputs, loss: LossSpec, *,
                    seed: int, num_sigmas: int = 4, autocast_dtype: torch.dtype | None = None) -> float:
    """Mean per-sample loss over every batch × every fixed σ (float64 sum of float32 losses)."""
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for batch in batches:
        x0, cond = inputs(batch)
        for sigma in validation_sigmas(num_sigmas):
            sigmas = sigma.expand(x0.shape[0]).to(x0.device)
            noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device)
            x_sigma = noisy_input(x0, noise, sigmas)
            ctx = (torch.autocast(x0.device.type, dtype=autocast_dtype) if autocast_dtype
                   else contextlib.nullcontext())
            with ctx:
                pred = model(x_sigma, sigma_to_timesteps(sigmas), cond.context, cond.pooled)
            per_sample = flow_matching_loss_per_sample(pred.float(), x0, noise, sigmas, loss)
            total += float(per_sample.double().sum())
            count += per_sample.numel()
    return total / max(1, count)


class ValidationHooks(LoopHooks):
    """Evaluates at the plan's steps/epochs on the main process; reports (step, loss) to ``report``."""

    def __init__(self, plan: ValidationPlan, evaluate: Callable[[], float],
                 report: Callable[[int, float], None] | None = None, is_main: bool = True) -> None:
        self.plan, self.evaluate, self.report, self.is_main = plan, evaluate, report, is_main
        self.history: list[tuple[int, float]] = []

    def _run(self, state: LoopState, where: str) -> None:
        if not self.is_main:
            return
        value = self.evaluate()
        self.history.append((state.global_step, value))
        logger.info("validation loss %.6f (%s)", value, where)
        if self.report is not None:
            self.report(state.global_step, value)

    def on_step_end(self, state: LoopState, loss: float, lr: float) -> None:
        every = self.plan.every_n_steps
        if every and state.global_step % every == 0:
            self._run(state, f"step {state.global_step}")

    def on_epoch_end(self, state: LoopState, epoch: int) -> None:
        every = self.plan.every_n_epochs
        if every and epoch % every == 0:
            self._run(state, f"epoch {epoch}")


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """``model`` in eval mode (no dropout) for the block, its previous mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
