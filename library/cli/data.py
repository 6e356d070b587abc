"""Dataset, caption, bucket and cache flags (sd-scripts' names), shared by the trainers and cache tools."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from library.data.cli_datasets import DatasetDefaults, blueprint_from_defaults, parse_resolution
from library.data.spec import DatasetBlueprint
from library.data.toml_config import load_dataset_config
from library.errors import UserError

if TYPE_CHECKING:  # library.data.dataset imports torch: loaded when cache options are built, not for --help
    from library.data.dataset import CacheOptions

_BOOL_FLAGS = ("enable_bucket", "bucket_no_upscale", "shuffle_caption", "enable_wildcard", "flip_aug", "color_aug",
               "random_crop", "alpha_mask", "cache_info")
_TYPED_FLAGS: dict[str, type] = {
    "dataset_repeats": int, "train_batch_size": int, "min_bucket_reso": int, "max_bucket_reso": int,
    "bucket_reso_steps": int, "resize_interpolation": str, "validation_split": float, "validation_seed": int,
    "prior_loss_weight": float, "caption_extension": str, "caption_prefix": str, "caption_suffix": str,
    "caption_separator": str, "keep_tokens": int, "keep_tokens_separator": str, "secondary_separator": str,
    "caption_dropout_rate": float, "caption_dropout_every_n_epochs": int, "caption_tag_dropout_rate": float,
    "token_warmup_min": int, "token_warmup_step": float,
}


def add_dataset_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("dataset")
    g.add_argument("--dataset_config", type=Path, help="dataset TOML ([general], [[datasets]], [[datasets.subsets]])")
    g.add_argument("--train_data_dir", type=Path, help="folder of 'N_class tokens' subfolders (DreamBooth style)")
    g.add_argument("--reg_data_dir", type=Path, help="folder of regularisation subfolders")
    g.add_argument("--in_json", type=Path, help="fine-tuning metadata JSON (captions/tags per image)")
    g.add_argument("--resolution", type=str, help="base resolution: '1024' or 'W,H'")
    g.add_argument("--seed", type=int, default=None, help="run seed (data order, augmentation, validation split)")
    defaults = DatasetDefaults()
    for name, kind in _TYPED_FLAGS.items():
        g.add_argument(f"--{name}", type=kind, default=None, help=f"(default {getattr(defaults, name)!r})")
    for name in _BOOL_FLAGS:
        g.add_argument(f"--{name}", action="store_true", default=None)


def add_cache_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("caching")
    g.add_argument("--cache_latents", action="store_true", help="encode images once (kept in a temp folder)")
    g.add_argument("--cache_latents_to_disk", action="store_true", help="keep latent caches beside the images")
    g.add_argument("--vae_batch_size", type=int, default=1)
    g.add_argument("--cache_text_encoder_outputs", action="store_true")
    g.add_argument("--cache_text_encoder_outputs_to_disk", action="store_true")
    g.add_argument("--text_encoder_batch_size", type=int, default=None, help="default: train_batch_size")
    g.add_argument("--use_t5xxl_cache_only", action="store_true", help="cache T5 only (CLIP-L/G are trained)")
    g.add_argument("--caption_variants", type=int, default=None,
                   help="caption variants cached per image (default 8 when captions vary, else 1)")
    g.add_argument("--cache_check", choices=("mtime", "hash"), default="mtime",
                   help="how a changed image is noticed: size+mtime, or content hash")
    g.add_argument("--skip_cache_check", action="store_true", help="trust existing caches (incl. sd-scripts')")
    g.add_argument("--debug_dataset", action="store_true", help="print buckets and write a contact sheet, then stop")
    g.add_argument("--max_data_loader_n_workers", type=int, default=0,
                   help="DataLoader workers (default 0; sd-scripts' 8 cost more than they save on cached data)")


def dataset_defaults(ns: argparse.Namespace) -> DatasetDefaults:
    """The command-line level of the cascade (only flags the user set override the defaults)."""
    changes: dict[str, object] = {}
    for name in list(_TYPED_FLAGS) + list(_BOOL_FLAGS):
        value = getattr(ns, name, None)
        if value is not None:
            changes[name] = value
    for name in ("train_data_dir", "reg_data_dir", "in_json"):
        if getattr(ns, name, None) is not None:
            changes[name] = getattr(ns, name)
    if getattr(ns, "resolution", None):
        changes["resolution"] = parse_resolution(ns.resolution)
    try:
        return dataclasses.replace(DatasetDefaults(), **changes)
    except (TypeError, ValueError) as exc:
        raise UserError(f"dataset flags: {exc}") from None


def dataset_blueprint(ns: argparse.Namespace) -> DatasetBlueprint:
    defaults = dataset_defaults(ns)
    if ns.dataset_config is not None:
        return load_dataset_config(ns.dataset_config, defaults)
    if defaults.train_data_dir is None and defaults.in_json is None:
        raise UserError("no training data: pass --dataset_config FILE.toml or --train_data_dir DIR")
    return blueprint_from_defaults(defaults)


def cache_options(ns: argparse.Namespace, *, vae_identity: str = "", encoder_identity: str = "",
                  t5_max_length: int = 256, apply_lg_attn_mask: bool = False, apply_t5_attn_mask: bool = False,
                  temp_dir: Path | None = None) -> CacheOptions:
    """What to cache and where: beside the images with *_to_disk, else under ``temp_dir``."""
    from library.data.dataset import CacheOptions

    to_disk = ns.cache_latents_to_disk or ns.cache_text_encoder_outputs_to_disk
    return CacheOptions(
        cache_latents=ns.cache_latents or ns.cache_latents_to_disk,
        cache_text_encoder_outputs=ns.cache_text_encoder_outputs or ns.cache_text_encoder_outputs_to_disk,
        cache_dir=None if to_disk or temp_dir is None else temp_dir,
        caption_variants=ns.caption_variants, t5_max_length=t5_max_length,
        apply_lg_attn_mask=apply_lg_attn_mask, apply_t5_attn_mask=apply_t5_attn_mask,
        te_parts=("t5",) if ns.use_t5xxl_cache_only else ("lg", "t5"),
        vae_identity=vae_identity, encoder_identity=encoder_identity,
        cache_check=ns.cache_check, skip_cache_check=ns.skip_cache_check,
        keep_in_memory=not to_disk,
    )
