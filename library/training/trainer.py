"""The full fine-tune run: setup, caching, the loop, saving and resume (the body of sd3_train.py)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from library.config import RunConfig
from library.data.batching import DataPosition
from library.data.dataset import CacheOptions, TrainingData
from library.data.spec import DatasetBlueprint
from library.errors import UserError
from library.training import setup
from library.training.caching import cache_latents, cache_text_outputs, empty_prompt_text, text_encode_fn
from library.training.checkpoints import (
    SavePolicy, checkpoint_metadata, checkpoint_name, interrupted_state_dir_name, model_extension, prune_outputs,
    save_dtype, save_full_checkpoint, state_dir_name,
)
from library.training.full_finetune import FullModel, FullTrainSpec, enable_gradient_checkpointing, param_groups
from library.training.optimizers import optimizer_eval, optimizer_train
from library.training.loop import LoopHooks, LoopSettings, LoopState, run_loop, steps_per_epoch, total_steps
from library.training.state import TrainState, capture_rng, load_state, model_signature, restore_rng, save_state
from library.training.step import batch_encoder_outputs, batch_latents, conditioning, flow_step

logger = logging.getLogger(__name__)
KIND = "full"


@dataclass
class Run:
    cfg: RunConfig
    accelerator: object
    model: FullModel
    optimizer: object
    scheduler: object
    generator: torch.Generator
    policy: SavePolicy
    signature: str
    settings_meta: dict


def _trainable_state(model: FullModel) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.startswith("mmdit.") or _is_trained(model, k)}


def _is_trained(model: FullModel, key: str) -> bool:
    name = key.split(".")[1] if key.startswith("text_encoders.") else None
    return name is not None and any(p.requires_grad for p in model.text_encoders[name].parameters())


class SaveHooks(LoopHooks):
    def __init__(self, run: Run, models: setup.Models) -> None:
        self.run, self.models = run, models
        self.out = Path(run.cfg.save.output_dir)

    def _save_model(self, name: str) -> None:
        run = self.run
        if not run.accelerator.is_main_process:
            return
        optimizer_eval(run.optimizer)  # schedule-free optimizers hold their averaged weights in eval mode
        try:
            self._write_model(name)
        finally:
            optimizer_train(run.optimizer)

    def _write_model(self, name: str) -> None:
        run = self.run
        model = run.accelerator.unwrap_model(run.model)
        encoders = self.models.encoders
        meta = checkpoint_metadata(model.mmdit.config, title=run.cfg.save.metadata_title or run.cfg.save.output_name,
                                   settings=run.settings_meta)
        save_full_checkpoint(self.out / name, model.mmdit.state_dict(), model.mmdit.config,
                             base_checkpoint_path=self.models.checkpoint, metadata=meta, text_encoders=encoders,
                             save_clip=run.cfg.save.save_clip, save_t5xxl=run.cfg.save.save_t5xxl,
                             dtype=save_dtype(run.cfg.save.save_precision), vae_path=run.cfg.model.vae)

    def save_state_dir(self, name: str, state: LoopState) -> None:
        run = self.run
        if not run.accelerator.is_main_process:
            return
        model = run.accelerator.unwrap_model(run.model)
        train_state = TrainState(epoch=state.position.epoch, global_step=state.global_step,
                                 data_position=state.position, model_kind=KIND, model_signature=run.signature,
                                 rng=capture_rng({"step": run.generator}))
        save_state(self.out / name, state=train_state, model_state=_trainable_state(model),
                   optimizer_state=run.optimizer.state_dict(), scheduler_state=run.scheduler.state_dict(),
                   extra={"loss_history": torch.tensor(state.loss_history[-1000:])})

    def on_step_end(self, state: LoopState, loss: float, lr: float) -> None:
        policy, step = self.run.policy, state.global_step
        if step < self.run.cfg.train.max_train_steps and policy.should_save_step(step):
            self._save_model(checkpoint_name(policy.output_name, step=step, ext=policy.ext))
            if policy.save_state:
                self.save_state_dir(state_dir_name(policy.output_name, step=step), state)
            if self.run.accelerator.is_main_process:
                prune_outputs(self.out, policy.to_remove_after_step(step))

    def on_epoch_end(self, state: LoopState, epoch: int) -> None:
        policy = self.run.policy
        if state.global_step < self.run.cfg.train.max_train_steps and policy.should_save_epoch(epoch):
            self._save_model(checkpoint_name(policy.output_name, epoch=epoch, ext=policy.ext))
            if policy.save_state:
                self.save_state_dir(state_dir_name(policy.output_name, epoch=epoch), state)
            if self.run.accelerator.is_main_process:
                prune_outputs(self.out, policy.to_remove_after_epoch(epoch))

    def on_train_end(self, state: LoopState) -> None:
        policy, acc = self.run.policy, self.run.accelerator
        logger.info("rank %d/%d: trained on %d samples (digest %08x), weights checksum %s", acc.process_index,
                    acc.num_processes, state.samples_seen, state.sample_digest, _checksum(acc.unwrap_model(self.run.model)))
        self._save_model(checkpoint_name(policy.output_name, ext=policy.ext))
        if policy.save_state or self.run.cfg.save.save_state_on_train_end:
            self.save_state_dir(state_dir_name(policy.output_name, final=True), state)


def _checksum(model: torch.nn.Module) -> str:
    import hashlib

    digest = hashlib.sha1()
    for value in model.state_dict().values():
        digest.update(value.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:12]


def _policy(cfg: RunConfig) -> SavePolicy:
    s = cfg.save
    return SavePolicy(output_name=s.output_name, save_every_n_epochs=s.save_every_n_epochs,
                      save_every_n_steps=s.save_every_n_steps, save_last_n_epochs=s.save_last_n_epochs,
                      save_last_n_steps=s.save_last_n_steps, save_last_n_epochs_state=s.save_last_n_epochs_state,
                      save_last_n_steps_state=s.save_last_n_steps_state, save_state=s.save_state,
                      ext=model_extension(s.save_model_as))


def _spec(cfg: RunConfig) -> FullTrainSpec:
    t = cfg.train
    return FullTrainSpec(learning_rate=t.learning_rate, learning_rate_te1=t.learning_rate_te1,
                         learning_rate_te2=t.learning_rate_te2, learning_rate_te3=t.learning_rate_te3,
                         train_text_encoder=t.train_text_encoder, train_t5xxl=t.train_t5xxl,
                         num_last_block_to_freeze=t.num_last_block_to_freeze,
                         gradient_checkpointing=t.gradient_checkpointing)


def _check(cfg: RunConfig, cache: CacheOptions) -> None:
    if cfg.model.fp8_base:
        raise UserError("--fp8_base is for network training (LoRA/LoKr): a full fine-tune updates the base "
                        "weights, which fp8 storage cannot hold; drop the flag or use sd3_train_network.py")
    trains_clip, trains_t5 = cfg.train.train_text_encoder, cfg.train.train_t5xxl
    if cfg.train.persistent_data_loader_workers:
        logger.warning("--persistent_data_loader_workers: accepted; workers are started once per epoch here")
    if cache.cache_text_encoder_outputs and (trains_t5 or (trains_clip and "lg" in cache.te_parts)):
        raise UserError("--cache_text_encoder_outputs cannot be used while training the encoders it caches; "
                        "with --train_text_encoder add --use_t5xxl_cache_only, or drop the caching flag")


def _start_state(cfg: RunConfig, per_epoch_batches: int) -> LoopState:
    """sd-scripts' --initial_step / --initial_epoch: start the counters (and the data order) there."""
    step = cfg.save.initial_step or 0
    if cfg.save.initial_epoch and not step:
        return LoopState(position=DataPosition(cfg.save.initial_epoch - 1, 0))
    consumed = step * cfg.train.gradient_accumulation_steps
    return LoopState(global_step=step, position=DataPosition(*divmod(consumed, max(1, per_epoch_batches))))


