"""Plumbing shared by the latent and text-encoder caches: safe npz reads, atomic npz writes, records.

- A cache is an uncompressed ``.npz`` (``np.savez``), readable with ``allow_pickle=False``.
- Provenance records are JSON strings stored as 0-d numpy unicode arrays, so no pickle is needed.
- Writes go to a hidden temp file in the target's folder and are renamed over the target with
  :func:`os.replace` (atomic on POSIX and Windows); the temp file is removed if anything fails.
- A file that cannot be opened (truncated, not a zip, bad CRC, ...) is reported as a reason string,
  never as an exception, so callers rebuild it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

logger = logging.getLogger(__name__)

# What numpy/zipfile raise for a truncated, corrupt or foreign file.
READ_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


@dataclass
class CacheSummary:
    """Outcome of one caching pass: files (re)written, files reused, and failures with reasons."""

    encoded: int = 0
    reused: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # cache path -> reason
    rebuilt_reasons: dict[str, str] = field(default_factory=dict)  # cache path -> why it was (re)encoded


def progress_due(number: int, total: int) -> bool:
    """Whether batch ``number`` (0-based) of ``total`` gets a progress line: about twenty per pass."""
    return number + 1 == total or (number + 1) % max(1, total // 20) == 0


def to_numpy(value: Any) -> np.ndarray:
    """A CPU numpy array; torch bfloat16 becomes float32 (numpy has no bfloat16), as sd-scripts does."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def encode_record(record: Mapping[str, Any]) -> np.ndarray:
    """JSON record -> 0-d unicode array (stored in the npz without pickling)."""
    return np.array(json.dumps(record, sort_keys=True))


def decode_record(array: np.ndarray) -> dict[str, Any]:
    """Inverse of :func:`encode_record` (accepts unicode or bytes arrays)."""
    value = array.item() if array.ndim == 0 else array.reshape(-1)[0]
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    decoded = json.loads(str(value))
    if not isinstance(decoded, dict):
        raise ValueError("cache record is not a JSON object")
    return decoded


def normalize_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record as it reads back from disk (tuples become lists, keys sorted)."""
    return json.loads(json.dumps(record, sort_keys=True))


def record_differences(stored: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """Top-level field names whose values differ between two normalised records."""
    names = sorted(set(stored) | set(expected))
    return [name for name in names if stored.get(name) != expected.get(name)]


def npz_keys(path: Path) -> tuple[frozenset[str] | None, str]:
    """(keys, "") for a readable npz; (None, reason) for a missing or unreadable one."""
    if not path.is_file():
        return None, "no cache file"
    try:
        with np.load(path, allow_pickle=False) as npz:
            return frozenset(npz.files), ""
    except READ_ERRORS as err:
        return None, f"unreadable cache file ({type(err).__name__}: {err})"


def read_arrays(path: Path, keys: Iterable[str]) -> tuple[dict[str, np.ndarray] | None, str]:
    """Read ``keys`` fully (checking each member's CRC); (None, reason) if that fails."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in keys}, ""
    except KeyError as err:
        return None, f"missing key {err}"
    except READ_ERRORS as err:
        return None, f"unreadable cache file ({type(err).__name__}: {err})"


def read_npz(
    path: Path, select: Callable[[frozenset[str]], Iterable[str]]
) -> tuple[dict[str, np.ndarray] | None, frozenset[str], str]:
    """Open ``path`` once: (arrays of the keys ``select(all keys)`` names, all keys, "") or (None, keys, reason)."""
    if not path.is_file():
        return None, frozenset(), "no cache file"
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = frozenset(npz.files)
            return {key: npz[key] for key in select(keys)}, keys, ""
    except KeyError as err:
        return None, frozenset(), f"missing key {err}"
    except READ_ERRORS as err:
        return None, frozenset(), f"unreadable cache file ({type(err).__name__}: {err})"


def read_record(path: Path, key: str) -> tuple[dict[str, Any] | None, str]:
    """The JSON record under ``key``; (None, reason) when it is absent or unreadable."""
    arrays, reason = read_arrays(path, [key])
    if arrays is None:
        return None, reason
    try:
        return decode_record(arrays[key]), ""
    except (ValueError, UnicodeDecodeError) as err:
        return None, f"unreadable cache record ({err})"


def read_existing(path: Path) -> dict[str, np.ndarray]:
    """Every array of an existing cache, or {} when it is missing or corrupt (then it is replaced)."""
    keys, reason = npz_keys(path)
    if keys is None:
        if path.exists():
            logger.warning("%s: %s; replacing it", path, reason)
        return {}
    arrays, reason = read_arrays(path, sorted(keys))
    if arrays is None:
        logger.warning("%s: %s; replacing it", path, reason)
        return {}
    return arrays


def atomic_savez(path: Path, arrays: Mapping[str, Any], *, fsync: bool = False) -> None:
    """Write ``arrays`` to ``path`` via a temp file in the same folder and :func:`os.replace`."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
