"""Which layers an SD3 network adapts (sd-scripts' lora_sd3 rules) and how they are named.

MMDiT: the joint blocks' attention (qkv, proj, attn2.*), MLP (fc1, fc2) and modulation
(adaLN_modulation.1) Linears, per-type ranks, ``train_block_indices``; with ``emb_dims`` also every
Linear / Conv2d of context_embedder, t_embedder, x_embedder (the patch-embedding conv), y_embedder,
final_layer.adaLN_modulation and final_layer.linear. Text encoders: CLIP-L/CLIP-G attention and MLP
Linears, T5's only with ``train_t5xxl``. Names: ``lora_unet_`` / ``lora_te1_`` / ``lora_te2_`` /
``lora_te3_`` + module path with . → _ (what ComfyUI maps back to ``diffusion_model.<path>``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn

from networks.options import EMB_PARTS, NetworkOptions, parse_block_indices

PREFIXES = {"unet": "lora_unet", "te1": "lora_te1", "te2": "lora_te2", "te3": "lora_te3"}
UNET_PATTERN = re.compile(
    r"^joint_blocks\.(\d+)\.(context|x)_block\.(attn2?\.(?:qkv|proj)|mlp\.fc[12]|adaLN_modulation\.1)$"
)
CLIP_PATTERN = re.compile(r"\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")
T5_PATTERN = re.compile(r"\.block\.\d+\.layer\.\d+\.(SelfAttention\.[qkvo]|DenseReluDense\.w[io](_[01])?)$")
UNET_KINDS = {"attn": "attn", "attn2": "attn", "mlp": "mlp", "adaLN_modulation": "mod"}
SUMMARY_ORDER = ("unet context attn", "unet context mlp", "unet context mod", "unet x attn", "unet x mlp",
                 "unet x mod", "unet emb", "te1", "te2", "te3")


@dataclass(frozen=True)
class Target:
    """One layer to adapt: its sd-scripts name, the Linear or Conv2d, its group (unet/te1..3) and rank."""

    name: str
    layer: nn.Linear | nn.Conv2d
    group: str
    dim: int


def unet_name(path: str) -> str:
    return f"{PREFIXES['unet']}_{path.replace('.', '_')}"


def _unet_dim(match: re.Match, options: NetworkOptions, default_dim: int) -> int:
    stream, kind = match.group(2), UNET_KINDS[match.group(3).split(".")[0]]
    dim = getattr(options, f"{stream}_{kind}_dim")
    return default_dim if dim is None else dim


def _block_targets(mmdit: nn.Module, options: NetworkOptions, default_dim: int) -> Iterator[Target]:
    blocks = parse_block_indices(options.train_block_indices, len(mmdit.joint_blocks))
    for path, module in mmdit.named_modules():
        match = UNET_PATTERN.match(path)
        if match is None or not isinstance(module, nn.Linear):
            continue
        if blocks is not None and int(match.group(1)) not in blocks:
            continue
        dim = _unet_dim(match, options, default_dim)
        if dim > 0:
            yield Target(unet_name(path), module, "unet", dim)


def _is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def _emb_targets(mmdit: nn.Module, emb_dims: tuple[int, ...] | None) -> Iterator[Target]:
    """Every Linear / Conv2d inside each embedder / final-layer part whose emb_dims rank is > 0."""
    for part, dim in zip(EMB_PARTS, emb_dims or ()):
        if dim <= 0:
            continue
        root = mmdit.get_submodule(part)
        for sub, module in root.named_modules():
            if _is_adaptable(module):
                yield Target(unet_name(f"{part}.{sub}" if sub else part), module, "unet", dim)


def _encoder_list(text_encoders: Any) -> list[nn.Module | None]:
    """A TextEncoders object or a [clip_l, clip_g, t5xxl] sequence → three entries (None = absent)."""
    if text_encoders is None:
        return [None, None, None]
    if hasattr(text_encoders, "clip_l"):
        return [text_encoders.clip_l, text_encoders.clip_g, getattr(text_encoders, "t5xxl", None)]
    encoders = list(text_encoders) + [None] * 3
    return encoders[:3]


def _te_targets(text_encoders: Any, options: NetworkOptions, dim: int) -> Iterator[Target]:
    patterns = (("te1", CLIP_PATTERN), ("te2", CLIP_PATTERN), ("te3", T5_PATTERN))
    for encoder, (group, pattern) in zip(_encoder_list(text_encoders), patterns):
        if encoder is None or (group == "te3" and not options.train_t5xxl):
            continue
        for path, module in encoder.named_modules():
            if isinstance(module, nn.Linear) and pattern.search(path):
                yield Target(f"{PREFIXES[group]}_{path.replace('.', '_')}", module, group, dim)


def find_targets(mmdit: nn.Module | None, text_encoders: Any, options: NetworkOptions, dim: int) -> list[Target]:
    """Every layer the network adapts, in order: joint blocks, embedders / final layer, CLIP-L, CLIP-G, T5."""
    targets: list[Target] = []
    if mmdit is not None:
        targets += _block_targets(mmdit, options, dim)
        targets += _emb_targets(mmdit, options.emb_dims)
    return targets + list(_te_targets(text_encoders, options, dim))


def summary_category(name: str, group: str) -> str:
    """The summary line a module counts in: "unet <stream> attn|mlp|mod", "unet emb", or its te group."""
    if group != "unet":
        return group
    path = name.removeprefix(PREFIXES["unet"] + "_")
    match = re.match(r"^joint_blocks_\d+_(context|x)_block_(attn2?|mlp|adaLN_modulation)_", path)
    if match is None:
        return "unet emb"
    return f"unet {match.group(1)} {UNET_KINDS[match.group(2)]}"
