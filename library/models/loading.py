"""Loading the MMDiT from an SD3/SD3.5 single-file checkpoint or a state dict.

The architecture is read from the tensors' shapes (plus our own metadata for miniature models),
the module is built on the ``meta`` device and the tensors are assigned into it, so a checkpoint
is never held twice in memory. Loading is strict: a missing or unexpected tensor is an error.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from library.errors import UserError
from library.models.mmdit import MMDiT
from library.models.mmdit_config import (
    MMDIT_CONFIG_METADATA_KEY,
    MMDiTConfig,
    check_mmdit_keys,
    infer_mmdit_config,
    split_mmdit_keys,
)
from library.models.safetensors_io import load_safetensors, read_header

logger = logging.getLogger(__name__)

StateDictOrPath = str | os.PathLike | Mapping[str, torch.Tensor]


def read_mmdit_config(path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> MMDiTConfig:
    """The MMDiT config of a checkpoint file, from its header only (no tensor data is read)."""
    header = read_header(path, "checkpoint")
    metadata = header.get("__metadata__") or {}
    all_keys = [k for k in header if k != "__metadata__"]
    prefix, keys = split_mmdit_keys(all_keys)
    shapes = {k: tuple(header[prefix + k]["shape"]) for k in keys}
    return infer_mmdit_config(shapes, metadata.get(MMDIT_CONFIG_METADATA_KEY), str(path), overrides, all_keys)


def mmdit_state_dict_from_file(path: str | os.PathLike, *, mmap: bool = True) -> dict[str, torch.Tensor]:
    """The prefix-free MMDiT tensors of a single-file checkpoint (other components are not read)."""
    header = read_header(path, "checkpoint")
    all_keys = [k for k in header if k != "__metadata__"]
    prefix, keys = split_mmdit_keys(all_keys)
    check_mmdit_keys(keys, str(path), all_keys)
    if prefix:
        return load_safetensors(path, mmap=mmap, prefix=prefix, what="checkpoint")
    wanted = set(keys)
    return {k: v for k, v in load_safetensors(path, mmap=mmap, what="checkpoint").items() if k in wanted}


def build_mmdit(cfg: MMDiTConfig, device: str | torch.device = "meta") -> MMDiT:
    """An MMDiT with config ``cfg`` on ``device`` (``meta`` allocates nothing)."""
    with torch.device(device):
        return MMDiT(cfg)


def _assign_strict(model: MMDiT, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    reference = model.state_dict()
    expected = set(reference.keys())
    given = set(state_dict.keys())
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensors (e.g. {', '.join(unexpected[:3])})")
        raise UserError(f"{source} does not match the inferred MMDiT: {'; '.join(parts)}")
    for key, tensor in state_dict.items():
        if tensor.shape != reference[key].shape:
            raise UserError(f"{source}: tensor {key} has shape {tuple(tensor.shape)}, expected {tuple(reference[key].shape)}")
    model.load_state_dict(state_dict, strict=True, assign=True)


def load_mmdit(
    path_or_state_dict: StateDictOrPath,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    *,
    mmap: bool = True,
    config: MMDiTConfig | None = None,
    config_overrides: Mapping[str, Any] | None = None,
) -> MMDiT:
    """Load an MMDiT from a checkpoint path or a (prefixed or prefix-free) state dict.

    ``dtype`` casts floating tensors (default: keep the stored dtype; fp8 storage is upcast to
    bfloat16 since matmuls cannot run in fp8 here). ``mmap=False`` reads the file in one go
    (``--disable_mmap_load_safetensors``). ``config`` bypasses inference entirely.
    """
    if isinstance(path_or_state_dict, Mapping):
        source = "state dict"
        prefix, keys = split_mmdit_keys(list(path_or_state_dict.keys()))
        check_mmdit_keys(keys, source, list(path_or_state_dict.keys()))
        state_dict = {k: path_or_state_dict[prefix + k] for k in keys}
        metadata_json = None
    else:
        source = str(Path(path_or_state_dict))
        state_dict = mmdit_state_dict_from_file(path_or_state_dict, mmap=mmap)
        metadata_json = (read_header(path_or_state_dict).get("__metadata__") or {}).get(MMDIT_CONFIG_METADATA_KEY)
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    cfg = config or infer_mmdit_config(shapes, metadata_json, source, config_overrides)
    model = build_mmdit(cfg)
    state_dict = {k: _cast(v, dtype) for k, v in state_dict.items()}
    _assign_strict(model, state_dict, source)
    logger.info("loaded %s MMDiT (%d blocks, hidden %d) from %s", cfg.variant, cfg.depth, cfg.hidden_size, source)
    return model.to(device).eval()


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if not t.is_floating_point():
        return t
    if dtype is None:
        return t.to(torch.bfloat16) if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t
    return t.to(dtype)