def _resume(run: Run, directory: str) -> LoopState:
    loaded = load_state(directory, expected_kind=KIND, expected_signature=run.signature)
    model = run.accelerator.unwrap_model(run.model)
    missing = [k for k in _trainable_state(model) if k not in loaded.model_state]
    if missing:
        raise UserError(f"state {directory} lacks {len(missing)} trained tensors (e.g. {missing[0]}); "
                        "it was saved with other --train_text_encoder/--train_t5xxl settings")
    model.load_state_dict(loaded.model_state, strict=False)
    run.optimizer.load_state_dict(loaded.optimizer_state)
    run.scheduler.load_state_dict(loaded.scheduler_state)
    restore_rng(loaded.state.rng, {"step": run.generator})
    history = loaded.extra.get("loss_history")
    return LoopState(global_step=loaded.state.global_step, position=loaded.state.data_position,
                     loss_history=[] if history is None else [float(x) for x in history])


def _cache(cfg: RunConfig, data, models: setup.Models, cache: CacheOptions, accelerator, batch: tuple[int, int]):
    """Fill the caches (each rank its share), then free what training no longer needs."""
    shard = (accelerator.process_index, accelerator.num_processes)
    empty = None
    if cache.cache_latents:
        cache_latents(data, models.vae, batch_size=batch[0], shard=shard)
    if cache.cache_text_encoder_outputs:
        cache_text_outputs(data, models.encoders, models.tokenizers, batch_size=batch[1], shard=shard)
        encode = text_encode_fn(models.encoders, models.tokenizers, t5_max_length=cache.t5_max_length,
                                apply_t5_attn_mask=cache.apply_t5_attn_mask, parts=cache.te_parts)
        empty = empty_prompt_text(encode)
    accelerator.wait_for_everyone()
    if cache.cache_latents:
        models.vae = None
    if cache.cache_text_encoder_outputs and not (cfg.train.train_text_encoder or cfg.train.train_t5xxl):
        models.encoders = None
    elif cache.cache_text_encoder_outputs and cache.te_parts == ("t5",):
        models.encoders = dataclasses.replace(models.encoders, t5xxl=None)  # T5 comes from the cache
    return empty


