"""MMDiT configuration: the dataclass, inference from a state dict's shapes, and the real variants.

Everything here works on ``{key: shape}`` maps (no tensors), so a 16 GB checkpoint can be
identified from its header alone, and the real sizes can be built on the ``meta`` device.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

from library.errors import UserError

MMDIT_PREFIX = "model.diffusion_model."
MMDIT_CONFIG_METADATA_KEY = "sd3_trainer.mmdit_config"
HEAD_DIM = 64
_MMDIT_TOP_LEVEL = frozenset(
    ("pos_embed", "x_embedder", "t_embedder", "y_embedder", "context_embedder", "joint_blocks", "final_layer")
)

VARIANTS = ("sd3-medium", "sd35-medium", "sd35-large")
MODELSPEC_ARCHITECTURE = {
    "sd3-medium": "stable-diffusion-3-medium",
    "sd35-medium": "stable-diffusion-3-5-medium",
    "sd35-large": "stable-diffusion-3-5-large",
}


@dataclass(frozen=True)
class MMDiTConfig:
    """Hyper-parameters of one MMDiT. ``num_heads`` is hidden/64 for real models."""

    depth: int
    hidden_size: int
    num_heads: int
    pos_embed_max_size: int
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    context_dim: int = 4096
    pooled_dim: int = 2048
    mlp_hidden: int = 0  # 0 means 4 * hidden_size
    qk_norm: bool = False
    dual_attention_layers: tuple[int, ...] = field(default_factory=tuple)
    # Patches per side of the model's base resolution (1024 px -> 64): scales the sincos grid.
    pos_embed_base_size: int = 64

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        object.__setattr__(self, "dual_attention_layers", tuple(sorted(self.dual_attention_layers)))
        object.__setattr__(self, "mlp_hidden", self.mlp_hidden or 4 * self.hidden_size)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def variant(self) -> str:
        """The released model family this architecture belongs to."""
        if self.dual_attention_layers:
            return "sd35-medium"
        return "sd35-large" if self.qk_norm else "sd3-medium"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "MMDiTConfig":
        data = json.loads(text)
        data["dual_attention_layers"] = tuple(data.get("dual_attention_layers", ()))
        return cls(**data)


def _foreign_model_hint(keys: Sequence[str]) -> str | None:
    """Name the model family of a state dict that is not an SD3 MMDiT, if recognisable."""
    joined = "\n".join(keys[:4000])
    probes = (
        ("input_blocks.", "an SDXL/SD1.x UNet"),
        ("double_blocks.", "a FLUX transformer"),
        ("single_transformer_blocks.", "a diffusers FLUX transformer"),
        ("transformer_blocks.0.attn.to_q", "a diffusers-format SD3 transformer (use the single-file .safetensors)"),
        ("text_model.encoder.", "a CLIP text encoder"),
        ("encoder.block.0.layer", "a T5 text encoder"),
        ("encoder.down.0.", "a VAE"),
    )
    for needle, name in probes:
        if needle in joined:
            return name
    return None


def split_mmdit_keys(keys: Sequence[str]) -> tuple[str, list[str]]:
    """Return (prefix, keys without prefix) of the MMDiT tensors in a checkpoint's key list."""
    prefixed = [k[len(MMDIT_PREFIX):] for k in keys if k.startswith(MMDIT_PREFIX)]
    if prefixed:
        return MMDIT_PREFIX, prefixed
    return "", [k for k in keys if k.split(".", 1)[0] in _MMDIT_TOP_LEVEL]


def check_mmdit_keys(keys: Sequence[str], source: str, all_keys: Sequence[str] | None = None) -> None:
    """Raise a one-line UserError unless ``keys`` (prefix stripped) look like an SD3 MMDiT.

    ``all_keys`` (the file's full key list) lets the message name what the file is instead.
    """
    keyset = set(keys)
    if "x_embedder.proj.weight" not in keyset or not any(k.startswith("joint_blocks.") for k in keyset):
        hint = _foreign_model_hint(list(all_keys or keys)) or "no model.diffusion_model.joint_blocks.* tensors"
        raise UserError(f"{source} is not an SD3/SD3.5 checkpoint: found {hint}; pass an SD3 or SD3.5 .safetensors file")
    if "pos_embed" not in keyset:
        raise UserError(
            f"{source} has no pos_embed tensor (saved by a tool that drops buffers?); "
            "re-save it with pos_embed or use the original checkpoint"
        )


def _block_indices(shapes: Mapping[str, Sequence[int]], suffix: str) -> list[int]:
    return sorted({int(k.split(".")[1]) for k in shapes if k.startswith("joint_blocks.") and k.endswith(suffix)})


def _infer_heads(shapes: Mapping[str, Sequence[int]], hidden: int) -> int:
    """Heads from the per-head qk-norm width when present, else the real rule head_dim = 64."""
    ln_q = shapes.get("joint_blocks.0.x_block.attn.ln_q.weight")
    return hidden // ln_q[0] if ln_q else max(1, hidden // HEAD_DIM)


