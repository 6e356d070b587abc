"""The run both trainers share: accelerator, models, caches, data, optimizer, the loop, saving and resume.

What is trained differs (the full model, or a network over a frozen base); that part arrives as a
:class:`Trainee`. :func:`prepare_run` loads and caches everything a run reads; :func:`train` builds the
optimizer and scheduler for the trainee, resumes or starts the counters, runs the loop with the save
hooks, and turns Ctrl-C into a saved state when ``--save_state`` is on.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from library.config import RunConfig
from library.data.batching import DataPosition
from library.data.dataset import CacheOptions, TrainingData
from library.data.spec import DatasetBlueprint
from library.errors import UserError
from library.training import setup
from library.training.caching import cache_latents, cache_text_outputs, empty_prompt_text, text_encode_fn
from library.training.checkpoints import SavePolicy, checkpoint_name, interrupted_state_dir_name, model_extension
from library.training.loop import LoopSettings, LoopState, run_loop, steps_per_epoch, total_steps
from library.training.run_hooks import EMA_PREFIX, ChainHooks, Run, SaveHooks, Trainee  # noqa: F401 (Trainee: re-exported)
from library.training.state import load_state, model_signature, restore_rng
from library.training.step import batch_encoder_outputs, batch_latents, conditioning, flow_step

logger = logging.getLogger(__name__)


@dataclass
class Prepared:
    """Everything a run reads, loaded and cached: the part before the trainee exists."""

    cfg: RunConfig
    accelerator: object
    models: setup.Models
    data: TrainingData
    cache: CacheOptions
    empty: object  # encoder outputs of the empty prompt (cached text), or None
    seed: int
    autocast: torch.dtype | None
    total_steps: int
    per_epoch: int
    sampling: object = None  # (SamplePlan, texts -> conditions, VAE) with --sample_prompts
    validation: TrainingData | None = None  # the held-out images (--validation_split)
    block_swap: object = None  # the BlockSwap of the MMDiT (--blocks_to_swap), attached when the run is made


def save_policy(cfg: RunConfig) -> SavePolicy:
    s = cfg.save
    return SavePolicy(output_name=s.output_name, save_every_n_epochs=s.save_every_n_epochs,
                      save_every_n_steps=s.save_every_n_steps, save_last_n_epochs=s.save_last_n_epochs,
                      save_last_n_steps=s.save_last_n_steps, save_last_n_epochs_state=s.save_last_n_epochs_state,
                      save_last_n_steps_state=s.save_last_n_steps_state, save_state=s.save_state,
                      ext=model_extension(s.save_model_as))


def _start_state(cfg: RunConfig, per_epoch_batches: int) -> LoopState:
    """sd-scripts' --initial_step / --initial_epoch: start the counters (and the data order) there."""
    step = cfg.save.initial_step or 0
    if cfg.save.initial_epoch and not step:
        return LoopState(position=DataPosition(cfg.save.initial_epoch - 1, 0))
    consumed = step * cfg.train.gradient_accumulation_steps
    return LoopState(global_step=step, position=DataPosition(*divmod(consumed, max(1, per_epoch_batches))))


def _resume(run: Run, directory: str) -> LoopState:
    loaded = load_state(directory, expected_kind=run.trainee.kind, expected_signature=run.signature)
    module = run.accelerator.unwrap_model(run.model)
    missing = [k for k in run.trainee.state_tensors(module) if k not in loaded.model_state]
    if missing:
        raise UserError(f"state {directory} lacks {len(missing)} trained tensors (e.g. {missing[0]}); "
                        "it was saved with other settings of what is trained")
    module.load_state_dict(loaded.model_state, strict=False)
    try:
        run.optimizer.load_state_dict(loaded.optimizer_state)
    except (ValueError, KeyError) as exc:
        raise UserError(f"state {directory}: its optimizer state does not fit this run's optimizer ({exc}); resume "
                        "with the optimizer flags it was saved with (--optimizer_type, --blockwise_fused_optimizers, "
                        "learning-rate groups)") from None
    run.scheduler.load_state_dict(loaded.scheduler_state)
    restore_rng(loaded.state.rng, {"step": run.generator})
    if run.ema is not None:
        ema = {k[len(EMA_PREFIX):]: v for k, v in loaded.extra.items() if k.startswith(EMA_PREFIX)}
        if ema:
            run.ema.load_state_dict(ema)
        else:
            logger.warning("state %s has no EMA: the EMA starts from the resumed weights", directory)
    history = loaded.extra.get("loss_history")
    return LoopState(global_step=loaded.state.global_step, position=loaded.state.data_position,
                     loss_history=[] if history is None else [float(x) for x in history])


