"""``--network_module networks.lokr_sd3``: LoKr for SD3 / SD3.5 (LyCORIS-compatible files).

network_args (``--network_args key=value ...``):
- factor (-1 = balanced), full_matrix, decompose_both, use_scalar: LyCORIS' LoKr layout options.
- context_attn_dim, context_mlp_dim, context_mod_dim, x_attn_dim, x_mlp_dim, x_mod_dim: per-type rank
  (0 skips that type); emb_dims: "[c,t,x,y,fm,fl]", six ranks for context_embedder, t_embedder,
  x_embedder (the patch conv), y_embedder, final_layer.adaLN_modulation, final_layer.linear (0 skips).
- train_block_indices, train_t5xxl, rank_dropout, module_dropout.
- loraplus_lr_ratio, loraplus_unet_lr_ratio, loraplus_text_encoder_lr_ratio (scale the lr of the
  zero-initialised w2 factors).
- verbose: log every module's name and rank on creation.
``--network_dropout`` (``neuron_dropout``) is torch dropout on the delta's output (LyCORIS' bypass
``dropout``). Conv2d targets follow LyCORIS' conv LoKr: a full w2 is saved as (b, d, kh, kw), a
low-rank w2_b as (r, d·kh·kw).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from networks.functional.lokr import lokr_rank
from networks.functional.conv import as_matrix
from networks.modules import LoKrModule
from networks.loading import network_from_file
from networks.network import SD3Network, build_network
from networks.options import parse_network_args

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
    return build_network(KIND, multiplier, network_dim or 4, network_alpha, text_encoders, mmdit, options,
                         neuron_dropout)


def _module_from_tensors(name: str, layer: nn.Module, tensors: Mapping[str, torch.Tensor]) -> LoKrModule:
    """An empty LoKr module shaped like the file's tensors (filled by ``load_tensors``)."""
    factors = {k: torch.zeros_like(as_matrix(v), dtype=torch.float32)  # conv w2: (b, d, kh, kw) -> (b, d·kh·kw)
               for k, v in tensors.items() if k.startswith("lokr_")}
    alpha = float(tensors["alpha"]) if "alpha" in tensors else None
    rank = lokr_rank(factors) or int(alpha or 1)
    return LoKrModule(name, layer, factors, alpha, rank)


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
