"""Pure embedding functions of the MMDiT: timestep frequencies and 2-D position tables."""

from __future__ import annotations

import math

import torch

TIMESTEP_FREQ_DIM = 256


def timestep_embedding(timesteps: torch.Tensor, dim: int = TIMESTEP_FREQ_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of ``timesteps`` (shape (B,), on the 0..1000 scale) in float32.

    Order is [cos, sin] with frequencies exp(-ln(max_period) * i / (dim/2)), as SD3 was trained.
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) * (-math.log(max_period) / half)
    args = timesteps.float()[:, None] * torch.exp(exponent)[None, :]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


def crop_offsets(grid: int, h: int, w: int) -> tuple[int, int]:
    """Top/left of the centre crop of an ``h`` x ``w`` patch window in a ``grid`` x ``grid`` table."""
    if h > grid or w > grid:
        raise ValueError(
            f"latent of {h}x{w} patches is larger than the position table ({grid}x{grid}); "
            f"use at most {grid * 16} px per side for this model"
        )
    return (grid - h) // 2, (grid - w) // 2


def crop_pos_embed(table: torch.Tensor, grid: int, h: int, w: int, top: int, left: int) -> torch.Tensor:
    """Take rows ``top:top+h`` and columns ``left:left+w`` of a (1, grid*grid, D) table -> (1, h*w, D)."""
    spatial = table.view(1, grid, grid, table.shape[-1])
    return spatial[:, top : top + h, left : left + w, :].reshape(1, h * w, table.shape[-1])


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """MAE-style 1-D sincos features: [sin(p*w), cos(p*w)], w_i = 10000^(-i/(dim/2)), float64."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = positions.double().reshape(-1)[:, None] * omega[None, :]  # (N, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """2-D sincos table over the grid ``rows`` x ``cols`` (coordinates): (len(rows)*len(cols), dim).

    The first half of the channels encodes the column coordinate and the second the row,
    the convention of the SD3 position table.
    """
    grid_r, grid_c = torch.meshgrid(rows.double(), cols.double(), indexing="ij")
    emb_c = sincos_1d(dim // 2, grid_c)
    emb_r = sincos_1d(dim // 2, grid_r)
    return torch.cat([emb_c, emb_r], dim=1)


def scaled_pos_embed(dim: int, h: int, w: int, grid: int, base_size: int, patched_size: int) -> torch.Tensor:
    """Position table for an ``h`` x ``w`` window at multi-resolution bucket ``patched_size``.

    The stored SD3 table places patch i of the full ``grid`` at coordinate i * base_size / grid.
    At the base resolution a centre crop of ``base_size`` patches spans a fixed coordinate
    interval; here a ``patched_size``-patch image is spread over that same interval (so every
    resolution sees the same coordinates for the same relative position), and the ``h`` x ``w``
    window is centred in it. At ``patched_size == base_size`` this reproduces the centre crop
    of a sincos table exactly. Returns (1, h*w, dim) float32.
    """
    unit = base_size / grid
    step = base_size / patched_size  # base-grid cells per patch of this resolution

    def coords(n: int) -> torch.Tensor:
        base_top = (grid - base_size) // 2
        centre = base_top + (base_size - 1) / 2.0
        return (centre + (torch.arange(n, dtype=torch.float64) - (n - 1) / 2.0) * step) * unit

    return sincos_2d(dim, coords(h), coords(w)).float().unsqueeze(0)
