"""From a :class:`DatasetBlueprint` to image records: which files, which raw captions, how often.

No image is opened here (bucketing and caching read sizes and pixels later); caption files are read
once each, after one directory listing per folder, so thousands of images list quickly.

- DreamBooth subsets: every ``.png .jpg .jpeg .webp .bmp`` file (any case) directly in image_dir,
  sorted by name. Caption = first non-empty line of ``<stem><caption_extension>`` (with
  enable_wildcard, all non-empty lines joined by newlines), read as UTF-8 (a BOM is fine). A missing
  or empty caption file gives the subset's class tokens (or "") and one warning per subset.
  With ``cache_info``, image sizes are taken from sd-scripts' ``metadata_cache.json`` in image_dir
  when it exists (captions are always re-read, so edits are never missed).
- Fine-tuning subsets: ``metadata_file`` is sd-scripts' ``--in_json`` (a JSON object: image key →
  {"caption", "tags", "image_size" / "train_resolution"}) or JSONL (one object per line with the
  image key in "image_key", "image_path" or "file_name"). The key is a file name or stem inside
  image_dir, or a path. Caption and tags are joined as sd-scripts does (caption + separator + tags).

Regularization balancing (sd-scripts' DreamBoothDataset rule, per dataset). Let T be the number of
training samples of the dataset, Σ num_repeats over its (training-split) non-reg images. Walk the reg
images in order (subset order, then file name): the first pass takes each image with its subset's
num_repeats and stops as soon as the running total reaches T (later images are dropped); if a whole
pass stays below T, further passes add one repeat to each image in turn until the total equals T.
So the reg samples equal T, except when the first pass overshoots it by less than one image's repeats.

Validation split (per subset of non-reg images, disjoint, deterministic): the subset's images,
sorted by path, are shuffled by ``random.Random(f"{seed}:{image_dir}|{metadata_file}")`` with seed =
validation_seed, else the run seed, else 0; the first round-half-up(n · validation_split) images (at
most n − 1) are validation images (num_repeats 1), the rest stay for training. The seed string holds
the folder, not the dataset index, so the same folder used by two datasets (multi-resolution
training) holds out the same images in both. Reg images are never held out.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from library.data.spec import CaptionOptions, DatasetBlueprint, DatasetSpec, SubsetSpec
from library.errors import UserError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
COMPANION_EXTENSIONS = (".txt", ".caption", ".npz", ".json", ".jsonl", ".toml", ".db", ".ini")
INFO_CACHE_FILE = "metadata_cache.json"
METADATA_IMAGE_KEYS = ("image_key", "image_path", "file_name")
METADATA_SIZE_KEYS = ("image_size", "train_resolution")


@dataclass(frozen=True)
class ImageRecord:
    """One training image before any augmentation."""

    image_path: Path
    caption: str  # raw text: prefix/suffix, wildcards, shuffling and dropout are applied later
    dataset_index: int
    subset_index: int
    is_reg: bool = False
    num_repeats: int = 1
    image_size: tuple[int, int] | None = None  # (width, height) when metadata knows it
    alpha_mask: bool = False


@dataclass(frozen=True)
class DatasetRecords:
    dataset_index: int
    train: tuple[ImageRecord, ...]  # training images, then the balanced reg images
    validation: tuple[ImageRecord, ...]

    @property
    def num_train_samples(self) -> int:
        return sum(r.num_repeats for r in self.train if not r.is_reg)

    @property
    def num_reg_samples(self) -> int:
        return sum(r.num_repeats for r in self.train if r.is_reg)


def _subset_name(dataset_index: int, subset_index: int) -> str:
    return f"dataset #{dataset_index + 1}, subset #{subset_index + 1}"


def _decode(path: Path, data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        utf16 = data[:2] in (b"\xff\xfe", b"\xfe\xff")
        hint = "it looks like UTF-16; " if utf16 else ""
        raise UserError(
            f"{what} {path} is not UTF-8 (byte 0x{data[err.start]:02x} at position {err.start}); "
            f"{hint}re-save it as UTF-8"
        ) from None


def read_caption_file(path: Path, enable_wildcard: bool = False) -> str:
    """The caption in ``path``: its first non-empty line, or with wildcards all non-empty lines."""
    lines = [line.strip() for line in _decode(path, path.read_bytes(), "caption file").splitlines()]
    lines = [line for line in lines if line]
    if enable_wildcard:
        return "\n".join(lines)
    return lines[0] if lines else ""


def _scan_folder(folder: Path, where: str, companions: Sequence[str]) -> tuple[list[Path], frozenset[str]]:
    """Image paths (sorted) and every file name in ``folder``; unknown file types are reported."""
    if not folder.is_dir():
        state = "is not a folder" if folder.exists() else "does not exist"
        raise UserError(f"{where}: image folder {folder} {state}")
    images: list[Path] = []
    names: set[str] = set()
    others: list[str] = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if not entry.is_file() or entry.name.startswith("."):
                continue
            names.add(entry.name)
            suffix = os.path.splitext(entry.name)[1].lower()
            if suffix in IMAGE_EXTENSIONS:
                images.append(Path(entry.path))
            elif suffix in companions:
                logger.debug("%s: not an image, skipped: %s", where, entry.name)
            else:
                others.append(entry.name)
    if others:
        logger.warning(
            "%s: %d files in %s are not images and are ignored (e.g. %s); images must be %s",
            where, len(others), folder, ", ".join(sorted(others)[:3]), " ".join(IMAGE_EXTENSIONS),
        )
    return sorted(images), frozenset(names)


def _no_images(folder: Path, where: str) -> UserError:
    has_dirs = any(p.is_dir() for p in folder.iterdir())
    hint = "; it has subfolders, but image_dir must be the folder that holds the images" if has_dirs else ""
    return UserError(f"{where}: no images in {folder} (looked for {' '.join(IMAGE_EXTENSIONS)}){hint}")


def _cached_sizes(folder: Path, where: str) -> dict[str, tuple[int, int]]:
    """Image sizes from sd-scripts' ``metadata_cache.json`` ({path: {"caption", "resolution"}})."""
    path = folder / INFO_CACHE_FILE
    if not path.is_file():
        return {}
    try:
        metas = json.loads(path.read_text(encoding="utf-8-sig"))
    except (ValueError, UnicodeDecodeError):
        logger.warning("%s: %s is not valid JSON; ignoring it", where, path)
        return {}
    sizes = {}
    for key, meta in metas.items() if isinstance(metas, dict) else ():
        size = _size_of(meta.get("resolution")) if isinstance(meta, dict) else None
        if size is not None:
            sizes[Path(key).name] = size
    return sizes