def _cache(prep_models: setup.Models, datas: list[TrainingData], cache: CacheOptions, accelerator,
           batch: tuple[int, int], trains_text: bool):
    """Fill the caches (training and validation data; each rank its share), then free what training no
    longer needs."""
    shard = (accelerator.process_index, accelerator.num_processes)
    empty = None
    for data in datas:
        if cache.cache_latents:
            cache_latents(data, prep_models.vae, batch_size=batch[0], shard=shard)
        if cache.cache_text_encoder_outputs:
            cache_text_outputs(data, prep_models.encoders, prep_models.tokenizers, batch_size=batch[1], shard=shard)
    if cache.cache_text_encoder_outputs:
        encode = text_encode_fn(prep_models.encoders, prep_models.tokenizers, t5_max_length=cache.t5_max_length,
                                apply_t5_attn_mask=cache.apply_t5_attn_mask, parts=cache.te_parts)
        empty = empty_prompt_text(encode)
    accelerator.wait_for_everyone()
    if cache.cache_latents:
        prep_models.vae = None  # a VAE kept for samples only is parked by _park_idle
    if cache.cache_text_encoder_outputs and not trains_text:
        prep_models.encoders = None
    elif cache.cache_text_encoder_outputs and cache.te_parts == ("t5",):
        prep_models.encoders = dataclasses.replace(prep_models.encoders, t5xxl=None)  # T5 comes from the cache
    return empty


def prepare_run(cfg: RunConfig, blueprint: DatasetBlueprint, cache: CacheOptions, *, weights: torch.dtype | None,
                trains_text: bool, batch_sizes: tuple[int, int] = (1, 8),
                on_loaded: Callable[[setup.Models], None] | None = None) -> Prepared:
    """Seed, accelerator, models (in ``weights``, or the precision's default), caches and data.
    ``on_loaded`` runs on the models before anything is cached (e.g. to merge --base_weights)."""
    from accelerate import Accelerator

    seed = setup.run_seed(cfg)
    setup.seed_everything(seed)
    wants_cpu = (cfg.model.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu"
    accelerator = Accelerator(cpu=wants_cpu, gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
                              kwargs_handlers=_ddp_handlers(cfg),  # fp16: accelerate's loss scaling (GPU only)
                              mixed_precision="fp16" if cfg.train.mixed_precision == "fp16" and not wants_cpu else "no")
    _check_block_swap(cfg, accelerator.num_processes)
    device = accelerator.device
    default_weights, autocast = setup.weight_dtypes(cfg, device.type)
    models = setup.load_models(cfg, str(device), weights or default_weights)
    if on_loaded is not None:
        on_loaded(models)
    sampling = _sampling(cfg, models, device)
    vae_id, text_id = setup.identities(cfg, models.checkpoint)
    cache = dataclasses.replace(cache, vae_identity=vae_id, encoder_identity=text_id)
    data = TrainingData(blueprint, cache, seed=seed)
    held = data.validation_data()
    empty = _cache(models, [data] + ([held] if held is not None else []), cache, accelerator, batch_sizes, trains_text)
    setup.seed_everything(seed)  # what follows (network init, ...) must not depend on how much was cached now
    _park_idle(cfg, models, sampling)
    per_epoch = steps_per_epoch(data, accelerator.num_processes, cfg.train.gradient_accumulation_steps)
    total = total_steps(cfg.train.max_train_steps, cfg.train.max_train_epochs, per_epoch)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_train_steps=total))
    return Prepared(cfg, accelerator, models, data, cache, empty, seed, autocast, total, per_epoch, sampling, held)


def _check_block_swap(cfg: RunConfig, processes: int) -> None:
    """Block swap with a full fine-tune keeps the swapped parameters (and their optimizer state) on the CPU,
    which DDP (one device per model) and optimizer steps fused into the backward cannot handle."""
    if not cfg.model.blocks_to_swap or cfg.network is not None:
        return
    if processes > 1:
        raise UserError("--blocks_to_swap with a full fine-tune runs on one GPU only (DDP needs every trained "
                        "parameter on the GPU); launch one process, or train a network (LoRA/LoKr) instead")
    if cfg.train.fused_backward_pass or cfg.train.blockwise_fused_optimizers:
        raise UserError("--blocks_to_swap cannot be combined with --fused_backward_pass / "
                        "--blockwise_fused_optimizers yet; drop one of them")


