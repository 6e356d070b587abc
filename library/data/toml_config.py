"""sd-scripts' dataset TOML (``--dataset_config``) → a frozen :class:`DatasetBlueprint`.

Tables: ``[general]`` (dataset and subset keys), ``[[datasets]]`` (the same, plus ``subsets``) and
``[[datasets.subsets]]`` (subset keys). As in sd-scripts, a subset with ``metadata_file`` is a
fine-tuning subset, any other a DreamBooth one; the DreamBooth-only keys (caption_extension,
class_tokens, cache_info, is_reg) are errors in a fine-tuning subset's table and do not cascade into
it. Values resolve subset → dataset → general → command line (:class:`DatasetDefaults`) → default.

Beyond sd-scripts, on purpose: a dataset may mix DreamBooth and fine-tuning subsets; alpha_mask may
cascade from [general]/[[datasets]] and prior_loss_weight may be set per dataset; caption_extension
must start with '.'; bucket_reso_steps must be a multiple of 16 and so must the resolution without
enable_bucket (SD3 cuts 8×-downsampled latents into 2×2 patches); face_crop_aug_range and
conditioning_data_dir are refused; system_prompt and custom_attributes are ignored with a warning.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import toml

from library.data.spec import (
    AugmentOptions,
    BucketOptions,
    CaptionOptions,
    DatasetBlueprint,
    DatasetSpec,
    SubsetSpec,
)
from library.errors import UserError

if TYPE_CHECKING:
    from library.data.cli_datasets import DatasetDefaults

logger = logging.getLogger(__name__)

DATASET_KEY = "dataset"  # allowed in [general] and [[datasets]]
SUBSET_KEY = "subset"  # allowed everywhere, cascades down to the subsets
SUBSET_ONLY = "subset_only"  # allowed only in [[datasets.subsets]]
DREAMBOOTH = "DreamBooth"
FINE_TUNING = "fine-tuning"
BOTH_KINDS = frozenset({DREAMBOOTH, FINE_TUNING})
DREAMBOOTH_ONLY = frozenset({DREAMBOOTH})
INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")
LATENT_PATCH_PX = 16


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, float) or _is_int(value)


def _is_resolution(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return len(value) == 2 and all(_is_int(v) for v in value)
    return _is_int(value)


def _to_resolution(value: Any) -> tuple[int, int]:
    return (int(value), int(value)) if _is_int(value) else (int(value[0]), int(value[1]))


def _to_path(value: Any) -> Path:
    return Path(value).expanduser()


@dataclass(frozen=True)
class ValueType:
    accepts: Callable[[Any], bool]
    description: str
    convert: Callable[[Any], Any]


TYPES: dict[str, ValueType] = {
    "int": ValueType(_is_int, "an integer", int),
    "float": ValueType(_is_number, "a number", float),
    "bool": ValueType(lambda v: isinstance(v, bool), "true or false", bool),
    "str": ValueType(lambda v: isinstance(v, str), "a string", str),
    "path": ValueType(lambda v: isinstance(v, (str, Path)), "a path string", _to_path),
    "resolution": ValueType(_is_resolution, "an integer or [width, height]", _to_resolution),
}


def _at_least(low: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value >= low else f"must be at least {low}"

    return check


def _rate(value: float) -> str | None:
    return None if 0.0 <= value <= 1.0 else "must be between 0 and 1"


def _split(value: float) -> str | None:
    return None if 0.0 <= value < 1.0 else "must be at least 0 and below 1"


def _patch_multiple(value: int) -> str | None:
    ok = value > 0 and value % LATENT_PATCH_PX == 0
    return None if ok else f"must be a positive multiple of {LATENT_PATCH_PX} (SD3 latents come in 16-px patches)"


def _interpolation(value: str) -> str | None:
    return None if value in INTERPOLATIONS else f"must be one of {', '.join(INTERPOLATIONS)}"


def _extension(value: str) -> str | None:
    return None if value.startswith(".") else f"must start with '.' (did you mean '.{value}'?)"


@dataclass(frozen=True)
class KeyRule:
    type_name: str
    level: str
    kinds: frozenset[str] = BOTH_KINDS
    check: Callable[[Any], str | None] | None = None


KEYS: dict[str, KeyRule] = {
    # dataset keys
    "resolution": KeyRule("resolution", DATASET_KEY, check=lambda v: None if min(_to_resolution(v)) > 0 else "must be positive"),
    "batch_size": KeyRule("int", DATASET_KEY, check=_at_least(1)),
    "enable_bucket": KeyRule("bool", DATASET_KEY),
    "min_bucket_reso": KeyRule("int", DATASET_KEY, check=_at_least(1)),
    "max_bucket_reso": KeyRule("int", DATASET_KEY, check=_at_least(1)),
    "bucket_reso_steps": KeyRule("int", DATASET_KEY, check=_patch_multiple),
    "bucket_no_upscale": KeyRule("bool", DATASET_KEY),
    "validation_split": KeyRule("float", DATASET_KEY, check=_split),
    "validation_seed": KeyRule("int", DATASET_KEY),
    "network_multiplier": KeyRule("float", DATASET_KEY),
    "prior_loss_weight": KeyRule("float", DATASET_KEY, check=_at_least(0)),
    # subset keys that cascade
    "num_repeats": KeyRule("int", SUBSET_KEY, check=_at_least(1)),
    "resize_interpolation": KeyRule("str", SUBSET_KEY, check=_interpolation),
    "alpha_mask": KeyRule("bool", SUBSET_KEY),
    "flip_aug": KeyRule("bool", SUBSET_KEY),
    "color_aug": KeyRule("bool", SUBSET_KEY),
    "random_crop": KeyRule("bool", SUBSET_KEY),
    "caption_extension": KeyRule("str", SUBSET_KEY, DREAMBOOTH_ONLY, _extension),
    "class_tokens": KeyRule("str", SUBSET_KEY, DREAMBOOTH_ONLY),
    "cache_info": KeyRule("bool", SUBSET_KEY, DREAMBOOTH_ONLY),
    "caption_prefix": KeyRule("str", SUBSET_KEY),
    "caption_suffix": KeyRule("str", SUBSET_KEY),
    "shuffle_caption": KeyRule("bool", SUBSET_KEY),
    "caption_separator": KeyRule("str", SUBSET_KEY, check=lambda v: None if v else "must not be empty"),
    "keep_tokens": KeyRule("int", SUBSET_KEY, check=_at_least(0)),
    "keep_tokens_separator": KeyRule("str", SUBSET_KEY),
    "secondary_separator": KeyRule("str", SUBSET_KEY),
    "enable_wildcard": KeyRule("bool", SUBSET_KEY),
    "caption_dropout_rate": KeyRule("float", SUBSET_KEY, check=_rate),
    "caption_dropout_every_n_epochs": KeyRule("int", SUBSET_KEY, check=_at_least(0)),
    "caption_tag_dropout_rate": KeyRule("float", SUBSET_KEY, check=_rate),
    "token_warmup_min": KeyRule("int", SUBSET_KEY, check=_at_least(0)),
    "token_warmup_step": KeyRule("float", SUBSET_KEY, check=_at_least(0)),
    # keys of one subset only
    "image_dir": KeyRule("path", SUBSET_ONLY),
    "metadata_file": KeyRule("path", SUBSET_ONLY),
    "is_reg": KeyRule("bool", SUBSET_ONLY, DREAMBOOTH_ONLY),
}
REFUSED: dict[str, str] = {
    "face_crop_aug_range": "face crop augmentation is not supported by sd3-trainer; remove the key",
    "conditioning_data_dir": "ControlNet datasets are not supported by sd3-trainer",
}
IGNORED: dict[str, str] = {
    "system_prompt": "it is used by Lumina only",
    "custom_attributes": "SD3 training does not use it",
}
TABLE_LEVELS: dict[str, frozenset[str]] = {
    "general": frozenset({DATASET_KEY, SUBSET_KEY}),
    "dataset": frozenset({DATASET_KEY, SUBSET_KEY}),
    "subset": frozenset({SUBSET_KEY, SUBSET_ONLY}),
}
PLACEMENT: dict[str, str] = {
    DATASET_KEY: "is a dataset key: put it in [[datasets]] or [general]",
    SUBSET_ONLY: "belongs to one subset: put it in [[datasets.subsets]]",
}
TOP_LEVEL = ("general", "datasets")
_BUILT_APART = ("resolution", "subsets", "buckets")


def _suggest(key: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _rule_for(key: str, table_level: str, kind: str | None, where: str) -> KeyRule | None:
    """The rule of ``key`` in a table of ``table_level``, or None for an ignored key."""
    if key in IGNORED:
        logger.warning("%s: ignoring '%s' (%s)", where, key, IGNORED[key])
        return None
    if key in REFUSED:
        raise UserError(f"{where}: '{key}': {REFUSED[key]}")
    rule = KEYS.get(key)
    if rule is None:
        here = [k for k, r in KEYS.items() if r.level in TABLE_LEVELS[table_level]]
        hint = _suggest(key, here + (["subsets"] if table_level == "dataset" else [])) or _suggest(key, list(KEYS))
        raise UserError(f"{where}: unknown key '{key}'{hint}")
    if rule.level not in TABLE_LEVELS[table_level]:
        raise UserError(f"{where}: '{key}' {PLACEMENT[rule.level]}")
    if kind is not None and kind not in rule.kinds:
        raise UserError(
            f"{where}: '{key}' applies only to DreamBooth subsets (image_dir without metadata_file); "
            "this subset has metadata_file, so it is a fine-tuning subset"
        )
    return rule


def _check_value(key: str, value: Any, rule: KeyRule, where: str) -> None:
    value_type = TYPES[rule.type_name]
    if not value_type.accepts(value):
        raise UserError(f"{where}: '{key}' must be {value_type.description}, not {value!r}")
    problem = rule.check(value) if rule.check else None
    if problem:
        raise UserError(f"{where}: {key} = {value!r} {problem}")


def _check_table(table: Any, table_level: str, kind: str | None, where: str) -> None:
    if not isinstance(table, Mapping):
        raise UserError(f"{where}: must be a table, not {table!r}")
    for key, value in table.items():
        if table_level == "dataset" and key == "subsets":
            continue
        rule = _rule_for(key, table_level, kind, where)
        if rule is not None:
            _check_value(key, value, rule, where)


@dataclass(frozen=True)
class _Scope:
    """The tables a value may come from, most specific first, then the command line."""

    tables: tuple[Mapping[str, Any], ...]
    defaults: DatasetDefaults
    kind: str | None = None

    def value(self, key: str) -> Any:
        rule = KEYS[key]
        convert = TYPES[rule.type_name].convert
        if self.kind is None or self.kind in rule.kinds:
            for table in self.tables:
                if key in table:
                    return convert(table[key])
        raw = self.defaults.value_for(key)
        if raw is None:
            return None
        problem = rule.check(raw) if rule.check else None
        if problem:
            raise UserError(f"command line: {self.defaults.flag_for(key)} {raw!r} {problem}")
        return convert(raw)

    def options(self, cls: type) -> Any:
        return cls(**{f.name: self.value(f.name) for f in fields(cls)})


@dataclass(frozen=True)
class _Where:
    """Names tables in messages: TOML table names for a file, plain words for the command line."""

    source: str
    from_file: bool = True

    def general(self) -> str:
        return f"{self.source}: [general]"

    def dataset(self, i: int) -> str:
        return f"{self.source}: [[datasets]] #{i + 1}" if self.from_file else self.source

    def subset(self, i: int, j: int) -> str:
        if self.from_file:
            return f"{self.source}: [[datasets.subsets]] #{j + 1} of [[datasets]] #{i + 1}"
        return f"{self.source}: subset #{j + 1}"


def _check_dataset(spec: DatasetSpec, where: str) -> None:
    buckets = spec.buckets
    width, height = spec.resolution
    if buckets.enable_bucket:
        if buckets.min_bucket_reso > buckets.max_bucket_reso:
            raise UserError(
                f"{where}: min_bucket_reso {buckets.min_bucket_reso} is larger than "
                f"max_bucket_reso {buckets.max_bucket_reso}"
            )
        if min(width, height) < buckets.min_bucket_reso:
            raise UserError(
                f"{where}: resolution {width}x{height} is below min_bucket_reso {buckets.min_bucket_reso}; "
                "lower min_bucket_reso or raise the resolution"
            )
        if max(width, height) > buckets.max_bucket_reso:
            raise UserError(
                f"{where}: resolution {width}x{height} exceeds max_bucket_reso {buckets.max_bucket_reso}; "
                "raise max_bucket_reso or lower the resolution"
            )
    elif width % LATENT_PATCH_PX or height % LATENT_PATCH_PX:
        raise UserError(
            f"{where}: resolution {width}x{height} must be a multiple of {LATENT_PATCH_PX} when enable_bucket "
            "is off (SD3 latents come in 16-px patches)"
        )


def _subset_from_table(
    table: Any, above: tuple[Mapping[str, Any], ...], defaults: DatasetDefaults, where: str
) -> SubsetSpec:
    kind = FINE_TUNING if isinstance(table, Mapping) and "metadata_file" in table else DREAMBOOTH
    _check_table(table, "subset", kind, where)
    scope = _Scope((table,) + above, defaults, kind)
    plain = {f.name: scope.value(f.name) for f in fields(SubsetSpec) if f.name not in ("captions", "augment")}
    spec = SubsetSpec(**plain, captions=scope.options(CaptionOptions), augment=scope.options(AugmentOptions))
    if kind == DREAMBOOTH and spec.image_dir is None:
        raise UserError(
            f"{where}: a subset needs image_dir (DreamBooth: a folder of images with caption files) "
            "or metadata_file (fine-tuning: JSON/JSONL captions)"
        )
    return spec


def _dataset_from_table(
    index: int, table: Any, general: Mapping[str, Any], defaults: DatasetDefaults, where: _Where
) -> DatasetSpec:
    here = where.dataset(index)
    _check_table(table, "dataset", None, here)
    raw_subsets = table.get("subsets")
    if not raw_subsets:
        raise UserError(
            f"{here}: no [[datasets.subsets]]: add one with image_dir (DreamBooth) or metadata_file (fine-tuning)"
        )
    if not isinstance(raw_subsets, list):
        raise UserError(f"{here}: 'subsets' must be an array of tables: write [[datasets.subsets]]")
    above = (table, general)
    subsets = tuple(
        _subset_from_table(sub, above, defaults, where.subset(index, j)) for j, sub in enumerate(raw_subsets)
    )
    scope = _Scope(above, defaults)
    resolution = scope.value("resolution")
    if resolution is None:
        raise UserError(f"{here}: no resolution: set resolution = 1024 (or [width, height]) or give --resolution")
    rest = {f.name: scope.value(f.name) for f in fields(DatasetSpec) if f.name not in _BUILT_APART}
    spec = DatasetSpec(resolution=resolution, subsets=subsets, buckets=scope.options(BucketOptions), **rest)
    _check_dataset(spec, here)
    return spec


def blueprint_from_dict(
    config: Mapping[str, Any], defaults: DatasetDefaults, source: str, from_file: bool = True
) -> DatasetBlueprint:
    """Validate a parsed dataset config (sd-scripts' TOML layout) and resolve its cascade."""
    where = _Where(source, from_file)
    for key in config:
        if key not in TOP_LEVEL:
            hint = " — put it in [general] or [[datasets]]" if key in KEYS else _suggest(key, list(TOP_LEVEL))
            raise UserError(f"{source}: unknown top-level key '{key}'{hint}")
    general = config.get("general", {})
    _check_table(general, "general", None, where.general())
    datasets = config.get("datasets")
    if not datasets:
        raise UserError(f"{source}: no [[datasets]]: add at least one [[datasets]] with a [[datasets.subsets]]")
    if not isinstance(datasets, list):
        raise UserError(f"{source}: 'datasets' must be an array of tables: write [[datasets]], not [datasets]")
    specs = tuple(_dataset_from_table(i, table, general, defaults, where) for i, table in enumerate(datasets))
    return DatasetBlueprint(datasets=specs)


def _read_toml(path: Path, source: str) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"{source}: file not found") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{source}: not UTF-8 (bad byte at position {err.start}); re-save it as UTF-8") from None
    except OSError as err:
        raise UserError(f"{source}: cannot read it ({err.strerror})") from None
    try:
        return toml.loads(text)
    except toml.TomlDecodeError as err:
        raise UserError(f"{source}: TOML syntax error at line {err.lineno}, column {err.colno}: {err.msg}") from None


def load_dataset_config(path: str | Path, defaults: DatasetDefaults) -> DatasetBlueprint:
    """Read ``--dataset_config`` and resolve it against the command-line values in ``defaults``.

    As sd-scripts does, ``--train_data_dir``, ``--reg_data_dir`` and ``--in_json`` are ignored (with
    a warning) when a dataset config is given.
    """
    path = Path(path)
    source = f"dataset config {path}"
    config = _read_toml(path, source)
    ignored = [f"--{name}" for name in ("train_data_dir", "reg_data_dir", "in_json") if getattr(defaults, name)]
    if ignored:
        logger.warning("ignoring %s because --dataset_config is given", ", ".join(ignored))
    return blueprint_from_dict(config, defaults, source)