def _live_text(models: setup.Models, cache: CacheOptions):
    from library.models.prompt_encoding import encode_tokens, tokenize_prompts

    if models.encoders is None:
        return None

    def encode(captions):
        tokens = tokenize_prompts(models.tokenizers, captions, t5_max_length=cache.t5_max_length)
        return encode_tokens(models.encoders, tokens, apply_t5_attn_mask=cache.apply_t5_attn_mask)

    return encode


def _step_fn(run: Run, models: setup.Models, cache: CacheOptions, empty, autocast):
    settings, device = setup.step_settings(run.cfg), run.accelerator.device
    vae_encode = None if models.vae is None else (lambda images: _vae_raw(models.vae, images, run.generator))
    live = _live_text(models, cache)

    def step(batch, generator):
        x0 = batch_latents(batch, vae_encode, device)
        cond = conditioning(batch_encoder_outputs(batch, empty, live), models.layout, settings, device, generator)
        return flow_step(run.model, x0, cond, settings, loss_weights=batch.loss_weights, masks=batch.masks,
                         generator=generator, autocast_dtype=autocast)

    return step


def _vae_raw(vae, images, generator):
    from library.models.vae import sample_posterior

    mean, logvar = vae.encode_moments(images)
    return sample_posterior(mean, logvar, generator)


