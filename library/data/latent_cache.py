"""Latent caches beside the images, in sd-scripts' SD3 layout plus a provenance record.

File: ``<stem>_<W:04d>x<H:04d>_sd3.npz`` beside the image (W, H = bucket size in pixels). Keys carry
the latent size suffix ``_<h>x<w>`` (h = H/8, w = W/8), so one file may hold several resolutions
(sd-scripts' multi-resolution layout); writing one resolution keeps the others' keys.

| key                          | dtype / shape                         | written by sd-scripts     |
|------------------------------|---------------------------------------|---------------------------|
| ``latents_<h>x<w>``          | float32 (16, h, w), no batch dim      | yes (``.float().numpy()``) |
| ``original_size_<h>x<w>``    | int64 (2,) = [W, H] of the image file | yes (``np.array``)        |
| ``crop_ltrb_<h>x<w>``        | int64 (4,) left, top, right, bottom   | yes                       |
| ``latents_flipped_<h>x<w>``  | float32 (16, h, w)                    | yes, with flip_aug        |
| ``alpha_mask_<h>x<w>``       | float32 (H, W) in [0, 1], pixel size  | yes, with alpha_mask      |
| ``sd3_trainer_meta_<h>x<w>`` | 0-d unicode array, JSON record        | no (ours; sd-scripts ignores it) |

The alpha mask is the bucket-sized image's alpha / 255 (all ones when the image has none), as
sd-scripts caches it; a flipped read mirrors it along W.

Latents are the *raw* VAE posterior sample, as sd-scripts stores them (its ``SDVAE.encode``); the
SD3 shift/scale ``(z - 0.0609) * 1.5305`` is applied after reading, so ``encode_fn`` must not apply it.

Provenance record (:func:`latent_cache_record`): ``format``, ``image`` (``size`` + ``mtime_ns``, or
``size`` + ``sha256`` with ``check="hash"``, which survives a touch), ``bucket`` [W, H], ``crop_ltrb``
(or null when the caller does not know it beforehand), ``flip``, ``alpha_mask``, ``random_crop``,
``resize_interpolation``, ``vae`` (caller's identity string, e.g. weights hash + dtype). A cache is
reused only when its stored record equals the expected one. A file without our record (written by
sd-scripts) is reused only with ``trust_foreign=True`` (sd-scripts' ``--skip_cache_check`` spirit:
its own key check only), otherwise it is rebuilt.
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from library.data.cache_io import (
    CacheSummary,
    atomic_savez,
    encode_record,
    normalize_record,
    npz_keys,
    progress_due,
    read_arrays,
    read_existing,
    read_npz,
    read_record,
    record_differences,
    to_numpy,
)
from library.errors import UserError

logger = logging.getLogger(__name__)

LATENT_FORMAT = "sd3-trainer-latents/1"
LATENTS_NPZ_SUFFIX = "_sd3.npz"
VAE_STRIDE = 8
META_PREFIX = "sd3_trainer_meta"
LoadResult = tuple[torch.Tensor, Sequence[int], Sequence[int], "torch.Tensor | np.ndarray | None"]


def latent_cache_path(image_path: str | os.PathLike[str], bucket_wh: tuple[int, int]) -> Path:
    """``<stem>_<W:04d>x<H:04d>_sd3.npz`` beside the image."""
    image_path = Path(image_path)
    width, height = bucket_wh
    return image_path.with_name(f"{image_path.stem}_{width:04d}x{height:04d}{LATENTS_NPZ_SUFFIX}")


def key_suffix(bucket_wh: tuple[int, int]) -> str:
    """``_<h>x<w>`` in latent units (sd-scripts' multi-resolution key suffix)."""
    width, height = bucket_wh
    if width % VAE_STRIDE or height % VAE_STRIDE:
        raise ValueError(f"bucket size {width}x{height} is not a multiple of {VAE_STRIDE}")
    return f"_{height // VAE_STRIDE}x{width // VAE_STRIDE}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def image_fingerprint(image_path: str | os.PathLike[str], check: str = "mtime") -> dict[str, Any]:
    """``{"size", "mtime_ns"}`` (check="mtime") or ``{"size", "sha256"}`` (check="hash")."""
    path = Path(image_path)
    try:
        stat = path.stat()
        if check == "mtime":
            return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        if check == "hash":
            return {"size": stat.st_size, "sha256": _sha256(path)}
    except OSError as err:
        raise UserError(f"cannot read image {path}: {err.strerror or err}") from err
    raise ValueError(f"unknown cache check {check!r}; use 'mtime' or 'hash'")


def latent_cache_record(
    image_path: str | os.PathLike[str],
    bucket_wh: tuple[int, int],
    *,
    vae_identity: str,
    flip: bool = False,
    alpha_mask: bool = False,
    random_crop: bool = False,
    resize_interpolation: str | None = None,
    crop_ltrb: Sequence[int] | None = None,
    check: str = "mtime",
) -> dict[str, Any]:
    """The provenance record a cache for this image and bucket must carry to be reused."""
    return normalize_record(
        {
            "format": LATENT_FORMAT,
            "image": image_fingerprint(image_path, check),
            "bucket": [int(bucket_wh[0]), int(bucket_wh[1])],
            "crop_ltrb": None if crop_ltrb is None else [int(v) for v in crop_ltrb],
            "flip": bool(flip),
            "alpha_mask": bool(alpha_mask),
            "random_crop": bool(random_crop),
            "resize_interpolation": resize_interpolation,
            "vae": vae_identity,
        }
    )


def _required_keys(suffix: str, flip: bool, alpha_mask: bool) -> list[str]:
    keys = [f"latents{suffix}", f"original_size{suffix}", f"crop_ltrb{suffix}"]
    keys += [f"latents_flipped{suffix}"] if flip else []
    return keys + ([f"alpha_mask{suffix}"] if alpha_mask else [])


def is_latent_cache_valid(
    npz_path: str | os.PathLike[str],
    expected_record: dict[str, Any],
    *,
    trust_foreign: bool = False,
    deep: bool = False,
) -> tuple[bool, str]:
    """(True, "") when the cache can be reused, else (False, reason).

    The bucket comes from ``expected_record["bucket"]``. ``deep`` reads the arrays too (CRC check);
    a truncated file is caught either way (its zip directory is gone).
    """
    path = Path(npz_path)
    expected = normalize_record(expected_record)
    suffix = key_suffix(tuple(expected["bucket"]))
    keys, reason = npz_keys(path)
    if keys is None:
        return False, reason
    required = _required_keys(suffix, expected["flip"], expected["alpha_mask"])
    meta_key = META_PREFIX + suffix
    if meta_key not in keys:
        if not trust_foreign:
            return False, "no provenance record (foreign cache; pass trust_foreign to reuse it)"
    else:
        stored, reason = read_record(path, meta_key)
        if stored is None:
            return False, reason
        changed = record_differences(stored, expected)
        if changed:
            return False, "changed: " + ", ".join(changed)
    missing = [key for key in required if key not in keys]
    if missing:
        return False, "missing keys: " + ", ".join(missing)
    if deep:
        arrays, reason = read_arrays(path, required)
        if arrays is None:
            return False, reason
    return True, ""


def write_latent_cache(
    npz_path: str | os.PathLike[str],
    bucket_wh: tuple[int, int],
    latents: torch.Tensor | np.ndarray,
    original_size: Sequence[int],
    crop_ltrb: Sequence[int],
    record: dict[str, Any],
    *,
    flipped: torch.Tensor | np.ndarray | None = None,
    alpha_mask: torch.Tensor | np.ndarray | None = None,
    fsync: bool = False,
) -> None:
    """Write one resolution's keys atomically, keeping other resolutions' keys of a readable file."""
    path = Path(npz_path)
    suffix = key_suffix(bucket_wh)
    width, height = bucket_wh
    arrays: dict[str, Any] = {
        key: value for key, value in read_existing(path).items() if not key.endswith(suffix)
    }
    arrays[f"latents{suffix}"] = _latents_array(latents, bucket_wh)
    arrays[f"original_size{suffix}"] = np.asarray(original_size, dtype=np.int64).reshape(2)
    arrays[f"crop_ltrb{suffix}"] = np.asarray(crop_ltrb, dtype=np.int64).reshape(4)
    if flipped is not None:
        arrays[f"latents_flipped{suffix}"] = _latents_array(flipped, bucket_wh)
    if alpha_mask is not None:
        mask = to_numpy(alpha_mask).astype(np.float32)
        if mask.shape != (height, width):
            raise ValueError(f"alpha mask has shape {mask.shape}, expected (H, W) = ({height}, {width})")
        arrays[f"alpha_mask{suffix}"] = mask
    arrays[META_PREFIX + suffix] = encode_record(record)
    atomic_savez(path, arrays, fsync=fsync)


def _latents_array(latents: torch.Tensor | np.ndarray, bucket_wh: tuple[int, int]) -> np.ndarray:
    array = to_numpy(latents).astype(np.float32)
    expected_hw = (bucket_wh[1] // VAE_STRIDE, bucket_wh[0] // VAE_STRIDE)
    if array.ndim != 3 or array.shape[1:] != expected_hw:
        raise ValueError(f"latents have shape {array.shape}, expected (C, {expected_hw[0]}, {expected_hw[1]})")
    return array


def read_latent_cache(
    npz_path: str | os.PathLike[str], bucket_wh: tuple[int, int], *, flipped: bool = False
) -> dict[str, torch.Tensor]:
    """``latents`` (C, h, w) float32 (the flipped ones when ``flipped``), ``original_size`` (2,),
    ``crop_ltrb`` (4,) int64, and ``alpha_mask`` (H, W) float32 if cached (mirrored when ``flipped``,
    as sd-scripts does)."""
    path = Path(npz_path)
    suffix = key_suffix(bucket_wh)
    arrays, _, reason = read_npz(path, lambda keys: _required_keys(suffix, flipped, f"alpha_mask{suffix}" in keys))
    if arrays is None:
        raise UserError(f"latent cache {path}: {reason}; delete it or re-run caching")
    latent_key = f"latents_flipped{suffix}" if flipped else f"latents{suffix}"
    out = {
        "latents": torch.from_numpy(arrays[latent_key].astype(np.float32)),
        "original_size": torch.from_numpy(arrays[f"original_size{suffix}"].astype(np.int64)),
        "crop_ltrb": torch.from_numpy(arrays[f"crop_ltrb{suffix}"].astype(np.int64)),
    }
    if f"alpha_mask{suffix}" in arrays:
        mask = torch.from_numpy(arrays[f"alpha_mask{suffix}"].astype(np.float32))
        out["alpha_mask"] = mask.flip(-1) if flipped else mask
    return out


@dataclass(frozen=True)
class LatentCacheItem:
    """One image to cache at one bucket size; ``source`` is whatever ``load_fn`` understands.

    ``flip`` and ``alpha_mask`` are read from the record so the two cannot disagree.
    """

    npz_path: Path
    bucket_wh: tuple[int, int]
    record: dict[str, Any]
    source: Any

    @property
    def flip(self) -> bool:
        return bool(self.record.get("flip", False))

    @property
    def alpha_mask(self) -> bool:
        return bool(self.record.get("alpha_mask", False))


LoadFn = Callable[[Any], LoadResult]
EncodeFn = Callable[[torch.Tensor], torch.Tensor]


def _safe_load(load_fn: LoadFn, item: LatentCacheItem) -> LoadResult | str:
    """The load result, or a reason string when the image cannot be read (never raises for that)."""
    try:
        return load_fn(item.source)
    except (UserError, OSError, ValueError) as err:
        return f"{type(err).__name__}: {err}"


def _batches(items: list[LatentCacheItem], batch_size: int) -> Iterator[list[LatentCacheItem]]:
    def key(item: LatentCacheItem) -> tuple[int, int, bool]:
        return (item.bucket_wh[0], item.bucket_wh[1], item.flip)

    for _, group in groupby(sorted(items, key=key), key=key):
        members = list(group)
        for start in range(0, len(members), batch_size):
            yield members[start : start + batch_size]


def _encode_checked(encode_fn: EncodeFn, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        latents = encode_fn(images)
    batch, _, height, width = images.shape
    if latents.dim() != 4 or latents.shape[0] != batch or latents.shape[2:] != (height // 8, width // 8):
        raise ValueError(f"encode_fn returned {tuple(latents.shape)} for images {tuple(images.shape)}")
    return latents.detach().float().cpu()


def _encode_and_write(
    batch: list[LatentCacheItem], loaded: list[LoadResult], encode_fn: EncodeFn, writer: ThreadPoolExecutor
) -> list[tuple[LatentCacheItem, Future[None]]]:
    """Encode one bucket batch and queue its file writes on ``writer`` (they overlap the next encode)."""
    width, height = batch[0].bucket_wh
    images = torch.stack([torch.as_tensor(result[0]) for result in loaded])  # (B, 3, H, W)
    if images.shape[1:] != (3, height, width):
        raise ValueError(f"load_fn gave images {tuple(images.shape[1:])} for bucket {width}x{height}")
    latents = _encode_checked(encode_fn, images)
    flipped = _encode_checked(encode_fn, images.flip(-1)) if batch[0].flip else None
    jobs = []
    for index, (item, (_, original_size, crop_ltrb, alpha)) in enumerate(zip(batch, loaded)):
        mask = None
        if item.alpha_mask:
            mask = torch.ones(height, width) if alpha is None else torch.as_tensor(alpha).float()
        future = writer.submit(
            write_latent_cache, item.npz_path, item.bucket_wh, latents[index], original_size, crop_ltrb, item.record,
            flipped=None if flipped is None else flipped[index], alpha_mask=mask,
        )
        jobs.append((item, future))
    return jobs


def _collect_writes(jobs: list[tuple[LatentCacheItem, Future[None]]], summary: CacheSummary) -> None:
    for item, future in jobs:
        try:
            future.result()
        except OSError as err:
            summary.failed[str(item.npz_path)] = f"write failed: {err}"
            logger.error("cannot write latent cache %s: %s", item.npz_path, err)
            continue
        summary.encoded += 1


def _find_stale(items: Sequence[LatentCacheItem], trust_foreign: bool, summary: CacheSummary) -> list[LatentCacheItem]:
    stale = []
    for item in items:
        valid, reason = is_latent_cache_valid(item.npz_path, item.record, trust_foreign=trust_foreign)
        if valid:
            summary.reused += 1
            continue
        if reason.startswith("unreadable"):
            logger.warning("latent cache %s: %s; rebuilding it", item.npz_path, reason)
        else:
            logger.debug("latent cache %s: %s; encoding", item.npz_path, reason)
        summary.rebuilt_reasons[str(item.npz_path)] = reason
        stale.append(item)
    return stale


def encode_missing_latents(
    items: Sequence[LatentCacheItem],
    encode_fn: EncodeFn,
    load_fn: LoadFn,
    *,
    batch_size: int,
    progress: bool = True,
    num_workers: int = 4,
    trust_foreign: bool = False,
) -> CacheSummary:
    """Encode the items whose cache is missing or stale, bucket by bucket, and write their files.

    ``load_fn(source) -> (image (3, H, W) in [-1, 1], original_size [W, H], crop_ltrb, alpha (H, W)
    in [0, 1] or None)`` runs in a thread pool (the next batch loads while one encodes); an image
    that raises ``UserError``/``OSError``/``ValueError`` is reported in ``failed`` and skipped.
    ``encode_fn(images (B, 3, H, W)) -> raw latents (B, 16, H/8, W/8)``; its errors propagate.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    summary = CacheSummary()
    stale = _find_stale(items, trust_foreign, summary)
    batches = list(_batches(stale, batch_size))
    jobs: list[tuple[LatentCacheItem, Future[None]]] = []
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool, ThreadPoolExecutor(max_workers=2) as writer:
        pending: list[Future[LoadResult | str]] = []
        if batches:
            pending = [pool.submit(_safe_load, load_fn, item) for item in batches[0]]
        for number, batch in enumerate(batches):
            results = [future.result() for future in pending]
            if number + 1 < len(batches):
                pending = [pool.submit(_safe_load, load_fn, item) for item in batches[number + 1]]
            good = [(item, res) for item, res in zip(batch, results) if not isinstance(res, str)]
            for item, res in zip(batch, results):
                if isinstance(res, str):
                    summary.failed[str(item.npz_path)] = res
                    logger.warning("skipping %s: %s", item.source, res)
            if good:
                jobs += _encode_and_write([g[0] for g in good], [g[1] for g in good], encode_fn, writer)
            if progress and progress_due(number, len(batches)):
                logger.info("latent cache: batch %d/%d (bucket %dx%d)", number + 1, len(batches), *batch[0].bucket_wh)
    _collect_writes(jobs, summary)
    logger.info(
        "latent cache: %d encoded, %d reused, %d failed", summary.encoded, summary.reused, len(summary.failed)
    )
    return summary
