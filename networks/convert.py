"""Convert SD3 LoRA / LoKr state dicts between sd-scripts / ComfyUI keys and diffusers / PEFT keys.

sd-scripts -> PEFT (what ``StableDiffusion3Pipeline.load_lora_weights`` and ``load_lora_adapter`` read):
- LoRA ``<name>.lora_down/lora_up/alpha`` -> ``<prefix>.<layer>.lora_A.weight`` / ``lora_B.weight`` with
  alpha/r baked into B (diffusers runs every module at scale 1). A fused qkv LoRA splits exactly:
  the same A for to_q, to_k, to_v and B cut in thirds; the (shift, scale) halves of the last context
  block's and the final layer's adaLN rows are swapped (see ``networks.convert_keys``).
- LoKr ``lokr_w1[_a/_b]`` / ``lokr_w2[_a/_b]`` -> the same names under the diffusers layer, with the
  scale baked into w1 (or w1_a). A Kronecker product cannot be cut into q/k/v, so a qkv LoKr goes to
  diffusers' fused projection (``attn.to_qkv``, ``attn.to_added_qkv``, ``attn2.to_qkv``), which
  ``load_lora_adapter`` creates by fusing the model's projections. A row swap moves W1's rows.
The exported file keeps the source metadata plus the alphas (``sd3_trainer.network_alphas``), so the
reverse conversion gives the original file back (up / w1 tensors to within one rounding when alpha
differs from the rank). A PEFT file from elsewhere converts at scale 1 (alpha = rank); separately
trained q, k, v LoRAs become one qkv LoRA of rank r_q + r_k + r_v (down stacked, up block-diagonal).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch

from library.errors import UserError
from library.models.safetensors_io import load_safetensors, read_metadata, save_safetensors
from networks.convert_keys import PEFT_PREFIXES, RowPart, UnetKeyMap, check_text_path, join_name, split_name
from networks.functional.conv import as_matrix
from networks.functional.factorization import factorization
from networks.functional.lokr import lokr_rank, lokr_scale, lokr_w1
from networks.functional.lora import lora_scale
from networks.network import split_network_sd

ALPHAS_KEY = "sd3_trainer.network_alphas"
PEFT_CONFIG_KEY = "lora_adapter_metadata"  # diffusers reads the adapter config from here
FORMAT_KEY = "sd3_trainer.converted_from"
LORA_TENSORS = ("lora_A.weight", "lora_B.weight")
LOKR_TENSORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
Tensors = dict[str, torch.Tensor]


def detect_format(keys: list[str]) -> str | None:
    """"sd-scripts" (lora_unet_* / lora_te*_*), "diffusers" (PEFT tensors under diffusers' prefixes) or None."""
    if any(k.split(".")[0].startswith(("lora_unet_", "lora_te1_", "lora_te2_", "lora_te3_")) for k in keys):
        return "sd-scripts"
    prefixes = tuple(p + "." for p in PEFT_PREFIXES.values())
    if any(k.startswith(prefixes) and (".lora_A." in k or ".lokr_" in k) for k in keys):
        return "diffusers"
    return None


def _scaled(tensor: torch.Tensor, scale: float) -> torch.Tensor:
    """tensor · scale with one rounding to the tensor's dtype (float64 in between)."""
    if scale == 1.0:
        return tensor.clone()
    return (tensor.double() * scale).to(tensor.dtype)


def _unscaled(tensor: torch.Tensor, scale: float) -> torch.Tensor:
    if scale == 1.0:
        return tensor.clone()
    return (tensor.double() / scale).to(tensor.dtype)


def _layer_shape(kind: str, tensors: Tensors) -> tuple[int, int]:
    """(out rows, in features) of the adapted layer's weight as a matrix."""
    if kind == "lora":
        return int(tensors["lora_up.weight"].shape[0]), int(tensors["lora_down.weight"].shape[1])
    matrices = {k: as_matrix(v) for k, v in tensors.items() if k in LOKR_TENSORS}
    a, c = lokr_w1(matrices).shape
    b = matrices["lokr_w2"].shape[0] if "lokr_w2" in matrices else matrices["lokr_w2_a"].shape[0]
    d = matrices["lokr_w2"].shape[1] if "lokr_w2" in matrices else matrices["lokr_w2_b"].shape[1]
    return int(a * b), int(c * d)


def _targets(group: str, path: str, kind: str, tensors: Tensors, unet: UnetKeyMap, name: str) -> list[RowPart]:
    if group != "unet":
        check_text_path(group, path, name)
        return [RowPart(path, 1, (0,))]
    return unet.to_diffusers(path, *_layer_shape(kind, tensors))


def _lora_to_peft(tensors: Tensors, parts: list[RowPart]) -> dict[str, Tensors]:
    down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
    rank = int(down.shape[0])
    scale = lora_scale(float(tensors["alpha"]) if "alpha" in tensors else None, rank)
    baked = _scaled(up, scale)
    return {p.target: {"lora_A.weight": down.clone(), "lora_B.weight": baked[p.rows(up.shape[0])].contiguous()}
            for p in parts}


def _kron_row_permutation(w1_rows: int, perm: torch.Tensor) -> torch.Tensor | None:
    """π with perm = kron rows of (π on W1's rows, identity on W2's), or None when there is none."""
    if len(perm) % w1_rows:
        return None
    b = len(perm) // w1_rows
    grid = perm.view(w1_rows, b)  # (a, b): row i_a·b + i_b of the result comes from grid[i_a, i_b]
    starts = grid[:, :1]
    if bool((grid == starts + torch.arange(b)).all()) and bool((starts % b == 0).all()):
        return starts.squeeze(1) // b
    return None


def permute_lokr_rows(tensors: Tensors, perm: torch.Tensor) -> Tensors:
    """LoKr factors whose ΔW has rows ΔW[perm]: W1's rows are permuted (or W2's when W1 has one row)."""
    out = dict(tensors)
    w1_key = "lokr_w1" if "lokr_w1" in tensors else "lokr_w1_a"
    pi = _kron_row_permutation(int(tensors[w1_key].shape[0]), perm)
    if pi is not None:
        out[w1_key] = tensors[w1_key][pi].contiguous()
        return out
    w2_key = "lokr_w2" if "lokr_w2" in tensors else "lokr_w2_a"
    if tensors[w1_key].shape[0] == 1:
        out[w2_key] = tensors[w2_key][perm].contiguous()
        return out
    raise UserError("this LoKr's Kronecker factorization does not allow the (shift, scale) row swap diffusers "
                    "needs for the last adaLN layers; retrain with the default factor (-1) or an even factor")


def _lokr_to_peft(tensors: Tensors, parts: list[RowPart], unet: UnetKeyMap, name: str) -> dict[str, Tensors]:
    factors = {k: v for k, v in tensors.items() if k in LOKR_TENSORS}
    alpha = float(tensors["alpha"]) if "alpha" in tensors else None
    matrices = {k: as_matrix(v) for k, v in factors.items()}
    scale = lokr_scale(alpha, lokr_rank(matrices) or 1, matrices)
    w1_key = "lokr_w1" if "lokr_w1" in factors else "lokr_w1_a"
    factors[w1_key] = _scaled(factors[w1_key], scale)
    if len(parts) > 1:
        fused = unet.fused_target(parts)
        if fused is None:
            raise UserError(f"{name}: a LoKr on this layer cannot be split into diffusers' layers")
        return {fused: factors}
    part = parts[0]
    if not part.identity:
        factors = permute_lokr_rows(factors, part.rows(_layer_shape("lokr", tensors)[0]))
    return {part.target: factors}


def to_peft(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
            source: str = "state dict") -> tuple[Tensors, dict[str, str]]:
    """sd-scripts / LyCORIS keys -> diffusers / PEFT keys (LoRA or LoKr); returns (tensors, metadata)."""
    kind, modules = split_network_sd(state_dict, source)
    unet = UnetKeyMap()
    out: Tensors = {}
    alphas: dict[str, float] = {}
    for name, tensors in modules.items():
        group, path = split_name(name)
        parts = _targets(group, path, kind, tensors, unet, name)
        if kind == "lora":
            converted = _lora_to_peft(tensors, parts)
        else:
            converted = _lokr_to_peft(tensors, parts, unet, name)
        for target, layer_tensors in converted.items():
            for key, tensor in layer_tensors.items():
                out[f"{PEFT_PREFIXES[group]}.{target}.{key}"] = tensor
        if "alpha" in tensors:
            alphas[name] = float(tensors["alpha"])
    meta = {**(metadata or {}), ALPHAS_KEY: json.dumps(alphas, sort_keys=True), FORMAT_KEY: f"sd-scripts {kind}"}
    if kind == "lokr":
        meta[PEFT_CONFIG_KEY] = json.dumps(lokr_peft_config(out), sort_keys=True)
    return out, meta


def _peft_layers(state_dict: Mapping[str, torch.Tensor], source: str) -> tuple[str, dict[tuple[str, str], Tensors]]:
    """{(group, diffusers layer): {tensor name: tensor}} and the kind of a PEFT state dict."""
    groups = {prefix: group for group, prefix in PEFT_PREFIXES.items()}
    layers: dict[tuple[str, str], Tensors] = {}
    kinds = set()
    for key, tensor in state_dict.items():
        prefix, _, rest = key.partition(".")
        leaf = next((t for t in LORA_TENSORS + LOKR_TENSORS + ("alpha",) if rest.endswith("." + t)), None)
        if prefix not in groups or leaf is None:
            raise UserError(f"{source}: key {key!r} is not a diffusers/PEFT LoRA or LoKr tensor under "
                            f"{', '.join(p + '.' for p in groups)} (DoRA and lora_B biases are not supported)")
        layers.setdefault((groups[prefix], rest[:-len(leaf) - 1]), {})[leaf] = tensor
        kinds.add("lokr" if leaf.startswith("lokr_") else "lora" if leaf != "alpha" else None)
    kinds.discard(None)
    if len(kinds) != 1:
        raise UserError(f"{source} has {'no LoRA/LoKr tensors' if not kinds else 'both LoRA and LoKr tensors'}")
    return kinds.pop(), layers


def _sai_layer(group: str, target: str, kind: str, tensors: Tensors, unet: UnetKeyMap) -> tuple[str, RowPart]:
    if group != "unet":
        check_text_path(group, target, target)
        return target, RowPart(target, 1, (0,))
    fused = unet.unfused(target)
    if kind == "lora":
        rows, in_features = int(tensors["lora_B.weight"].shape[0]), int(tensors["lora_A.weight"].shape[1])
    else:
        rows, in_features = _layer_shape("lokr", tensors)
    if fused is not None:
        path, _ = unet.to_sai(fused, rows // 3, in_features)
        return path, RowPart(target, 1, (0,))
    return unet.to_sai(target, rows, in_features)


def _lora_from_peft(parts: list[tuple[RowPart, Tensors]], alpha: float | None, name: str) -> Tensors:
    first = parts[0][1]["lora_A.weight"]
    total_rows = parts[0][0].sai_rows(int(parts[0][1]["lora_B.weight"].shape[0]))
    same_down = all(torch.equal(t["lora_A.weight"], first) for _, t in parts)
    downs = [first] if same_down else [t["lora_A.weight"] for _, t in parts]
    rank = sum(int(d.shape[0]) for d in downs)
    up = first.new_zeros((total_rows, rank, *parts[0][1]["lora_B.weight"].shape[2:]))
    offset = 0
    for part, tensors in parts:
        width = rank if same_down else int(tensors["lora_A.weight"].shape[0])
        up[part.rows(total_rows), offset:offset + width] = tensors["lora_B.weight"] * _peft_alpha_scale(tensors)
        offset += 0 if same_down else width
    alpha = float(rank) if alpha is None else alpha
    return {"lora_down.weight": torch.cat(downs) if len(downs) > 1 else downs[0].clone(),
            "lora_up.weight": _unscaled(up, lora_scale(alpha, rank)), "alpha": torch.tensor(alpha)}


def _peft_alpha_scale(tensors: Tensors) -> float:
    """alpha/r of a PEFT layer that stores an ``alpha`` tensor (kohya-style exports), else 1."""
    if "alpha" not in tensors:
        return 1.0
    return float(tensors["alpha"]) / int(tensors["lora_A.weight"].shape[0])


def _lokr_from_peft(parts: list[tuple[RowPart, Tensors]], alpha: float | None, name: str) -> Tensors:
    if len(parts) > 1:
        raise UserError(f"{name}: separate LoKr factors on to_q/to_k/to_v cannot be joined into SAI's fused qkv layer")
    part, tensors = parts[0]
    factors = {k: v for k, v in tensors.items() if k in LOKR_TENSORS}
    if not part.identity:
        perm = part.rows(_layer_shape("lokr", factors)[0])
        factors = permute_lokr_rows(factors, torch.argsort(perm))
    matrices = {k: as_matrix(v) for k, v in factors.items()}
    rank = lokr_rank(matrices) or 1
    alpha = float(rank) if alpha is None else alpha
    w1_key = "lokr_w1" if "lokr_w1" in factors else "lokr_w1_a"
    factors[w1_key] = _unscaled(factors[w1_key], lokr_scale(alpha, rank, matrices))
    return {**factors, "alpha": torch.tensor(alpha)}


def from_peft(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
              source: str = "state dict") -> tuple[Tensors, dict[str, str]]:
    """diffusers / PEFT keys -> sd-scripts / LyCORIS keys; the inverse of :func:`to_peft`."""
    kind, layers = _peft_layers(state_dict, source)
    meta = dict(metadata or {})
    alphas = json.loads(meta.pop(ALPHAS_KEY, "{}"))
    meta.pop(FORMAT_KEY, None)
    meta.pop(PEFT_CONFIG_KEY, None)
    unet = UnetKeyMap()
    modules: dict[str, list[tuple[RowPart, Tensors]]] = {}
    for (group, target), tensors in sorted(layers.items()):
        path, part = _sai_layer(group, target, kind, tensors, unet)
        modules.setdefault(join_name(group, path), []).append((part, tensors))
    out: Tensors = {}
    for name, parts in modules.items():
        parts.sort(key=lambda item: item[0].blocks)  # q, k, v order
        convert = _lora_from_peft if kind == "lora" else _lokr_from_peft
        for key, tensor in convert(parts, alphas.get(name), name).items():
            out[f"{name}.{key}"] = tensor
    return out, meta



def _lokr_dims(tensors: Tensors) -> tuple[tuple[int, int], tuple[int, int] | None, int]:
    """((a, b), (c, d) or None, rank as PEFT counts it) of one layer's PEFT LoKr tensors. (c, d) is None
    for a low-rank w2, whose columns are d·kh·kw for a conv (the kernel is not in the file)."""
    w1, w2 = tensors.get("lokr_w1"), tensors.get("lokr_w2")
    a, c = w1.shape if w1 is not None else (tensors["lokr_w1_a"].shape[0], tensors["lokr_w1_b"].shape[1])
    b = w2.shape[0] if w2 is not None else tensors["lokr_w2_a"].shape[0]
    if "lokr_w2_a" in tensors:
        return (int(a), int(b)), None, int(tensors["lokr_w2_a"].shape[1])
    d = int(w2.shape[1])
    rank = int(tensors["lokr_w1_a"].shape[1]) if "lokr_w1_a" in tensors else max(int(b), d)  # full: PEFT builds full
    return (int(a), int(b)), (int(c), d), rank


def _decompose_factor(dims: list[tuple[tuple[int, int], tuple[int, int] | None]]) -> int | None:
    """The LoKr ``factor`` under which every layer's factorization comes out as stored."""
    candidates = [-1] + sorted({out[0] for out, _ in dims})
    for factor in candidates:
        if all(factorization(a * b, factor) == (a, b) and (inp is None or factorization(inp[0] * inp[1], factor) == inp)
               for (a, b), inp in dims):
            return factor
    return None


def lokr_peft_config(peft_tensors: Mapping[str, torch.Tensor]) -> dict[str, object]:
    """diffusers' ``lora_adapter_metadata`` for a PEFT LoKr state dict: per prefix, the ``LoKrConfig``
    (rank per layer, alpha = rank since the scale is baked in, decompose_both and decompose_factor)
    that makes PEFT build exactly the stored factor shapes. diffusers' own inference from shapes
    cannot read a conv layer's flattened low-rank w2, hence this explicit config."""
    layers: dict[tuple[str, str], Tensors] = {}
    for key, tensor in peft_tensors.items():
        head, _, leaf = key.rpartition(".")
        prefix, _, layer = head.partition(".")
        layers.setdefault((prefix, layer), {})[leaf] = tensor
    config: dict[str, object] = {}
    for prefix in sorted({p for p, _ in layers}):
        mine = {layer: _lokr_dims(t) for (p, layer), t in layers.items() if p == prefix}
        ranks = {layer: rank for layer, (_, _, rank) in mine.items()}
        r = Counter(ranks.values()).most_common(1)[0][0]
        pattern = {f"^{re.escape(layer)}$": rank for layer, rank in sorted(ranks.items()) if rank != r}
        factor = _decompose_factor([(out, inp) for out, inp, _ in mine.values()])
        values = {"r": r, "alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
                  "target_modules": sorted(mine), "decompose_both": any("lokr_w1_a" in t for t in layers.values()),
                  "decompose_factor": -1 if factor is None else factor}
        config.update({f"{prefix}.{k}": v for k, v in values.items()})
    return config


FORMATS = ("diffusers", "sd-scripts")


def convert_file(src: str | Path, dst: str | Path, to: str | None = None,
                 dtype: torch.dtype | None = None) -> tuple[str, int]:
    """Convert the network file ``src`` into ``dst`` (written atomically); ``to`` is "diffusers" or
    "sd-scripts" (default: the other layout). Returns (layout written, tensor count)."""
    src, dst = Path(src), Path(dst)
    if dst.resolve() == src.resolve():
        raise UserError(f"--dst_path {dst} is the source file; write the converted file elsewhere")
    tensors = load_safetensors(src, what="network file")
    found = detect_format(list(tensors))
    if found is None:
        raise UserError(f"{src} is not an SD3 LoRA/LoKr file (no lora_unet_/lora_te*_ keys and no "
                        "transformer./text_encoder*. keys with lora_A/lokr_ tensors)")
    to = to or next(f for f in FORMATS if f != found)
    if to not in FORMATS:
        raise UserError(f"unknown layout {to!r}; choose one of {', '.join(FORMATS)}")
    if to == found:
        raise UserError(f"{src} is already in the {found} layout")
    convert = to_peft if to == "diffusers" else from_peft
    out, metadata = convert(tensors, read_metadata(src, what="network file"), str(src))
    if dtype is not None:
        out = {k: v if k.endswith(".alpha") else v.to(dtype) for k, v in out.items()}
    save_safetensors(out, dst, metadata)
    return to, len(out)
