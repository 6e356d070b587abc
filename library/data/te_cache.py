"""Text-encoder output caches beside the images: ``<stem>_sd3_te.npz``, sd-scripts' SD3 layout + variants.

Per caption, outputs are passed and returned as ``dict[str, array]`` named like the model layer's
``EncoderOutputs`` fields, without the batch dimension:

| name            | shape     | on disk, variant 0 (sd-scripts' key) / variant k |
|-----------------|-----------|--------------------------------------------------|
| ``clip_l``      | (77, Wl)  | ``lg_out`` = cat(clip_l, clip_g, -1) (77, Wl+Wg), unpadded / ``lg_out_v<k>`` |
| ``clip_g``      | (77, Wg)  | (second part of ``lg_out``)                      |
| ``clip_l_pooled`` | (Pl,)   | ``lg_pooled`` = cat(clip_l_pooled, clip_g_pooled) (Pl+Pg,) / ``lg_pooled_v<k>`` |
| ``clip_g_pooled`` | (Pg,)   | (second part of ``lg_pooled``)                   |
| ``clip_l_mask`` | (77,)     | ``clip_l_attn_mask`` / ``clip_l_attn_mask_v<k>`` |
| ``clip_g_mask`` | (77,)     | ``clip_g_attn_mask`` / ``clip_g_attn_mask_v<k>`` |
| ``t5``          | (T, D)    | ``t5_out`` / ``t5_out_v<k>``                     |
| ``t5_mask``     | (T,)      | ``t5_attn_mask`` / ``t5_attn_mask_v<k>``         |

File-level keys: ``apply_lg_attn_mask``, ``apply_t5_attn_mask`` (0-d bool, as sd-scripts writes them)
and ``sd3_trainer_meta`` (ours: JSON ``{"record": ..., "storage": ...}``). A one-variant full cache
therefore has exactly sd-scripts' keys (plus our record) and sd-scripts can read it; sd-scripts' files
read here as one variant (their split of ``lg_out`` is at 768, CLIP-L's width, unless told otherwise).

Parts: ``"lg"`` (both CLIPs: sequences, pooled, masks) and ``"t5"`` (sequence and mask). A cache for
``--use_t5xxl_cache_only`` is written with ``parts=("t5",)``. A full cache also satisfies a
T5-only request; the reverse is rebuilt.

Dtypes: float16/float32 are stored as given; bfloat16 (numpy has none) is stored as float32, as
sd-scripts does, with a dtype tag per output in the record so reading gives each output back in its
own dtype, exactly (also when CLIP-L and CLIP-G differ and ``lg_out`` holds the wider one).

Record (:func:`te_cache_record`): ``format``, ``captions`` (the processed texts, one per variant),
``t5_max_length``, ``apply_lg_attn_mask``, ``apply_t5_attn_mask``, ``encoders`` (caller's identity:
a string, or a dict per encoder, of which only the expected keys are compared), ``parts``. A field
that does not apply to the expected parts is ``None`` and not compared.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from library.data.cache_io import (
    CacheSummary,
    atomic_savez,
    decode_record,
    encode_record,
    normalize_record,
    npz_keys,
    progress_due,
    read_arrays,
    read_npz,
    read_record,
    to_numpy,
)
from library.errors import UserError

logger = logging.getLogger(__name__)

TE_FORMAT = "sd3-trainer-te/1"
TE_NPZ_SUFFIX = "_sd3_te.npz"
META_KEY = "sd3_trainer_meta"
SD3_CLIP_L_WIDTH = 768  # CLIP-L hidden and projection width: where sd-scripts' lg_out/lg_pooled split
PARTS: dict[str, tuple[str, ...]] = {
    "lg": ("clip_l", "clip_g", "clip_l_pooled", "clip_g_pooled", "clip_l_mask", "clip_g_mask"),
    "t5": ("t5", "t5_mask"),
}
DISK_KEYS: dict[str, tuple[str, ...]] = {
    "lg": ("lg_out", "lg_pooled", "clip_l_attn_mask", "clip_g_attn_mask"),
    "t5": ("t5_out", "t5_attn_mask"),
}
FLAG_KEYS = ("apply_lg_attn_mask", "apply_t5_attn_mask")
Array = np.ndarray | torch.Tensor


def te_cache_path(image_path: str | os.PathLike[str]) -> Path:
    """``<stem>_sd3_te.npz`` beside the image."""
    image_path = Path(image_path)
    return image_path.with_name(image_path.stem + TE_NPZ_SUFFIX)


def variant_key(disk_name: str, variant: int) -> str:
    """sd-scripts' plain key for variant 0, ``<name>_v<k>`` for the others."""
    return disk_name if variant == 0 else f"{disk_name}_v{variant}"


