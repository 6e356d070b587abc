"""Reading and writing safetensors files, with one-line errors for bad files.

Loading memory-maps by default (tensors are paged in on access); ``mmap=False`` reads the
whole file in one go, which is faster on some network drives and Windows setups
(``--disable_mmap_load_safetensors``). Writing goes to a temporary file in the same folder
that is renamed over the target, so an interrupted save never leaves a half-written model.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Mapping

import torch

from library.errors import UserError

_HEADER_LEN_BYTES = 8
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def _check_file(path: Path, what: str) -> None:
    if not path.exists():
        raise UserError(f"{what} not found: {path} (check the path)")
    if path.is_dir():
        raise UserError(f"{what} is a folder, not a .safetensors file: {path}")


def read_header(path: str | os.PathLike, what: str = "model file") -> dict:
    """Return the parsed JSON header (tensor entries plus ``__metadata__``) of a safetensors file.

    Validates that the data section is as long as the header says, so a truncated download is
    reported here and not as a crash deep inside a load.
    """
    path = Path(path)
    _check_file(path, what)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            raw_len = f.read(_HEADER_LEN_BYTES)
            if len(raw_len) < _HEADER_LEN_BYTES:
                raise ValueError("file is shorter than a safetensors header")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > min(_MAX_HEADER_BYTES, size - _HEADER_LEN_BYTES):
                raise ValueError("header length is larger than the file")
            header = json.loads(f.read(header_len))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{what} {path} is not a valid safetensors file ({exc}); re-download or re-save it") from None
    data_len = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if _HEADER_LEN_BYTES + header_len + data_len > size:
        raise UserError(
            f"{what} {path} is truncated ({size} bytes, header promises "
            f"{_HEADER_LEN_BYTES + header_len + data_len}); re-download or re-save it"
        )
    return header


def read_metadata(path: str | os.PathLike, what: str = "model file") -> dict[str, str]:
    """Return the ``__metadata__`` string map of a safetensors file (empty if it has none)."""
    return dict(read_header(path, what).get("__metadata__") or {})


def read_shapes(path: str | os.PathLike, what: str = "model file") -> dict[str, tuple[int, ...]]:
    """Return ``{key: shape}`` without reading any tensor data."""
    header = read_header(path, what)
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def load_safetensors(
    path: str | os.PathLike,
    *,
    mmap: bool = True,
    prefix: str | None = None,
    strip_prefix: bool = True,
    what: str = "model file",
) -> dict[str, torch.Tensor]:
    """Load tensors from ``path`` onto the CPU.

    ``prefix`` keeps only keys that start with it (and strips it unless ``strip_prefix`` is
    False), so one component can be taken out of an all-in-one checkpoint without touching
    the rest of the file.
    """
    from safetensors import safe_open
    from safetensors.torch import load as load_bytes

    path = Path(path)
    read_header(path, what)
    try:
        if mmap:
            out = {}
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    if prefix is None or key.startswith(prefix):
                        out[key] = f.get_tensor(key)
        else:
            out = {k: v for k, v in load_bytes(path.read_bytes()).items() if prefix is None or k.startswith(prefix)}
    except Exception as exc:  # safetensors raises its own error types for corrupt data
        raise UserError(f"{what} {path} could not be read ({exc}); re-download or re-save it") from None
    if prefix is not None and strip_prefix:
        out = {k[len(prefix):]: v for k, v in out.items()}
    return out


_DTYPE_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _layout(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
            dtypes: Mapping[str, torch.dtype]) -> tuple[list[str], bytes]:
    """Data order (widest dtype first, then name, so every tensor is aligned) and the padded header.
    ``dtypes`` gives the stored dtype of tensors written in another dtype than they have."""
    stored = {k: dtypes.get(k, t.dtype) for k, t in tensors.items()}
    width = {k: torch.empty((), dtype=d).element_size() for k, d in stored.items()}
    order = sorted(tensors, key=lambda k: (-width[k], k))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for key in order:
        if stored[key] not in _DTYPE_CODES:
            raise ValueError(f"tensor {key} has dtype {stored[key]}, which safetensors cannot store")
        size = tensors[key].numel() * width[key]
        header[key] = {"dtype": _DTYPE_CODES[stored[key]], "shape": list(tensors[key].shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return order, raw


def _cpu_flat(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """One tensor as stored: cast (where it lives, as a whole-dict cast would), on the CPU, flat."""
    t = t.detach()
    if dtype is not None and dtype != t.dtype:
        t = t.to(dtype)
    return t.to("cpu").contiguous().reshape(-1)


def save_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
    dtypes: Mapping[str, torch.dtype] | None = None,
) -> None:
    """Write ``tensors`` to ``path`` atomically (temp file in the same folder, then rename).

    The layout is deterministic (sorted metadata, fixed tensor order), so saving the same tensors
    and metadata twice gives identical bytes, and tensors are streamed one at a time, so no
    second copy of the whole model is built in memory. ``dtypes`` (key -> dtype) stores those
    tensors cast, one at a time while writing (``--mem_eff_save``): the bytes equal those of saving
    the cast tensors.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dtypes = dtypes or {}
    order, header = _layout(tensors, metadata or {}, dtypes)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(header)))
            f.write(header)
            for key in order:
                t = _cpu_flat(tensors[key], dtypes.get(key))
                f.write(memoryview(t.view(torch.uint8).numpy()))
                del t
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """The exact bytes :func:`save_safetensors` writes, in memory (for small files: hashes, tests)."""
    order, header = _layout(tensors, metadata or {}, {})
    parts = [struct.pack("<Q", len(header)), header]
    for key in order:
        parts.append(_cpu_flat(tensors[key], None).view(torch.uint8).numpy().tobytes())
    return b"".join(parts)
