"""The full fine-tune (the body of sd3_train.py): the MMDiT, and optionally the text encoders, trained."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from library.config import RunConfig
from library.data.dataset import CacheOptions
from library.data.spec import DatasetBlueprint
from library.errors import UserError
from library.models.text_encoders import TextEncoders
from library.training import engine
from library.training.checkpoints import checkpoint_metadata, save_dtype, save_full_checkpoint
from library.training.full_finetune import FullModel, FullTrainSpec, enable_gradient_checkpointing, param_groups
from library.training.fused import block_param_groups, check_fused, fused_mode
from library.training.loop import LoopHooks

logger = logging.getLogger(__name__)
KIND = "full"


@dataclass
class FullTrainee:
    """The MMDiT (and trained encoders) under one module; saved as a full SD3 checkpoint."""

    cfg: RunConfig
    module: FullModel
    groups: list[dict]
    encoders: TextEncoders | None  # every loaded encoder (saved with --save_clip / --save_t5xxl)
    checkpoint: Path
    kind: str = KIND

    def param_groups(self) -> list[dict]:
        return self.groups

    def state_tensors(self, module: FullModel) -> dict[str, torch.Tensor]:
        return {k: v for k, v in module.state_dict().items() if k.startswith("mmdit.") or _is_trained(module, k)}

    def write_model(self, path: Path, module: FullModel, settings: dict) -> None:
        save = self.cfg.save
        meta = checkpoint_metadata(module.mmdit.config, title=save.metadata_title or save.output_name,
                                   settings=settings)
        save_full_checkpoint(path, module.mmdit.state_dict(), module.mmdit.config, base_checkpoint_path=self.checkpoint,
                             metadata=meta, text_encoders=self.encoders, save_clip=save.save_clip,
                             save_t5xxl=save.save_t5xxl, dtype=save_dtype(save.save_precision), vae_path=self.cfg.model.vae,
                             mem_eff_save=save.mem_eff_save)

    def step_hooks(self) -> list[LoopHooks]:
        return []


def _is_trained(model: FullModel, key: str) -> bool:
    name = key.split(".")[1] if key.startswith("text_encoders.") else None
    return name is not None and any(p.requires_grad for p in model.text_encoders[name].parameters())


def _spec(cfg: RunConfig) -> FullTrainSpec:
    t = cfg.train
    return FullTrainSpec(learning_rate=t.learning_rate, learning_rate_te1=t.learning_rate_te1,
                         learning_rate_te2=t.learning_rate_te2, learning_rate_te3=t.learning_rate_te3,
                         train_text_encoder=t.train_text_encoder, train_t5xxl=t.train_t5xxl,
                         num_last_block_to_freeze=t.num_last_block_to_freeze,
                         gradient_checkpointing=t.gradient_checkpointing,
                         cpu_offload_checkpointing=t.cpu_offload_checkpointing)


def _check(cfg: RunConfig, cache: CacheOptions) -> None:
    if cfg.model.fp8_base or cfg.model.fp8_base_unet:
        raise UserError("--fp8_base is for network training (LoRA/LoKr): a full fine-tune updates the base "
                        "weights, which fp8 storage cannot hold; drop the flag or use sd3_train_network.py")
    mode = fused_mode(cfg.train.fused_backward_pass, cfg.train.blockwise_fused_optimizers)
    if mode is not None:
        check_fused(mode, accumulation=cfg.train.gradient_accumulation_steps, max_grad_norm=cfg.train.max_grad_norm,
                    loss_scaling=False)
    if cfg.train.cpu_offload_checkpointing and not cfg.train.gradient_checkpointing:
        raise UserError("--cpu_offload_checkpointing moves checkpointed activations to the CPU: it needs "
                        "--gradient_checkpointing")
    trains_clip, trains_t5 = cfg.train.train_text_encoder, cfg.train.train_t5xxl
    if cfg.train.persistent_data_loader_workers:
        logger.warning("--persistent_data_loader_workers: accepted; workers are started once per epoch here")
    if cache.cache_text_encoder_outputs and (trains_t5 or (trains_clip and "lg" in cache.te_parts)):
        raise UserError("--cache_text_encoder_outputs cannot be used while training the encoders it caches; "
                        "with --train_text_encoder add --use_t5xxl_cache_only, or drop the caching flag")


def train_full(cfg: RunConfig, blueprint: DatasetBlueprint, cache: CacheOptions, *, vae_batch_size: int = 1,
               text_batch_size: int = 8) -> Path:
    """Run a full fine-tune; returns the final checkpoint's path."""
    _check(cfg, cache)
    trains_te = cfg.train.train_text_encoder or cfg.train.train_t5xxl
    prep = engine.prepare_run(cfg, blueprint, cache, weights=None, trains_text=trains_te,
                              batch_sizes=(vae_batch_size, text_batch_size))
    models, spec, t = prep.models, _spec(prep.cfg), prep.cfg.train
    trained_encoders = models.encoders if trains_te else None
    groups = param_groups(models.mmdit, trained_encoders, spec)
    enable_gradient_checkpointing(models.mmdit, trained_encoders, spec)
    mode = fused_mode(t.fused_backward_pass, t.blockwise_fused_optimizers)
    model = FullModel(models.mmdit, trained_encoders, fused_update=mode)
    if mode == "block":
        groups = block_param_groups(model, groups)
    trainee = FullTrainee(prep.cfg, model, groups, models.encoders, models.checkpoint)
    return engine.train(prep, trainee, engine.settings_meta(prep))
