"""Merging networks: into a checkpoint (tensor by tensor), or several into one LoRA.

Into a checkpoint: every weight a module adapts becomes W + Σ ratio_i · ΔW_i, added in float32 on
the working device and cast to ``save_dtype`` (``--save_precision``) or back to W's own dtype. The
output is streamed: each tensor is read from the input, merged, cast and written in turn (never the
whole model in memory), into a temp file that is renamed at the end. ``save_dtype`` casts the
MMDiT and text encoder tensors, never the VAE (``first_stage_model.*``), as saving a checkpoint
does. The input's metadata is kept and the merged networks are appended to
``sd3_trainer.merged_networks``.

Into one LoRA (no checkpoint): ``concat`` is exact for LoRA inputs —
ΔW = Σ r_i·s_i·up_i·down_i = [r_1 s_1 up_1, r_2 s_2 up_2, …] · [down_1; down_2; …], alpha = the summed
rank (scale 1); ``svd`` factorises Σ r_i·ΔW_i to ``--new_rank`` (or a dynamic rank), which is the
route for LoKr inputs (their ΔW is a full matrix).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import torch

from library.errors import UserError
from library.models.safetensors_io import read_header, save_safetensors
from library.models.saving import VAE_PREFIX
from networks.deltas import (
    GROUP_LABELS, NetworkFile, check_fits, checkpoint_key_map, conv_kernel, delta_shape, encoder_file_key_map,
    group_of, groups_present, lora_factors, module_delta, module_rank, progress,
)
from networks.functional.svd import svd_of_product, thin_svd
from networks.lowrank import RankSpec, Report, lora_from_svd, lora_metadata, record_merge

logger = logging.getLogger(__name__)
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
ENCODER_FLAGS = {"te1": "--clip_l", "te2": "--clip_g", "te3": "--t5xxl"}
Plan = dict[str, list[tuple[int, str, float]]]  # weight key -> [(network index, module name, ratio), …]


@dataclass(frozen=True)
class ModelFile:
    """One file to merge into: an all-in-one checkpoint (``encoder`` None) or a separate text
    encoder file (``encoder`` = "clip_l" / "clip_g" / "t5xxl"), written to ``save_to``."""

    path: Path
    save_to: Path
    encoder: str | None = None


@dataclass(frozen=True)
class Devices:
    loading: str = "cpu"
    working: str = "cpu"


class _LazyTensor:
    """A tensor produced only when the writer asks for its data (``detach()``): ``save_safetensors``
    lays the file out from dtype and shape, then streams each tensor in turn."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, produce: Callable[[], torch.Tensor]) -> None:
        self.shape, self.dtype, self._produce = torch.Size(shape), dtype, produce

    def numel(self) -> int:
        return math.prod(self.shape)

    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def detach(self) -> torch.Tensor:
        return self._produce()


def _key_map(model: ModelFile, shapes: dict[str, tuple[int, ...]]) -> dict[str, str]:
    if model.encoder is None:
        return checkpoint_key_map(shapes)
    return encoder_file_key_map(shapes, model.encoder)


def _owner(group: str, present: Sequence[set[str]], models: Sequence[ModelFile]) -> int | None:
    """The file a group's modules go to: a separate encoder file wins over the checkpoint."""
    found = [i for i, groups in enumerate(present) if group in groups]
    separate = [i for i in found if models[i].encoder is not None]
    return (separate or found or [None])[0]


def _missing_part_error(network: NetworkFile, group: str, models: Sequence[ModelFile]) -> UserError:
    label = GROUP_LABELS[group]
    if group == "unet":
        return UserError(f"{network.path} adapts the MMDiT but no SD3 checkpoint was given; pass --sd3_model")
    flag = ENCODER_FLAGS[group]
    return UserError(f"{network.path} has {label} modules but {models[0].path} has no {label}; "
                     f"pass {flag} FILE and {flag}_save_to OUT")