def infer_mmdit_config(
    shapes: Mapping[str, Sequence[int]],
    metadata_json: str | None = None,
    source: str = "state dict",
    overrides: Mapping[str, Any] | None = None,
    all_keys: Sequence[str] | None = None,
) -> MMDiTConfig:
    """Infer the MMDiT config from prefix-free ``{key: shape}`` (see DESIGN §3).

    ``metadata_json`` (our own ``sd3_trainer.mmdit_config``) supplies what shapes cannot tell,
    i.e. the head count of miniature models; ``overrides`` win over both.
    """
    check_mmdit_keys(list(shapes), source, all_keys)
    hidden, in_ch, patch, _ = shapes["x_embedder.proj.weight"]
    depth = len(_block_indices(shapes, ".x_block.attn.qkv.weight"))
    rows = shapes["pos_embed"][1]
    grid = math.isqrt(rows)
    if grid * grid != rows:
        raise UserError(f"{source}: pos_embed has {rows} rows, not a square grid; the file is not an SD3 MMDiT")
    stored = json.loads(metadata_json) if metadata_json else {}
    values: dict[str, Any] = dict(
        depth=depth,
        hidden_size=hidden,
        num_heads=stored.get("num_heads", _infer_heads(shapes, hidden)),
        pos_embed_max_size=grid,
        patch_size=patch,
        in_channels=in_ch,
        out_channels=shapes["final_layer.linear.weight"][0] // (patch * patch),
        context_dim=shapes["context_embedder.weight"][1],
        pooled_dim=shapes["y_embedder.mlp.0.weight"][1],
        mlp_hidden=shapes["joint_blocks.0.x_block.mlp.fc1.weight"][0],
        qk_norm="joint_blocks.0.x_block.attn.ln_q.weight" in shapes,
        dual_attention_layers=tuple(_block_indices(shapes, ".x_block.attn2.qkv.weight")),
        pos_embed_base_size=stored.get("pos_embed_base_size", 64),
    )
    values.update(overrides or {})
    return MMDiTConfig(**values)


def real_config(variant: str) -> MMDiTConfig:
    """The released architecture of ``variant`` (one of VARIANTS)."""
    table = {
        "sd3-medium": dict(depth=24, pos_embed_max_size=192),
        "sd35-medium": dict(depth=24, pos_embed_max_size=384, qk_norm=True, dual_attention_layers=tuple(range(13))),
        "sd35-large": dict(depth=38, pos_embed_max_size=192, qk_norm=True),
    }
    if variant not in table:
        raise UserError(f"unknown model variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    spec = table[variant]
    hidden = HEAD_DIM * spec["depth"]
    return MMDiTConfig(hidden_size=hidden, num_heads=spec["depth"], **spec)


def _linear(shapes: dict, name: str, out_f: int, in_f: int) -> None:
    shapes[f"{name}.weight"] = (out_f, in_f)
    shapes[f"{name}.bias"] = (out_f,)


def _stream_shapes(shapes: dict, prefix: str, cfg: MMDiTConfig, pre_only: bool, dual: bool) -> None:
    d = cfg.hidden_size
    _linear(shapes, f"{prefix}.attn.qkv", 3 * d, d)
    attns = ["attn", "attn2"] if dual else ["attn"]
    for attn in attns:
        if attn == "attn2":
            _linear(shapes, f"{prefix}.attn2.qkv", 3 * d, d)
        if cfg.qk_norm:
            shapes[f"{prefix}.{attn}.ln_q.weight"] = (cfg.head_dim,)
            shapes[f"{prefix}.{attn}.ln_k.weight"] = (cfg.head_dim,)
        if not pre_only:
            _linear(shapes, f"{prefix}.{attn}.proj", d, d)
    if not pre_only:
        _linear(shapes, f"{prefix}.mlp.fc1", cfg.mlp_hidden, d)
        _linear(shapes, f"{prefix}.mlp.fc2", d, cfg.mlp_hidden)
    chunks = 2 if pre_only else (9 if dual else 6)
    _linear(shapes, f"{prefix}.adaLN_modulation.1", chunks * d, d)


def mmdit_shapes(cfg: MMDiTConfig) -> dict[str, tuple[int, ...]]:
    """The prefix-free ``{key: shape}`` description of an MMDiT checkpoint with config ``cfg``."""
    d, p = cfg.hidden_size, cfg.patch_size
    shapes: dict[str, tuple[int, ...]] = {
        "pos_embed": (1, cfg.pos_embed_max_size**2, d),
        "x_embedder.proj.weight": (d, cfg.in_channels, p, p),
        "x_embedder.proj.bias": (d,),
    }
    _linear(shapes, "t_embedder.mlp.0", d, 256)
    _linear(shapes, "t_embedder.mlp.2", d, d)
    _linear(shapes, "y_embedder.mlp.0", d, cfg.pooled_dim)
    _linear(shapes, "y_embedder.mlp.2", d, d)
    _linear(shapes, "context_embedder", d, cfg.context_dim)
    for i in range(cfg.depth):
        last = i == cfg.depth - 1
        _stream_shapes(shapes, f"joint_blocks.{i}.context_block", cfg, pre_only=last, dual=False)
        _stream_shapes(shapes, f"joint_blocks.{i}.x_block", cfg, pre_only=False, dual=i in cfg.dual_attention_layers)
    _linear(shapes, "final_layer.linear", p * p * cfg.out_channels, d)
    _linear(shapes, "final_layer.adaLN_modulation.1", 2 * d, d)
    return shapes


def to_diffusers_config(cfg: MMDiTConfig) -> dict[str, Any]:
    """The ``SD3Transformer2DModel`` config of the same network (for tests, tools and exports)."""
    return {
        "_class_name": "SD3Transformer2DModel",
        "sample_size": cfg.pos_embed_base_size * cfg.patch_size,
        "patch_size": cfg.patch_size,
        "in_channels": cfg.in_channels,
        "num_layers": cfg.depth,
        "attention_head_dim": cfg.head_dim,
        "num_attention_heads": cfg.num_heads,
        "joint_attention_dim": cfg.context_dim,
        "caption_projection_dim": cfg.hidden_size,
        "pooled_projection_dim": cfg.pooled_dim,
        "out_channels": cfg.out_channels,
        "pos_embed_max_size": cfg.pos_embed_max_size,
        "dual_attention_layers": list(cfg.dual_attention_layers),
        "qk_norm": "rms_norm" if cfg.qk_norm else None,
    }
