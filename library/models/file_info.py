"""What a .safetensors file is, from its header alone: kind, model variant, network ranks, training settings.

:func:`file_summary` takes the parsed header (``{key: {"dtype", "shape", ...}, "__metadata__": {...}}``,
see :func:`library.models.safetensors_io.read_header`), so a 16 GB checkpoint is described without
reading a tensor. Kinds:

- ``checkpoint``: SAI single file (``model.diffusion_model.*`` + VAE + text encoders) or a bare MMDiT;
  the MMDiT config (variant, depth, heads, dual-attention layers, qk-norm) is inferred from the shapes
  with :func:`library.models.mmdit_config.infer_mmdit_config`.
- ``lora`` / ``lokr``: sd-scripts / LyCORIS network files (``lora_unet_*``, ``lora_te1_*`` ...): modules
  per part, ranks (``lora_down`` rows; LoKr ``*_b`` rows or "full"), alphas when given, and the base
  model from the metadata, else guessed from the shapes (attn2 modules: SD3.5-M; width 2432: SD3.5-L).
- ``diffusers-lora``: PEFT keys (``transformer.…lora_A.weight``).
- ``clip`` / ``t5`` / ``vae``: separate component files; anything else is ``unknown``.
"""

from __future__ import annotations

import datetime
import json
import math
import re
from collections import Counter
from typing import Any, Mapping

from library.errors import UserError
from library.models.mmdit_config import (
    MMDIT_CONFIG_METADATA_KEY, MODELSPEC_ARCHITECTURE, VARIANTS, infer_mmdit_config, real_config, split_mmdit_keys,
)

Shapes = Mapping[str, tuple[int, ...]]
NETWORK_PREFIXES = {"lora_unet": "mmdit", "lora_te1": "clip_l", "lora_te2": "clip_g", "lora_te3": "t5xxl"}
COMPONENT_PREFIXES = {"model.diffusion_model.": "mmdit", "first_stage_model.": "vae",
                      "text_encoders.clip_l.": "clip_l", "text_encoders.clip_g.": "clip_g",
                      "text_encoders.t5xxl.": "t5xxl"}
_UNET_KIND = re.compile(r"^joint_blocks_(\d+)_(context|x)_block_(attn2?|mlp|adaLN_modulation)_")
_KIND_NAMES = {"attn": "attn", "attn2": "attn2", "mlp": "mlp", "adaLN_modulation": "mod"}
TRAINING_KEYS = (  # (metadata key, label), shown in this order when present
    ("modelspec.architecture", "architecture"), ("modelspec.title", "title"), ("modelspec.date", "date"),
    ("modelspec.prediction_type", "prediction type"), ("ss_base_model_version", "base model"),
    ("ss_sd_model_name", "trained from"), ("ss_network_module", "network module"), ("ss_network_dim", "network dim"),
    ("ss_network_alpha", "network alpha"), ("ss_network_args", "network args"), ("ss_optimizer", "optimizer"),
    ("ss_learning_rate", "learning rate"), ("ss_unet_lr", "unet lr"), ("ss_text_encoder_lr", "text encoder lr"),
    ("ss_lr_scheduler", "lr scheduler"), ("ss_lr_warmup_steps", "warmup steps"), ("ss_steps", "steps trained"),
    ("ss_max_train_steps", "max train steps"), ("ss_epoch", "epoch"), ("ss_num_epochs", "epochs"),
    ("ss_num_batches_per_epoch", "batches per epoch"), ("ss_gradient_accumulation_steps", "gradient accumulation"),
    ("ss_num_train_images", "train images"), ("ss_mixed_precision", "mixed precision"), ("ss_seed", "seed"),
    ("ss_weighting_scheme", "weighting scheme"), ("sd3_trainer.timestep_sampling", "timestep sampling"),
    ("sd3_trainer.loss_weighting", "loss weighting"), ("ss_training_shift", "training shift"),
    ("ss_logit_mean", "logit mean"), ("ss_logit_std", "logit std"), ("ss_mode_scale", "mode scale"),
    ("sd3_trainer.model_prediction_type", "prediction objective"), ("ss_loss_type", "loss type"),
    ("ss_training_started_at", "started"), ("ss_training_finished_at", "finished"),
    ("ss_training_comment", "comment"), ("sshs_model_hash", "model hash"),
)