def write_info_cache(folder: Path, entries: Mapping[Path, tuple[str, tuple[int, int]]]) -> None:
    """Write sd-scripts' ``metadata_cache.json`` ({path: {"caption", "resolution": [w, h]}}) atomically."""
    data = {str(path): {"caption": caption, "resolution": list(size)} for path, (caption, size) in entries.items()}
    target = folder / INFO_CACHE_FILE
    temp = target.with_name(target.name + ".tmp")
    temp.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
    temp.replace(target)


def _size_of(value: Any) -> tuple[int, int] | None:
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value)
    return (int(value[0]), int(value[1])) if ok else None


def _dreambooth_records(subset: SubsetSpec, dataset_index: int, subset_index: int) -> list[ImageRecord]:
    where = _subset_name(dataset_index, subset_index)
    folder = Path(subset.image_dir)
    extension = subset.captions.caption_extension
    images, names = _scan_folder(folder, where, COMPANION_EXTENSIONS + (extension.lower(),))
    if not images:
        raise _no_images(folder, where)
    sizes = _cached_sizes(folder, where) if subset.cache_info else {}
    fallback = subset.class_tokens or ""
    records, missing, empty = [], 0, 0
    for path in images:
        caption_name = path.stem + extension
        caption = None
        if caption_name in names:
            caption = read_caption_file(folder / caption_name, subset.captions.enable_wildcard) or None
            if caption is None:
                empty += 1
        else:
            missing += 1
        records.append(ImageRecord(
            image_path=path, caption=caption if caption is not None else fallback,
            dataset_index=dataset_index, subset_index=subset_index, is_reg=subset.is_reg,
            num_repeats=subset.num_repeats, image_size=sizes.get(path.name), alpha_mask=subset.alpha_mask,
        ))
    if missing or empty:
        problems = [f"{missing} have no '{extension}' caption file" if missing else "",
                    f"{empty} have an empty one" if empty else ""]
        used = f"the class tokens {fallback!r}" if fallback else "an empty caption"
        logger.warning("%s (%s): of %d images, %s; using %s for them",
                       where, folder, len(images), " and ".join(p for p in problems if p), used)
    return records


