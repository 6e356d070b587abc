"""What a saved network file carries: ss_* metadata as sd-scripts writes it (plus what it forgets),
modelspec with ``…/lora`` or ``…/lokr``, and the additional-networks hashes ``sshs_model_hash`` /
``sshs_legacy_hash``.

The hashes follow sd-webui-additional-networks (as sd-scripts precomputes them): they are taken over
the file as it would be written with only its ``ss_*`` metadata; the model hash is the SHA-256 of
everything after the header (the tensor data), the legacy hash the first 8 hex digits of the SHA-256
of the 64 KiB at offset 1 MiB.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

import torch

from library.models.mmdit_config import MMDiTConfig
from library.models.safetensors_io import safetensors_bytes
from library.training.checkpoints import checkpoint_metadata

# sd-scripts' SS_METADATA_MINIMUM_KEYS: what --no_metadata still writes
MINIMUM_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                "ss_network_args")
BASE_MODEL_VERSION = {"sd3-medium": "sd3_medium", "sd35-medium": "sd3.5_medium", "sd35-large": "sd3.5_large"}
_NETWORK_KEYS = {"network_module": "ss_network_module", "network_dim": "ss_network_dim",
                 "network_alpha": "ss_network_alpha", "network_dropout": "ss_network_dropout",
                 "scale_weight_norms": "ss_scale_weight_norms", "network_multiplier": "sd3_trainer.network_multiplier"}
LEGACY_OFFSET, LEGACY_LENGTH = 0x100000, 0x10000


def parse_network_args(items: tuple[str, ...] | list[str]) -> dict[str, str]:
    """``key=value`` items (sd-scripts' --network_args) -> dict; a malformed item is a ValueError."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--network_args item {item!r} is not key=value")
        out[key.strip()] = value.strip()
    return out


def network_metadata(settings: Mapping[str, Any], config: MMDiTConfig, *, kind: str, title: str,
                     network_args: Mapping[str, str], minimal: bool = False) -> dict[str, str]:
    """Metadata of a network file; ``minimal`` (--no_metadata) keeps modelspec and sd-scripts' minimum keys."""
    meta = checkpoint_metadata(config, title=title, settings=settings, adapter=kind)
    for key, meta_key in _NETWORK_KEYS.items():
        if settings.get(key) is not None:
            meta[meta_key] = str(settings[key])
    meta["ss_network_dim"] = str(settings.get("network_dim") or 4)
    meta["ss_network_args"] = json.dumps(dict(network_args), sort_keys=True)
    meta["ss_base_model_version"] = BASE_MODEL_VERSION[config.variant]
    meta["ss_v2"] = "False"
    if minimal:
        meta = {k: v for k, v in meta.items() if k in MINIMUM_KEYS or k.startswith("modelspec.")}
    return meta


def additional_network_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) of the file written with only the ``ss_*`` metadata."""
    data = safetensors_bytes(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_length = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_length:]).hexdigest()
    legacy_hash = hashlib.sha256(data[LEGACY_OFFSET:LEGACY_OFFSET + LEGACY_LENGTH]).hexdigest()[:8]
    return model_hash, legacy_hash


def with_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    model_hash, legacy_hash = additional_network_hashes(tensors, metadata)
    return {**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash}