def te_cache_record(
    captions: Sequence[str],
    t5_max_length: int,
    apply_lg_attn_mask: bool,
    apply_t5_attn_mask: bool,
    encoder_identity: str | Mapping[str, str],
    *,
    parts: Sequence[str] = ("lg", "t5"),
) -> dict[str, Any]:
    """The record a cache for these processed captions must carry to be reused."""
    unknown = set(parts) - set(PARTS)
    if unknown or not parts:
        raise ValueError(f"parts must be a non-empty subset of {sorted(PARTS)}, got {list(parts)}")
    if not captions:
        raise ValueError("a text-encoder cache needs at least one caption")
    has_lg, has_t5 = "lg" in parts, "t5" in parts
    return normalize_record(
        {
            "format": TE_FORMAT,
            "captions": [str(c) for c in captions],
            "t5_max_length": int(t5_max_length) if has_t5 else None,
            "apply_lg_attn_mask": bool(apply_lg_attn_mask) if has_lg else None,
            "apply_t5_attn_mask": bool(apply_t5_attn_mask) if has_t5 else None,
            "encoders": encoder_identity if isinstance(encoder_identity, str) else dict(encoder_identity),
            "parts": sorted(parts),
        }
    )


def _record_mismatch(stored: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """Field names in which ``stored`` does not serve ``expected`` (None = not compared)."""
    changed = []
    for name in sorted(set(expected) - {"parts", "encoders"}):
        if expected[name] is not None and stored.get(name) != expected[name]:
            changed.append(name)
    if not set(expected["parts"]) <= set(stored.get("parts") or []):
        changed.append("parts")
    have, want = stored.get("encoders"), expected["encoders"]
    if isinstance(have, dict) and isinstance(want, dict):
        if any(have.get(name) != value for name, value in want.items()):
            changed.append("encoders")
    elif have != want:
        changed.append("encoders")
    return changed


def _flags_match(path: Path, expected: Mapping[str, Any]) -> tuple[bool, str]:
    arrays, reason = read_arrays(path, FLAG_KEYS)
    if arrays is None:
        return False, reason
    for name in FLAG_KEYS:
        if expected.get(name) is not None and bool(arrays[name]) != expected[name]:
            return False, f"changed: {name}"
    return True, ""


def is_te_cache_valid(
    path: str | os.PathLike[str],
    record: Mapping[str, Any],
    *,
    trust_foreign: bool = False,
    deep: bool = False,
) -> tuple[bool, str]:
    """(True, "") when the cache serves ``record``, else (False, reason).

    A file without our record (sd-scripts') is reused only with ``trust_foreign``, after sd-scripts'
    own check (keys present, mask flags equal); it then offers one variant. ``deep`` reads every
    array (CRC check); a truncated file is caught either way.
    """
    path = Path(path)
    expected = normalize_record(record)
    keys, reason = npz_keys(path)
    if keys is None:
        return False, reason
    if META_KEY in keys:
        meta, reason = read_record(path, META_KEY)
        if meta is None or not isinstance(meta.get("record"), dict):
            return False, reason or "malformed cache record"
        changed = _record_mismatch(meta["record"], expected)
        if changed:
            return False, "changed: " + ", ".join(changed)
        count = len(meta["record"]["captions"])
    elif not trust_foreign:
        return False, "no provenance record (foreign cache; pass trust_foreign to reuse it)"
    else:
        count = 1
    required = list(FLAG_KEYS)
    for part in expected["parts"]:
        required += [variant_key(name, k) for k in range(count) for name in DISK_KEYS[part]]
    missing = [key for key in required if key not in keys]
    if missing:
        return False, "missing keys: " + ", ".join(missing)
    if deep:
        arrays, reason = read_arrays(path, required)
        if arrays is None:
            return False, reason
    return (True, "") if META_KEY in keys else _flags_match(path, expected)


def _dtype_tag(value: Array) -> str:
    if isinstance(value, torch.Tensor):
        return str(value.dtype).removeprefix("torch.")
    return np.asarray(value).dtype.name


def _variant_arrays(outputs: Mapping[str, Array], parts: Sequence[str], k: int) -> tuple[dict[str, Any], dict]:
    """Disk arrays of one variant and its storage info (dtype tags, lg split widths)."""
    missing = [name for part in parts for name in PARTS[part] if name not in outputs]
    if missing:
        raise ValueError(f"variant {k} lacks {missing} for cache parts {list(parts)}")
    tags = {name: _dtype_tag(outputs[name]) for part in parts for name in PARTS[part]}
    arr = {name: to_numpy(outputs[name]) for name in tags}
    disk: dict[str, Any] = {}
    info: dict[str, Any] = {"dtypes": tags}
    if "lg" in parts:
        disk[variant_key("lg_out", k)] = np.concatenate([arr["clip_l"], arr["clip_g"]], axis=-1)
        disk[variant_key("lg_pooled", k)] = np.concatenate([arr["clip_l_pooled"], arr["clip_g_pooled"]], axis=-1)
        disk[variant_key("clip_l_attn_mask", k)] = arr["clip_l_mask"]
        disk[variant_key("clip_g_attn_mask", k)] = arr["clip_g_mask"]
        info["lg_split"] = [int(arr["clip_l"].shape[-1]), int(arr["clip_l_pooled"].shape[-1])]
    if "t5" in parts:
        disk[variant_key("t5_out", k)] = arr["t5"]
        disk[variant_key("t5_attn_mask", k)] = arr["t5_mask"]
    return disk, info


def write_te_cache(
    path: str | os.PathLike[str],
    variants: Sequence[Mapping[str, Array]],
    record: Mapping[str, Any],
    *,
    fsync: bool = False,
) -> None:
    """Write all variants (one per caption of ``record``) atomically, replacing any old file."""
    record = normalize_record(record)
    if len(variants) != len(record["captions"]):
        raise ValueError(f"{len(variants)} variants for {len(record['captions'])} captions")
    arrays: dict[str, Any] = {
        "apply_lg_attn_mask": np.array(bool(record["apply_lg_attn_mask"])),
        "apply_t5_attn_mask": np.array(bool(record["apply_t5_attn_mask"])),
    }
    storage = []
    for k, outputs in enumerate(variants):
        disk, info = _variant_arrays(outputs, record["parts"], k)
        arrays.update(disk)
        storage.append(info)
    arrays[META_KEY] = encode_record({"record": record, "storage": storage})
    atomic_savez(Path(path), arrays, fsync=fsync)


def _to_tensor(array: np.ndarray, tag: str | None) -> torch.Tensor:
    """The stored array in the dtype it was given in (bf16, or fp16 promoted by the lg concatenation)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    dtype = getattr(torch, tag, None) if tag else None
    return tensor.to(dtype) if isinstance(dtype, torch.dtype) else tensor


def _read_meta(path: Path, keys: frozenset[str]) -> dict[str, Any] | None:
    if META_KEY not in keys:
        return None
    meta, reason = read_record(path, META_KEY)
    if meta is None:
        raise UserError(f"text-encoder cache {path}: {reason}; delete it or re-run caching")
    return meta


def num_variants(path: str | os.PathLike[str]) -> int:
    """Number of cached caption variants (1 for an sd-scripts file)."""
    path = Path(path)
    keys, reason = npz_keys(path)
    if keys is None:
        raise UserError(f"text-encoder cache {path}: {reason}; re-run caching")
    meta = _read_meta(path, keys)
    return 1 if meta is None else len(meta["storage"])


def read_te_cache(
    path: str | os.PathLike[str], variant: int = 0, *, clip_l_width: int | None = None
) -> dict[str, torch.Tensor]:
    """One variant's outputs as tensors (names as in the module docstring; only the cached parts).

    ``clip_l_width`` splits sd-scripts' ``lg_out``/``lg_pooled`` of a foreign file (default 768).
    """
    path = Path(path)
    wanted = [variant_key(name, variant) for names in DISK_KEYS.values() for name in names]
    arrays, keys, reason = read_npz(path, lambda keys: [k for k in [META_KEY, *wanted] if k in keys])
    if arrays is None:
        raise UserError(f"text-encoder cache {path}: {reason}; re-run caching")
    meta = decode_record(arrays.pop(META_KEY)) if META_KEY in arrays else None
    count = 1 if meta is None else len(meta["storage"])
    if not 0 <= variant < count:
        raise IndexError(f"{path} holds {count} variant(s); asked for {variant}")
    info = meta["storage"][variant] if meta else {}
    disk = {key.removesuffix(f"_v{variant}") if variant else key: value for key, value in arrays.items()}
    out: dict[str, np.ndarray] = {}
    if "lg_out" in disk:
        split_seq, split_pooled = info.get("lg_split") or [clip_l_width or SD3_CLIP_L_WIDTH] * 2
        out["clip_l"], out["clip_g"] = disk["lg_out"][..., :split_seq], disk["lg_out"][..., split_seq:]
        pooled = disk["lg_pooled"]
        out["clip_l_pooled"], out["clip_g_pooled"] = pooled[..., :split_pooled], pooled[..., split_pooled:]
        out["clip_l_mask"], out["clip_g_mask"] = disk["clip_l_attn_mask"], disk["clip_g_attn_mask"]
    if "t5_out" in disk:
        out["t5"], out["t5_mask"] = disk["t5_out"], disk["t5_attn_mask"]
    tags = info.get("dtypes", {})
    return {name: _to_tensor(value, tags.get(name)) for name, value in out.items()}


@dataclass(frozen=True)
class TeCacheItem:
    """One image's text-encoder cache: its path and expected record (captions come from the record)."""

    npz_path: Path
    record: dict[str, Any]

    @property
    def captions(self) -> list[str]:
        return list(self.record["captions"])


TeEncodeFn = Callable[[list[str]], list[Mapping[str, Array]]]


def _stale_items(items: Sequence[TeCacheItem], trust_foreign: bool, summary: CacheSummary) -> list[TeCacheItem]:
    stale = []
    for item in items:
        valid, reason = is_te_cache_valid(item.npz_path, item.record, trust_foreign=trust_foreign)
        if valid:
            summary.reused += 1
            continue
        log = logger.warning if reason.startswith("unreadable") else logger.debug
        log("text-encoder cache %s: %s; encoding", item.npz_path, reason)
        summary.rebuilt_reasons[str(item.npz_path)] = reason
        stale.append(item)
    return stale


def _write_item(item: TeCacheItem, outputs: list[Mapping[str, Array]], summary: CacheSummary) -> None:
    try:
        write_te_cache(item.npz_path, outputs, item.record)
    except OSError as err:
        summary.failed[str(item.npz_path)] = f"write failed: {err}"
        logger.error("cannot write text-encoder cache %s: %s", item.npz_path, err)
        return
    summary.encoded += 1


def encode_missing_te(
    items: Sequence[TeCacheItem],
    encode_fn: TeEncodeFn,
    *,
    batch_size: int,
    trust_foreign: bool = False,
    progress: bool = True,
) -> CacheSummary:
    """Encode every caption variant of the stale items in batches of ``batch_size`` captions
    (across items) and write each file once, as soon as all its variants are encoded.

    ``encode_fn(captions) -> one outputs dict per caption``; its errors propagate.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    summary = CacheSummary()
    stale = _stale_items(items, trust_foreign, summary)
    queue = [(index, caption) for index, item in enumerate(stale) for caption in item.captions]
    done: dict[int, list[Mapping[str, Array]]] = {}
    total = (len(queue) + batch_size - 1) // batch_size
    for number, start in enumerate(range(0, len(queue), batch_size)):
        batch = queue[start : start + batch_size]
        outputs = encode_fn([caption for _, caption in batch])
        if len(outputs) != len(batch):
            raise ValueError(f"encode_fn returned {len(outputs)} outputs for {len(batch)} captions")
        for (index, _), result in zip(batch, outputs):
            done.setdefault(index, []).append(result)
            if len(done[index]) == len(stale[index].captions):
                _write_item(stale[index], done.pop(index), summary)
        if progress and progress_due(number, total):
            logger.info("text-encoder cache: batch %d/%d", number + 1, total)
    logger.info(
        "text-encoder cache: %d encoded, %d reused, %d failed", summary.encoded, summary.reused, len(summary.failed)
    )
    return summary
