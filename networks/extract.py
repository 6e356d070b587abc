"""LoRA from two checkpoints (extract) and LoRA of another rank (resize), both by SVD.

Extract: for every layer an SD3 network can adapt (``networks.targets``: the joint blocks'
Linears, the embedders / final layer incl. the patch-embedding conv, and the CLIP-L / CLIP-G / T5
attention and MLP Linears when both checkpoints hold them) ΔW = W_tuned − W_org is read one weight
pair at a time, factorised on the working device (``networks.lowrank``) and kept as a LoRA module
with alpha = rank. MMDiT modules with ΔW = 0 are left out; a text encoder is left out as a whole
when no |ΔW| entry of it exceeds ``min_diff`` (sd-scripts' rule).

Resize: each module's ΔW (a LoRA's through its factors, a LoKr's in full) is factorised again to
the new rank; a LoRA keeps its alpha / rank scale (alpha' = scale · rank'), a LoKr becomes a LoRA
with alpha = rank.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from library.errors import UserError
from library.models.loading import build_mmdit, read_mmdit_config
from library.models.modelspec import modelspec_metadata
from library.models.safetensors_io import read_header
from library.models.text_encoders import CHECKPOINT_PREFIXES
from networks.deltas import (
    ENCODER_GROUPS, GROUP_LABELS, NetworkFile, checkpoint_key_map, conv_kernel, lora_factors, module_delta,
    module_name, module_rank, progress,
)
from networks.functional.lora import lora_scale
from networks.functional.svd import svd_of_product, thin_svd
from networks.lowrank import RankSpec, Report, lora_from_svd, lora_metadata
from networks.options import NetworkOptions
from networks.targets import CLIP_PATTERN, T5_PATTERN, find_targets

logger = logging.getLogger(__name__)
ENCODER_PATTERNS = {"clip_l": CLIP_PATTERN, "clip_g": CLIP_PATTERN, "t5xxl": T5_PATTERN}


@dataclass(frozen=True)
class ExtractTarget:
    name: str
    key: str
    group: str
    kernel: tuple[int, int] | None = None


def _mmdit_targets(path: Path, key_map: dict[str, str]) -> Iterator[ExtractTarget]:
    """Every MMDiT layer a network can adapt, found on a ``meta``-device model (nothing allocated)."""
    mmdit = build_mmdit(read_mmdit_config(path))
    everything = NetworkOptions(train_t5xxl=True, emb_dims=(1, 1, 1, 1, 1, 1))
    for target in find_targets(mmdit, None, everything, 1):
        kernel = tuple(target.layer.kernel_size) if isinstance(target.layer, torch.nn.Conv2d) else None
        yield ExtractTarget(target.name, key_map[target.name], "unet", kernel)


def _encoder_targets(shapes: dict[str, tuple[int, ...]]) -> Iterator[ExtractTarget]:
    for encoder, group in ENCODER_GROUPS.items():
        prefix, pattern = CHECKPOINT_PREFIXES[encoder], ENCODER_PATTERNS[encoder]
        for key, shape in shapes.items():
            if key.startswith(prefix) and key.endswith(".weight") and len(shape) == 2:
                path = key[len(prefix):].removesuffix(".weight")
                if pattern.search(path):
                    yield ExtractTarget(module_name(group, path), key, group)


def extract_targets(org: Path, tuned: Path) -> list[ExtractTarget]:
    """The layers to compare; a tuned model of another architecture is a one-line UserError."""
    org_shapes = {k: tuple(v["shape"]) for k, v in read_header(org, "--model_org").items() if k != "__metadata__"}
    tuned_shapes = {k: tuple(v["shape"]) for k, v in read_header(tuned, "--model_tuned").items() if k != "__metadata__"}
    targets = list(_mmdit_targets(org, checkpoint_key_map(org_shapes)))
    tuned_groups = {g for k in tuned_shapes for e, g in ENCODER_GROUPS.items() if k.startswith(CHECKPOINT_PREFIXES[e])}
    targets += [t for t in _encoder_targets(org_shapes) if t.group in tuned_groups]
    tuned_map = checkpoint_key_map(tuned_shapes)
    for target in targets:
        tuned_key = tuned_map.get(target.name)
        if tuned_key is None or tuned_shapes[tuned_key] != org_shapes[target.key]:
            raise UserError(f"--model_tuned {tuned} is another architecture than --model_org {org} "
                            f"({target.key} missing or of another shape); extract between versions of one model")
    return targets


def _diff(handles, target: ExtractTarget, tuned_key: str, device: str) -> torch.Tensor:
    org, tuned = handles
    weight = org.get_tensor(target.key).to(device, torch.float32)
    delta = tuned.get_tensor(tuned_key).to(device, torch.float32) - weight
    return delta.reshape(delta.shape[0], -1)  # conv (out, in, kh, kw) -> (out, in·kh·kw)


def _changed_encoders(handles, targets, tuned_map, device: str, min_diff: float) -> set[str]:
    """The text encoder groups with some |ΔW| entry > min_diff (read without any SVD)."""
    largest: dict[str, float] = {}
    for target in targets:
        if target.group != "unet" and largest.get(target.group, 0.0) <= min_diff:
            diff = _diff(handles, target, tuned_map[target.name], device).abs().max()
            largest[target.group] = max(largest.get(target.group, 0.0), float(diff))
    for group, value in largest.items():
        verdict = "extracted" if value > min_diff else "left out"
        logger.info("%s: largest |ΔW| %.3g (min_diff %g) → %s", GROUP_LABELS[group], value, min_diff, verdict)
    return {g for g, v in largest.items() if v > min_diff}


def extract_lora(org: str | os.PathLike, tuned: str | os.PathLike, spec: RankSpec, *, min_diff: float = 0.01,
                 loading_device: str = "cpu", working_device: str = "cpu", title: str | None = None,
                 show_progress: bool = False) -> tuple[dict[str, dict], dict[str, str], Report]:
    """A LoRA of ``tuned − org`` (see the module docstring): ({module: tensors}, metadata, report)."""
    from safetensors import safe_open

    org, tuned = Path(org), Path(tuned)
    targets = extract_targets(org, tuned)
    tuned_map = checkpoint_key_map({k: tuple(v["shape"]) for k, v in read_header(tuned).items() if k != "__metadata__"})
    modules: dict[str, dict] = {}
    report = Report()
    with safe_open(str(org), framework="pt", device=loading_device) as a, \
            safe_open(str(tuned), framework="pt", device=loading_device) as b:
        wanted = {"unet"} | _changed_encoders((a, b), targets, tuned_map, working_device, min_diff)
        chosen = [t for t in targets if t.group in wanted]
        for target in progress(chosen, len(chosen), "extracting", show_progress):
            delta = _diff((a, b), target, tuned_map[target.name], working_device)
            if not bool(delta.any()):
                report.skipped.append(target.name)
                continue
            modules[target.name], module_report = lora_from_svd(target.name, thin_svd(delta), spec, kernel=target.kernel)
            report.modules.append(module_report)
    if not modules:
        raise UserError(f"--model_tuned {tuned} does not differ from --model_org {org} in any adaptable layer")
    return modules, _extract_metadata(org, tuned, modules, title), report


def _extract_metadata(org: Path, tuned: Path, modules: dict[str, dict], title: str | None) -> dict[str, str]:
    tuned_meta = read_header(tuned).get("__metadata__") or {}
    resolution = tuned_meta.get("modelspec.resolution", "1024x1024").split("x")[0]
    cfg = read_mmdit_config(tuned)
    base = modelspec_metadata(cfg, title=title or tuned.stem, adapter="lora",
                              resolution=int(resolution) if resolution.isdigit() else 1024)
    flat = {f"{m}.{k}": t for m, ts in modules.items() for k, t in ts.items()}
    return lora_metadata(base, flat, comment=f"extracted from {tuned.name} minus {org.name}")


def resize_network(network: NetworkFile, spec: RankSpec, *, device: str = "cpu",
                   show_progress: bool = False) -> tuple[dict[str, dict], dict[str, str], Report]:
    """``network`` at the new rank (see the module docstring): ({module: tensors}, metadata, report)."""
    modules: dict[str, dict] = {}
    report = Report()
    items = network.modules.items()
    for name, tensors in progress(items, len(items), "resizing", show_progress):
        kernel = conv_kernel(tensors)
        if network.kind == "lora":
            up, down = lora_factors(tensors, device)
            scale = lora_scale(float(tensors["alpha"]) if "alpha" in tensors else None, down.shape[0])
            svd = svd_of_product(up, down)
        else:
            scale, svd = 1.0, thin_svd(module_delta(network.kind, tensors, device))
        modules[name], module_report = lora_from_svd(name, svd, spec, kernel=kernel, scale=scale,
                                                     rank_before=module_rank(network.kind, tensors))
        report.modules.append(module_report)
    ranks = sorted({m.rank_before for m in report.modules if m.rank_before is not None})
    before = f"rank {ranks[0]}" if len(ranks) == 1 else ("full LoKr" if not ranks else f"ranks {ranks[0]}–{ranks[-1]}")
    flat = {f"{m}.{k}": t for m, ts in modules.items() for k, t in ts.items()}
    comment = f"resized from {before} ({network.kind}) to {spec.method or 'rank'} {spec.param or spec.dim}"
    return modules, lora_metadata(network.metadata, flat, comment=comment), report
