"""Saved networks as per-module weight differences, and where each module lands in a checkpoint.

A network file (``networks.network.split_network_sd`` groups and classifies it) gives, per module,
ΔW as the matrix (out, in[·kh·kw]) — LoRA ``scale · up @ down`` or LoKr ``scale · kron(W1, W2)``
(``networks.functional``) — or, for a LoRA, its two factors with the scale folded into up.

Module names map to weights by the sd-scripts / ComfyUI rule of ``networks.targets``: the weight
``<prefix><path>.weight`` of a model part is adapted by the module ``<group prefix>_<path with . → _>``;
the parts are the MMDiT (``model.diffusion_model.`` or no prefix, group ``lora_unet``) and the text
encoders of an all-in-one checkpoint (``text_encoders.clip_l.transformer.`` → ``lora_te1``,
``clip_g`` → ``lora_te2``, ``t5xxl`` → ``lora_te3``) or of separate Hugging-Face-named files.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from library.errors import UserError
from library.models.mmdit_config import split_mmdit_keys
from library.models.safetensors_io import load_safetensors, read_metadata
from library.models.text_encoders import CHECKPOINT_PREFIXES
from networks.functional.conv import as_matrix
from networks.functional.lokr import lokr_delta, lokr_rank, lokr_scale, lokr_w1, lokr_w2
from networks.functional.lora import lora_scale
from networks.network import split_network_sd
from networks.targets import PREFIXES, unet_name

Tensors = dict[str, torch.Tensor]
T = TypeVar("T")
ENCODER_GROUPS = {"clip_l": "te1", "clip_g": "te2", "t5xxl": "te3"}
GROUP_LABELS = {"unet": "MMDiT", "te1": "CLIP-L", "te2": "CLIP-G", "te3": "T5-XXL"}


@dataclass(frozen=True)
class NetworkFile:
    """A LoRA or LoKr file: its kind, ``{module name: {tensor name: tensor}}`` and metadata."""

    path: str
    kind: str
    modules: dict[str, Tensors]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return os.path.basename(self.path)


def read_network(path: str | os.PathLike) -> NetworkFile:
    """Read a network file; not one (or a missing file) is a one-line UserError."""
    weights = load_safetensors(path, what="network file")
    kind, modules = split_network_sd(weights, str(path))
    return NetworkFile(str(path), kind, modules, read_metadata(path, "network file"))


def group_of(name: str) -> str:
    """"unet", "te1", "te2" or "te3" for a module name."""
    for group, prefix in PREFIXES.items():
        if name.startswith(prefix + "_"):
            return group
    raise ValueError(f"{name} is not an SD3 network module name")


def module_name(group: str, path: str) -> str:
    """The network module name that adapts the layer at ``path`` of a model part."""
    return unet_name(path) if group == "unet" else f"{PREFIXES[group]}_{path.replace('.', '_')}"


def _float(tensors: Mapping[str, torch.Tensor], device: torch.device | str | None) -> Tensors:
    return {k: as_matrix(v).to(device, torch.float32) for k, v in tensors.items() if k != "alpha"}


def _alpha(tensors: Mapping[str, torch.Tensor]) -> float | None:
    return float(tensors["alpha"]) if "alpha" in tensors else None


def lora_factors(tensors: Mapping[str, torch.Tensor],
                 device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(up (out, r) · scale, down (r, in[·kh·kw])) of a LoRA module in float32: ΔW = up @ down."""
    matrices = _float(tensors, device)
    down, up = matrices["lora_down.weight"], matrices["lora_up.weight"]
    return up * lora_scale(_alpha(tensors), down.shape[0]), down


def module_delta(kind: str, tensors: Mapping[str, torch.Tensor],
                 device: torch.device | str | None = None) -> torch.Tensor:
    """ΔW (out, in[·kh·kw]) of one module in float32 (multiplier 1)."""
    if kind == "lora":
        up, down = lora_factors(tensors, device)
        return up @ down
    matrices = _float(tensors, device)
    rank = lokr_rank(matrices) or 1
    return lokr_delta(matrices, lokr_scale(_alpha(tensors), rank, matrices))


