"""ΔW → LoRA module by SVD with a rank rule, and the kept-energy report (extract, resize, SVD merge).

The math is ``networks.functional.svd``; this module turns one module's singular triplets into the
tensors of a LoRA file (conv layout when the target is a conv) and collects what was kept.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from library.errors import UserError
from library.models.safetensors_io import save_safetensors
from networks.functional.svd import RANK_CHOOSERS, choose_rank, clamp_factors, kept_energy, truncate

logger = logging.getLogger(__name__)
MERGED_NETWORKS_KEY = "sd3_trainer.merged_networks"


@dataclass(frozen=True)
class RankSpec:
    """How many singular values to keep: ``dim`` (``conv_dim`` for a conv target; default ``dim``), or a
    dynamic method capped by it; ``clamp_quantile`` < 1 clamps the factors (sd-scripts' extract)."""

    dim: int
    conv_dim: int | None = None
    method: str | None = None
    param: float | None = None
    clamp_quantile: float = 1.0

    def __post_init__(self) -> None:
        check_rank_spec(self)

    def max_rank(self, conv: bool) -> int:
        return self.conv_dim if conv and self.conv_dim is not None else self.dim


def check_rank_spec(spec: RankSpec) -> None:
    """One-line UserErrors for ranks < 1, an unknown method, a missing or out-of-range param."""
    if spec.dim < 1 or (spec.conv_dim is not None and spec.conv_dim < 1):
        raise UserError(f"the rank must be at least 1 (got dim {spec.dim}, conv dim {spec.conv_dim})")
    if not 0.0 < spec.clamp_quantile <= 1.0:
        raise UserError(f"--clamp_quantile must be in (0, 1], got {spec.clamp_quantile}")
    if spec.method is None:
        return
    if spec.method not in RANK_CHOOSERS:
        raise UserError(f"--dynamic_method {spec.method} is not one of {', '.join(RANK_CHOOSERS)}")
    if spec.param is None:
        raise UserError(f"--dynamic_method {spec.method} needs --dynamic_param")
    if spec.method == "sv_ratio" and spec.param < 1.0:
        raise UserError(f"--dynamic_param for sv_ratio is a ratio σ_max/σ ≥ 1, got {spec.param}")
    if spec.method != "sv_ratio" and not 0.0 < spec.param <= 1.0:
        raise UserError(f"--dynamic_param for {spec.method} is a fraction in (0, 1], got {spec.param}")


@dataclass(frozen=True)
class ModuleReport:
    """One module: rank before (None = full ΔW) and after, Σσ² kept and in all."""

    name: str
    rank_before: int | None
    rank: int
    energy_kept: float
    energy_total: float

    @property
    def kept_fraction(self) -> float:
        return 1.0 if self.energy_total == 0.0 else self.energy_kept / self.energy_total


@dataclass
class Report:
    """What a factorisation kept, module by module."""

    modules: list[ModuleReport] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def kept_fraction(self) -> float:
        """Σ kept σ² / Σ σ² over every module (each module's ‖ΔW‖²_F weighs in)."""
        total = sum(m.energy_total for m in self.modules)
        return 1.0 if total == 0.0 else sum(m.energy_kept for m in self.modules) / total

    def lines(self, verbose: bool = False) -> list[str]:
        out = []
        if verbose:
            for m in self.modules:
                before = "full" if m.rank_before is None else str(m.rank_before)
                out.append(f"{m.name}: rank {before} → {m.rank}, kept energy {100 * m.kept_fraction:.2f} %")
        if not self.modules:
            return out + ["no modules written"]
        ranks = [m.rank for m in self.modules]
        worst = min(self.modules, key=lambda m: m.kept_fraction)
        out.append(f"{len(self.modules)} modules, rank {min(ranks)}–{max(ranks)}, kept energy "
                   f"{100 * self.kept_fraction():.2f} % of Σσ² (lowest {100 * worst.kept_fraction:.2f} % at {worst.name})")
        if self.skipped:
            out.append(f"{len(self.skipped)} modules left out (no difference), e.g. {self.skipped[0]}")
        return out


def lora_from_svd(name: str, svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor], spec: RankSpec, *,
                  kernel: tuple[int, int] | None = None, scale: float = 1.0, rank_before: int | None = None) -> tuple[dict[str, torch.Tensor], ModuleReport]:
    """LoRA tensors (CPU, float32) of the chosen rank from ΔW's thin SVD, and the module's report.

    ``scale`` is the alpha / rank to keep (resize keeps the input's): up is divided by it and
    alpha = scale · rank. ``kernel`` (kh, kw) writes the conv layout down (r, in, kh, kw), up (r→1×1).
    """
    u, s, vh = svd
    rank = choose_rank(s, spec.max_rank(kernel is not None), spec.method, spec.param)
    up, down = clamp_factors(*truncate(u, s, vh, rank), spec.clamp_quantile)
    up = (up / scale).cpu().contiguous()
    down = down.cpu().contiguous()
    if kernel is not None:
        down = down.reshape(rank, -1, *kernel)  # (r, in·kh·kw) -> (r, in, kh, kw)
        up = up.reshape(*up.shape, 1, 1)  # (out, r) -> (out, r, 1, 1)
    squares = s.double() ** 2
    report = ModuleReport(name, rank_before, rank, kept_energy(s, rank) * float(squares.sum()), float(squares.sum()))
    return {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(float(scale * rank))}, report


