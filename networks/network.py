"""The SD3 adapter network: injection, merge, save and load, summaries and max-norm regularisation.

Which layers are adapted and how they are named is ``networks.targets``; the ``network_args`` are
parsed in ``networks.options``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from library.errors import UserError
from library.models.safetensors_io import load_safetensors, save_safetensors
from networks.functional.conv import as_matrix
from networks.functional.lokr import lokr_init
from networks.functional.lora import lora_init
from networks.modules import AdapterModule, LoKrModule, LoRAModule, matrix_shape
from networks.options import NetworkOptions, check_dropout
from networks.targets import PREFIXES, SUMMARY_ORDER, Target, find_targets, summary_category

logger = logging.getLogger(__name__)
LORA_KEYS = ("lora_down.weight", "lora_up.weight")


def _fresh_lora(target: Target, alpha: float | None, options: NetworkOptions) -> AdapterModule:
    layer = target.layer
    parts = 3 if options.split_qkv and target.name.endswith("_qkv") else 1
    out_features, in_features = matrix_shape(layer)  # a conv's in is in·kh·kw
    pairs = [lora_init(out_features // parts, in_features, target.dim) for _ in range(parts)]
    return LoRAModule(target.name, layer, [p[0] for p in pairs], [p[1] for p in pairs], alpha)


def _fresh_lokr(target: Target, alpha: float | None, options: NetworkOptions) -> AdapterModule:
    layer = target.layer
    kernel_numel = layer.weight[0, 0].numel()  # kh·kw for a conv, 1 for a Linear
    tensors = lokr_init(
        layer.weight.shape[0], layer.weight.shape[1], target.dim, factor=options.factor,
        full_matrix=options.full_matrix, decompose_both=options.decompose_both, use_scalar=options.use_scalar,
        kernel_numel=kernel_numel,
    )
    return LoKrModule(target.name, layer, tensors, alpha, target.dim)


FRESH_MODULES: dict[str, Callable[[Target, float | None, NetworkOptions], AdapterModule]] = {
    "lora": _fresh_lora,
    "lokr": _fresh_lokr,
}


class SD3Network(nn.Module):
    """A set of LoRA or LoKr modules over the MMDiT and text encoders (sd-scripts' network API)."""

    def __init__(self, kind: str, modules: Sequence[AdapterModule], groups: Mapping[str, str],
                 multiplier: float = 1.0, options: NetworkOptions | None = None,
                 neuron_dropout: float | None = None) -> None:
        super().__init__()
        self.kind = kind
        self.options = options or NetworkOptions()
        self.neuron_dropout = neuron_dropout
        self.adapters = nn.ModuleDict({m.lora_name: m for m in modules})
        self.groups = dict(groups)
        self.set_multiplier(multiplier)
        for module in modules:
            module.rank_dropout = self.options.rank_dropout
            module.module_dropout = self.options.module_dropout
            module.neuron_dropout = neuron_dropout or 0.0

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for module in self.adapters.values():
            module.multiplier = multiplier

    def _selected(self, apply_text_encoder: bool, apply_unet: bool) -> Iterator[AdapterModule]:
        for name, module in self.adapters.items():
            if (self.groups[name] == "unet" and apply_unet) or (self.groups[name] != "unet" and apply_text_encoder):
                yield module

    def apply_to(self, text_encoders: Any = None, mmdit: Any = None,
                 apply_text_encoder: bool = True, apply_unet: bool = True) -> None:
        """Hook the wrapped layers (the models were bound at creation; the first two args are
        accepted for sd-scripts' call signature only)."""
        for module in self._selected(apply_text_encoder, apply_unet):
            module.apply_to()

    def restore(self) -> None:
        """Unhook every module (weights stay as they are)."""
        for module in self.adapters.values():
            module.restore()

    def merge_to(self, text_encoders: Any = None, mmdit: Any = None, weights_sd: Mapping | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
        """Fold every module into its layer's weight (loading ``weights_sd`` first when given)."""
        if weights_sd is not None:
            self.load_state_dict_sd(weights_sd)
        for module in self.adapters.values():
            module.restore()
            module.merge_to()

    def group_names(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name, group in self.groups.items():
            out.setdefault(group, []).append(name)
        return out

    def summary(self) -> dict[str, tuple[int, int]]:
        """{category: (modules, trainable parameters)} per ``targets.SUMMARY_ORDER`` category present."""
        counts: dict[str, tuple[int, int]] = {}
        for name, module in self.adapters.items():
            category = summary_category(name, self.groups[name])
            modules, params = counts.get(category, (0, 0))
            counts[category] = (modules + 1, params + module.trainable_parameter_count())
        return {c: counts[c] for c in SUMMARY_ORDER if c in counts}

    def summary_lines(self) -> list[str]:
        """One line per module type (unet <stream> attn/mlp/mod, unet emb, te1-3) and a total line."""
        summary = self.summary()
        width = max((len(c) for c in summary), default=5)
        lines = [f"{self.kind} {c:<{width}}: {m:5d} modules, {p:>12,} params" for c, (m, p) in summary.items()]
        modules, params = sum(m for m, _ in summary.values()), sum(p for _, p in summary.values())
        return lines + [f"{self.kind} {'total':<{width}}: {modules:5d} modules, {params:>12,} params"]

    def apply_max_norm_regularization(self, max_norm: float,
                                      device: torch.device | str | None = None) -> tuple[int, float, float]:
        """sd-scripts' ``--scale_weight_norms``: scale every module's ΔW to Frobenius norm <= max_norm.

        Returns (modules scaled, mean norm, max norm), the norms taken after scaling.
        """
        if not self.adapters:
            return 0, 0.0, 0.0
        results = [module.apply_max_norm(max_norm, device) for module in self.adapters.values()]
        norms = [norm for _, norm in results]
        return sum(scaled for scaled, _ in results), sum(norms) / len(norms), max(norms)

    def param_groups(self, unet_lr: float, text_encoder_lrs: float | Sequence[float] | None = None,
                     loraplus_lr_ratio: float | None = None, loraplus_unet_lr_ratio: float | None = None,
                     loraplus_text_encoder_lr_ratio: float | None = None) -> list[dict[str, Any]]:
        """Optimizer groups per model part; LoRA+ multiplies the up (LoKr: w2) factors' lr.

        ``text_encoder_lrs``: one lr, or [te1, te2, te3]; None uses ``unet_lr``. An lr of 0 drops the
        part. Ratios not given here come from the network_args.
        """
        opts = self.options
        base_ratio = loraplus_lr_ratio if loraplus_lr_ratio is not None else opts.loraplus_lr_ratio
        unet_ratio = loraplus_unet_lr_ratio or opts.loraplus_unet_lr_ratio or base_ratio
        te_ratio = loraplus_text_encoder_lr_ratio or opts.loraplus_text_encoder_lr_ratio or base_ratio
        lrs = _part_lrs(unet_lr, text_encoder_lrs)
        groups: list[dict[str, Any]] = []
        for part, names in self.group_names().items():
            if not lrs[part]:
                continue
            ratio = unet_ratio if part == "unet" else te_ratio
            groups += self._part_groups(part, names, lrs[part], ratio)
        return groups

    def _part_groups(self, part: str, names: list[str], lr: float, ratio: float | None) -> list[dict[str, Any]]:
        plus, plain = [], []
        for name in names:
            module = self.adapters[name]
            ups = {id(p) for p in module.up_parameters()} if ratio else set()
            for param in module.parameters():
                (plus if id(param) in ups else plain).append(param)
        groups = [{"params": plain, "lr": lr, "name": part}]
        if plus:
            groups.append({"params": plus, "lr": lr * ratio, "name": f"{part}_plus"})
        return groups

    def state_dict_for_save(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """sd-scripts / LyCORIS keys: ``<name>.lora_down.weight`` … or ``<name>.lokr_w1`` …, and ``alpha``."""
        out: dict[str, torch.Tensor] = {}
        for name, module in self.adapters.items():
            for key, tensor in module.save_tensors().items():
                tensor = tensor.detach().cpu()
                out[f"{name}.{key}"] = tensor.to(dtype) if dtype is not None and key != "alpha" else tensor
        return out

    def save_weights(self, path: str | Path, dtype: torch.dtype | None = None,
                     metadata: Mapping[str, str] | None = None) -> None:
        save_safetensors(self.state_dict_for_save(dtype), path, metadata)

    def load_weights(self, path: str | Path) -> None:
        """Load a file saved by this network's kind and ranks; a mismatch is a one-line UserError."""
        self.load_state_dict_sd(load_safetensors(path, what="network file"), str(path))

    def load_state_dict_sd(self, weights_sd: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
        kind, modules = split_network_sd(weights_sd, source)
        if kind != self.kind:
            raise UserError(f"{source} is a {kind.upper()} file but this network is {self.kind.upper()}; "
                            f"use networks.{kind}_sd3")
        missing = sorted(set(self.adapters) - set(modules))
        extra = sorted(set(modules) - set(self.adapters))
        if missing or extra:
            raise UserError(f"{source} was made for a different model or network_args "
                            f"({len(missing)} modules missing, e.g. {missing[:1]}; {len(extra)} unknown, e.g. {extra[:1]})")
        for name, tensors in modules.items():
            _check_shapes(self.adapters[name], tensors, source)
            self.adapters[name].load_tensors(tensors)


def _part_lrs(unet_lr: float, text_encoder_lrs: float | Sequence[float] | None) -> dict[str, float]:
    if not isinstance(text_encoder_lrs, Sequence):
        text_encoder_lrs = [unet_lr if text_encoder_lrs is None else float(text_encoder_lrs)]
    te = list(text_encoder_lrs or [unet_lr])
    te += [te[-1]] * (3 - len(te))
    return {"unet": unet_lr, "te1": te[0], "te2": te[1], "te3": te[2]}


def _matrix_shapes(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Tensor shapes as 2-D matrices (a conv kernel (r, in, kh, kw) counts as (r, in·kh·kw)), alpha left out."""
    return {k: tuple(as_matrix(v).shape) for k, v in tensors.items() if k != "alpha"}


def _check_shapes(module: AdapterModule, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    expected, got = _matrix_shapes(module.save_tensors()), _matrix_shapes(tensors)
    if expected == got:
        return
    name = module.lora_name
    out_features, in_features = matrix_shape(module.base)
    if isinstance(module, LoRAModule) and got.keys() == expected.keys():
        down, up = got["lora_down.weight"], got["lora_up.weight"]
        if down[1] == in_features and up[0] == out_features:
            raise UserError(f"{source} has rank {down[0]} at {name} but this network has rank "
                            f"{expected['lora_down.weight'][0]}; set --network_dim to match the file")
        raise UserError(f"{source} was made for a different model size ({name} is {down[1]}→{up[0]}, "
                        f"the model's layer is {in_features}→{out_features})")
    raise UserError(f"{source} does not match this network at {name} (file {got}, network {expected}); "
                    f"check --network_dim and network_args, or the model size")


def split_network_sd(weights_sd: Mapping[str, torch.Tensor], source: str) -> tuple[str, dict[str, dict]]:
    """Group ``<name>.<tensor>`` keys by module and tell LoRA from LoKr; not a network → UserError."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights_sd.items():
        name, _, tensor_key = key.partition(".")
        if name.split("_")[0] == "lora" and any(name.startswith(p + "_") for p in PREFIXES.values()):
            modules.setdefault(name, {})[tensor_key] = tensor
    kinds = {_module_kind(t) for t in modules.values()}
    if not modules or None in kinds:
        raise UserError(f"{source} is not an SD3 LoRA/LoKr file (no lora_unet_/lora_te*_ modules with "
                        f"lora_down/lora_up or lokr_w1/lokr_w2 tensors)")
    if len(kinds) > 1:
        raise UserError(f"{source} mixes LoRA and LoKr modules; only one kind per file is supported")
    return kinds.pop(), modules


def _module_kind(tensors: Mapping[str, torch.Tensor]) -> str | None:
    if all(k in tensors for k in LORA_KEYS):
        return "lora"
    has_w1 = "lokr_w1" in tensors or ("lokr_w1_a" in tensors and "lokr_w1_b" in tensors)
    has_w2 = "lokr_w2" in tensors or ("lokr_w2_a" in tensors and "lokr_w2_b" in tensors)
    return "lokr" if has_w1 and has_w2 else None


def build_network(kind: str, multiplier: float, dim: int, alpha: float | None, text_encoders: Any,
                  mmdit: nn.Module | None, options: NetworkOptions,
                  neuron_dropout: float | None = None) -> SD3Network:
    """A fresh network of ``kind`` (ΔW = 0) over the targets found in the models; logs its summary."""
    check_dropout("--network_dropout", neuron_dropout)
    check_dropout("network_args rank_dropout", options.rank_dropout)
    check_dropout("network_args module_dropout", options.module_dropout)
    targets = find_targets(mmdit, text_encoders, options, dim)
    modules = [FRESH_MODULES[kind](t, alpha, options) for t in targets]
    network = SD3Network(kind, modules, {t.name: t.group for t in targets}, multiplier, options, neuron_dropout)
    if options.verbose:
        for module in modules:
            logger.info("%s: %s rank %d, alpha %g", module.lora_name, kind, module.rank, module.alpha)
    for line in network.summary_lines():
        logger.info(line)
    return network


def network_from_sd(kind: str, builder: Callable[[str, nn.Module, dict], AdapterModule], multiplier: float,
                    weights_sd: Mapping[str, torch.Tensor], text_encoders: Any, mmdit: nn.Module | None,
                    source: str) -> SD3Network:
    """A network shaped like the file (kind, modules and ranks from its tensors), weights loaded."""
    found, modules = split_network_sd(weights_sd, source)
    if found != kind:
        raise UserError(f"{source} is a {found.upper()} file; load it with networks.{found}_sd3")
    everything = NetworkOptions(train_t5xxl=True, emb_dims=(1, 1, 1, 1, 1, 1))
    targets = {t.name: t for t in find_targets(mmdit, text_encoders, everything, 1)}
    unknown = sorted(set(modules) - set(targets))
    if unknown:
        raise UserError(f"{source} was made for a different model size or encoders "
                        f"({len(unknown)} modules not in this model, e.g. {unknown[0]})")
    built = [builder(name, targets[name].layer, tensors) for name, tensors in modules.items()]
    for module in built:
        if module.delta_shape() != matrix_shape(module.base):
            raise UserError(f"{source} was made for a different model size ({module.lora_name} is "
                            f"{module.delta_shape()}, the model's weight is {tuple(module.base.weight.shape)})")
        module.load_tensors(modules[module.lora_name])
    return SD3Network(kind, built, {m.lora_name: targets[m.lora_name].group for m in built}, multiplier)
