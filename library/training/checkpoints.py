"""Output names, retention of older saves, training metadata and writing full checkpoints.

Names follow sd-scripts exactly: ``<name>.safetensors`` (final), ``<name>-000005.safetensors`` (after
epoch 5), ``<name>-step00000100.safetensors`` (after optimizer step 100), and the state folders
``<name>-state``, ``<name>-000005-state``, ``<name>-step00000100-state``.

Retention (sd-scripts' ``get_remove_epoch_no`` / ``get_remove_step_no``; after each save exactly one
older save is deleted, if it exists):

- epochs: saving after epoch ``e`` removes the save of epoch ``e - save_every_n_epochs * N`` with
  ``N = --save_last_n_epochs``, so the last N epoch saves remain. The final epoch is not saved as
  ``<name>-<epoch>`` (the final ``<name>.safetensors`` is written instead), as in sd-scripts.
- steps: saving after step ``s`` removes the save of step ``r = s - N - 1`` rounded down to a multiple
  of ``save_every_n_steps`` (``N = --save_last_n_steps``), so saves made within the last N steps
  (steps ``>= s - N``) remain.
- states use ``--save_last_n_epochs_state`` / ``--save_last_n_steps_state`` when given, else the
  model counts; they are only pruned when states are being saved.

Every file is written to a temp file beside the target and renamed; a failed write (a full disk)
leaves the target as it was and no temp file, and is reported as a one-line :class:`UserError`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping

import torch

from library.errors import UserError
from library.models.mmdit_config import MMDIT_CONFIG_METADATA_KEY, MMDiTConfig
from library.models.modelspec import modelspec_metadata
from library.models.safetensors_io import read_metadata, save_safetensors
from library.models.saving import VAE_PREFIX, checkpoint_tensors, save_sd3_checkpoint
from library.models.text_encoders import TextEncoders, text_encoder_metadata, text_encoder_state_dicts_for_checkpoint
from library.models.vae import VAE_CONFIG_METADATA_KEY, vae_ldm_tensors

logger = logging.getLogger(__name__)

MODEL_EXTENSIONS = MappingProxyType({"safetensors": ".safetensors"})
SAVE_PRECISIONS = MappingProxyType(
    {"float": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
)
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


# --- names


def checkpoint_name(output_name: str, *, epoch: int | None = None, step: int | None = None,
                    ext: str = ".safetensors") -> str:
    """``name-000005.safetensors`` (epoch), ``name-step00000100.safetensors`` (step), else ``name.safetensors``."""
    if epoch is not None and step is not None:
        raise ValueError("give epoch or step, not both")
    if epoch is not None:
        return f"{output_name}-{epoch:06d}{ext}"
    if step is not None:
        return f"{output_name}-step{step:08d}{ext}"
    return f"{output_name}{ext}"


def state_dir_name(output_name: str, *, epoch: int | None = None, step: int | None = None,
                   final: bool = False) -> str:
    """``name-000005-state``, ``name-step00000100-state`` or (``final``) ``name-state``."""
    if sum((epoch is not None, step is not None, final)) != 1:
        raise ValueError("give exactly one of epoch, step or final=True")
    return checkpoint_name(output_name, epoch=epoch, step=step, ext="-state")


def interrupted_state_dir_name(output_name: str, *, step: int) -> str:
    """``name-step00000123-interrupted-state``: the state saved on Ctrl-C. Its own name keeps it out of
    the retention rules (an interrupted run's state is never pruned by the resumed run)."""
    return f"{output_name}-step{step:08d}-interrupted-state"


def model_extension(save_model_as: str) -> str:
    """The file extension for ``--save_model_as`` (only safetensors is written)."""
    if save_model_as not in MODEL_EXTENSIONS:
        raise UserError(f"--save_model_as {save_model_as} is not supported; use {', '.join(MODEL_EXTENSIONS)}")
    return MODEL_EXTENSIONS[save_model_as]


def save_dtype(save_precision: str | None) -> torch.dtype | None:
    """``--save_precision`` (float/fp16/bf16) as a dtype; ``None`` keeps the training dtype."""
    if save_precision is None:
        return None
    if save_precision not in SAVE_PRECISIONS:
        raise UserError(f"--save_precision {save_precision} is not one of {', '.join(SAVE_PRECISIONS)}")
    return SAVE_PRECISIONS[save_precision]


# --- retention


def _check_count(flag: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise UserError(f"--{flag} must be at least 1, got {value}")


@dataclass(frozen=True)
class SavePolicy:
    """When to save during training and which older saves to delete (see the module docstring)."""

    output_name: str
    save_every_n_epochs: int | None = None
    save_every_n_steps: int | None = None
    save_last_n_epochs: int | None = None
    save_last_n_steps: int | None = None
    save_last_n_epochs_state: int | None = None
    save_last_n_steps_state: int | None = None
    save_state: bool = False
    ext: str = ".safetensors"

    def __post_init__(self) -> None:
        for flag in ("save_every_n_epochs", "save_every_n_steps", "save_last_n_epochs", "save_last_n_steps",
                     "save_last_n_epochs_state", "save_last_n_steps_state"):
            _check_count(flag, getattr(self, flag))
        if (self.save_last_n_epochs or self.save_last_n_epochs_state) and not self.save_every_n_epochs:
            logger.warning("--save_last_n_epochs has no effect without --save_every_n_epochs")
        if (self.save_last_n_steps or self.save_last_n_steps_state) and not self.save_every_n_steps:
            logger.warning("--save_last_n_steps has no effect without --save_every_n_steps")

    def should_save_epoch(self, epoch: int, num_epochs: int | None = None) -> bool:
        """Save after (1-based) ``epoch``? Never for the last epoch, which gets the final save."""
        if not self.save_every_n_epochs or epoch % self.save_every_n_epochs:
            return False
        return num_epochs is None or epoch < num_epochs

    def should_save_step(self, step: int) -> bool:
        """Save after optimizer step ``step`` (1-based global step)?"""
        return bool(self.save_every_n_steps) and step > 0 and step % self.save_every_n_steps == 0

    def _state_count(self, n_state: int | None, n_model: int | None) -> int | None:
        return (n_state or n_model) if self.save_state else None

    def to_remove_after_epoch(self, epoch: int) -> list[str]:
        """Names (files and state folders, relative to the output dir) to delete after saving ``epoch``."""
        every = self.save_every_n_epochs
        if not every:
            return []
        out = []
        n_state = self._state_count(self.save_last_n_epochs_state, self.save_last_n_epochs)
        for count, name in ((self.save_last_n_epochs, self._ckpt_epoch), (n_state, self._state_epoch)):
            if count and epoch - every * count > 0:
                out.append(name(epoch - every * count))
        return out

    def to_remove_after_step(self, step: int) -> list[str]:
        """Names (files and state folders, relative to the output dir) to delete after saving ``step``."""
        every = self.save_every_n_steps
        if not every:
            return []
        out = []
        n_state = self._state_count(self.save_last_n_steps_state, self.save_last_n_steps)
        for count, name in ((self.save_last_n_steps, self._ckpt_step), (n_state, self._state_step)):
            if count:
                old = step - count - 1
                old -= old % every
                if old > 0:
                    out.append(name(old))
        return out

    def _ckpt_epoch(self, epoch: int) -> str:
        return checkpoint_name(self.output_name, epoch=epoch, ext=self.ext)

    def _ckpt_step(self, step: int) -> str:
        return checkpoint_name(self.output_name, step=step, ext=self.ext)

    def _state_epoch(self, epoch: int) -> str:
        return state_dir_name(self.output_name, epoch=epoch)

    def _state_step(self, step: int) -> str:
        return state_dir_name(self.output_name, step=step)


def prune_outputs(output_dir: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Delete the files / state folders ``names`` under ``output_dir`` that exist; return what was removed."""
    removed = []
    for name in names:
        path = Path(output_dir) / name
        if path.is_dir():
            logger.info("removing old state: %s", path)
            shutil.rmtree(path)
        elif path.exists():
            logger.info("removing old checkpoint: %s", path)
            path.unlink()
        else:
            continue
        removed.append(path)
    return removed


# --- metadata


def tag_frequency(captions_by_dir: Mapping[str, Iterable[str]]) -> dict[str, dict[str, int]]:
    """sd-scripts' ``ss_tag_frequency``: per image folder, how many captions contain each tag
    (captions split on ",", tags stripped and lower-cased, empty tags skipped; repeats not counted)."""
    out: dict[str, dict[str, int]] = {}
    for dir_name, captions in captions_by_dir.items():
        counts = out.setdefault(dir_name, {})
        for caption in captions:
            for tag in caption.split(","):
                tag = tag.strip().lower()
                if tag:
                    counts[tag] = counts.get(tag, 0) + 1
    return out


# settings key -> metadata key; values are written as str(value), as sd-scripts does.
_SCALAR_KEYS = MappingProxyType({
    "output_name": "ss_output_name",
    "session_id": "ss_session_id",
    "training_started_at": "ss_training_started_at",
    "training_finished_at": "ss_training_finished_at",
    "training_comment": "ss_training_comment",
    "base_model_version": "ss_base_model_version",
    "learning_rate": "ss_learning_rate",
    "unet_lr": "ss_unet_lr",
    "text_encoder_lr": "ss_text_encoder_lr",
    "lr_scheduler": "ss_lr_scheduler",
    "lr_warmup_steps": "ss_lr_warmup_steps",
    "max_train_steps": "ss_max_train_steps",
    "num_epochs": "ss_num_epochs",
    "num_batches_per_epoch": "ss_num_batches_per_epoch",
    "num_train_images": "ss_num_train_images",
    "num_reg_images": "ss_num_reg_images",
    "steps": "ss_steps",
    "epoch": "ss_epoch",
    "seed": "ss_seed",
    "mixed_precision": "ss_mixed_precision",
    "full_bf16": "ss_full_bf16",
    "gradient_checkpointing": "ss_gradient_checkpointing",
    "gradient_accumulation_steps": "ss_gradient_accumulation_steps",
    "max_grad_norm": "ss_max_grad_norm",
    "caption_dropout_rate": "ss_caption_dropout_rate",
    "caption_tag_dropout_rate": "ss_caption_tag_dropout_rate",
    "prior_loss_weight": "ss_prior_loss_weight",
    "loss_type": "ss_loss_type",
    "huber_schedule": "ss_huber_schedule",
    "huber_c": "ss_huber_c",
    "huber_scale": "ss_huber_scale",
    "apply_lg_attn_mask": "ss_apply_lg_attn_mask",
    "apply_t5_attn_mask": "ss_apply_t5_attn_mask",
    "weighting_scheme": "ss_weighting_scheme",
    "logit_mean": "ss_logit_mean",
    "logit_std": "ss_logit_std",
    "mode_scale": "ss_mode_scale",
    "training_shift": "ss_training_shift",
    "timestep_sampling": "sd3_trainer.timestep_sampling",
    "loss_weighting": "sd3_trainer.loss_weighting",
    "model_prediction_type": "sd3_trainer.model_prediction_type",
    "min_timestep": "sd3_trainer.min_timestep",
    "max_timestep": "sd3_trainer.max_timestep",
    "t5xxl_max_token_length": "sd3_trainer.t5xxl_max_token_length",
    "clip_l_dropout_rate": "sd3_trainer.clip_l_dropout_rate",
    "clip_g_dropout_rate": "sd3_trainer.clip_g_dropout_rate",
    "t5_dropout_rate": "sd3_trainer.t5_dropout_rate",
    "trainer_version": "sd3_trainer.version",
})
# settings key -> metadata key; values are written as JSON.
_JSON_KEYS = MappingProxyType({
    "datasets": "ss_datasets",
    "dataset_dirs": "ss_dataset_dirs",
    "bucket_info": "ss_bucket_info",
    "tag_frequency": "ss_tag_frequency",
})


def _optimizer_text(settings: Mapping[str, Any]) -> str | None:
    name = settings.get("optimizer_type") or settings.get("optimizer")
    if name is None:
        return None
    items = settings.get("optimizer_args") or ()
    if isinstance(items, Mapping):
        items = [f"{k}={v}" for k, v in items.items()]
    return f"{name}({','.join(str(a) for a in items)})" if items else str(name)


def _model_basename(settings: Mapping[str, Any], key: str) -> str | None:
    value = settings.get(key)
    return None if value is None else os.path.basename(os.fspath(value).rstrip("/\\"))


_DERIVED: Mapping[str, Callable[[Mapping[str, Any]], str | None]] = MappingProxyType({
    "ss_optimizer": _optimizer_text,
    "ss_sd_model_name": lambda s: _model_basename(s, "pretrained_model_name_or_path"),
    "ss_vae_name": lambda s: _model_basename(s, "vae"),
})


def training_metadata(settings: Mapping[str, Any]) -> dict[str, str]:
    """String metadata for a saved model from the run's settings (flag names as keys).

    Known flags become ``ss_*`` keys as sd-scripts names them (plus ``ss_training_shift``, which
    sd-scripts forgets) or ``sd3_trainer.*`` for concepts of ours; ``datasets``, ``dataset_dirs``,
    ``bucket_info`` and ``tag_frequency`` are JSON; ``captions_by_dir`` ({folder: [caption, ...]})
    is turned into ``ss_tag_frequency`` when no ``tag_frequency`` is given. Other keys are ignored.
    Paths are reduced to their base names (as sd-scripts records them).
    """
    meta: dict[str, str] = {}
    for key, meta_key in _SCALAR_KEYS.items():
        if key in settings:
            meta[meta_key] = str(settings[key])
    for meta_key, derive in _DERIVED.items():
        value = derive(settings)
        if value is not None:
            meta[meta_key] = value
    json_values = {k: settings[k] for k in _JSON_KEYS if k in settings}
    if "tag_frequency" not in json_values and "captions_by_dir" in settings:
        json_values["tag_frequency"] = tag_frequency(settings["captions_by_dir"])
    for key, value in json_values.items():
        meta[_JSON_KEYS[key]] = json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
    return meta


def checkpoint_metadata(cfg: MMDiTConfig, *, title: str, settings: Mapping[str, Any], resolution: int = 1024,
                        adapter: str | None = None, date: str | None = None) -> dict[str, str]:
    """``modelspec.*`` metadata plus :func:`training_metadata` of ``settings``."""
    return modelspec_metadata(cfg, title=title, resolution=resolution, adapter=adapter, date=date,
                              extra=training_metadata(settings))


# --- writing


def save_error(path: str | os.PathLike, exc: OSError) -> UserError:
    """The one-line error for a failed write of ``path`` (a full disk says so)."""
    if exc.errno in _DISK_FULL_ERRNOS:
        reason = exc.strerror or os.strerror(exc.errno)
        return UserError(f"not enough disk space to save {path}: {reason}; free space or change --output_dir")
    return UserError(f"could not save {path}: {exc}; check --output_dir")


def _text_encoder_parts(text_encoders: TextEncoders | None, save_clip: bool,
                        save_t5xxl: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not (save_clip or save_t5xxl):
        return {}, {}
    if text_encoders is None:
        raise ValueError("save_clip / save_t5xxl need the loaded text encoders")
    present = text_encoders.present()
    wanted = (["clip_l", "clip_g"] if save_clip else []) + (["t5xxl"] if save_t5xxl else [])
    for name in wanted:
        if name not in present:
            logger.warning("%s is not loaded, so it is not saved in the checkpoint", name)
    tensors = text_encoder_state_dicts_for_checkpoint(text_encoders, clip=save_clip, t5xxl=save_t5xxl)
    return tensors, text_encoder_metadata(text_encoders, clip=save_clip, t5xxl=save_t5xxl)


def save_full_checkpoint(
    path: str | os.PathLike,
    model_state_dict: Mapping[str, torch.Tensor],
    cfg: MMDiTConfig,
    *,
    base_checkpoint_path: str | os.PathLike,
    metadata: Mapping[str, str],
    text_encoders: TextEncoders | None = None,
    save_clip: bool = False, save_t5xxl: bool = False,
    dtype: torch.dtype | None = None, vae_path: str | os.PathLike | None = None, mem_eff_save: bool = False,
) -> Path:
    """Write an all-in-one SD3 checkpoint atomically and return its path.

    The VAE tensors are copied unchanged (dtype included) from ``vae_path`` (default: the base
    checkpoint), with its VAE config metadata if it has one. ``save_clip`` adds CLIP-L and CLIP-G,
    ``save_t5xxl`` adds T5-XXL, from ``text_encoders`` (with their config metadata). ``dtype``
    (``--save_precision``) casts the MMDiT and the text encoders, never the VAE.

    Tensors are always streamed to the file one by one, but the ``--save_precision`` cast first builds
    a cast copy of the whole model; ``mem_eff_save`` casts each tensor while it is written instead (at
    most one cast tensor exists at a time). The bytes written are identical either way.
    """
    path = Path(path)
    vae_source = Path(vae_path if vae_path is not None else base_checkpoint_path)
    vae = vae_ldm_tensors(vae_source)
    meta = dict(metadata)
    vae_config = read_metadata(vae_source, "VAE file").get(VAE_CONFIG_METADATA_KEY)
    if vae_config is not None:
        meta[VAE_CONFIG_METADATA_KEY] = vae_config
    te_tensors, te_meta = _text_encoder_parts(text_encoders, save_clip, save_t5xxl)
    meta.update(te_meta)
    logger.info("saving checkpoint: %s", path)
    try:
        if mem_eff_save:  # save_sd3_checkpoint's file and cast rule, casting each tensor while it is written
            tensors = checkpoint_tensors(model_state_dict, vae_tensors=vae, text_encoder_tensors=te_tensors)
            casts = {k: dtype for k, v in tensors.items() if dtype and v.is_floating_point() and not k.startswith(VAE_PREFIX)}
            save_safetensors(tensors, path, {**meta, MMDIT_CONFIG_METADATA_KEY: cfg.to_json()}, dtypes=casts)
        else:
            save_sd3_checkpoint(path, model_state_dict, cfg, metadata=meta, vae_tensors=vae,
                                text_encoder_tensors=te_tensors, dtype=dtype)
    except OSError as exc:
        raise save_error(path, exc) from None
    return path
