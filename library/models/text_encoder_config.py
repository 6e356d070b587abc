"""Text encoder configs and file recognition: shape inference, metadata JSON, key clean-up.

Used by :mod:`library.models.text_encoders`. Config inference follows the real models' rules
(CLIP heads = width / 64, CLIP-L quick_gelu, CLIP-G gelu; T5 heads from the relative attention
bias, gated-gelu when ``wi_0`` exists); a JSON config stored in the file metadata
(``sd3_trainer.clip_l_config`` / ``sd3_trainer.clip_g_config`` / ``sd3_trainer.t5xxl_config``)
overrides it, which tiny test models need.
"""

from __future__ import annotations

import json
import re
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch

from library.errors import UserError

CLIP_SIGNATURE = "text_model.embeddings.token_embedding.weight"
T5_SIGNATURE = "encoder.block.0.layer.0.SelfAttention.q.weight"
CLIP_ACTIVATION = MappingProxyType({"l": "quick_gelu", "g": "gelu"})
CLIP_REAL_WIDTH = MappingProxyType({"l": 768, "g": 1280})
CLIP_LABEL = MappingProxyType({"l": "CLIP-L", "g": "CLIP-G"})
_CLIP_ARCH_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
    "num_attention_heads", "max_position_embeddings", "hidden_act", "layer_norm_eps",
    "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id",
)  # fmt: skip
_T5_ARCH_KEYS = (
    "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets",
    "relative_attention_max_distance", "dropout_rate", "layer_norm_epsilon", "feed_forward_proj",
    "pad_token_id", "eos_token_id", "decoder_start_token_id",
)  # fmt: skip
_ARCH_KEYS_BY_TYPE = MappingProxyType({"clip_text_model": _CLIP_ARCH_KEYS, "t5": _T5_ARCH_KEYS})
IGNORED_KEYS = frozenset({"text_model.embeddings.position_ids", "logit_scale", "scaled_fp8"})
IGNORED_PREFIXES = ("decoder.", "lm_head.")  # a full T5 file: only the encoder is used


def keys_preview(keys: list[str], n: int = 3) -> str:
    """The first ``n`` keys and how many more, for one-line error messages."""
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _count_indexed(sd: Mapping[str, Any], pattern: str) -> int:
    indices = {int(m.group(1)) for k in sd if (m := re.match(pattern, k))}
    return max(indices) + 1 if indices else 0