def plan_merge(models: Sequence[ModelFile], networks: Sequence[tuple[NetworkFile, float]],
               headers: Sequence[dict]) -> list[Plan]:
    """Per model file, {weight key: [(network index, module name, ratio), …]}; every module must land."""
    shapes = [{k: tuple(v["shape"]) for k, v in h.items() if k != "__metadata__"} for h in headers]
    maps = [_key_map(m, s) for m, s in zip(models, shapes)]
    present = [groups_present(m) for m in maps]
    plans: list[Plan] = [{} for _ in models]
    for index, (network, ratio) in enumerate(networks):
        unknown = []
        for name in network.modules:
            owner = _owner(group_of(name), present, models)
            if owner is None:
                raise _missing_part_error(network, group_of(name), models)
            key = maps[owner].get(name)
            if key is None:
                unknown.append(name)
                continue
            if key.removesuffix(".weight") + ".scale_weight" in shapes[owner]:
                raise UserError(f"{models[owner].path} stores scaled fp8 weights ({key}); merge into an fp16/bf16/fp32 "
                                "version of the model")
            check_fits(network, name, shapes[owner][key])
            plans[owner].setdefault(key, []).append((index, name, ratio))
        if unknown:
            raise UserError(f"{network.path} was made for another model: {len(unknown)} of its modules are not in "
                            f"the model (e.g. {unknown[0]})")
    return plans


def _output_dtype(key: str, stored: torch.dtype, save_dtype: torch.dtype | None) -> torch.dtype:
    if save_dtype is None or not stored.is_floating_point or key.startswith(VAE_PREFIX):
        return stored
    return save_dtype


def _merged_tensor(handle: Any, key: str, contributions: Sequence[tuple[int, str, float]],
                   networks: Sequence[tuple[NetworkFile, float]], out_dtype: torch.dtype, device: str) -> torch.Tensor:
    """One output tensor: read, W + Σ ratio·ΔW in float32 on ``device`` when adapted, cast, on the CPU."""
    weight = handle.get_tensor(key)
    if contributions:
        merged = weight.to(device, torch.float32, copy=True)  # never write into what was read
        flat = merged.view(merged.shape[0], -1)  # conv (out, in, kh, kw) -> (out, in·kh·kw), shared storage
        for index, name, ratio in contributions:
            network = networks[index][0]
            flat.add_(module_delta(network.kind, network.modules[name], device), alpha=ratio)
        weight = merged
    return weight.to(out_dtype).cpu()


