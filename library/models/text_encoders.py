"""CLIP-L, CLIP-G and T5-XXL text encoders built from state dicts (transformers modules).

Sources: the all-in-one SAI checkpoint (``text_encoders.clip_l.transformer.*``,
``text_encoders.clip_g.transformer.*``, ``text_encoders.t5xxl.transformer.*``, Hugging Face key
names below the prefix) or separate files with Hugging Face key names (ComfyUI's ``clip_l``,
``clip_g``, ``t5xxl_fp16`` files; an extra leading ``transformer.`` is tolerated). A separate file
wins over the all-in-one checkpoint; an encoder found nowhere is ``None`` (zeros downstream).

Config: inferred from tensor shapes with the real rules (CLIP heads = width / 64, CLIP-L
quick_gelu, CLIP-G gelu; T5 heads from the relative attention bias, gated-gelu), unless the file's
metadata has a JSON config under ``sd3_trainer.clip_l_config`` / ``sd3_trainer.clip_g_config`` /
``sd3_trainer.t5xxl_config`` (a transformers config dict, or a subset of it): that wins. Tiny test
models need it (head width not 64, activation not inferable).

CLIP-L's pooled output is used un-projected, as in SAI's reference code, ComfyUI and diffusers'
single-file loader: its ``text_projection`` is always the identity (a stored one is ignored).

Dtypes: weights stored as fp32/fp16/bf16/float8_e4m3fn (also ComfyUI's "scaled fp8", where each
``X.scale_weight`` multiplies ``X.weight``) are converted to the compute dtype while loading, so
an fp8 T5-XXL takes 2 bytes per weight in bf16. Keeping fp8 storage (cast on forward) is a
separate runtime feature that can attach to these modules from outside.

Every module is returned in ``eval()`` with ``requires_grad`` off; training code turns on what it
trains. transformers is imported lazily.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch

from library.errors import UserError
from library.models.safetensors_io import load_safetensors, read_metadata, read_shapes

logger = logging.getLogger(__name__)

CLIP_SIGNATURE = "text_model.embeddings.token_embedding.weight"
T5_SIGNATURE = "encoder.block.0.layer.0.SelfAttention.q.weight"
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CLIP_ACTIVATION = MappingProxyType({"l": "quick_gelu", "g": "gelu"})
_CLIP_REAL_WIDTH = MappingProxyType({"l": 768, "g": 1280})
_CLIP_LABEL = MappingProxyType({"l": "CLIP-L", "g": "CLIP-G"})
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
_IGNORED_KEYS = frozenset({"text_model.embeddings.position_ids", "logit_scale", "scaled_fp8"})
_IGNORED_PREFIXES = ("decoder.", "lm_head.")  # a full T5 file: only the encoder is used


@dataclass
class TextEncoders:
    """The SD3 text encoders; a missing one is ``None`` and contributes zeros."""

    clip_l: Any | None = None
    clip_g: Any | None = None
    t5xxl: Any | None = None

    def present(self) -> dict[str, Any]:
        """``{name: module}`` for the encoders that are loaded."""
        return {k: v for k, v in vars(self).items() if v is not None}


def _keys_preview(keys: list[str], n: int = 3) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _count_indexed(sd: Mapping[str, Any], pattern: str) -> int:
    indices = {int(m.group(1)) for k in sd if (m := re.match(pattern, k))}
    return max(indices) + 1 if indices else 0


def _check_compute_dtype(dtype: torch.dtype) -> None:
    if dtype not in COMPUTE_DTYPES:
        raise UserError(f"text encoder compute dtype must be float32, bfloat16 or float16, got {dtype}")


def infer_clip_config(sd: Mapping[str, torch.Tensor], which: str) -> dict[str, Any]:
    """CLIPTextConfig fields from shapes (real rules: head width 64; activation by ``which``)."""
    label = _CLIP_LABEL[which]
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
        "hidden_act": _CLIP_ACTIVATION[which],
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


def _parse_config_json(text: str | Mapping[str, Any], config_cls: type, label: str, source: str) -> dict:
    try:
        raw = json.loads(text) if isinstance(text, str) else dict(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{label} config in the metadata of {source} is not valid JSON ({exc}); re-save the file") from None
    if not isinstance(raw, dict):
        raise UserError(f"{label} config in the metadata of {source} is not a JSON object; re-save the file")
    known = set(config_cls().to_dict())
    return {k: v for k, v in raw.items() if k in known and k not in ("dtype", "torch_dtype", "transformers_version")}


def _clean_state_dict(sd: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Drop harmless extras and dequantise ComfyUI scaled fp8 (weight * scale_weight)."""
    out = {
        k: v
        for k, v in sd.items()
        if k not in _IGNORED_KEYS and not k.endswith(".scale_input") and not k.startswith(_IGNORED_PREFIXES)
    }
    for key in [k for k in out if k.endswith(".scale_weight")]:
        scale = out.pop(key)
        weight_key = key[: -len("scale_weight")] + "weight"
        if weight_key in out:
            out[weight_key] = out[weight_key].to(dtype) * scale.to(dtype)
    return out


