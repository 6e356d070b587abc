"""The dataset flags of sd-scripts as plain values, and the datasets they describe without a TOML.

:class:`DatasetDefaults` holds the command-line level of the cascade (subset → dataset → general →
command line → default); its field defaults are sd-scripts' flag defaults. ``library/cli.py`` builds
it from the parsed flags; nothing here parses arguments.

Without ``--dataset_config`` (sd-scripts' rules):
- ``--train_data_dir`` alone: DreamBooth. Each subfolder named ``N_class tokens`` is a subset with
  N repeats and those class tokens (``10_sks girl`` → 10, "sks girl"; ``5_a_b`` → 5, "a_b"); other
  subfolders are skipped with a warning. ``--reg_data_dir`` adds regularization subsets the same way.
- ``--in_json``: fine-tuning, one subset with ``--train_data_dir`` as its image folder,
  ``--dataset_repeats`` repeats; ``--reg_data_dir`` is ignored (with a warning).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from library.data.spec import DatasetBlueprint
from library.data.toml_config import blueprint_from_dict
from library.errors import UserError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# dataset-config key -> flag name, where they differ
KEY_TO_FLAG: dict[str, str] = {"batch_size": "train_batch_size", "num_repeats": "dataset_repeats"}
# dataset-config keys without a flag, and their defaults
NOT_FLAGS: dict[str, Any] = {
    "class_tokens": None,
    "is_reg": False,
    "image_dir": None,
    "metadata_file": None,
}


@dataclass(frozen=True)
class DatasetDefaults:
    """Dataset-related command-line values (sd-scripts flag names and defaults)."""

    train_data_dir: Path | None = None
    reg_data_dir: Path | None = None
    in_json: Path | None = None
    dataset_repeats: int = 1
    resolution: tuple[int, int] | None = None  # (width, height); see parse_resolution
    train_batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    resize_interpolation: str | None = None
    validation_split: float = 0.0
    validation_seed: int | None = None
    prior_loss_weight: float = 1.0
    network_multiplier: float = 1.0
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
    flip_aug: bool = False
    color_aug: bool = False
    random_crop: bool = False
    alpha_mask: bool = False
    cache_info: bool = False

    def value_for(self, key: str) -> Any:
        """The command-line value of a dataset-config key (its default when no flag exists)."""
        if key in NOT_FLAGS:
            return NOT_FLAGS[key]
        return getattr(self, KEY_TO_FLAG.get(key, key))

    @staticmethod
    def flag_for(key: str) -> str:
        return "--" + KEY_TO_FLAG.get(key, key)


def parse_resolution(text: str) -> tuple[int, int]:
    """``--resolution`` as sd-scripts writes it: ``"1024"`` → (1024, 1024), ``"1216,832"`` → (width, height)."""
    parts = [part.strip() for part in str(text).split(",")]
    try:
        values = [int(part) for part in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) <= 0:
        raise UserError(f"--resolution {text!r}: expected SIZE or WIDTH,HEIGHT, e.g. 1024 or 1216,832")
    return values[0], values[1]


def parse_folder_name(name: str) -> tuple[int, str] | None:
    """sd-scripts' DreamBooth folder name: ``"10_sks girl"`` → (10, "sks girl").

    The part before the first ``_`` is the repeat count and the rest the class tokens (``"10"`` →
    (10, "")). None when that part is not an integer or is below 1 (such folders are skipped).
    """
    head, _, rest = name.partition("_")
    try:
        repeats = int(head)
    except ValueError:
        return None
    return (repeats, rest) if repeats >= 1 else None


def dreambooth_subset_tables(parent: Path, is_reg: bool, flag: str) -> list[dict[str, Any]]:
    """One subset table per ``N_class tokens`` subfolder of ``parent``, sorted by folder name."""
    if not parent.is_dir():
        raise UserError(f"{flag} {parent}: folder not found")
    tables: list[dict[str, Any]] = []
    skipped: list[str] = []
    for entry in sorted(parent.iterdir()):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        parsed = parse_folder_name(entry.name)
        if parsed is None:
            skipped.append(entry.name)
            continue
        repeats, class_tokens = parsed
        table: dict[str, Any] = {"image_dir": str(entry), "num_repeats": repeats, "is_reg": is_reg}
        if class_tokens:
            table["class_tokens"] = class_tokens
        tables.append(table)
    if skipped:
        logger.warning(
            "%s %s: skipping subfolders not named 'N_class tokens' (N = repeats, at least 1): %s",
            flag, parent, ", ".join(skipped),
        )
    return tables


def _no_subfolders(parent: Path) -> UserError:
    loose = [p.name for p in parent.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    hint = f"; the {len(loose)} images directly in it are not used" if loose else ""
    return UserError(
        f"--train_data_dir {parent}: no subfolders named 'N_class tokens' (e.g. '10_sks girl' = 10 repeats, "
        f"class tokens 'sks girl'); put the images in such a subfolder{hint}"
    )


def blueprint_from_defaults(defaults: DatasetDefaults) -> DatasetBlueprint:
    """The datasets of ``--train_data_dir`` / ``--reg_data_dir`` / ``--in_json`` (no dataset config)."""
    if defaults.train_data_dir is None and defaults.in_json is None:
        raise UserError("no training images: give --dataset_config, or --train_data_dir (with --in_json to fine-tune)")
    if defaults.in_json is not None:
        subset: dict[str, Any] = {"metadata_file": str(defaults.in_json)}
        if defaults.train_data_dir is not None:
            subset["image_dir"] = str(defaults.train_data_dir)
        if defaults.reg_data_dir is not None:
            logger.warning("ignoring --reg_data_dir: regularization images need DreamBooth folders, not --in_json")
        subsets = [subset]
    else:
        train_dir = Path(defaults.train_data_dir)
        subsets = dreambooth_subset_tables(train_dir, False, "--train_data_dir")
        if not subsets:
            raise _no_subfolders(train_dir)
        if defaults.reg_data_dir is not None:
            reg = dreambooth_subset_tables(Path(defaults.reg_data_dir), True, "--reg_data_dir")
            if not reg:
                logger.warning("--reg_data_dir %s: no 'N_class tokens' subfolders, so no regularization images",
                               defaults.reg_data_dir)
            subsets += reg
    return blueprint_from_dict({"datasets": [{"subsets": subsets}]}, defaults, "command line", from_file=False)
