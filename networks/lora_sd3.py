"""``--network_module networks.lora_sd3``: LoRA for SD3 / SD3.5 (sd-scripts-compatible files).

network_args (``--network_args key=value ...``):
- context_attn_dim, context_mlp_dim, context_mod_dim, x_attn_dim, x_mlp_dim, x_mod_dim: per-type rank
  of the joint blocks' Linears (default --network_dim; 0 skips that type).
- emb_dims: "[c,t,x,y,fm,fl]", six ranks for context_embedder, t_embedder, x_embedder (the patch conv),
  y_embedder, final_layer.adaLN_modulation, final_layer.linear (0 skips; default: none adapted).
- train_block_indices: "0,1,4-5,7" / "all" / "none".
- split_qkv: one LoRA per q/k/v part (saved as one combined LoRA); train_t5xxl: adapt T5 too.
- rank_dropout, module_dropout: sd-scripts' dropouts (training only).
- loraplus_lr_ratio, loraplus_unet_lr_ratio, loraplus_text_encoder_lr_ratio: LoRA+ (up weights' lr).
- verbose: log every module's name and rank on creation.
``--network_dropout`` (``neuron_dropout``) is torch dropout on the down projection's output.
Conv2d targets save lora_down as (r, in, kh, kw) and lora_up as (out, r, 1, 1).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from networks.functional.conv import as_matrix
from networks.modules import LoRAModule
from networks.loading import network_from_file
from networks.network import SD3Network, build_network
from networks.options import parse_network_args

KIND = "lora"


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
    """A fresh LoRA (up weights zero, so the models' outputs are unchanged). ``vae`` is unused."""
    options = parse_network_args(KIND, network_args)
    return build_network(KIND, multiplier, network_dim or 4, network_alpha, text_encoders, mmdit, options,
                         neuron_dropout)


def _module_from_tensors(name: str, layer: nn.Module, tensors: Mapping[str, torch.Tensor]) -> LoRAModule:
    """An empty LoRA module shaped like the file's tensors (filled by ``load_tensors``)."""
    down = torch.zeros_like(as_matrix(tensors["lora_down.weight"]), dtype=torch.float32)  # conv: (r, in·kh·kw)
    up = torch.zeros_like(as_matrix(tensors["lora_up.weight"]), dtype=torch.float32)  # conv: (out, r, 1, 1) -> (out, r)
    alpha = float(tensors["alpha"]) if "alpha" in tensors else None
    return LoRAModule(name, layer, [down], [up], alpha)


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
    """A LoRA shaped like ``file`` (or ``weights_sd``), weights loaded; apply_to() or merge_to() next."""
    return network_from_file(KIND, _module_from_tensors, multiplier, file, weights_sd, text_encoders, mmdit,
                             for_inference)