def infer_clip_config(sd: Mapping[str, torch.Tensor], which: str) -> dict[str, Any]:
    """CLIPTextConfig fields from shapes (real rules: head width 64; activation by ``which``)."""
    label = CLIP_LABEL[which]
    vocab, hidden = sd[CLIP_SIGNATURE].shape
    if hidden % 64:
        raise UserError(
            f"{label} width {hidden} is not a multiple of 64, so its heads cannot be inferred; "
            f"store its config in the file metadata as sd3_trainer.clip_{which}_config"
        )
    proj = sd.get("text_projection.weight")
    return {
        "vocab_size": int(vocab),
        "hidden_size": int(hidden),
        "intermediate_size": int(sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
        "projection_dim": int(proj.shape[0]) if proj is not None else int(hidden),
        "num_hidden_layers": _count_indexed(sd, r"text_model\.encoder\.layers\.(\d+)\."),
        "num_attention_heads": int(hidden) // 64,
        "max_position_embeddings": int(sd["text_model.embeddings.position_embedding.weight"].shape[0]),
        "hidden_act": CLIP_ACTIVATION[which],
        "layer_norm_eps": 1e-5,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
    }


def infer_t5_config(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """T5Config fields from shapes (heads from the relative attention bias; gated-gelu if wi_0)."""
    vocab, d_model = sd["shared.weight"].shape
    buckets, heads = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in sd
    wi = sd["encoder.block.0.layer.1.DenseReluDense." + ("wi_0.weight" if gated else "wi.weight")]
    return {
        "vocab_size": int(vocab),
        "d_model": int(d_model),
        "d_kv": int(sd[T5_SIGNATURE].shape[0]) // int(heads),
        "d_ff": int(wi.shape[0]),
        "num_layers": _count_indexed(sd, r"encoder\.block\.(\d+)\."),
        "num_heads": int(heads),
        "relative_attention_num_buckets": int(buckets),
        "relative_attention_max_distance": 128,
        "feed_forward_proj": "gated-gelu" if gated else "relu",
        "layer_norm_epsilon": 1e-6,
        "dropout_rate": 0.1,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
    }


def config_to_json(config: Any) -> str:
    """The architecture fields of a CLIP text / T5 config as JSON, for the metadata keys."""
    keys = _ARCH_KEYS_BY_TYPE[config.model_type]
    return json.dumps({k: getattr(config, k) for k in keys if hasattr(config, k)}, sort_keys=True)


def parse_config_json(text: str | Mapping[str, Any], config_cls: type, label: str, source: str) -> dict:
    try:
        raw = json.loads(text) if isinstance(text, str) else dict(text)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{label} config in the metadata of {source} is not valid JSON ({exc}); re-save the file"
        ) from None
    if not isinstance(raw, dict):
        raise UserError(f"{label} config in the metadata of {source} is not a JSON object; re-save the file")
    known = set(config_cls().to_dict())
    return {k: v for k, v in raw.items() if k in known and k not in ("dtype", "torch_dtype", "transformers_version")}


def clean_state_dict(sd: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Drop harmless extras and dequantise ComfyUI scaled fp8 (weight * scale_weight)."""
    out = {
        k: v
        for k, v in sd.items()
        if k not in IGNORED_KEYS and not k.endswith(".scale_input") and not k.startswith(IGNORED_PREFIXES)
    }
    for key in [k for k in out if k.endswith(".scale_weight")]:
        scale = out.pop(key)
        weight_key = key[: -len("scale_weight")] + "weight"
        if weight_key in out:
            out[weight_key] = out[weight_key].to(dtype) * scale.to(dtype)
    return out


_FOREIGN_SIGNS = (
    ("text_encoders.", "an SD3 checkpoint without these text encoder weights"),
    ("conditioner.embedders.", "an SDXL checkpoint"),
    ("cond_stage_model.", "an SD1/SD2 checkpoint"),
    ("model.diffusion_model.double_blocks.", "a FLUX checkpoint"),
    ("double_blocks.", "a FLUX model"),
    ("model.diffusion_model.input_blocks.", "an SD1/SD2/SDXL checkpoint"),
    ("model.diffusion_model.joint_blocks.", "an SD3 checkpoint without these text encoder weights"),
    ("joint_blocks.", "an SD3 MMDiT file"),
    ("lora_", "a LoRA"),
    ("lycoris_", "a LyCORIS network"),
    ("transformer.resblocks.", "an open_clip-format CLIP (convert it to Hugging Face key names)"),
    ("encoder.block.", "a T5 text encoder"),
    ("text_model.", "a CLIP text encoder"),
    ("encoder.down.", "a VAE"),
    ("first_stage_model.", "a VAE"),
)


def describe_foreign_file(keys: list[str]) -> str | None:
    """What a file whose keys are ``keys`` looks like (``None`` if unknown)."""
    for sign, what in _FOREIGN_SIGNS:
        if any(k.startswith(sign) or f".{sign}" in k for k in keys):
            return what
    return None


def infer_or_fail(
    infer: Callable[..., dict], sd: Mapping[str, torch.Tensor], label: str, source: str, *args: Any
) -> dict:
    """``infer(sd, *args)``, with a missing key reported as a one-line :class:`UserError`."""
    try:
        return infer(sd, *args)
    except KeyError as exc:
        msg = f"{label} weights in {source} are incomplete (missing {exc.args[0]}); pass a complete file"
        raise UserError(msg) from None