def module_rank(kind: str, tensors: Mapping[str, torch.Tensor]) -> int | None:
    """A LoRA's rank, a LoKr's split-factor rank (None when both its factors are full)."""
    if kind == "lora":
        return int(tensors["lora_down.weight"].shape[0])
    return lokr_rank(dict(tensors))


def delta_shape(kind: str, tensors: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(out, in[·kh·kw]) of a module's ΔW, from the tensor shapes alone."""
    if kind == "lora":
        return int(tensors["lora_up.weight"].shape[0]), int(as_matrix(tensors["lora_down.weight"]).shape[1])
    shapes = {k: torch.empty(as_matrix(v).shape, device="meta") for k, v in tensors.items() if k != "alpha"}
    w1, w2 = lokr_w1(shapes), lokr_w2(shapes)
    return int(w1.shape[0] * w2.shape[0]), int(w1.shape[1] * w2.shape[1])


def conv_kernel(tensors: Mapping[str, torch.Tensor]) -> tuple[int, int] | None:
    """(kh, kw) when the file stores the module in conv layout (a 4-D lora_down or lokr_w2)."""
    for key in ("lora_down.weight", "lokr_w2"):
        if key in tensors and tensors[key].dim() == 4:
            return int(tensors[key].shape[2]), int(tensors[key].shape[3])
    return None


def matrix_shape_of(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, prod(rest)) of a weight's shape."""
    return int(shape[0]), int(math.prod(shape[1:]))


def _part_map(keys: Iterable[str], prefix: str, group: str, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key in keys:
        full = prefix + key
        if key.endswith(".weight") and len(shapes[full]) >= 2:
            out[module_name(group, key.removesuffix(".weight"))] = full
    return out


def checkpoint_key_map(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, str]:
    """{module name: weight key} for every matrix / conv weight of the MMDiT and the text encoders
    inside an all-in-one checkpoint (``shapes`` from its header)."""
    mmdit_prefix, mmdit_keys = split_mmdit_keys(list(shapes))
    out = _part_map(mmdit_keys, mmdit_prefix, "unet", shapes)
    for encoder, group in ENCODER_GROUPS.items():
        prefix = CHECKPOINT_PREFIXES[encoder]
        keys = [k[len(prefix):] for k in shapes if k.startswith(prefix)]
        out.update(_part_map(keys, prefix, group, shapes))
    return out


def encoder_file_key_map(shapes: Mapping[str, tuple[int, ...]], encoder: str) -> dict[str, str]:
    """{module name: weight key} for a separate text encoder file (HF key names, optionally under the
    all-in-one prefix or ``transformer.``)."""
    group = ENCODER_GROUPS[encoder]
    for prefix in (CHECKPOINT_PREFIXES[encoder], "transformer.", ""):
        keys = [k[len(prefix):] for k in shapes if k.startswith(prefix)]
        if keys:
            return _part_map(keys, prefix, group, shapes)
    return {}


def groups_present(key_map: Mapping[str, str]) -> set[str]:
    return {group_of(name) for name in key_map}


def check_fits(network: NetworkFile, name: str, weight_shape: tuple[int, ...]) -> None:
    """A one-line UserError unless the module's ΔW has the weight's matrix shape."""
    got, want = delta_shape(network.kind, network.modules[name]), matrix_shape_of(weight_shape)
    if got != want:
        raise UserError(f"{network.path} was made for another model: {name} is {got[1]}→{got[0]}, "
                        f"the model's weight is {want[1]}→{want[0]}")


def progress(items: Iterable[T], total: int, desc: str, enabled: bool) -> Iterator[T]:
    """``items`` with a tqdm bar when ``enabled``."""
    if not enabled:
        yield from items
        return
    from tqdm.auto import tqdm

    yield from tqdm(items, total=total, desc=desc, dynamic_ncols=True)
