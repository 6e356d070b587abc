"""The run being trained (:class:`Run`) and the hooks that save it: model files and training states at
the --save_every_n_* points, pruning, the final save, and the EMA weights beside the raw ones."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from library.config import RunConfig
from library.training.checkpoints import SavePolicy, checkpoint_name, prune_outputs, state_dir_name
from library.training.loop import LoopHooks, LoopState
from library.training.optimizers import optimizer_eval, optimizer_train
from library.training.state import TrainState, capture_rng, save_state

logger = logging.getLogger(__name__)


class Trainee(Protocol):
    """What a run trains. ``module`` is prepared by accelerate; its forward is the MMDiT's forward."""

    kind: str  # "full", "lora", "lokr": recorded in training states
    module: torch.nn.Module

    def param_groups(self) -> list[dict]: ...

    def state_tensors(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The trained tensors of the unwrapped ``module`` (what a training state stores)."""

    def write_model(self, path: Path, module: torch.nn.Module, settings: dict) -> None:
        """Save the trained model file (main process only; ``module`` unwrapped)."""

    def step_hooks(self) -> list[LoopHooks]:
        """Hooks that run after each optimizer step, before saving (e.g. max-norm regularisation)."""


@dataclass
class Run:
    cfg: RunConfig
    accelerator: object
    trainee: Trainee
    model: torch.nn.Module  # trainee.module after accelerator.prepare
    optimizer: object
    scheduler: object
    generator: torch.Generator
    policy: SavePolicy
    signature: str
    settings_meta: dict
    ema: object = None  # EmaWeights with --ema

    def trained(self) -> dict[str, torch.Tensor]:
        """The trained parameters of the unwrapped model, by name (what the EMA follows)."""
        from library.training.ema import trained_tensors

        return trained_tensors(self.accelerator.unwrap_model(self.model))


class ChainHooks(LoopHooks):
    """Several hooks run in order."""

    def __init__(self, hooks: list[LoopHooks]) -> None:
        self.hooks = hooks

    def on_train_start(self, state: LoopState) -> None:
        for hook in self.hooks:
            hook.on_train_start(state)

    def on_step_end(self, state: LoopState, loss: float, lr: float) -> None:
        for hook in self.hooks:
            hook.on_step_end(state, loss, lr)

    def on_epoch_end(self, state: LoopState, epoch: int) -> None:
        for hook in self.hooks:
            hook.on_epoch_end(state, epoch)

    def on_train_end(self, state: LoopState) -> None:
        for hook in self.hooks:
            hook.on_train_end(state)


class SaveHooks(LoopHooks):
    """Model files and training states at the --save_every_n_* points, pruning, and the final save."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.out = Path(run.cfg.save.output_dir)

    def _save_model(self, name_args: dict, state: LoopState) -> None:
        """``<name>[-…].safetensors``, and with --ema ``<name>_ema[-…].safetensors`` beside it."""
        run, policy = self.run, self.run.policy
        if not run.accelerator.is_main_process:
            return
        optimizer_eval(run.optimizer)  # schedule-free optimizers hold their averaged weights in eval mode
        settings = {**run.settings_meta, "steps": state.global_step, "epoch": state.position.epoch}
        module = run.accelerator.unwrap_model(run.model)
        try:
            run.trainee.write_model(self.out / checkpoint_name(policy.output_name, ext=policy.ext, **name_args),
                                    module, settings)
            if run.ema is not None:
                with run.ema.applied(run.trained()):
                    run.trainee.write_model(self.out / checkpoint_name(ema_name(policy.output_name), ext=policy.ext,
                                                                       **name_args), module, {**settings, "ema": True})
        finally:
            optimizer_train(run.optimizer)

    def save_state_dir(self, name: str, state: LoopState) -> None:
        run = self.run
        if not run.accelerator.is_main_process:
            return
        module = run.accelerator.unwrap_model(run.model)
        train_state = TrainState(epoch=state.position.epoch, global_step=state.global_step,
                                 data_position=state.position, model_kind=run.trainee.kind,
                                 model_signature=run.signature, output_name=run.policy.output_name,
                                 rng=capture_rng({"step": run.generator}))
        save_state(self.out / name, state=train_state, model_state=run.trainee.state_tensors(module),
                   optimizer_state=run.optimizer.state_dict(), scheduler_state=run.scheduler.state_dict(),
                   extra={"loss_history": torch.tensor(state.loss_history[-1000:]), **ema_extra(run.ema)})

    def _save_point(self, state: LoopState, name_args: dict, to_remove: list[str]) -> None:
        policy = self.run.policy
        self._save_model(name_args, state)
        if policy.save_state:
            self.save_state_dir(state_dir_name(policy.output_name, **name_args), state)
        if self.run.accelerator.is_main_process:
            ema_files = [ema_name(policy.output_name) + n[len(policy.output_name):] for n in to_remove
                         if n.endswith(policy.ext)] if self.run.ema is not None else []
            prune_outputs(self.out, [*to_remove, *ema_files])

    def on_step_end(self, state: LoopState, loss: float, lr: float) -> None:
        policy, step = self.run.policy, state.global_step
        if step < self.run.cfg.train.max_train_steps and policy.should_save_step(step):
            self._save_point(state, {"step": step}, policy.to_remove_after_step(step))

    def on_epoch_end(self, state: LoopState, epoch: int) -> None:
        policy = self.run.policy
        if state.global_step < self.run.cfg.train.max_train_steps and policy.should_save_epoch(epoch):
            self._save_point(state, {"epoch": epoch}, policy.to_remove_after_epoch(epoch))

    def on_train_end(self, state: LoopState) -> None:
        policy, acc = self.run.policy, self.run.accelerator
        module = acc.unwrap_model(self.run.model)
        logger.info("rank %d/%d: trained on %d samples (digest %08x), weights checksum %s", acc.process_index,
                    acc.num_processes, state.samples_seen, state.sample_digest,
                    _checksum(self.run.trainee.state_tensors(module)))
        self._save_model({}, state)
        if policy.save_state or self.run.cfg.save.save_state_on_train_end:
            self.save_state_dir(state_dir_name(policy.output_name, final=True), state)


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha1()
    for value in tensors.values():
        digest.update(value.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:12]


EMA_PREFIX = "ema."  # keys of the EMA tensors in a training state's extra.pt


def ema_name(output_name: str) -> str:
    return f"{output_name}_ema"


def ema_extra(ema) -> dict[str, torch.Tensor]:
    return {} if ema is None else {EMA_PREFIX + k: v for k, v in ema.state_dict().items()}