def _require_signature(sd: Mapping[str, Any], signature: str, label: str, source: str) -> None:
    if signature not in sd:
        raise UserError(
            f"{source} has no {label} weights ({signature} missing; first keys: {_keys_preview(sorted(sd))}); "
            f"pass a {label} file with Hugging Face key names"
        )


def _instantiate(model_cls: Any, config: Any, dtype: torch.dtype) -> Any:
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights

    with no_init_weights():
        return model_cls._from_config(config, dtype=dtype)


def _load_strict(model: Any, sd: Mapping[str, torch.Tensor], label: str, source: str) -> Any:
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        parts = [f"missing {_keys_preview(missing)}" if missing else "", f"unexpected {_keys_preview(unexpected)}" if unexpected else ""]
        raise UserError(
            f"{label} weights in {source} do not match the model ({'; '.join(p for p in parts if p)}); "
            f"pass a complete {label} file"
        )
    bad = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if sd[k].shape != v.shape]
    if bad:
        raise UserError(
            f"{label} weights in {source} have other shapes than its config ({_keys_preview(bad, 2)}); "
            f"fix or remove the config in its metadata"
        )
    model.load_state_dict(sd, strict=True)
    model.eval()
    model.requires_grad_(False)
    return model


def _check_clip_width(cfg: Mapping[str, Any], which: str, source: str) -> None:
    other = "g" if which == "l" else "l"
    if cfg["hidden_size"] == _CLIP_REAL_WIDTH[other]:
        raise UserError(
            f"{source} looks like {_CLIP_LABEL[other]} ({cfg['hidden_size']} wide), not {_CLIP_LABEL[which]}; "
            f"did you swap --clip_l and --clip_g?"
        )