def _parse_json_metadata(text: str, path: Path) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"metadata file {path}: invalid JSON at line {err.lineno}: {err.msg}") from None
    if not isinstance(data, dict):
        raise UserError(f"metadata file {path}: expected an object mapping image keys to {{caption, tags, ...}}")
    return data


def _parse_jsonl_metadata(text: str, path: Path) -> dict[str, Any]:
    entries: dict[str, Any] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"metadata file {path}: line {number}: invalid JSON ({err.msg})") from None
        key = next((item[k] for k in METADATA_IMAGE_KEYS if isinstance(item, dict) and k in item), None)
        if not isinstance(key, str):
            raise UserError(f"metadata file {path}: line {number}: needs one of {', '.join(METADATA_IMAGE_KEYS)}")
        entries[key] = item
    return entries


METADATA_PARSERS: dict[str, Callable[[str, Path], dict[str, Any]]] = {
    ".json": _parse_json_metadata,
    ".jsonl": _parse_jsonl_metadata,
}


def load_metadata(path: Path) -> dict[str, dict[str, Any]]:
    """A fine-tuning metadata file (JSON as sd-scripts' --in_json, or JSONL) as {image key: entry}."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"metadata file {path} not found")
    text = _decode(path, path.read_bytes(), "metadata file")
    entries = METADATA_PARSERS.get(path.suffix.lower(), _parse_json_metadata)(text, path)
    for key, entry in entries.items():
        if not isinstance(entry, dict):
            raise UserError(f"metadata file {path}: entry '{key}' must be an object with caption/tags")
        for field_name in ("caption", "tags"):
            if entry.get(field_name) is not None and not isinstance(entry[field_name], str):
                raise UserError(f"metadata file {path}: entry '{key}': {field_name} must be a string")
    return entries


def _metadata_caption(entry: Mapping[str, Any], options: CaptionOptions) -> str:
    """sd-scripts' fine-tuning caption: caption + separator + tags (tags alone when no caption)."""
    caption, tags = entry.get("caption"), entry.get("tags")
    if not caption:
        caption, tags = tags, None
    if not tags:
        return caption or ""
    separator = options.caption_separator
    if options.enable_wildcard:
        tags = tags.replace("\n", separator)
        return "\n".join(f"{line}{separator}{tags}" for line in caption.split("\n") if line.strip())
    return caption + separator + tags


def _image_index(folder: Path | None, where: str) -> dict[str, Path]:
    """File name and stem → path for the images directly in ``folder``."""
    if folder is None:
        return {}
    images, _ = _scan_folder(Path(folder), where, COMPANION_EXTENSIONS)
    index = {path.stem: path for path in images}
    index.update({path.name: path for path in images})
    return index


def _find_image(key: str, index: Mapping[str, Path]) -> Path | None:
    if key in index:
        return index[key]
    path = Path(key).expanduser()
    if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
        return path
    return next((p for p in (path.with_name(path.name + e) for e in IMAGE_EXTENSIONS) if p.is_file()), None)


