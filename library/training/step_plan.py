"""How many optimizer steps a run takes and when it saves, counted exactly as the trainer counts them.

The counts come from the trainer's own functions (:func:`library.training.loop.steps_per_epoch` and
:func:`total_steps` over :class:`TrainingData`'s epoch batches), so ``tools/steps.py`` cannot disagree
with a run. The arithmetic (the SD3-M fine-tuning tutorial's, made exact):

- batches per epoch = Σ over datasets and buckets of ⌈samples in the bucket / batch size⌉, where
  samples = images × repeats; each process takes ⌊batches / processes⌋ of them;
- optimizer steps per epoch = max(1, ⌊batches per process / gradient accumulation⌋);
- total = epochs × steps per epoch with ``--max_train_epochs`` (it wins), else ``--max_train_steps``.

Accumulation runs on across epoch ends (accelerate counts micro-batches, not epochs), so epoch e ends
after ⌊e · batches per process / accumulation⌋ optimizer steps; saves follow the run hooks: a step save
after every ``save_every_n_steps`` steps and an epoch save after every ``save_every_n_epochs`` epochs,
each only before the last step, which writes the final ``<name>.safetensors``; retention
(``--save_last_n_*``) prunes older saves as :class:`SavePolicy` says.
"""

from __future__ import annotations

from dataclasses import dataclass

from library.data.dataset import TrainingData
from library.errors import UserError
from library.training.checkpoints import SavePolicy, checkpoint_name, state_dir_name
from library.training.loop import epoch_batches, steps_per_epoch, total_steps


@dataclass(frozen=True)
class StepPlan:
    batches_per_epoch: int  # every dataset, every process
    batches_per_process: int
    processes: int
    accumulation: int
    steps_per_epoch: int
    total_steps: int

    @property
    def epochs(self) -> int:
        """Epochs the run starts (the last one may stop part-way), as the trainer records ss_num_epochs."""
        return -(-self.total_steps // max(1, self.steps_per_epoch))


@dataclass(frozen=True)
class SaveEvent:
    step: int  # optimizer steps done when it is written
    kind: str  # "step", "epoch" or "final"
    name: str  # the model file
    state: str | None = None  # the state folder written with it (--save_state)
    epoch: int | None = None


def plan_steps(data: TrainingData, *, processes: int = 1, accumulation: int = 1, max_train_steps: int | None = None,
               max_train_epochs: int | None = None) -> StepPlan:
    """The run's step counts (raises UserError when neither steps nor epochs are set)."""
    if processes < 1 or accumulation < 1:
        raise ValueError(f"processes and accumulation must be at least 1, got {processes} and {accumulation}")
    per_process = len(epoch_batches(data, 0, 0, processes))
    if per_process < 1:
        raise UserError(f"{len(data.epoch_batches(0))} batches per epoch cannot be shared by {processes} processes; "
                        "add images or repeats, or use fewer processes")
    per_epoch = steps_per_epoch(data, processes, accumulation)
    return StepPlan(batches_per_epoch=len(data.epoch_batches(0)), batches_per_process=per_process, processes=processes,
                    accumulation=accumulation, steps_per_epoch=per_epoch,
                    total_steps=total_steps(max_train_steps, max_train_epochs, per_epoch))


def epoch_end_steps(plan: StepPlan) -> list[tuple[int, int]]:
    """(epoch, optimizer steps done) at the end of every epoch the run completes before its last step."""
    out = []
    epoch = 1
    while True:
        step = epoch * plan.batches_per_process // plan.accumulation
        if step >= plan.total_steps:
            return out
        out.append((epoch, step))
        epoch += 1


def save_events(policy: SavePolicy, plan: StepPlan, final_state: bool = False) -> list[SaveEvent]:
    """Every save of the run in order (a step's step save before its epoch save; the final save last, with
    its ``<name>-state`` folder under --save_state or ``final_state`` (--save_state_on_train_end))."""
    def event(at: int, kind: str, **name: int) -> SaveEvent:
        state = state_dir_name(policy.output_name, **name) if policy.save_state else None
        return SaveEvent(at, kind, checkpoint_name(policy.output_name, ext=policy.ext, **name), state,
                         name.get("epoch"))

    events = []
    if policy.save_every_n_steps:
        events += [event(s, "step", step=s) for s in range(policy.save_every_n_steps, plan.total_steps,
                                                             policy.save_every_n_steps)]
    events += [event(step, "epoch", epoch=epoch) for epoch, step in epoch_end_steps(plan)
               if policy.should_save_epoch(epoch)]
    events.sort(key=lambda e: (e.step, e.kind != "step"))
    final = state_dir_name(policy.output_name, final=True) if policy.save_state or final_state else None
    return events + [SaveEvent(plan.total_steps, "final", checkpoint_name(policy.output_name, ext=policy.ext), final)]


def kept_outputs(policy: SavePolicy, events: list[SaveEvent]) -> list[str]:
    """The files and state folders left in the output folder at the end (retention applied as in the run)."""
    kept: list[str] = []
    for e in events:
        kept += [n for n in (e.name, e.state) if n]
        if e.kind == "step":
            removed = set(policy.to_remove_after_step(e.step))
        elif e.kind == "epoch":
            removed = set(policy.to_remove_after_epoch(e.epoch or 0))
        else:
            removed = set()
        kept = [n for n in kept if n not in removed]
    return kept
