"""The SD3 / SD3.5 MMDiT with the attribute names of Stability AI's checkpoints.

One class covers SD3-Medium, SD3.5-Medium (dual attention + qk RMSNorm) and SD3.5-Large (qk
RMSNorm). ``joint_blocks`` is a plain ModuleList whose blocks take and return tensors only, so
block swap, fp8 and adapters can attach from outside. Attention is one PyTorch SDPA call over
the concatenated context and image tokens.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from library.models.embeddings import (
    TIMESTEP_FREQ_DIM,
    crop_offsets,
    crop_pos_embed,
    scaled_pos_embed,
    timestep_embedding,
)
from library.models.mmdit_config import MMDiTConfig

LN_EPS = 1e-6


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift with per-sample (B, D) shift/scale broadcast over tokens."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine parameters over the last dim (eps 1e-6).

    Under autocast the result stays in the autocast dtype (statistics are still accumulated in
    float32 by the kernel) instead of autocast's float32 output: the modulation and the next
    matmul then read half the bytes.
    """
    device = x.device.type
    if device != "meta" and torch.is_autocast_enabled(device):  # meta (memory planning) has no autocast
        with torch.autocast(device, enabled=False):
            return F.layer_norm(x.to(torch.get_autocast_dtype(device)), (x.shape[-1],), eps=LN_EPS)
    return F.layer_norm(x, (x.shape[-1],), eps=LN_EPS)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim with a learned scale (the per-head qk norm of SD3.5)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Embedder(nn.Module):
    """Linear -> SiLU -> Linear, stored as ``mlp.0`` / ``mlp.2`` (timestep and pooled-text embedders)."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_channels: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, h*w, D)


class SelfAttention(nn.Module):
    """The q/k/v projection (fused ``qkv``), optional per-head RMSNorm, and output ``proj``."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, pre_only: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        head_dim = dim // num_heads
        self.ln_q = RMSNorm(head_dim) if qk_norm else None
        self.ln_k = RMSNorm(head_dim) if qk_norm else None
        self.proj = None if pre_only else nn.Linear(dim, dim)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, L, D) -> q, k, v each (B, L, H, hd), with q/k normalised per head."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, -1).unbind(2)
        if self.ln_q is not None:
            q, k = self.ln_q(q), self.ln_k(k)
        return q, k, v


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA over (B, L, H, hd) inputs -> (B, L, H*hd)."""
    b, n, h, d = q.shape
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2).reshape(b, n, h * d)


class StreamBlock(nn.Module):
    """One stream (context or image) of a joint block: adaLN, attention(s) and MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, qk_norm: bool, pre_only: bool, dual: bool) -> None:
        super().__init__()
        self.pre_only = pre_only
        self.dual = dual
        self.attn = SelfAttention(dim, num_heads, qk_norm, pre_only=pre_only)
        self.attn2 = SelfAttention(dim, num_heads, qk_norm) if dual else None
        self.mlp = None if pre_only else Mlp(dim, mlp_hidden)
        chunks = 2 if pre_only else (9 if dual else 6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, chunks * dim))

    def pre_attention(self, x: torch.Tensor, c: torch.Tensor) -> tuple[tuple, list[torch.Tensor], torch.Tensor]:
        """Modulated input -> (q, k, v), the modulation chunks, and the normalised input."""
        mods = list(self.adaLN_modulation(c).chunk(2 if self.pre_only else (9 if self.dual else 6), dim=1))
        normed = layer_norm(x)
        return self.attn.project(modulate(normed, mods[0], mods[1])), mods, normed

    def post_attention(self, x: torch.Tensor, attn_out: torch.Tensor, mods: list[torch.Tensor], normed: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        x = torch.addcmul(x, gate_msa.unsqueeze(1), self.attn.proj(attn_out))
        if self.attn2 is not None:
            shift2, scale2, gate2 = mods[6:9]
            q, k, v = self.attn2.project(modulate(normed, shift2, scale2))
            x = torch.addcmul(x, gate2.unsqueeze(1), self.attn2.proj(attention(q, k, v)))
        h = self.mlp(modulate(layer_norm(x), shift_mlp, scale_mlp))
        return torch.addcmul(x, gate_mlp.unsqueeze(1), h)


class JointBlock(nn.Module):
    """Context and image streams sharing one attention over the concatenated sequence."""

    def __init__(self, cfg: MMDiTConfig, index: int) -> None:
        super().__init__()
        d, heads, mlp = cfg.hidden_size, cfg.num_heads, cfg.mlp_hidden
        last = index == cfg.depth - 1
        self.context_block = StreamBlock(d, heads, mlp, cfg.qk_norm, pre_only=last, dual=False)
        self.x_block = StreamBlock(d, heads, mlp, cfg.qk_norm, pre_only=False, dual=index in cfg.dual_attention_layers)

    def forward(
        self, context: torch.Tensor, x: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        (cq, ck, cv), c_mods, c_normed = self.context_block.pre_attention(context, c)
        (xq, xk, xv), x_mods, x_normed = self.x_block.pre_attention(x, c)
        n_ctx = context.shape[1]
        joint = attention(torch.cat([cq, xq], 1), torch.cat([ck, xk], 1), torch.cat([cv, xv], 1), mask)
        ctx_out, x_out = joint[:, :n_ctx], joint[:, n_ctx:]
        x = self.x_block.post_attention(x, x_out, x_mods, x_normed)
        if self.context_block.pre_only:
            return None, x
        return self.context_block.post_attention(context, ctx_out, c_mods, c_normed), x


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch: int, out_channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(layer_norm(x), shift, scale))


def offloaded_checkpoint(block: nn.Module, ctx: torch.Tensor, hidden: torch.Tensor, c: torch.Tensor,
                         mask: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """A checkpointed block whose saved inputs (the context and image streams) wait in CPU memory.

    A checkpoint keeps only each block's inputs; here those are copied to the CPU before the block runs
    and back to the device inside it (again when backward recomputes it), so the device holds one
    block's inputs at a time. The copies are autograd ops, so gradients flow through them unchanged.
    """
    device = hidden.device

    def run(ctx_cpu: torch.Tensor, hidden_cpu: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None):
        return block(ctx_cpu.to(device), hidden_cpu.to(device), c, mask)

    return checkpoint(run, ctx.to("cpu"), hidden.to("cpu"), c, mask, use_reentrant=False)


class MMDiT(nn.Module):
    """SD3 MMDiT. ``forward(x, timesteps, context, y, skip_layers=None) -> velocity``.

    ``timesteps`` are σ·1000 (float32). Options set from outside: ``gradient_checkpointing`` (with
    ``cpu_offload_checkpointing``: the checkpointed block inputs wait in CPU memory),
    ``pos_emb_random_crop_rate`` (training only) and :meth:`enable_scaled_pos_embed`.
    """

    def __init__(self, cfg: MMDiTConfig) -> None:
        super().__init__()
        self.config = cfg
        d = cfg.hidden_size
        self.register_buffer("pos_embed", torch.zeros(1, cfg.pos_embed_max_size**2, d))
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, d)
        self.t_embedder = Embedder(TIMESTEP_FREQ_DIM, d)
        self.y_embedder = Embedder(cfg.pooled_dim, d)
        self.context_embedder = nn.Linear(cfg.context_dim, d)
        self.joint_blocks = nn.ModuleList(JointBlock(cfg, i) for i in range(cfg.depth))
        self.final_layer = FinalLayer(d, cfg.patch_size, cfg.out_channels)
        self.gradient_checkpointing = False
        self.cpu_offload_checkpointing = False
        self.pos_emb_random_crop_rate = 0.0
        self.scaled_pos_embed_sizes: tuple[int, ...] = ()
        self._scaled_tables: dict[tuple[int, int, int], torch.Tensor] = {}

    def enable_scaled_pos_embed(self, latent_sizes: Sequence[int]) -> None:
        """Use multi-resolution position tables for these square latent sizes (sd-scripts option)."""
        self.scaled_pos_embed_sizes = tuple(sorted({s // self.config.patch_size for s in latent_sizes}))
        self._scaled_tables.clear()

    def _bucket_size(self, h: int, w: int) -> int:
        """The configured patch size whose square area is nearest to h*w."""
        return min(self.scaled_pos_embed_sizes, key=lambda s: abs(s * s - h * w))

    def cropped_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """Position embeddings for an ``h`` x ``w`` patch grid: (1, h*w, D)."""
        grid = self.config.pos_embed_max_size
        if self.scaled_pos_embed_sizes:
            key = (h, w, self._bucket_size(h, w))
            if key not in self._scaled_tables:
                self._scaled_tables[key] = scaled_pos_embed(
                    self.config.hidden_size, h, w, grid, self.config.pos_embed_base_size, key[2]
                )
            return self._scaled_tables[key].to(self.pos_embed.device, self.pos_embed.dtype)
        top, left = crop_offsets(grid, h, w)
        if self.training and self.pos_emb_random_crop_rate > 0 and random.random() < self.pos_emb_random_crop_rate:
            top, left = random.randint(0, grid - h), random.randint(0, grid - w)
        return crop_pos_embed(self.pos_embed, grid, h, w, top, left)

    def unpatchify(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        p, c = self.config.patch_size, self.config.out_channels
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def _attention_mask(self, context_mask: torch.Tensor | None, n_img: int) -> torch.Tensor | None:
        """Key-padding mask (B, 1, 1, L_ctx + L_img) from a (B, L_ctx) keep-mask; None if unused."""
        if context_mask is None:
            return None
        keep_img = torch.ones(context_mask.shape[0], n_img, dtype=torch.bool, device=context_mask.device)
        return torch.cat([context_mask.bool(), keep_img], dim=1)[:, None, None, :]

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        y: torch.Tensor,
        skip_layers: Sequence[int] | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        p = self.config.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"latent size {tuple(x.shape[-2:])} is not a multiple of the patch size {p}")
        h, w = x.shape[-2] // p, x.shape[-1] // p
        hidden = self.x_embedder(x)  # (B, h*w, D); the residual stream keeps this dtype
        hidden = hidden + self.cropped_pos_embed(h, w).to(hidden.dtype)
        t_freq = timestep_embedding(timesteps.reshape(-1).expand(x.shape[0]))
        c = self.t_embedder(t_freq.to(self.t_embedder.mlp[0].weight.dtype)) + self.y_embedder(y)
        ctx = self.context_embedder(context)
        mask = self._attention_mask(context_mask, h * w)
        skip = set(skip_layers or ())
        for i, block in enumerate(self.joint_blocks):
            if i in skip:
                continue
            if self.gradient_checkpointing and torch.is_grad_enabled() and self.cpu_offload_checkpointing:
                ctx, hidden = offloaded_checkpoint(block, ctx, hidden, c, mask)
            elif self.gradient_checkpointing and torch.is_grad_enabled():
                ctx, hidden = checkpoint(block, ctx, hidden, c, mask, use_reentrant=False)
            else:
                ctx, hidden = block(ctx, hidden, c, mask)
        return self.unpatchify(self.final_layer(hidden, c), h, w)