def shapes_of(header: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _lokr_factor(shapes: Shapes, name: str) -> tuple[int, int, int | None]:
    """(rows, cols, rank or None when full) of a LoKr factor ``lokr_w1`` / ``lokr_w2`` (conv w2 flattened)."""
    if name in shapes:
        full = shapes[name]
        return full[0], numel(full[1:]), None
    a, b = shapes[f"{name}_a"], shapes[f"{name}_b"]
    return a[0], numel(b[1:]), a[1]


def module_info(kind: str, tensors: Shapes) -> tuple[str, tuple[int, int]]:
    """(rank text, (out, in) of ΔW) of one network module's tensor shapes."""
    if kind == "lora":
        down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
        return str(down[0]), (up[0], numel(down[1:]))
    a, c, r1 = _lokr_factor(tensors, "lokr_w1")
    b, d, r2 = _lokr_factor(tensors, "lokr_w2")
    ranks = [r for r in (r1, r2) if r is not None]
    return (str(max(ranks)) if ranks else "full"), (a * b, c * d)


def _network_modules(shapes: Shapes) -> dict[str, dict[str, tuple[int, ...]]]:
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        name, _, tensor = key.partition(".")
        if any(name.startswith(p + "_") for p in NETWORK_PREFIXES):
            modules.setdefault(name, {})[tensor] = shape
    return modules


def _module_kind(tensors: Shapes) -> str | None:
    if "lora_down.weight" in tensors and "lora_up.weight" in tensors:
        return "lora"
    if any(k.startswith("lokr_w1") for k in tensors) and any(k.startswith("lokr_w2") for k in tensors):
        return "lokr"
    return None


def module_category(name: str) -> str:
    """"mmdit x attn", "mmdit context mlp", "mmdit emb", "clip_l", ... for a module name."""
    prefix = next(p for p in NETWORK_PREFIXES if name.startswith(p + "_"))
    if prefix != "lora_unet":
        return NETWORK_PREFIXES[prefix]
    match = _UNET_KIND.match(name[len(prefix) + 1:])
    return f"mmdit {match.group(2)} {_KIND_NAMES[match.group(3)]}" if match else "mmdit emb"


def _guess_variant(modules: Mapping[str, Any], widths: Mapping[str, int]) -> str:
    names = [n for n in modules if n.startswith("lora_unet_")]
    if any("_attn2_" in n for n in names):
        return "sd35-medium (attn2 modules)"
    blocks = {int(m.group(1)) for n in names if (m := _UNET_KIND.match(n[len("lora_unet_"):]))}
    width = widths.get("mmdit")
    for variant in VARIANTS:
        real = real_config(variant)
        if width == real.hidden_size and (not blocks or max(blocks) < real.depth) and variant != "sd35-medium":
            return f"{variant} by width {width}" + (" (or sd35-medium without attn2 modules)" if width == 1536 else "")
    return f"unknown (MMDiT width {width}, {len(blocks)} blocks)" if names else "no MMDiT modules"


def network_details(shapes: Shapes, metadata: Mapping[str, str], alphas: Mapping[str, float]) -> dict[str, Any]:
    modules = _network_modules(shapes)
    kinds = {_module_kind(t) for t in modules.values()}
    kind = kinds.pop() if len(kinds) == 1 else "mixed"
    categories: dict[str, Counter] = {}
    widths: dict[str, int] = {}
    for name, tensors in sorted(modules.items()):
        module_kind = _module_kind(tensors)
        rank, (_, in_features) = module_info(module_kind, tensors) if module_kind else ("?", (0, 0))
        categories.setdefault(module_category(name), Counter())[rank] += 1
        if name.endswith("_attn_qkv") and name.startswith("lora_unet_"):
            widths["mmdit"] = in_features
    base = metadata.get("ss_base_model_version") or metadata.get("modelspec.architecture")
    return {
        "network": kind, "modules": len(modules),
        "ranks": {cat: dict(sorted(c.items())) for cat, c in sorted(categories.items())},
        "alphas": dict(sorted(Counter(f"{a:g}" for a in alphas.values()).items())),
        "base_model": base or _guess_variant(modules, widths),
    }


def checkpoint_details(shapes: Shapes, metadata: Mapping[str, str]) -> dict[str, Any]:
    prefix, keys = split_mmdit_keys(list(shapes))
    mmdit_keys = {prefix + k for k in keys}
    components: dict[str, dict[str, int]] = {}
    for key, shape in shapes.items():
        part = "mmdit" if key in mmdit_keys else next((c for p, c in COMPONENT_PREFIXES.items() if key.startswith(p)),
                                                      "other")
        entry = components.setdefault(part, {"tensors": 0, "parameters": 0})
        entry["tensors"] += 1
        entry["parameters"] += numel(shape)
    details: dict[str, Any] = {"components": components}
    try:
        cfg = infer_mmdit_config({k: shapes[prefix + k] for k in keys}, metadata.get(MMDIT_CONFIG_METADATA_KEY),
                                 "checkpoint", all_keys=list(shapes))
    except (UserError, KeyError, ValueError) as exc:
        details["mmdit"] = f"not recognised ({exc})"
        return details
    details["variant"] = cfg.variant
    details["mmdit"] = {"architecture": MODELSPEC_ARCHITECTURE[cfg.variant], "depth": cfg.depth,
                        "hidden_size": cfg.hidden_size, "heads": cfg.num_heads,
                        "pos_embed_grid": cfg.pos_embed_max_size, "qk_norm": cfg.qk_norm,
                        "dual_attention_layers": list(cfg.dual_attention_layers)}
    return details


def _encoder_details(shapes: Shapes) -> tuple[str, dict[str, Any]] | None:
    token = shapes.get("text_model.embeddings.token_embedding.weight")
    if token:
        layers = len({k.split(".")[3] for k in shapes if k.startswith("text_model.encoder.layers.")})
        which = {768: "CLIP-L", 1280: "CLIP-G"}.get(token[1], f"CLIP (width {token[1]})")
        return "clip", {"model": which, "width": token[1], "layers": layers}
    q = shapes.get("encoder.block.0.layer.0.SelfAttention.q.weight")
    if q:
        layers = len({k.split(".")[2] for k in shapes if k.startswith("encoder.block.")})
        return "t5", {"model": "T5-XXL encoder" if q[1] == 4096 else f"T5 encoder (d_model {q[1]})",
                      "d_model": q[1], "layers": layers}
    if any(k.startswith(("encoder.down.", "decoder.up.")) for k in shapes):
        latent = shapes.get("decoder.conv_in.weight", (0, 0))[1]
        return "vae", {"latent_channels": latent}
    return None


def classify(shapes: Shapes, metadata: Mapping[str, str], alphas: Mapping[str, float]) -> tuple[str, dict[str, Any]]:
    """(kind, details) of a file's tensor shapes (module docstring)."""
    if _network_modules(shapes):
        details = network_details(shapes, metadata, alphas)
        return details["network"], details
    if any(".lora_A." in k or ".lora_B." in k for k in shapes):
        ranks = Counter(str(s[0]) for k, s in shapes.items() if ".lora_A." in k)
        return "diffusers-lora", {"modules": sum(ranks.values()), "ranks": {"all": dict(ranks)}}
    prefix, keys = split_mmdit_keys(list(shapes))
    if "x_embedder.proj.weight" in keys:
        return "checkpoint", checkpoint_details(shapes, metadata)
    found = _encoder_details(shapes)
    if found:
        return found
    tops = Counter(k.split(".")[0] for k in shapes)
    return "unknown", {"top_level_keys": dict(tops.most_common(8))}


def _timestamp(value: str) -> str:
    try:
        return datetime.datetime.fromtimestamp(float(value), tz=datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    except (ValueError, OverflowError, OSError):
        return value


def training_settings(metadata: Mapping[str, str]) -> dict[str, str]:
    """The curated training keys present in ``metadata`` (TRAINING_KEYS), labelled, timestamps readable."""
    out = {}
    for key, label in TRAINING_KEYS:
        if key in metadata and metadata[key] not in ("", "None"):
            value = metadata[key]
            out[label] = _timestamp(value) if key.endswith("_at") else value
    return out


def top_tags(metadata: Mapping[str, str], n: int = 10) -> list[tuple[str, int]]:
    """The ``n`` most frequent tags of ``ss_tag_frequency`` over all folders ([] if absent or unreadable)."""
    try:
        folders = json.loads(metadata.get("ss_tag_frequency") or "{}")
        total: Counter = Counter()
        for counts in folders.values():
            total.update({str(k): int(v) for k, v in counts.items()})
    except (ValueError, TypeError, AttributeError):
        return []
    return total.most_common(n)


def file_summary(header: Mapping[str, Any], alphas: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Everything :mod:`tools.show_metadata` prints, as a JSON-able dict."""
    metadata = dict(header.get("__metadata__") or {})
    shapes = shapes_of(header)
    dtypes = Counter(v["dtype"] for k, v in header.items() if k != "__metadata__")
    kind, details = classify(shapes, metadata, alphas or {})
    return {"kind": kind, "tensors": len(shapes), "parameters": sum(numel(s) for s in shapes.values()),
            "dtypes": dict(dtypes.most_common()), "details": details, "training": training_settings(metadata),
            "top_tags": top_tags(metadata), "metadata_keys": len(metadata)}


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _detail_lines(kind: str, details: Mapping[str, Any]) -> list[str]:
    lines = []
    if kind == "checkpoint":
        for part, entry in details["components"].items():
            lines.append(f"  {part}: {entry['tensors']} tensors, {_count(entry['parameters'])} parameters")
        mmdit = details["mmdit"]
        shown = mmdit if isinstance(mmdit, str) else ", ".join(f"{k} {v}" for k, v in mmdit.items())
        lines.append(f"  MMDiT: {shown}")
    elif "ranks" in details:
        base = f", base model {details['base_model']}" if "base_model" in details else ""
        lines.append(f"  {details['modules']} modules{base}")
        for category, ranks in details["ranks"].items():
            lines.append(f"  {category}: " + ", ".join(f"{n} x rank {r}" for r, n in ranks.items()))
        if details.get("alphas"):
            lines.append("  alpha: " + ", ".join(f"{a} ({n} modules)" for a, n in details["alphas"].items()))
    else:
        lines += [f"  {k}: {v}" for k, v in details.items()]
    return lines


def describe(summary: Mapping[str, Any]) -> list[str]:
    """The summary of :func:`file_summary` as text lines."""
    variant = summary["details"].get("variant")
    lines = [f"kind: {summary['kind']}" + (f" ({variant})" if variant else ""),
             f"tensors: {summary['tensors']}, parameters: {_count(summary['parameters'])}, dtypes: "
             + ", ".join(f"{d} {n}" for d, n in summary["dtypes"].items())]
    lines += _detail_lines(summary["kind"], summary["details"])
    if summary["training"]:
        lines.append("training:")
        lines += [f"  {label}: {value}" for label, value in summary["training"].items()]
    if summary["top_tags"]:
        lines.append("top tags: " + ", ".join(f"{t} {n}" for t, n in summary["top_tags"]))
    lines.append(f"metadata keys: {summary['metadata_keys']} (--all lists them)")
    return lines