def _write_merged(model: ModelFile, header: dict, plan: Plan, networks: Sequence[tuple[NetworkFile, float]],
                  save_dtype: torch.dtype | None, devices: Devices, show: bool) -> None:
    from safetensors import safe_open
    from tqdm.auto import tqdm

    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    bar = tqdm(total=len(entries), desc=f"merging {model.path.name}", disable=not show, dynamic_ncols=True)
    with safe_open(str(model.path), framework="pt", device=devices.loading) as handle:
        def producer(key: str, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
            def produce() -> torch.Tensor:
                bar.update(1)
                return _merged_tensor(handle, key, plan.get(key, ()), networks, dtype, devices.working)
            return produce

        lazy = {}
        for key, entry in entries.items():
            dtype = _output_dtype(key, SAFETENSORS_DTYPES[entry["dtype"]], save_dtype)
            lazy[key] = _LazyTensor(tuple(entry["shape"]), dtype, producer(key, dtype))
        metadata = record_merge(header.get("__metadata__") or {}, merge_record(networks))
        try:
            save_safetensors(lazy, model.save_to, metadata)  # type: ignore[arg-type]  # lazy tensors, see _LazyTensor
        except OSError as exc:
            raise UserError(f"could not save {model.save_to}: {exc}") from None
        finally:
            bar.close()


def merge_record(networks: Sequence[tuple[NetworkFile, float]]) -> list[dict[str, object]]:
    """What ``sd3_trainer.merged_networks`` records per network: file name, kind, ratio, hash if known."""
    out = []
    for network, ratio in networks:
        entry: dict[str, object] = {"name": network.label, "kind": network.kind, "ratio": ratio}
        if network.metadata.get("sshs_model_hash"):
            entry["sshs_model_hash"] = network.metadata["sshs_model_hash"]
        out.append(entry)
    return out


def merge_into_models(models: Sequence[ModelFile], networks: Sequence[tuple[NetworkFile, float]], *,
                      save_dtype: torch.dtype | None = None, devices: Devices = Devices(),
                      show_progress: bool = False) -> dict[Path, int]:
    """Merge every network into the model files (see the module docstring); returns
    {output path: number of weights changed}. Nothing is written when a network does not fit."""
    for model in models:
        if model.save_to.resolve() == model.path.resolve():
            raise UserError(f"the output {model.save_to} is the input; choose another --save_to")
    headers = [read_header(m.path, "model file") for m in models]
    plans = plan_merge(models, networks, headers)
    moved = [(NetworkFile(n.path, n.kind, {k: {t: v.to(devices.working) for t, v in m.items()}
                                           for k, m in n.modules.items()}, n.metadata), r) for n, r in networks]
    for model, header, plan in zip(models, headers, plans):
        logger.info("merging %d weights of %s into %s", len(plan), model.path, model.save_to)
        _write_merged(model, header, plan, moved, save_dtype, devices, show_progress)
    return {m.save_to: len(p) for m, p in zip(models, plans)}


# --- several networks into one LoRA


def _module_sources(networks: Sequence[tuple[NetworkFile, float]]) -> dict[str, list[tuple[NetworkFile, float]]]:
    sources: dict[str, list[tuple[NetworkFile, float]]] = {}
    for network, ratio in networks:
        for name in network.modules:
            sources.setdefault(name, []).append((network, ratio))
    for name, items in sources.items():
        shapes = {delta_shape(n.kind, n.modules[name]) for n, _ in items}
        if len(shapes) > 1:
            raise UserError(f"the networks were made for different models: {name} has shapes {sorted(shapes)}")
    return sources


def _kernel(name: str, items: Sequence[tuple[NetworkFile, float]]) -> tuple[int, int] | None:
    kernels = {conv_kernel(n.modules[name]) for n, _ in items} - {None}
    return kernels.pop() if kernels else None


def _concat_module(name: str, items: Sequence[tuple[NetworkFile, float]]) -> dict[str, torch.Tensor]:
    ups, downs = [], []
    for network, ratio in items:
        up, down = lora_factors(network.modules[name])
        ups.append(up * ratio)
        downs.append(down)
    up, down = torch.cat(ups, dim=1), torch.cat(downs, dim=0)  # (out, Σr), (Σr, in·k)
    kernel = _kernel(name, items)
    if kernel is not None:
        down = down.reshape(down.shape[0], -1, *kernel)  # (Σr, in·kh·kw) -> (Σr, in, kh, kw)
        up = up.reshape(*up.shape, 1, 1)  # (out, Σr) -> (out, Σr, 1, 1)
    return {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(float(down.shape[0]))}


def _summed_svd(name: str, items: Sequence[tuple[NetworkFile, float]], device: str):
    """Thin SVD of Σ ratio·ΔW: from the stacked factors when all are LoRA, else of the full sum."""
    if all(n.kind == "lora" for n, _ in items):
        factors = [lora_factors(n.modules[name], device) for n, _ in items]
        up = torch.cat([f[0] * r for f, (_, r) in zip(factors, items)], dim=1)
        return svd_of_product(up, torch.cat([f[1] for f in factors], dim=0))
    total = sum(module_delta(n.kind, n.modules[name], device) * r for n, r in items)
    return thin_svd(total)


def merge_to_lora(networks: Sequence[tuple[NetworkFile, float]], *, spec: RankSpec | None = None,
                  device: str = "cpu", show_progress: bool = False) -> tuple[dict[str, dict], dict[str, str], Report]:
    """One LoRA from several networks: ``spec`` None concatenates (exact, LoRA inputs only), else SVD.

    Returns ({module: tensors}, metadata, report); the report is empty for a concatenation.
    """
    if spec is None and any(n.kind != "lora" for n, _ in networks):
        lokr = next(n for n, _ in networks if n.kind != "lora")
        raise UserError(f"{lokr.path} is a LoKr; its ΔW is a full matrix, so merging it into a LoRA needs --new_rank")
    sources = _module_sources(networks)
    modules: dict[str, dict] = {}
    report = Report()
    for name, items in progress(sources.items(), len(sources), "merging networks", show_progress):
        if spec is None:
            modules[name] = _concat_module(name, items)
            continue
        rank_before = sum(module_rank(n.kind, n.modules[name]) or 0 for n, _ in items) or None
        modules[name], module_report = lora_from_svd(name, _summed_svd(name, items, device), spec,
                                                     kernel=_kernel(name, items), rank_before=rank_before)
        report.modules.append(module_report)
    first = networks[0][0].metadata
    base = {k: v for k, v in first.items() if k.startswith(("modelspec.", "ss_base_model_version", "ss_v2"))}
    flat = {f"{m}.{k}": t for m, ts in modules.items() for k, t in ts.items()}
    how = "concatenated" if spec is None else "SVD-merged"
    metadata = lora_metadata(base, flat, comment=f"{how} from {', '.join(n.label for n, _ in networks)}")
    return modules, record_merge(metadata, merge_record(networks)), report
