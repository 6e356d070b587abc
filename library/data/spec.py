"""Typed, frozen description of the training data: what the dataset TOML and flags resolve to.

The TOML keys of sd-scripts (``[general]``, ``[[datasets]]``, ``[[datasets.subsets]]``) map onto these
fields one to one (same names), after the cascade subset → dataset → general → command line →
default has been applied, so nothing downstream needs to know where a value came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class CaptionOptions:
    """How a caption is read and augmented (sd-scripts' subset keys of the same names)."""

    caption_extension: str = ".caption"
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0


@dataclass(frozen=True)
class AugmentOptions:
    flip_aug: bool = False
    color_aug: bool = False
    random_crop: bool = False


@dataclass(frozen=True)
class SubsetSpec:
    """One folder (DreamBooth style) or one metadata file (fine-tuning style) of images."""

    image_dir: Path | None = None
    metadata_file: Path | None = None  # set for fine-tuning subsets (JSON/JSONL captions, tags, sizes)
    num_repeats: int = 1
    class_tokens: str | None = None  # caption used when an image has no caption file
    is_reg: bool = False
    cache_info: bool = False
    alpha_mask: bool = False
    resize_interpolation: str | None = None  # per-subset override of DatasetSpec.resize_interpolation
    captions: CaptionOptions = field(default_factory=CaptionOptions)
    augment: AugmentOptions = field(default_factory=AugmentOptions)

    @property
    def is_fine_tuning(self) -> bool:
        return self.metadata_file is not None


@dataclass(frozen=True)
class BucketOptions:
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False


@dataclass(frozen=True)
class DatasetSpec:
    """Images trained at one base resolution with one batch size."""

    resolution: tuple[int, int]  # (width, height)
    subsets: tuple[SubsetSpec, ...]
    batch_size: int = 1
    buckets: BucketOptions = field(default_factory=BucketOptions)
    resize_interpolation: str | None = None  # None: area for downscaling, lanczos for upscaling
    validation_split: float = 0.0
    validation_seed: int | None = None
    prior_loss_weight: float = 1.0
    network_multiplier: float = 1.0  # sd-scripts' per-dataset adapter multiplier


@dataclass(frozen=True)
class DatasetBlueprint:
    """Every dataset of a run, fully resolved."""

    datasets: tuple[DatasetSpec, ...]
