"""What a run shows while it trains, attached as loop hooks: EMA updates, validation loss, tracker logs
(TensorBoard / W&B) with the final ``loss.png``, and sample images (optionally with the EMA weights)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Callable, Iterator

from library.training.loop import LoopHooks
from library.training.run_hooks import Run

logger = logging.getLogger(__name__)

TRACKER_NAMES = {"full": "finetuning"}  # sd-scripts' default project names; networks: "network_train"


def watch_hooks(run: Run, prep, validation_inputs: Callable) -> list[LoopHooks]:
    """EMA, validation, tracker and sample hooks of ``run`` in the order they must run after a step."""
    from library.training.tracking import TrackerHooks, open_tracker, redact

    cfg, main = run.cfg, run.accelerator.is_main_process
    name = TRACKER_NAMES.get(run.trainee.kind, "network_train")
    tracker = open_tracker(cfg.log, default_name=name, settings=redact(run.settings_meta), is_main=main)
    logs = TrackerHooks(tracker, plot_path=Path(cfg.save.output_dir) / "loss.png", is_main=main)
    hooks: list[LoopHooks] = []
    if run.ema is not None:
        from library.training.ema import EmaHooks

        hooks.append(EmaHooks(run.ema, run.trained, cfg.ema.ema_update_every))
    hooks.extend(_validation_hooks(run, prep, validation_inputs, logs.log_validation))
    hooks.append(logs)
    hooks.extend(_sample_hooks(run, prep, logs.log_images))
    return hooks


def _validation_hooks(run: Run, prep, inputs: Callable, report: Callable) -> list[LoopHooks]:
    from library.training.setup import step_settings
    from library.training.validation import (
        ValidationHooks, eval_mode, validation_batches, validation_loss, validation_plan,
    )

    v, held = run.cfg.validation, prep.validation
    if held is None:
        if v.validate_every_n_steps or v.validate_every_n_epochs or v.max_validation_steps:
            logger.warning("validation flags given but no image is held out: set validation_split (e.g. 0.1)")
        return []
    seed = _validation_seed(prep)
    plan = validation_plan(every_n_steps=v.validate_every_n_steps, every_n_epochs=v.validate_every_n_epochs,
                           max_steps=v.max_validation_steps, seed=seed)
    loss = dataclasses.replace(step_settings(run.cfg).loss, weighting="none")
    batches = validation_batches(held, plan.max_steps)

    def evaluate() -> float:
        model = run.accelerator.unwrap_model(run.model)
        with eval_mode(model):
            return validation_loss(model, (held.load_batch(b, 0) for b in batches), inputs, loss, seed=plan.seed,
                                   num_sigmas=plan.num_sigmas, autocast_dtype=prep.autocast)

    logger.info("validation: %d held-out images, %d batches per evaluation", len(held.records), len(batches))
    return [ValidationHooks(plan, evaluate, report, is_main=run.accelerator.is_main_process)]


def _validation_seed(prep) -> int:
    seeds = [spec.validation_seed for spec in prep.data.blueprint.datasets if spec.validation_seed is not None]
    return seeds[0] if seeds else prep.seed


def _sample_hooks(run: Run, prep, report: Callable) -> list[LoopHooks]:
    if prep.sampling is None:
        return []
    from library.training.sampling import SampleContext, SampleHooks

    plan, conditions, vae = prep.sampling
    ctx = SampleContext(model=lambda: run.accelerator.unwrap_model(run.model),
                        vae=lambda: vae.to(run.accelerator.device), conditions=conditions,
                        device=run.accelerator.device, compute_dtype=prep.autocast,
                        out_dir=Path(run.cfg.save.output_dir) / "sample", output_name=run.cfg.save.output_name,
                        is_main=run.accelerator.is_main_process, weights=_round_context(run, prep, vae), report=report)
    return [SampleHooks(plan, ctx)]


def _round_context(run: Run, prep, vae) -> Callable[[], contextlib.AbstractContextManager]:
    """What a sample round runs in: the MMDiT swapping --blocks_to_swap_while_sampling blocks (default
    --blocks_to_swap), the EMA weights with --sample_ema, and afterwards the VAE back on the CPU when it is
    kept for samples only (without --highvram)."""
    from library.runtime.block_swap import BlockSwap, check_blocks_to_swap

    cfg, mmdit = run.cfg, prep.models.mmdit
    count = cfg.sample.blocks_to_swap_while_sampling
    count = check_blocks_to_swap(cfg.model.blocks_to_swap if count is None else count, mmdit.config.depth,
                                 "--blocks_to_swap_while_sampling")
    park_vae = not cfg.model.highvram and prep.models.vae is None
    use_ema = cfg.sample.sample_ema and run.ema is not None

    @contextlib.contextmanager
    def round_context() -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            if park_vae:
                stack.callback(vae.to, "cpu")
            if use_ema:  # outside the swap: the raw weights come back after the swap finished its copies
                stack.enter_context(run.ema.applied(run.trained()))
            if prep.block_swap is not None:
                stack.enter_context(prep.block_swap.swapping(count))
            elif count:  # swapping only while sampling: a swap for the round
                swap = BlockSwap(mmdit.joint_blocks, count, run.accelerator.device, what="--blocks_to_swap_while_sampling")
                stack.callback(swap.remove)
            yield

    return round_context