def train_full(cfg: RunConfig, blueprint: DatasetBlueprint, cache: CacheOptions, *, vae_batch_size: int = 1,
               text_batch_size: int = 8) -> Path:
    """Run a full fine-tune; returns the final checkpoint's path."""
    from accelerate import Accelerator

    _check(cfg, cache)
    seed = setup.run_seed(cfg)
    setup.seed_everything(seed)
    wants_cpu = (cfg.model.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu"
    accelerator = Accelerator(cpu=wants_cpu, gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
                              kwargs_handlers=_ddp_handlers(cfg))
    device = accelerator.device
    weights, autocast = setup.weight_dtypes(cfg, device.type)
    models = setup.load_models(cfg, str(device), weights)
    vae_id, text_id = setup.identities(cfg, models.checkpoint)
    cache = dataclasses.replace(cache, vae_identity=vae_id, encoder_identity=text_id)
    data = TrainingData(blueprint, cache, seed=seed)
    empty = _cache(cfg, data, models, cache, accelerator, (vae_batch_size, text_batch_size))
    spec = _spec(cfg)
    trains_te = cfg.train.train_text_encoder or cfg.train.train_t5xxl
    groups = param_groups(models.mmdit, models.encoders if trains_te else None, spec)
    enable_gradient_checkpointing(models.mmdit, models.encoders if trains_te else None, spec)
    model = FullModel(models.mmdit, models.encoders if trains_te else None)
    per_epoch = steps_per_epoch(data, accelerator.num_processes, cfg.train.gradient_accumulation_steps)
    total = total_steps(cfg.train.max_train_steps, cfg.train.max_train_epochs, per_epoch)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_train_steps=total))
    optimizer, scheduler = setup.optimizer_and_scheduler(cfg, groups, total)
    model, optimizer = accelerator.prepare(model, optimizer)
    generator = torch.Generator().manual_seed(seed + accelerator.process_index)
    shapes = {k: tuple(v.shape) for k, v in _trainable_state(accelerator.unwrap_model(model)).items()}
    run = Run(cfg, accelerator, model, optimizer, scheduler, generator, _policy(cfg),
              model_signature(models.mmdit.config, shapes), _settings_meta(cfg, seed, total, data))
    per_epoch_batches = per_epoch * cfg.train.gradient_accumulation_steps
    state = _resume(run, cfg.save.resume) if cfg.save.resume else _start_state(cfg, per_epoch_batches)
    hooks = SaveHooks(run, models)
    settings = LoopSettings(total, cfg.train.gradient_accumulation_steps, cfg.train.max_grad_norm,
                            cfg.train.max_bad_steps, seed, cfg.train.max_data_loader_n_workers)
    try:
        run_loop(accelerator, model, data, _step_fn(run, models, cache, empty, autocast), optimizer, scheduler,
                 settings, state, generator, hooks)
    except KeyboardInterrupt:
        if not run.policy.save_state:
            raise UserError(f"interrupted at step {state.global_step}; nothing saved (use --save_state to keep a "
                            "state on Ctrl-C)") from None
        name = interrupted_state_dir_name(run.policy.output_name, step=state.global_step)
        hooks.save_state_dir(name, state)
        raise UserError(f"interrupted at step {state.global_step}; resume with --resume "
                        f"{Path(cfg.save.output_dir) / name}") from None
    return Path(cfg.save.output_dir) / checkpoint_name(run.policy.output_name, ext=run.policy.ext)


def _ddp_handlers(cfg: RunConfig) -> list:
    if not cfg.train.ddp_timeout:
        return []
    import datetime

    from accelerate.utils import InitProcessGroupKwargs

    return [InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=cfg.train.ddp_timeout))]


def _settings_meta(cfg: RunConfig, seed: int, total: int, data) -> dict:
    """What the saved files record about the run (flags, seed, dataset summary, tag frequencies)."""
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
    return {**cfg.to_toml_dict(), "seed": seed, "max_train_steps": total, "captions_by_dir": captions,
            "num_train_images": len(data.records), "datasets": datasets, "dataset_dirs": dirs,
            "bucket_info": buckets}