def clip_from_state_dict(
    sd: Mapping[str, torch.Tensor],
    config_json: str | Mapping[str, Any] | None = None,
    which: str = "l",
    *,
    dtype: torch.dtype = torch.float32,
    source: str = "state dict",
) -> Any:
    """Build a ``CLIPTextModelWithProjection`` (CLIP-L: ``which="l"``, CLIP-G: ``"g"``)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    if which not in _CLIP_LABEL:
        raise ValueError(f"which must be 'l' or 'g', got {which!r}")
    _check_compute_dtype(dtype)
    label = _CLIP_LABEL[which]
    sd = _clean_state_dict(sd, dtype)
    _require_signature(sd, CLIP_SIGNATURE, label, source)
    if config_json is None:
        cfg = infer_clip_config(sd, which)
        _check_clip_width(cfg, which, source)
    else:
        cfg = _parse_config_json(config_json, CLIPTextConfig, label, source)
    if which == "l":
        hidden = int(sd[CLIP_SIGNATURE].shape[1])
        if "text_projection.weight" in sd:
            logger.info("CLIP-L in %s: stored text_projection ignored (SD3 uses the un-projected pooled output)", source)
        sd["text_projection.weight"] = torch.eye(hidden, dtype=dtype)
        cfg["projection_dim"] = hidden
    model = _instantiate(CLIPTextModelWithProjection, CLIPTextConfig(**cfg), dtype)
    return _load_strict(model, sd, label, source)


def t5_from_state_dict(
    sd: Mapping[str, torch.Tensor],
    config_json: str | Mapping[str, Any] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    source: str = "state dict",
) -> Any:
    """Build a ``T5EncoderModel`` (``encoder.embed_tokens`` is tied to ``shared``)."""
    from transformers import T5Config, T5EncoderModel

    _check_compute_dtype(dtype)
    if dtype == torch.float16:
        logger.warning("T5 in float16 can overflow; bfloat16 or float32 is safer")
    sd = _clean_state_dict(sd, dtype)
    if "shared.weight" not in sd and "encoder.embed_tokens.weight" in sd:
        sd["shared.weight"] = sd["encoder.embed_tokens.weight"]
    _require_signature(sd, T5_SIGNATURE, "T5-XXL", source)
    _require_signature(sd, "shared.weight", "T5-XXL", source)
    sd.setdefault("encoder.embed_tokens.weight", sd["shared.weight"])
    if config_json is None:
        cfg = infer_t5_config(sd)
    else:
        cfg = _parse_config_json(config_json, T5Config, "T5-XXL", source)
    model = _instantiate(T5EncoderModel, T5Config(**cfg), dtype)
    return _load_strict(model, sd, "T5-XXL", source)


@dataclass(frozen=True)
class _EncoderSpec:
    label: str
    flag: str
    prefix: str
    metadata_key: str
    signature: str
    build: Callable[..., Any]
    not_saved: tuple[str, ...]


_SPECS = MappingProxyType(
    {
        "clip_l": _EncoderSpec(
            "CLIP-L", "--clip_l", "text_encoders.clip_l.transformer.", "sd3_trainer.clip_l_config",
            CLIP_SIGNATURE, lambda sd, cfg, **kw: clip_from_state_dict(sd, cfg, "l", **kw), ("text_projection.weight",),
        ),
        "clip_g": _EncoderSpec(
            "CLIP-G", "--clip_g", "text_encoders.clip_g.transformer.", "sd3_trainer.clip_g_config",
            CLIP_SIGNATURE, lambda sd, cfg, **kw: clip_from_state_dict(sd, cfg, "g", **kw), (),
        ),
        "t5xxl": _EncoderSpec(
            "T5-XXL", "--t5xxl", "text_encoders.t5xxl.transformer.", "sd3_trainer.t5xxl_config",
            T5_SIGNATURE, t5_from_state_dict, ("encoder.embed_tokens.weight",),
        ),
    }
)  # fmt: skip
METADATA_KEYS = MappingProxyType({name: spec.metadata_key for name, spec in _SPECS.items()})
CHECKPOINT_PREFIXES = MappingProxyType({name: spec.prefix for name, spec in _SPECS.items()})

_FOREIGN_SIGNS = (
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


def _separate_source(spec: _EncoderSpec, path: str | Path) -> tuple[Path, str]:
    path = Path(path)
    shapes = read_shapes(path, what=f"{spec.flag} file")
    for prefix in (spec.prefix, "transformer.", ""):
        if prefix + spec.signature in shapes:
            return path, prefix
    what = describe_foreign_file(sorted(shapes)) or f"unknown (first keys: {_keys_preview(sorted(shapes))})"
    raise UserError(f"{spec.flag} file {path} is not a {spec.label} text encoder (it looks like {what}); pass a {spec.label} file")


def _checkpoint_source(spec: _EncoderSpec, ckpt: Path, keys: list[str]) -> tuple[Path, str] | None:
    if any(k.startswith(spec.prefix) for k in keys):
        return ckpt, spec.prefix
    what = describe_foreign_file(keys)
    if what is not None and not what.startswith("an SD3"):
        raise UserError(f"checkpoint {ckpt} is {what}, not an SD3 checkpoint; pass an SD3/SD3.5 .safetensors file")
    logger.warning("no %s in %s and no %s file given: %s contributes zeros", spec.label, ckpt, spec.flag, spec.label)
    return None


def _load_encoder(spec: _EncoderSpec, path: Path, prefix: str, dtype: torch.dtype, mmap: bool) -> Any:
    sd = load_safetensors(path, mmap=mmap, prefix=prefix or None, what=f"{spec.label} file")
    config_json = read_metadata(path).get(spec.metadata_key)
    model = spec.build(sd, config_json, dtype=dtype, source=str(path))
    logger.info("%s loaded from %s (%s, %s)", spec.label, path, "metadata config" if config_json else "inferred config", dtype)
    return model


def load_text_encoders(
    ckpt_path: str | Path | None = None,
    clip_l_path: str | Path | None = None,
    clip_g_path: str | Path | None = None,
    t5xxl_path: str | Path | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    t5_dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    mmap: bool = True,
    load_t5: bool = True,
) -> TextEncoders:
    """Load the encoders: a separate file wins over the all-in-one ``ckpt_path``; others are None."""
    separate = {"clip_l": clip_l_path, "clip_g": clip_g_path, "t5xxl": t5xxl_path}
    dtypes = {"clip_l": dtype, "clip_g": dtype, "t5xxl": t5_dtype or dtype}
    ckpt = Path(ckpt_path) if ckpt_path is not None else None
    ckpt_keys = sorted(read_shapes(ckpt, what="checkpoint")) if ckpt is not None else []
    loaded: dict[str, Any] = {}
    for name, spec in _SPECS.items():
        if name == "t5xxl" and not load_t5:
            continue
        if separate[name] is not None:
            source = _separate_source(spec, separate[name])
        elif ckpt is not None:
            source = _checkpoint_source(spec, ckpt, ckpt_keys)
        else:
            source = None
        if source is not None:
            loaded[name] = _load_encoder(spec, *source, dtypes[name], mmap).to(device)
    return TextEncoders(**loaded)


def text_encoder_state_dicts_for_checkpoint(
    encoders: TextEncoders, *, clip: bool = True, t5xxl: bool = True
) -> dict[str, torch.Tensor]:
    """Tensors under the all-in-one prefixes (``--save_clip`` / ``--save_t5xxl``), as stored dtype."""
    wanted = {"clip_l": clip, "clip_g": clip, "t5xxl": t5xxl}
    out: dict[str, torch.Tensor] = {}
    for name, model in encoders.present().items():
        if not wanted[name]:
            continue
        spec = _SPECS[name]
        for key, tensor in model.state_dict().items():
            if key not in spec.not_saved:
                out[spec.prefix + key] = tensor.detach()
    return out


def text_encoder_metadata(encoders: TextEncoders, *, clip: bool = True, t5xxl: bool = True) -> dict[str, str]:
    """The ``sd3_trainer.*_config`` metadata entries for the encoders saved with the checkpoint."""
    wanted = {"clip_l": clip, "clip_g": clip, "t5xxl": t5xxl}
    return {_SPECS[n].metadata_key: config_to_json(m.config) for n, m in encoders.present().items() if wanted[n]}