def _park_idle(cfg: RunConfig, models: setup.Models, sampling) -> None:
    """Without --highvram, a VAE kept only to decode samples waits on the CPU between sample rounds, and the
    CUDA cache emptied after caching gives the memory back."""
    if cfg.model.highvram:
        return
    if sampling is not None and models.vae is None and sampling[2] is not None:
        sampling[2].to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sampling(cfg: RunConfig, models: setup.Models, device: torch.device):
    """With --sample_prompts: the plan, an encoder of prompt texts (live encoders while they are loaded,
    else the table encoded now, before caching frees them) and the VAE (kept for decoding)."""
    from library.training import sampling

    s = cfg.sample
    plan = sampling.sample_plan(s.sample_prompts, every_n_steps=s.sample_every_n_steps,
                                every_n_epochs=s.sample_every_n_epochs, at_first=s.sample_at_first,
                                sampler=s.sample_sampler, shift=s.sample_shift, variant=models.mmdit.config.variant)
    if plan is None:
        return None
    m = cfg.model
    live = sampling.prompt_encoder(lambda: models.encoders, models.tokenizers, models.layout, t5_max_length=m.t5xxl_max_token_length,
                                   apply_lg_attn_mask=m.apply_lg_attn_mask, apply_t5_attn_mask=m.apply_t5_attn_mask,
                                   device=device)
    table = live([t for spec in plan.prompts for t in (spec.prompt, spec.negative_prompt)])
    had_t5 = models.encoders.t5xxl is not None

    def conditions(texts: list[str]) -> dict:  # live while every encoder is loaded (a trained one shows)
        encoders = models.encoders
        return live(texts) if encoders is not None and (encoders.t5xxl is not None) == had_t5 else table

    return plan, conditions, models.vae


def _live_text(models: setup.Models, cache: CacheOptions):
    from library.models.prompt_encoding import encode_tokens, tokenize_prompts

    if models.encoders is None:
        return None

    def encode(captions):
        tokens = tokenize_prompts(models.tokenizers, captions, t5_max_length=cache.t5_max_length)
        return encode_tokens(models.encoders, tokens, apply_t5_attn_mask=cache.apply_t5_attn_mask)

    return encode


def _inputs(prep: Prepared, settings, device: torch.device, vae_encode):
    """batch, generator -> (x0, conditioning): latents cached or encoded now, captions cached or live."""
    live = _live_text(prep.models, prep.cache)

    def inputs(batch, generator=None):
        x0 = batch_latents(batch, vae_encode, device)
        return x0, conditioning(batch_encoder_outputs(batch, prep.empty, live), prep.models.layout, settings, device,
                                generator)

    return inputs


def _step_fn(run: Run, prep: Prepared):
    settings, models = setup.step_settings(run.cfg), prep.models
    vae_encode = None if models.vae is None else (lambda images: _vae_raw(models.vae, images, run.generator))
    inputs = _inputs(prep, settings, run.accelerator.device, vae_encode)

    def step(batch, generator):
        x0, cond = inputs(batch, generator)
        return flow_step(run.model, x0, cond, settings, loss_weights=batch.loss_weights, masks=batch.masks,
                         generator=generator, autocast_dtype=prep.autocast)

    return step


def _validation_inputs(run: Run, prep: Prepared):
    """Validation inputs: no encoder dropout; images encoded to the VAE posterior mean (deterministic)."""
    settings = dataclasses.replace(setup.step_settings(run.cfg), clip_l_dropout_rate=0.0, clip_g_dropout_rate=0.0,
                                   t5_dropout_rate=0.0)
    vae = prep.models.vae
    return _inputs(prep, settings, run.accelerator.device,
                   None if vae is None else (lambda images: vae.encode_moments(images)[0]))


def _vae_raw(vae, images, generator):
    from library.models.vae import sample_posterior

    mean, logvar = vae.encode_moments(images)
    return sample_posterior(mean, logvar, generator)