def _fine_tuning_records(subset: SubsetSpec, dataset_index: int, subset_index: int) -> list[ImageRecord]:
    where = _subset_name(dataset_index, subset_index)
    entries = load_metadata(Path(subset.metadata_file))
    index = _image_index(subset.image_dir, where)
    records, missing = [], []
    for key, entry in entries.items():
        path = _find_image(key, index)
        if path is None:
            missing.append(key)
            continue
        size = next((s for s in (_size_of(entry.get(k)) for k in METADATA_SIZE_KEYS) if s), None)
        records.append(ImageRecord(
            image_path=path, caption=_metadata_caption(entry, subset.captions), dataset_index=dataset_index,
            subset_index=subset_index, num_repeats=subset.num_repeats, image_size=size, alpha_mask=subset.alpha_mask,
        ))
    folder = f"in {subset.image_dir}" if subset.image_dir else "(no image_dir set)"
    if missing:
        logger.warning("%s: %d images of %s not found %s, skipped (e.g. %s)",
                       where, len(missing), subset.metadata_file, folder, ", ".join(missing[:3]))
    if not records:
        listed = f"{len(entries)} images listed in {subset.metadata_file}"
        raise UserError(f"{where}: none of the {listed} was found {folder}")
    return records


def subset_records(subset: SubsetSpec, dataset_index: int, subset_index: int) -> list[ImageRecord]:
    """The images of one subset, each with its raw caption and the subset's repeats."""
    loader = _fine_tuning_records if subset.is_fine_tuning else _dreambooth_records
    return loader(subset, dataset_index, subset_index)


def balance_regularization(train: Sequence[ImageRecord], reg: Sequence[ImageRecord]) -> list[ImageRecord]:
    """Reg images with repeats rewritten so their samples match the training samples (module docstring)."""
    target = sum(record.num_repeats for record in train if not record.is_reg)
    if not reg or target == 0:
        return []
    repeats: list[int] = []
    total = 0
    for record in reg:
        repeats.append(record.num_repeats)
        total += record.num_repeats
        if total >= target:
            break
    step = 0
    while total < target:
        repeats[step % len(repeats)] += 1
        total += 1
        step += 1
    return [replace(record, num_repeats=n) for record, n in zip(reg, repeats)]


def split_validation(
    records: Sequence[ImageRecord], split: float, seed: int, key: str
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(train, validation) of one subset's records; see the module docstring for the rule."""
    if split <= 0 or len(records) < 2:
        return list(records), []
    order = sorted(records, key=lambda r: str(r.image_path))
    random.Random(f"{seed}:{key}").shuffle(order)
    count = min(len(order) - 1, math.floor(len(order) * split + 0.5))
    held = {str(r.image_path) for r in order[:count]}
    train = [r for r in records if str(r.image_path) not in held]
    validation = sorted((replace(r, num_repeats=1) for r in order[:count]), key=lambda r: str(r.image_path))
    return train, validation


def dataset_records(spec: DatasetSpec, dataset_index: int, seed: int | None = None) -> DatasetRecords:
    """Training (with balanced reg) and validation records of one dataset; ``seed`` is the run seed."""
    split_seed = spec.validation_seed if spec.validation_seed is not None else (seed or 0)
    train: list[ImageRecord] = []
    validation: list[ImageRecord] = []
    reg: list[ImageRecord] = []
    for subset_index, subset in enumerate(spec.subsets):
        records = subset_records(subset, dataset_index, subset_index)
        if subset.is_reg:
            reg.extend(records)
            continue
        key = f"{subset.image_dir}|{subset.metadata_file}"
        kept, held = split_validation(records, spec.validation_split, split_seed, key)
        train.extend(kept)
        validation.extend(held)
    if not train:
        raise UserError(f"dataset #{dataset_index + 1}: only regularization subsets (is_reg); add training images")
    if spec.validation_split > 0 and not validation:
        logger.warning("dataset #%d: validation_split %.3g holds out no image (too few images per subset)",
                       dataset_index + 1, spec.validation_split)
    balanced = balance_regularization(train, reg)
    if reg:
        logger.info("dataset #%d: %d reg images give %d reg samples for %d training samples",
                    dataset_index + 1, len(balanced), sum(r.num_repeats for r in balanced),
                    sum(r.num_repeats for r in train))
    else:
        logger.debug("dataset #%d: no regularization images", dataset_index + 1)
    return DatasetRecords(dataset_index, tuple(train) + tuple(balanced), tuple(validation))


def blueprint_records(blueprint: DatasetBlueprint, seed: int | None = None) -> tuple[DatasetRecords, ...]:
    """The records of every dataset of a run."""
    return tuple(dataset_records(spec, index, seed) for index, spec in enumerate(blueprint.datasets))
