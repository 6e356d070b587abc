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

import logging
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch

from library.errors import UserError
from library.models.safetensors_io import load_safetensors, read_metadata, read_shapes
from library.models.text_encoder_config import (
    CLIP_LABEL,
    CLIP_REAL_WIDTH,
    CLIP_SIGNATURE,
    T5_SIGNATURE,
    clean_state_dict,
    config_to_json,
    describe_foreign_file,
    infer_clip_config,
    infer_or_fail,
    infer_t5_config,
    keys_preview,
    parse_config_json,
)

logger = logging.getLogger(__name__)

COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)



@dataclass
class TextEncoders:
    """The SD3 text encoders; a missing one is ``None`` and contributes zeros."""

    clip_l: Any | None = None
    clip_g: Any | None = None
    t5xxl: Any | None = None

    def present(self) -> dict[str, Any]:
        """``{name: module}`` for the encoders that are loaded."""
        return {k: v for k, v in vars(self).items() if v is not None}


def _check_compute_dtype(dtype: torch.dtype) -> None:
    if dtype not in COMPUTE_DTYPES:
        raise UserError(f"text encoder compute dtype must be float32, bfloat16 or float16, got {dtype}")


def _require_signature(sd: Mapping[str, Any], signature: str, label: str, source: str) -> None:
    if signature not in sd:
        raise UserError(
            f"{source} has no {label} weights ({signature} missing; first keys: {keys_preview(sorted(sd))}); "
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
        parts = [f"missing {keys_preview(missing)}"] if missing else []
        parts += [f"unexpected {keys_preview(unexpected)}"] if unexpected else []
        raise UserError(
            f"{label} weights in {source} do not match the model ({'; '.join(parts)}); "
            f"pass a complete {label} file"
        )
    bad = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if sd[k].shape != v.shape]
    if bad:
        raise UserError(
            f"{label} weights in {source} have other shapes than its config ({keys_preview(bad, 2)}); "
            f"fix or remove the config in its metadata"
        )
    model.load_state_dict(sd, strict=True)
    model.eval()
    model.requires_grad_(False)
    return model


def _check_clip_width(cfg: Mapping[str, Any], which: str, source: str) -> None:
    other = "g" if which == "l" else "l"
    if cfg["hidden_size"] == CLIP_REAL_WIDTH[other]:
        raise UserError(
            f"{source} looks like {CLIP_LABEL[other]} ({cfg['hidden_size']} wide), not {CLIP_LABEL[which]}; "
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

    if which not in CLIP_LABEL:
        raise ValueError(f"which must be 'l' or 'g', got {which!r}")
    _check_compute_dtype(dtype)
    label = CLIP_LABEL[which]
    sd = clean_state_dict(sd, dtype)
    _require_signature(sd, CLIP_SIGNATURE, label, source)
    if config_json is None:
        cfg = infer_or_fail(infer_clip_config, sd, label, source, which)
        _check_clip_width(cfg, which, source)
    else:
        cfg = parse_config_json(config_json, CLIPTextConfig, label, source)
    if which == "l":
        hidden = int(sd[CLIP_SIGNATURE].shape[1])
        if "text_projection.weight" in sd:
            logger.info("CLIP-L in %s: stored text_projection ignored (SD3 pools un-projected)", source)
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
    sd = clean_state_dict(sd, dtype)
    if "shared.weight" not in sd and "encoder.embed_tokens.weight" in sd:
        sd["shared.weight"] = sd["encoder.embed_tokens.weight"]
    _require_signature(sd, T5_SIGNATURE, "T5-XXL", source)
    _require_signature(sd, "shared.weight", "T5-XXL", source)
    sd.setdefault("encoder.embed_tokens.weight", sd["shared.weight"])
    if config_json is None:
        cfg = infer_or_fail(infer_t5_config, sd, "T5-XXL", source)
    else:
        cfg = parse_config_json(config_json, T5Config, "T5-XXL", source)
    model = _instantiate(T5EncoderModel, T5Config(**cfg), dtype)
    model.set_input_embeddings(model.shared)  # one table for shared and encoder.embed_tokens
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


def _build_clip_l(sd: Mapping[str, torch.Tensor], cfg: str | None, **kw: Any) -> Any:
    return clip_from_state_dict(sd, cfg, "l", **kw)


def _build_clip_g(sd: Mapping[str, torch.Tensor], cfg: str | None, **kw: Any) -> Any:
    return clip_from_state_dict(sd, cfg, "g", **kw)


_SPECS = MappingProxyType(
    {
        "clip_l": _EncoderSpec(
            label="CLIP-L",
            flag="--clip_l",
            prefix="text_encoders.clip_l.transformer.",
            metadata_key="sd3_trainer.clip_l_config",
            signature=CLIP_SIGNATURE,
            build=_build_clip_l,
            not_saved=("text_projection.weight",),  # always the identity (see the module docstring)
        ),
        "clip_g": _EncoderSpec(
            label="CLIP-G",
            flag="--clip_g",
            prefix="text_encoders.clip_g.transformer.",
            metadata_key="sd3_trainer.clip_g_config",
            signature=CLIP_SIGNATURE,
            build=_build_clip_g,
            not_saved=(),
        ),
        "t5xxl": _EncoderSpec(
            label="T5-XXL",
            flag="--t5xxl",
            prefix="text_encoders.t5xxl.transformer.",
            metadata_key="sd3_trainer.t5xxl_config",
            signature=T5_SIGNATURE,
            build=t5_from_state_dict,
            not_saved=("encoder.embed_tokens.weight",),  # tied to shared.weight
        ),
    }
)
METADATA_KEYS = MappingProxyType({name: spec.metadata_key for name, spec in _SPECS.items()})
CHECKPOINT_PREFIXES = MappingProxyType({name: spec.prefix for name, spec in _SPECS.items()})


def _separate_source(spec: _EncoderSpec, path: str | Path) -> tuple[Path, str]:
    path = Path(path)
    shapes = read_shapes(path, what=f"{spec.flag} file")
    for prefix in (spec.prefix, "transformer.", ""):
        if prefix + spec.signature in shapes:
            return path, prefix
    what = describe_foreign_file(sorted(shapes)) or f"unknown (first keys: {keys_preview(sorted(shapes))})"
    raise UserError(
        f"{spec.flag} file {path} is not a {spec.label} text encoder (it looks like {what}); pass a {spec.label} file"
    )


def _checkpoint_source(spec: _EncoderSpec, ckpt: Path, keys: list[str]) -> tuple[Path, str] | None:
    if any(k.startswith(spec.prefix) for k in keys):
        return ckpt, spec.prefix
    what = describe_foreign_file(keys)
    is_sd3 = any(k.startswith(("text_encoders.", "model.diffusion_model.joint_blocks.")) for k in keys)
    if what is not None and not is_sd3:
        raise UserError(f"checkpoint {ckpt} is {what}, not an SD3 checkpoint; pass an SD3/SD3.5 .safetensors file")
    logger.warning("no %s in %s and no %s file given: %s contributes zeros", spec.label, ckpt, spec.flag, spec.label)
    return None


def _load_encoder(spec: _EncoderSpec, path: Path, prefix: str, dtype: torch.dtype, mmap: bool) -> Any:
    sd = load_safetensors(path, mmap=mmap, prefix=prefix or None, what=f"{spec.label} file")
    config_json = read_metadata(path).get(spec.metadata_key)
    model = spec.build(sd, config_json, dtype=dtype, source=str(path))
    how = "metadata config" if config_json else "inferred config"
    logger.info("%s loaded from %s (%s, %s)", spec.label, path, how, dtype)
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