def _make_run(prep: Prepared, trainee: Trainee, settings_meta: dict) -> Run:
    cfg, accelerator = prep.cfg, prep.accelerator
    optimizer, scheduler = setup.optimizer_and_scheduler(cfg, trainee.param_groups(), prep.total_steps)
    prep.block_swap = _attach_block_swap(prep)
    # with block swap the model is placed already: accelerate's model.to(device) would pull the swapped blocks in
    model, optimizer = accelerator.prepare(trainee.module, optimizer,
                                           device_placement=[None if prep.block_swap is None else False, None])
    generator = torch.Generator().manual_seed(prep.seed + accelerator.process_index)
    shapes = {k: tuple(v.shape) for k, v in trainee.state_tensors(accelerator.unwrap_model(model)).items()}
    signature = model_signature(prep.models.mmdit.config, shapes)
    run = Run(cfg, accelerator, trainee, model, optimizer, scheduler, generator, save_policy(cfg), signature, settings_meta)
    if cfg.ema.ema:
        from library.training.ema import EmaWeights

        device = accelerator.device if cfg.ema.ema_device == "gpu" else torch.device("cpu")
        run.ema = EmaWeights(run.trained(), cfg.ema.ema_decay, device)
    return run


def _attach_block_swap(prep: Prepared):
    """--blocks_to_swap: the MMDiT's last joint blocks on (pinned) CPU memory, the rest on the device."""
    count = prep.cfg.model.blocks_to_swap
    if not count:
        return None
    from library.runtime.block_swap import attach_block_swap

    mmdit = prep.models.mmdit
    return attach_block_swap(mmdit, mmdit.joint_blocks, count, prep.accelerator.device)


def train(prep: Prepared, trainee: Trainee, settings_meta: dict) -> Path:
    """Train ``trainee`` on the prepared run; returns the final model file's path."""
    run = _make_run(prep, trainee, settings_meta)
    cfg = run.cfg
    per_epoch_batches = prep.per_epoch * cfg.train.gradient_accumulation_steps
    state = _resume(run, cfg.save.resume) if cfg.save.resume else _start_state(cfg, per_epoch_batches)
    from library.training.watch import watch_hooks

    saver = SaveHooks(run)
    hooks = [*trainee.step_hooks(), *watch_hooks(run, prep, _validation_inputs(run, prep)), saver]
    settings = LoopSettings(prep.total_steps, cfg.train.gradient_accumulation_steps, cfg.train.max_grad_norm,
                            cfg.train.max_bad_steps, prep.seed, cfg.train.max_data_loader_n_workers)
    try:
        run_loop(run.accelerator, run.model, prep.data, _step_fn(run, prep), run.optimizer, run.scheduler,
                 settings, state, run.generator, ChainHooks(hooks))
    except KeyboardInterrupt:
        if not run.policy.save_state:
            raise UserError(f"interrupted at step {state.global_step}; nothing saved (use --save_state to keep a "
                            "state on Ctrl-C)") from None
        name = interrupted_state_dir_name(run.policy.output_name, step=state.global_step)
        saver.save_state_dir(name, state)
        raise UserError(f"interrupted at step {state.global_step}; resume with --resume "
                        f"{Path(cfg.save.output_dir) / name}") from None
    finally:
        for hook in hooks:  # trackers flush and close even when the run stops early
            if hasattr(hook, "close"):
                hook.close()
    return Path(cfg.save.output_dir) / checkpoint_name(run.policy.output_name, ext=run.policy.ext)


def _ddp_handlers(cfg: RunConfig) -> list:
    if not cfg.train.ddp_timeout:
        return []
    import datetime

    from accelerate.utils import InitProcessGroupKwargs

    return [InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=cfg.train.ddp_timeout))]


def settings_meta(prep: Prepared) -> dict:
    """What the saved files record about the run (flags, seed, dataset summary, tag frequencies)."""
    cfg, data = prep.cfg, prep.data
    captions: dict[str, list[str]] = {}
    dirs: dict[str, dict[str, int]] = {}
    for record in data.records:
        folder = str(Path(record.image_path).parent.name)
        captions.setdefault(folder, []).append(record.caption)
        entry = dirs.setdefault(folder, {"n_repeats": record.num_repeats, "img_count": 0})
        entry["img_count"] += 1
    buckets = {f"{w}x{h}": n for (_, (w, h)), n in data.bucket_counts().items()}
    datasets = [{"resolution": list(spec.resolution), "batch_size": spec.batch_size,
                 "enable_bucket": spec.buckets.enable_bucket, "subsets": len(spec.subsets)}
                for spec in data.blueprint.datasets]
    return {**cfg.to_toml_dict(), "seed": prep.seed, "max_train_steps": prep.total_steps,
            "num_epochs": -(-prep.total_steps // max(1, prep.per_epoch)), "num_batches_per_epoch": len(data.epoch_batches(0)),
            "captions_by_dir": captions, "num_train_images": len(data.records), "datasets": datasets,
            "dataset_dirs": dirs, "bucket_info": buckets}
