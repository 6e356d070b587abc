"""``--network_module networks.lokr_sd3``: LoKr for SD3 / SD3.5 (LyCORIS-compatible files).

network_args: factor (-1 = balanced), full_matrix, decompose_both, use_scalar, rank_dropout,
module_dropout, the per-type dims (0 skips), train_block_indices, train_t5xxl and the LoRA+ ratios
(which scale the lr of the zero-initialised w2 factors).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from networks.functional.lokr import lokr_rank
from networks.modules import LoKrModule
from networks.loading import network_from_file
from networks.network import SD3Network, build_network, parse_network_args

KIND = "lokr"


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: Any,
    text_encoders: Any,
    mmdit: nn.Module | None,
    neuron_dropout: float | None = None,
    **network_args: Any,
) -> SD3Network:
    """A fresh LoKr (w2 zero, so the models' outputs are unchanged). ``vae`` is unused."""
    options = parse_network_args(KIND, network_args)
    return build_network(KIND, multiplier, network_dim or 4, network_alpha, text_encoders, mmdit, options)


def _module_from_tensors(name: str, linear: nn.Linear, tensors: Mapping[str, torch.Tensor]) -> LoKrModule:
    """An empty LoKr module shaped like the file's tensors (filled by ``load_tensors``)."""
    factors = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in tensors.items() if k.startswith("lokr_")}
    alpha = float(tensors["alpha"]) if "alpha" in tensors else None
    rank = lokr_rank(factors) or int(alpha or 1)
    return LoKrModule(name, linear, factors, alpha, rank)


def create_network_from_weights(
    multiplier: float,
    file: str | Path | None,
    vae: Any,
    text_encoders: Any,
    mmdit: nn.Module | None,
    weights_sd: Mapping[str, torch.Tensor] | None = None,
    for_inference: bool = False,
    **kwargs: Any,
) -> SD3Network:
    """A LoKr shaped like ``file`` (or ``weights_sd``), weights loaded; apply_to() or merge_to() next."""
    return network_from_file(KIND, _module_from_tensors, multiplier, file, weights_sd, text_encoders, mmdit,
                             for_inference)
