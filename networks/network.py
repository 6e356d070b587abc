"""The SD3 adapter network: target discovery (sd-scripts' rules), injection, merge, save and load.

Targets: the joint blocks' Linears, CLIP-L/CLIP-G attention and MLP Linears, and T5's only with
``train_t5xxl``; names ``lora_unet_`` / ``lora_te1_`` / ``lora_te2_`` / ``lora_te3_`` + path with . → _.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from library.errors import UserError
from library.models.safetensors_io import load_safetensors, save_safetensors
from networks.functional.lokr import lokr_init
from networks.functional.lora import lora_init
from networks.modules import AdapterModule, LoKrModule, LoRAModule

PREFIXES = {"unet": "lora_unet", "te1": "lora_te1", "te2": "lora_te2", "te3": "lora_te3"}
UNET_PATTERN = re.compile(
    r"^joint_blocks\.(\d+)\.(context|x)_block\.(attn2?\.(?:qkv|proj)|mlp\.fc[12]|adaLN_modulation\.1)$"
)
CLIP_PATTERN = re.compile(r"\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")
T5_PATTERN = re.compile(r"\.block\.\d+\.layer\.\d+\.(SelfAttention\.[qkvo]|DenseReluDense\.w[io](_[01])?)$")
TYPE_DIM_ARGS = ("context_attn_dim", "context_mlp_dim", "context_mod_dim", "x_attn_dim", "x_mlp_dim", "x_mod_dim")
LORA_KEYS = ("lora_down.weight", "lora_up.weight")


def parse_bool(value: Any) -> bool:
    text = str(value).strip().lower()
    if text not in ("1", "true", "yes", "on", "0", "false", "no", "off", "none", ""):
        raise ValueError(f"not a boolean: {value!r}")
    return text in ("1", "true", "yes", "on")


def parse_block_indices(value: Any, depth: int | None = None) -> frozenset[int] | None:
    """"0,1,4-5,7" → {0, 1, 4, 5, 7}; "all" → None (every block); "none" → empty."""
    text = str(value).strip().lower()
    if text == "all":
        return None
    if text in ("none", ""):
        return frozenset()
    indices: set[int] = set()
    for part in text.split(","):
        start, _, end = part.strip().partition("-")
        indices.update(range(int(start), int(end or start) + 1))
    if depth is not None and any(i >= depth for i in indices):
        raise UserError(f"train_block_indices {value!r} names a block beyond the model's {depth} blocks")
    return frozenset(indices)


def _optional_float(value: Any) -> float | None:
    return None if str(value).lower() == "none" else float(value)


@dataclass(frozen=True)
class NetworkOptions:
    """The parsed ``--network_args`` (strings from the command line are converted here)."""

    context_attn_dim: int | None = None
    context_mlp_dim: int | None = None
    context_mod_dim: int | None = None
    x_attn_dim: int | None = None
    x_mlp_dim: int | None = None
    x_mod_dim: int | None = None
    train_block_indices: str = "all"
    split_qkv: bool = False
    train_t5xxl: bool = False
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    loraplus_lr_ratio: float | None = None
    loraplus_unet_lr_ratio: float | None = None
    loraplus_text_encoder_lr_ratio: float | None = None
    factor: int = -1
    full_matrix: bool = False
    decompose_both: bool = False
    use_scalar: bool = False


_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    **{name: int for name in TYPE_DIM_ARGS},
    "train_block_indices": str,
    "split_qkv": parse_bool,
    "train_t5xxl": parse_bool,
    "rank_dropout": float,
    "module_dropout": float,
    "loraplus_lr_ratio": _optional_float,
    "loraplus_unet_lr_ratio": _optional_float,
    "loraplus_text_encoder_lr_ratio": _optional_float,
    "factor": int,
    "full_matrix": parse_bool,
    "decompose_both": parse_bool,
    "use_scalar": parse_bool,
}
COMMON_ARGS = frozenset(_CONVERTERS) - {"split_qkv", "factor", "full_matrix", "decompose_both", "use_scalar"}
ALLOWED_ARGS = {
    "lora": COMMON_ARGS | {"split_qkv"},
    "lokr": COMMON_ARGS | {"factor", "full_matrix", "decompose_both", "use_scalar"},
}


def parse_network_args(kind: str, network_args: Mapping[str, Any]) -> NetworkOptions:
    """Convert and check ``network_args``; an unknown or malformed arg is a UserError naming it."""
    allowed = ALLOWED_ARGS[kind]
    values: dict[str, Any] = {}
    for key, raw in network_args.items():
        if key not in allowed:
            raise UserError(
                f"unknown network_args {key!r} for networks.{kind}_sd3; valid: {', '.join(sorted(allowed))}"
            )
        if raw is None:
            continue
        try:
            values[key] = _CONVERTERS[key](raw)
        except ValueError:
            raise UserError(f"network_args {key}={raw!r} is not a valid value") from None
    return NetworkOptions(**values)


@dataclass(frozen=True)
class Target:
    """One Linear to adapt: its sd-scripts name, the module, its group (unet/te1..3) and rank."""

    name: str
    linear: nn.Linear
    group: str
    dim: int


def _unet_dim(match: re.Match, options: NetworkOptions, default_dim: int) -> int:
    stream = match.group(2)
    kind = {"attn": "attn", "attn2": "attn", "mlp": "mlp", "adaLN_modulation": "mod"}[match.group(3).split(".")[0]]
    dim = getattr(options, f"{stream}_{kind}_dim")
    return default_dim if dim is None else dim


def _unet_targets(mmdit: nn.Module, options: NetworkOptions, default_dim: int) -> Iterator[Target]:
    blocks = parse_block_indices(options.train_block_indices, len(mmdit.joint_blocks))
    for path, module in mmdit.named_modules():
        match = UNET_PATTERN.match(path)
        if match is None or not isinstance(module, nn.Linear):
            continue
        if blocks is not None and int(match.group(1)) not in blocks:
            continue
        dim = _unet_dim(match, options, default_dim)
        if dim > 0:
            yield Target(f"{PREFIXES['unet']}_{path.replace('.', '_')}", module, "unet", dim)


def _encoder_list(text_encoders: Any) -> list[nn.Module | None]:
    """A TextEncoders object or a [clip_l, clip_g, t5xxl] sequence → three entries (None = absent)."""
    if text_encoders is None:
        return [None, None, None]
    if hasattr(text_encoders, "clip_l"):
        return [text_encoders.clip_l, text_encoders.clip_g, getattr(text_encoders, "t5xxl", None)]
    encoders = list(text_encoders) + [None] * 3
    return encoders[:3]


def _te_targets(text_encoders: Any, options: NetworkOptions, dim: int) -> Iterator[Target]:
    patterns = (("te1", CLIP_PATTERN), ("te2", CLIP_PATTERN), ("te3", T5_PATTERN))
    for encoder, (group, pattern) in zip(_encoder_list(text_encoders), patterns):
        if encoder is None or (group == "te3" and not options.train_t5xxl):
            continue
        for path, module in encoder.named_modules():
            if isinstance(module, nn.Linear) and pattern.search(path):
                yield Target(f"{PREFIXES[group]}_{path.replace('.', '_')}", module, group, dim)


def find_targets(mmdit: nn.Module | None, text_encoders: Any, options: NetworkOptions, dim: int) -> list[Target]:
    """Every Linear the network adapts, in model order (MMDiT first, then CLIP-L, CLIP-G, T5)."""
    targets = list(_unet_targets(mmdit, options, dim)) if mmdit is not None else []
    return targets + list(_te_targets(text_encoders, options, dim))


def _fresh_lora(target: Target, alpha: float | None, options: NetworkOptions) -> AdapterModule:
    linear = target.linear
    parts = 3 if options.split_qkv and target.name.endswith("_qkv") else 1
    out_part = linear.out_features // parts
    pairs = [lora_init(out_part, linear.in_features, target.dim) for _ in range(parts)]
    return LoRAModule(target.name, linear, [p[0] for p in pairs], [p[1] for p in pairs], alpha)


def _fresh_lokr(target: Target, alpha: float | None, options: NetworkOptions) -> AdapterModule:
    linear = target.linear
    tensors = lokr_init(
        linear.out_features, linear.in_features, target.dim, factor=options.factor,
        full_matrix=options.full_matrix, decompose_both=options.decompose_both, use_scalar=options.use_scalar,
    )
    return LoKrModule(target.name, linear, tensors, alpha, target.dim)


FRESH_MODULES: dict[str, Callable[[Target, float | None, NetworkOptions], AdapterModule]] = {
    "lora": _fresh_lora,
    "lokr": _fresh_lokr,
}


class SD3Network(nn.Module):
    """A set of LoRA or LoKr modules over the MMDiT and text encoders (sd-scripts' network API)."""

    def __init__(self, kind: str, modules: Sequence[AdapterModule], groups: Mapping[str, str],
                 multiplier: float = 1.0, options: NetworkOptions | None = None) -> None:
        super().__init__()
        self.kind = kind
        self.options = options or NetworkOptions()
        self.adapters = nn.ModuleDict({m.lora_name: m for m in modules})
        self.groups = dict(groups)
        self.set_multiplier(multiplier)
        for module in modules:
            module.rank_dropout = self.options.rank_dropout
            module.module_dropout = self.options.module_dropout

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
        """Hook the wrapped Linears (the models were bound at creation; the first two args are
        accepted for sd-scripts' call signature only)."""
        for module in self._selected(apply_text_encoder, apply_unet):
            module.apply_to()

    def restore(self) -> None:
        """Unhook every module (weights stay as they are)."""
        for module in self.adapters.values():
            module.restore()

    def merge_to(self, text_encoders: Any = None, mmdit: Any = None, weights_sd: Mapping | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
        """Fold every module into its Linear's weight (loading ``weights_sd`` first when given)."""
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


def _check_shapes(module: AdapterModule, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    expected = {k: tuple(v.shape) for k, v in module.save_tensors().items() if k != "alpha"}
    got = {k: tuple(v.shape) for k, v in tensors.items() if k != "alpha"}
    if expected == got:
        return
    name, base = module.lora_name, module.base
    if isinstance(module, LoRAModule) and got.keys() == expected.keys():
        down, up = got["lora_down.weight"], got["lora_up.weight"]
        if down[1] == base.in_features and up[0] == base.out_features:
            raise UserError(f"{source} has rank {down[0]} at {name} but this network has rank "
                            f"{expected['lora_down.weight'][0]}; set --network_dim to match the file")
        raise UserError(f"{source} was made for a different model size ({name} is {down[1]}→{up[0]}, "
                        f"the model's Linear is {base.in_features}→{base.out_features})")
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
                  mmdit: nn.Module | None, options: NetworkOptions) -> SD3Network:
    """A fresh network of ``kind`` (ΔW = 0) over the targets found in the models."""
    targets = find_targets(mmdit, text_encoders, options, dim)
    modules = [FRESH_MODULES[kind](t, alpha, options) for t in targets]
    return SD3Network(kind, modules, {t.name: t.group for t in targets}, multiplier, options)


def network_from_sd(kind: str, builder: Callable[[str, nn.Linear, dict], AdapterModule], multiplier: float,
                    weights_sd: Mapping[str, torch.Tensor], text_encoders: Any, mmdit: nn.Module | None,
                    source: str) -> SD3Network:
    """A network shaped like the file (kind, modules and ranks from its tensors), weights loaded."""
    found, modules = split_network_sd(weights_sd, source)
    if found != kind:
        raise UserError(f"{source} is a {found.upper()} file; load it with networks.{found}_sd3")
    everything = NetworkOptions(train_t5xxl=True)
    targets = {t.name: t for t in find_targets(mmdit, text_encoders, everything, 1)}
    unknown = sorted(set(modules) - set(targets))
    if unknown:
        raise UserError(f"{source} was made for a different model size or encoders "
                        f"({len(unknown)} modules not in this model, e.g. {unknown[0]})")
    built = [builder(name, targets[name].linear, tensors) for name, tensors in modules.items()]
    for module in built:
        linear = module.base
        if module.delta_shape() != (linear.out_features, linear.in_features):
            raise UserError(f"{source} was made for a different model size ({module.lora_name} is "
                            f"{module.delta_shape()}, the model's weight is {tuple(linear.weight.shape)})")
        module.load_tensors(modules[module.lora_name])
    return SD3Network(kind, built, {m.lora_name: targets[m.lora_name].group for m in built}, multiplier)
