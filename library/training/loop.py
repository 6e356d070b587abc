"""The one training loop of both trainers: batches -> steps -> optimizer updates, with accelerate.

What is trained arrives as a :class:`Trainable`; how a batch becomes a loss arrives as a callable;
saving, sampling and logging attach through :class:`LoopHooks`. The loop owns the counters
(epoch, position in the epoch's batch list, optimizer step) so that a resumed run continues at the
exact batch it stopped before, with the same random streams.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import torch

from library.data.batching import Batch, DataPosition, shard
from library.data.dataset import BatchData, TrainingData
from library.errors import UserError
from library.training.step import StepResult

logger = logging.getLogger(__name__)


class Trainable(Protocol):
    """What the loop trains (the full model, or a network attached to it), prepared by accelerate.

    A trainable whose optimizer steps run inside backward (``--fused_backward_pass`` /
    ``--blockwise_fused_optimizers``, see :mod:`library.training.fused`) carries ``fused_update = "parameter"``
    or ``"block"``; the loop then never calls ``optimizer.step()`` (the scheduler still steps once per update).
    """

    def parameters(self) -> Iterator[torch.nn.Parameter]: ...

    def train(self, mode: bool = True) -> object: ...


StepFn = Callable[[BatchData, torch.Generator], StepResult]


@dataclass(frozen=True)
class LoopSettings:
    max_train_steps: int
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    max_bad_steps: int = 10  # consecutive non-finite losses before the run stops
    seed: int = 0
    data_workers: int = 0  # DataLoader worker processes preparing batches ahead (0: in this process)


@dataclass
class LoopState:
    """Counters the loop advances; saved with training states."""

    global_step: int = 0  # optimizer updates done
    position: DataPosition = field(default_factory=DataPosition)
    bad_steps: int = 0
    loss_history: list[float] = field(default_factory=list)
    samples_seen: int = 0  # this rank, this process (not restored on resume)
    sample_digest: int = 0  # order-independent digest of the sample ids this rank trained on
    # The last optimizer step, for loggers (not saved): gradient norm before clipping (None when not
    # clipped), the σ of its batches, and the learning rate of each parameter group by name.
    grad_norm: float | None = None
    sigmas: list[float] = field(default_factory=list)
    lrs: dict[str, float] = field(default_factory=dict)


class LoopHooks:
    """Override what you need; every hook runs on every rank (hooks decide who writes)."""

    def on_train_start(self, state: LoopState) -> None: ...

    def on_step_end(self, state: LoopState, loss: float, lr: float) -> None: ...

    def on_epoch_end(self, state: LoopState, epoch: int) -> None: ...

    def on_train_end(self, state: LoopState) -> None: ...


def epoch_batches(data: TrainingData, epoch: int, rank: int, world: int) -> list[Batch]:
    """This rank's batches of ``epoch`` (disjoint across ranks, equal counts)."""
    batches = data.epoch_batches(epoch)
    return shard(batches, rank, world) if world > 1 else batches


