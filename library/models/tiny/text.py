"""Miniature CLIP-L, CLIP-G and T5 text encoders with every parameter random (same seed, same tensors).

Widths pair with the tiny MMDiT (:mod:`library.models.tiny.mmdit`): T5 ``d_model`` = context width
48, pooled width = CLIP-L 16 (identity projection, as SD3 uses it) + CLIP-G projection 24 = 40,
and CLIP-L 16 + CLIP-G 28 = 44 < 48, so the CLIP part of the context is really zero-padded. The
miniatures break the real rules on purpose (head width not 64, CLIP-G projection narrower than its
width, T5 inner width ``heads * d_kv`` = 32 != ``d_model``), so their configs travel as JSON in the
``sd3_trainer.*_config`` metadata keys. CLIP keeps the real 49,408-token vocabulary (the real BPE
tokenizer works with it); the T5 vocabulary covers the tiny sentencepiece tokenizer.

Scale (DESIGN §6): matrices ~ N(0, 1/fan_in), norm weights ~ 1 + N(0, 0.1²), biases ~ N(0, 0.05²),
token/position embeddings and T5's relative attention bias ~ N(0, 1).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from library.models.safetensors_io import save_safetensors
from library.models.text_encoders import CHECKPOINT_PREFIXES, METADATA_KEYS

TINY_CONTEXT_DIM = 48
TINY_POOLED_DIM = 40
TINY_T5_VOCAB = 640  # >= tiny.tokenizers.TINY_T5_TOKENIZER_MAX (a test checks it)
_CLIP_COMMON = MappingProxyType(
    {
        "vocab_size": 49408,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
    }
)
TINY_CONFIGS = MappingProxyType(
    {
        "clip_l": MappingProxyType({
            **_CLIP_COMMON,
            "hidden_size": 16,
            "intermediate_size": 32,
            "projection_dim": 16,
            "hidden_act": "quick_gelu",
        }),
        "clip_g": MappingProxyType({
            **_CLIP_COMMON,
            "hidden_size": 28,
            "intermediate_size": 56,
            "projection_dim": 24,
            "hidden_act": "gelu",
        }),
        "t5xxl": MappingProxyType({
            "vocab_size": TINY_T5_VOCAB,
            "d_model": TINY_CONTEXT_DIM,
            "d_kv": 16,
            "d_ff": 64,
            "num_layers": 2,
            "num_heads": 2,
            "relative_attention_num_buckets": 32,
            "relative_attention_max_distance": 128,
            "dropout_rate": 0.1,
            "layer_norm_epsilon": 1e-6,
            "feed_forward_proj": "gated-gelu",
            "pad_token_id": 0,
            "eos_token_id": 1,
            "decoder_start_token_id": 0,
        }),
    }
)
_NOT_STORED = MappingProxyType({"clip_l": ("text_projection.weight",), "t5xxl": ("encoder.embed_tokens.weight",)})
_SEED_OFFSET = MappingProxyType({"clip_l": 0, "clip_g": 1, "t5xxl": 2})
_NORM_STD = 0.1
_BIAS_STD = 0.05


def _meta_model(name: str) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    builders = {
        "clip_l": (CLIPTextModelWithProjection, CLIPTextConfig),
        "clip_g": (CLIPTextModelWithProjection, CLIPTextConfig),
        "t5xxl": (T5EncoderModel, T5Config),
    }
    model_cls, config_cls = builders[name]
    with torch.device("meta"):
        return model_cls(config_cls(**TINY_CONFIGS[name]))


def tiny_text_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of the stored tensors of tiny encoder ``name`` (Hugging Face key names)."""
    skip = _NOT_STORED.get(name, ())
    return {k: tuple(v.shape) for k, v in _meta_model(name).state_dict().items() if k not in skip}


def _random_tensor(key: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    noise = torch.randn(shape, generator=gen)
    if key.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
        return 1.0 + _NORM_STD * noise
    if key.endswith(".bias"):
        return _BIAS_STD * noise
    if key.endswith(("embedding.weight", "shared.weight", "relative_attention_bias.weight")):
        return noise
    return noise / math.sqrt(math.prod(shape[1:]))


def tiny_text_config_json(name: str) -> str:
    """The metadata JSON config of tiny encoder ``name`` (``clip_l``, ``clip_g`` or ``t5xxl``)."""
    return json.dumps(dict(TINY_CONFIGS[name]), sort_keys=True)


def tiny_text_encoder_state_dicts(seed: int = 0) -> dict[str, tuple[dict[str, torch.Tensor], str]]:
    """``{name: (state_dict in HF key names, config JSON)}`` for ``clip_l``, ``clip_g``, ``t5xxl``."""
    out = {}
    for name in TINY_CONFIGS:
        gen = torch.Generator().manual_seed(seed * 1000 + _SEED_OFFSET[name])
        sd = {key: _random_tensor(key, shape, gen) for key, shape in sorted(tiny_text_shapes(name).items())}
        out[name] = (sd, tiny_text_config_json(name))
    return out


def _cast(sd: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) for k, v in sd.items()} if dtype is not None else dict(sd)


def tiny_text_encoder_checkpoint(
    seed: int = 0, dtype: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors under the all-in-one prefixes plus their metadata, to merge into a tiny checkpoint."""
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    for name, (sd, config_json) in tiny_text_encoder_state_dicts(seed).items():
        tensors.update({CHECKPOINT_PREFIXES[name] + k: v for k, v in _cast(sd, dtype).items()})
        metadata[METADATA_KEYS[name]] = config_json
    return tensors, metadata


def write_tiny_text_encoder_files(
    out_dir: str | Path, seed: int = 0, dtype: torch.dtype | None = None
) -> dict[str, Path]:
    """Write ``clip_l``/``clip_g``/``t5xxl.safetensors`` (HF names) and ``text_encoders.safetensors``
    (all-in-one prefixes); return ``{"clip_l", "clip_g", "t5xxl", "all_in_one": path}``."""
    out = Path(out_dir)
    paths: dict[str, Path] = {}
    for name, (sd, config_json) in tiny_text_encoder_state_dicts(seed).items():
        paths[name] = out / f"{name}.safetensors"
        save_safetensors(_cast(sd, dtype), paths[name], {METADATA_KEYS[name]: config_json})
    tensors, metadata = tiny_text_encoder_checkpoint(seed, dtype)
    paths["all_in_one"] = out / "text_encoders.safetensors"
    save_safetensors(tensors, paths["all_in_one"], metadata)
    return paths