def cast_factors(modules: Mapping[str, Mapping[str, torch.Tensor]], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """``{module: tensors}`` → flat file tensors ``<module>.<tensor>``; ``dtype`` casts all but alpha."""
    out: dict[str, torch.Tensor] = {}
    for name, tensors in modules.items():
        for key, tensor in tensors.items():
            out[f"{name}.{key}"] = tensor.to(dtype) if dtype is not None and key != "alpha" else tensor
    return out


def _dim_text(values: Sequence[float]) -> str:
    distinct = sorted(set(values))
    if len(distinct) == 1:
        value = distinct[0]
        return str(int(value)) if float(value).is_integer() else str(value)
    return "Dynamic"


def _lora_args(text: str, module: str) -> str:
    """The input's network_args as they hold for the new LoRA: none from a LoKr (its layout args mean
    nothing here), and no ``split_qkv`` (an SVD of a split qkv LoRA is no longer block-diagonal)."""
    try:
        items = json.loads(text)
    except ValueError:
        return "{}"
    if "lokr" in module or not isinstance(items, dict):
        return "{}"
    return json.dumps({k: v for k, v in items.items() if k != "split_qkv"}, sort_keys=True)


def lora_metadata(base: Mapping[str, str], tensors: Mapping[str, torch.Tensor], *,
                  comment: str | None = None) -> dict[str, str]:
    """``base`` metadata updated for a LoRA file: module, dim and alpha ("Dynamic" when they vary),
    ``modelspec.architecture`` ending in ``/lora``, and an optional training comment prefix."""
    meta = dict(base)
    ranks = [float(t.shape[0]) for k, t in tensors.items() if k.endswith(".lora_down.weight")]
    alphas = [float(t) for k, t in tensors.items() if k.endswith(".alpha")]
    meta["ss_network_module"] = "networks.lora_sd3"
    meta["ss_network_dim"] = _dim_text(ranks) if ranks else "0"
    meta["ss_network_alpha"] = _dim_text(alphas) if alphas else "0"
    if meta.get("ss_network_args"):
        meta["ss_network_args"] = _lora_args(meta["ss_network_args"], base.get("ss_network_module", ""))
    architecture = meta.get("modelspec.architecture")
    if architecture:
        meta["modelspec.architecture"] = architecture.split("/")[0] + "/lora"
    if comment:
        old = meta.get("ss_training_comment")
        meta["ss_training_comment"] = comment if not old or old == "None" else f"{comment}; {old}"
    for key in ("sshs_model_hash", "sshs_legacy_hash"):
        meta.pop(key, None)
    return meta


def record_merge(metadata: Mapping[str, str], entries: Sequence[Mapping[str, object]]) -> dict[str, str]:
    """``metadata`` with ``entries`` appended to its JSON list of merged networks."""
    meta = dict(metadata)
    try:
        earlier = json.loads(meta.get(MERGED_NETWORKS_KEY, "[]"))
    except ValueError:
        earlier = []
    meta[MERGED_NETWORKS_KEY] = json.dumps(list(earlier) + [dict(e) for e in entries], sort_keys=True)
    return meta


def write_lora(path: str | os.PathLike, modules: Mapping[str, Mapping[str, torch.Tensor]], metadata: Mapping[str, str],
               dtype: torch.dtype | None = None,
               finish_metadata: Callable[[Mapping[str, torch.Tensor], Mapping[str, str]], Mapping[str, str]] | None = None,
               ) -> dict[str, torch.Tensor]:
    """Write the LoRA file atomically (``finish_metadata`` may add hashes of the final tensors); a failed
    write is a one-line UserError and leaves no file."""
    tensors = cast_factors(modules, dtype)
    meta = finish_metadata(tensors, metadata) if finish_metadata is not None else metadata
    try:
        save_safetensors(tensors, path, meta)
    except OSError as exc:
        raise UserError(f"could not save {path}: {exc}") from None
    return tensors