def steps_per_epoch(data: TrainingData, world: int, accumulation: int) -> int:
    return max(1, len(epoch_batches(data, 0, 0, world)) // accumulation)


def total_steps(max_train_steps: int | None, max_train_epochs: int | None, per_epoch: int) -> int:
    """--max_train_epochs wins over --max_train_steps, as in sd-scripts."""
    if max_train_epochs:
        return max_train_epochs * per_epoch
    if not max_train_steps or max_train_steps < 1:
        raise UserError("set --max_train_steps N or --max_train_epochs N (at least 1)")
    return max_train_steps


class _EpochView(torch.utils.data.Dataset):
    """Batches ``start..`` of one epoch as a map-style dataset (what DataLoader workers fetch)."""

    def __init__(self, data: TrainingData, batches: list[Batch], epoch: int, start: int, first_step: int,
                 settings: LoopSettings) -> None:
        self.data, self.batches, self.epoch, self.start = data, batches, epoch, start
        self.first_step, self.settings = first_step, settings

    def __len__(self) -> int:
        return len(self.batches) - self.start

    def __getitem__(self, i: int) -> BatchData:
        step = self.first_step + i // self.settings.gradient_accumulation_steps  # for caption token warm-up
        return self.data.load_batch(self.batches[self.start + i], self.epoch, step=step,
                                    max_steps=self.settings.max_train_steps)


def _loaded_batches(view: _EpochView, workers: int) -> Iterator[BatchData]:
    if workers <= 0:
        return (view[i] for i in range(len(view)))
    loader = torch.utils.data.DataLoader(view, batch_size=None, shuffle=False, num_workers=workers,
                                         collate_fn=_identity)
    return iter(loader)


def _identity(batch: BatchData) -> BatchData:
    return batch


def _finite(result: StepResult) -> bool:
    return bool(torch.isfinite(result.loss.detach()).item())


def _update(accelerator, params: list[torch.nn.Parameter], optimizer, scheduler, max_grad_norm: float) -> float | None:
    """One optimizer update; returns the global gradient norm before clipping (None without clipping)."""
    norm = None
    if max_grad_norm and max_grad_norm > 0:
        norm = accelerator.clip_grad_norm_(params, max_grad_norm)  # one global norm over every trained tensor
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return None if norm is None else float(norm)


def _fused_updater(accelerator, trainable: Trainable, optimizer, params: list[torch.nn.Parameter],
                   settings: LoopSettings):
    """The in-backward stepper of a trainable with ``fused_update`` set, else None."""
    mode = getattr(accelerator.unwrap_model(trainable), "fused_update", None)
    if mode is None:
        return None
    from library.training.fused import FusedUpdater, check_fused

    check_fused(mode, accumulation=settings.gradient_accumulation_steps, max_grad_norm=settings.max_grad_norm,
                world_size=accelerator.num_processes, loss_scaling=getattr(accelerator, "scaler", None) is not None)
    return FusedUpdater(optimizer, params, mode, settings.max_grad_norm, seed=settings.seed)


def _backward_and_update(accelerator, fused, loss: torch.Tensor, params: list[torch.nn.Parameter], optimizer,
                         scheduler, settings: LoopSettings, state: LoopState) -> None:
    """Backpropagate one micro-batch; on the last of an accumulation, update (plain or fused)."""
    if fused is None:
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            state.grad_norm = _update(accelerator, params, optimizer, scheduler, settings.max_grad_norm)
        return
    norm = fused.backward(lambda retain: accelerator.backward(loss, retain_graph=retain), accelerator.sync_gradients)
    if accelerator.sync_gradients:
        state.grad_norm = norm
        scheduler.step()


def allow_fp16_gradients(accelerator, params: list[torch.nn.Parameter]) -> None:
    """--full_fp16 under accelerate's fp16 loss scaler: torch's GradScaler refuses to unscale fp16
    gradients; let it (the gradients are fp16 by choice, as in sd-scripts)."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None or not any(p.dtype == torch.float16 for p in params) or getattr(scaler, "_fp16_allowed", False):
        return
    unscale = scaler._unscale_grads_

    def unscale_fp16(optimizer, inv_scale, found_inf, allow_fp16):  # noqa: ARG001 (torch's signature)
        return unscale(optimizer, inv_scale, found_inf, True)

    scaler._unscale_grads_ = unscale_fp16
    scaler._fp16_allowed = True


def group_lrs(optimizer, scheduler) -> dict[str, float]:
    """Learning rate per parameter group, keyed by the group's ``name`` (else ``group<i>``)."""
    rates = scheduler.get_last_lr()
    return {str(g.get("name") or f"group{i}"): float(lr) for i, (g, lr) in enumerate(zip(optimizer.param_groups, rates))}


def _bad_step(state: LoopState, settings: LoopSettings, optimizer, epoch: int, index: int) -> None:
    state.bad_steps += 1
    optimizer.zero_grad(set_to_none=True)
    logger.warning("non-finite loss at epoch %d batch %d: update skipped (%d in a row)", epoch + 1, index, state.bad_steps)
    if state.bad_steps >= settings.max_bad_steps:
        raise UserError(
            f"loss was NaN/inf for {state.bad_steps} steps in a row (last at epoch {epoch + 1}); lower the "
            "learning rate, use bf16 instead of fp16, or check the data; the last saved state is intact"
        )


def run_loop(
    accelerator,
    trainable: Trainable,
    data: TrainingData,
    step_fn: StepFn,
    optimizer,
    scheduler,
    settings: LoopSettings,
    state: LoopState,
    generator: torch.Generator,
    hooks: LoopHooks = LoopHooks(),
) -> LoopState:
    """Train until ``settings.max_train_steps`` optimizer updates are done (resuming at ``state``)."""
    params = [p for p in trainable.parameters() if p.requires_grad]
    allow_fp16_gradients(accelerator, params)
    fused = _fused_updater(accelerator, trainable, optimizer, params, settings)
    trainable.train()
    hooks.on_train_start(state)
    started = time.perf_counter()
    try:
        _epochs(accelerator, trainable, data, step_fn, optimizer, scheduler, settings, state, generator, hooks,
                params, fused)
    finally:
        if fused is not None:
            fused.close()
    elapsed = time.perf_counter() - started
    logger.info("trained %d steps in %.1f s (%.2f s/step)", state.global_step, elapsed,
                elapsed / max(1, state.global_step))
    hooks.on_train_end(state)
    return state


def _epochs(accelerator, trainable: Trainable, data: TrainingData, step_fn: StepFn, optimizer, scheduler,
            settings: LoopSettings, state: LoopState, generator: torch.Generator, hooks: LoopHooks,
            params: list[torch.nn.Parameter], fused) -> None:
    """The epochs and batches of :func:`run_loop` (``fused``: the in-backward stepper, or None)."""
    rank, world = accelerator.process_index, accelerator.num_processes
    bar = _progress(accelerator, settings.max_train_steps, state.global_step)
    while state.global_step < settings.max_train_steps:
        epoch = state.position.epoch
        batches = epoch_batches(data, epoch, rank, world)
        start = state.position.batch_index
        view = _EpochView(data, batches, epoch, start, state.global_step, settings)
        for index, batch in zip(range(start, len(batches)), _loaded_batches(view, settings.data_workers)):
            state.samples_seen += len(batches[index].samples)
            state.sample_digest ^= _digest(batches[index].samples)
            with accelerator.accumulate(trainable):
                result = step_fn(batch, generator)
                state.sigmas.extend(float(x) for x in result.sigmas.detach().flatten().cpu())
                if not _finite(result):
                    _bad_step(state, settings, optimizer, epoch, index)
                    state.position = DataPosition(epoch, index + 1)
                    continue
                state.bad_steps = 0
                _backward_and_update(accelerator, fused, result.loss, params, optimizer, scheduler, settings, state)
            state.position = DataPosition(epoch, index + 1)
            if accelerator.sync_gradients:
                state.global_step += 1
                loss = float(result.loss.detach())
                state.loss_history.append(loss)
                lr = scheduler.get_last_lr()[0]
                state.lrs = group_lrs(optimizer, scheduler)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", avg=f"{average_loss(state.loss_history):.4f}", lr=f"{lr:.2e}")
                hooks.on_step_end(state, loss, lr)
                state.sigmas = []
                if state.global_step >= settings.max_train_steps:
                    break
        if state.global_step >= settings.max_train_steps and state.position.batch_index < len(batches):
            break
        state.position = DataPosition(epoch + 1, 0)
        hooks.on_epoch_end(state, epoch + 1)
    if bar is not None:
        bar.close()


def _digest(samples: tuple[int, ...]) -> int:
    out = 0
    for sample in samples:
        out ^= (sample * 2654435761 + 97) & 0xFFFFFFFF
    return out


def _progress(accelerator, total: int, done: int):
    """A tqdm bar on the local main process (steps, s/it, loss, average loss, lr); None elsewhere."""
    if not accelerator.is_local_main_process:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc="steps", dynamic_ncols=True, smoothing=0.1)


def average_loss(history: list[float], window: int = 50) -> float:
    recent = history[-window:]
    return sum(recent) / len(recent) if recent else math.nan
