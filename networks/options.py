"""``--network_args`` for networks.lora_sd3 / networks.lokr_sd3: the typed options and their parsing.

Strings from the command line (``key=value``) and typed values from a TOML config both go through
the converters here; an unknown key or a malformed value is a one-line UserError naming it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from library.errors import UserError

TYPE_DIM_ARGS = ("context_attn_dim", "context_mlp_dim", "context_mod_dim", "x_attn_dim", "x_mlp_dim", "x_mod_dim")
EMB_PARTS = ("context_embedder", "t_embedder", "x_embedder", "y_embedder",
             "final_layer.adaLN_modulation", "final_layer.linear")


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


def parse_emb_dims(value: Any) -> tuple[int, ...]:
    """"[4,0,4,4,0,4]", "4,0,4,4,0,4" or a list of 6 ints → a tuple of 6 ranks (0 skips the part)."""
    if isinstance(value, str):
        text = value.strip().removeprefix("[").removesuffix("]")
        items: list[Any] = [part for part in text.split(",") if part.strip()]
    else:
        items = list(value)
    dims = tuple(int(item) for item in items)
    if len(dims) != len(EMB_PARTS) or any(d < 0 for d in dims):
        raise UserError(f"network_args emb_dims={value!r} must be {len(EMB_PARTS)} ranks >= 0 for "
                        f"[{', '.join(EMB_PARTS)}], e.g. emb_dims=[4,0,4,4,0,4]")
    return dims


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
    emb_dims: tuple[int, ...] | None = None
    train_block_indices: str = "all"
    split_qkv: bool = False
    train_t5xxl: bool = False
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    loraplus_lr_ratio: float | None = None
    loraplus_unet_lr_ratio: float | None = None
    loraplus_text_encoder_lr_ratio: float | None = None
    verbose: bool = False
    factor: int = -1
    full_matrix: bool = False
    decompose_both: bool = False
    use_scalar: bool = False


_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    **{name: int for name in TYPE_DIM_ARGS},
    "emb_dims": parse_emb_dims,
    "train_block_indices": str,
    "split_qkv": parse_bool,
    "train_t5xxl": parse_bool,
    "rank_dropout": float,
    "module_dropout": float,
    "loraplus_lr_ratio": _optional_float,
    "loraplus_unet_lr_ratio": _optional_float,
    "loraplus_text_encoder_lr_ratio": _optional_float,
    "verbose": parse_bool,
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
        except (ValueError, TypeError):
            raise UserError(f"network_args {key}={raw!r} is not a valid value") from None
    return NetworkOptions(**values)


def check_dropout(name: str, value: float | None) -> float:
    """A dropout probability in [0, 1) (None means 0); anything else is a UserError naming ``name``."""
    p = 0.0 if value is None else float(value)
    if not 0.0 <= p < 1.0:
        raise UserError(f"{name}={value} must be a probability in [0, 1)")
    return p
