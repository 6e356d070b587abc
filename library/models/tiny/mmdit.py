"""Miniature MMDiTs of the three real variants, with every parameter random.

Scale follows DESIGN §6: matrices ~ N(0, 1/fan_in), norm weights ~ 1 + N(0, 0.1²), biases small.
Miniatures break the heads = depth rule on purpose, so their config travels in the file's metadata.
"""

from __future__ import annotations

import math

import torch

from library.models.mmdit_config import MMDiTConfig, mmdit_shapes
from library.models.embeddings import sincos_2d


def tiny_mmdit_config(variant: str, *, heads_equal_depth: bool = False) -> MMDiTConfig:
    """A few-layer MMDiT of ``variant`` with a 16x16 position grid and narrow widths.

    ``heads_equal_depth`` builds the real head rule (heads = depth, head_dim 64) at small depth.
    """
    depth = {"sd3-medium": 3, "sd35-medium": 3, "sd35-large": 2}[variant]
    heads, head_dim = (depth, 64) if heads_equal_depth else (2, 16)
    return MMDiTConfig(
        depth=depth,
        hidden_size=heads * head_dim,
        num_heads=heads,
        pos_embed_max_size=16,
        context_dim=48,
        pooled_dim=40,
        qk_norm=variant != "sd3-medium",
        dual_attention_layers=(0, 1) if variant == "sd35-medium" else (),
        pos_embed_base_size=8,
    )


def _random_tensor(key: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if key.endswith((".ln_q.weight", ".ln_k.weight")):
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if key.endswith(".bias"):
        return 0.02 * torch.randn(shape, generator=gen)
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=gen) / math.sqrt(fan_in)


def tiny_mmdit_state_dict(cfg: MMDiTConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random prefix-free MMDiT tensors for ``cfg``; pos_embed is a sincos table plus noise."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, shape in sorted(mmdit_shapes(cfg).items()):
        if key == "pos_embed":
            grid = cfg.pos_embed_max_size
            coords = torch.arange(grid) * (cfg.pos_embed_base_size / grid)
            table = sincos_2d(cfg.hidden_size, coords, coords).float().unsqueeze(0)
            out[key] = table + 0.1 * torch.randn(shape, generator=gen)
        else:
            out[key] = _random_tensor(key, shape, gen)
    return out
