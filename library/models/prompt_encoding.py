"""Prompts -> MMDiT conditioning (``context``, ``pooled``), as SD3 defines it (DESIGN §3).

Three steps, so that text-encoder caches can store the middle result and still get dropout:
1. :func:`tokenize_prompts`: CLIP-L and CLIP-G 77 tokens (pad to max length, truncation keeps the
   EOS last; CLIP-L pads with EOS 49407, CLIP-G with id 0), T5 ``t5_max_length`` tokens (pad 0).
2. :func:`encode_tokens` -> :class:`EncoderOutputs`: per CLIP the penultimate hidden state
   (``hidden_states[-2]``, no final LayerNorm) and the projected pooled ``text_embeds``; T5's last
   hidden state. A missing encoder gives ``None``.
3. :func:`apply_dropout` (per sample, zeros) and :func:`assemble_conditioning`:
   ``context = cat(pad(cat(L, G, -1), to the context width), T5)`` along the sequence, shape
   (B, 77 + T, D), and ``pooled = cat(L_pooled, G_pooled)``; ``None``/dropped parts are zeros.

Widths come from :class:`TextLayout` (real SD3: 768 + 1280 -> 4096, pooled 2048), by default
read from the loaded encoders (context width = T5 ``d_model``) with the real sizes for missing ones.
``apply_lg_attn_mask`` / ``apply_t5_attn_mask`` zero the embeddings of padding tokens (sd-scripts'
flags); the T5 mask also goes into T5's attention. Both are off by default, as in every reference.
This matches diffusers' ``StableDiffusion3Pipeline.encode_prompt`` (clip_skip None) exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Sequence

import torch
import torch.nn.functional as F

CLIP_TOKENS = 77
DEFAULT_T5_MAX_LENGTH = 256
DropoutSpec = float | Sequence[bool] | torch.Tensor | None


@dataclass(frozen=True)
class PromptTokens:
    """Token ids and attention masks (1 = real token), each (B, 77) for CLIP or (B, T) for T5."""

    clip_l: torch.Tensor
    clip_l_mask: torch.Tensor
    clip_g: torch.Tensor
    clip_g_mask: torch.Tensor
    t5: torch.Tensor | None = None
    t5_mask: torch.Tensor | None = None


@dataclass(frozen=True)
class TextLayout:
    """Widths of the conditioning: CLIP sequences, CLIP pooled outputs, and the joint context."""

    clip_l_width: int = 768
    clip_l_pooled: int = 768
    clip_g_width: int = 1280
    clip_g_pooled: int = 1280
    context_dim: int = 4096

    @property
    def pooled_dim(self) -> int:
        return self.clip_l_pooled + self.clip_g_pooled


SD3_TEXT_LAYOUT = TextLayout()


@dataclass(frozen=True)
class EncoderOutputs:
    """Raw per-encoder outputs (what a text-encoder cache stores); ``None`` for a missing encoder."""

    clip_l: torch.Tensor | None  # (B, 77, Wl)
    clip_l_pooled: torch.Tensor | None  # (B, Pl)
    clip_g: torch.Tensor | None  # (B, 77, Wg)
    clip_g_pooled: torch.Tensor | None  # (B, Pg)
    t5: torch.Tensor | None  # (B, T, D)
    clip_l_mask: torch.Tensor | None = None  # (B, 77)
    clip_g_mask: torch.Tensor | None = None  # (B, 77)
    t5_mask: torch.Tensor | None = None  # (B, T)

    @property
    def batch_size(self) -> int:
        present = [getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None]
        if not present:
            raise ValueError("EncoderOutputs holds no tensors, so its batch size is unknown")
        return int(present[0].shape[0])


@dataclass(frozen=True)
class Conditioning:
    """MMDiT inputs: ``context`` (B, 77 + T, D) and ``pooled`` (B, Pl + Pg), plus token masks."""

    context: torch.Tensor
    pooled: torch.Tensor
    clip_l_mask: torch.Tensor | None = None
    clip_g_mask: torch.Tensor | None = None
    t5_mask: torch.Tensor | None = None

    @property
    def context_mask(self) -> torch.Tensor:
        """(B, 77 + T) bool: real tokens of either CLIP, then real T5 tokens (all True if unknown)."""
        batch, seq = self.context.shape[:2]
        dev = self.context.device
        clip_masks = [m.to(dev).bool() for m in (self.clip_l_mask, self.clip_g_mask) if m is not None]
        if clip_masks:
            lg = clip_masks[0] | clip_masks[-1]
        else:
            lg = torch.ones(batch, CLIP_TOKENS, dtype=torch.bool, device=dev)
        t5 = torch.ones(batch, seq - CLIP_TOKENS, dtype=torch.bool, device=dev)
        if self.t5_mask is not None:
            t5 = self.t5_mask.to(dev).bool()
        return torch.cat([lg, t5], dim=1)


def _tokenize(tokenizer: Any, prompts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    out = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    return out.input_ids, out.attention_mask


def tokenize_prompts(
    tokenizers: Any, prompts: str | Sequence[str], *, t5_max_length: int = DEFAULT_T5_MAX_LENGTH
) -> PromptTokens:
    """Tokenize for all three encoders (``tokenizers``: a ``library.models.tokenizers.Tokenizers``)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    l_ids, l_mask = _tokenize(tokenizers.clip_l, prompts, CLIP_TOKENS)
    g_ids, g_mask = _tokenize(tokenizers.clip_g, prompts, CLIP_TOKENS)
    t5_ids, t5_mask = (None, None)
    if tokenizers.t5 is not None:
        t5_ids, t5_mask = _tokenize(tokenizers.t5, prompts, t5_max_length)
    return PromptTokens(l_ids, l_mask, g_ids, g_mask, t5_ids, t5_mask)


def layout_from_encoders(encoders: Any, base: TextLayout = SD3_TEXT_LAYOUT) -> TextLayout:
    """Widths of the loaded encoders (``encoders``: a ``TextEncoders``); ``base`` for missing ones."""
    updates: dict[str, int] = {}
    for name in ("clip_l", "clip_g"):
        model = getattr(encoders, name)
        if model is not None:
            updates[f"{name}_width"] = model.config.hidden_size
            updates[f"{name}_pooled"] = model.config.projection_dim
    if encoders.t5xxl is not None:
        updates.update(context_dim=encoders.t5xxl.config.d_model)
    return replace(base, **updates)


def _run_clip(model: Any, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(ids.to(model.device), output_hidden_states=True)
    return out.hidden_states[-2], out.text_embeds  # penultimate layer (no final LayerNorm), projected pooled


def _run_t5(model: Any, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    mask = mask.to(model.device) if mask is not None else None
    return model(ids.to(model.device), attention_mask=mask).last_hidden_state


def encode_tokens(encoders: Any, tokens: PromptTokens, *, apply_t5_attn_mask: bool = False) -> EncoderOutputs:
    """Run the loaded encoders (no grad handling here: callers choose ``torch.no_grad`` or not)."""
    l_seq = l_pooled = g_seq = g_pooled = t5_seq = None
    if encoders.clip_l is not None:
        l_seq, l_pooled = _run_clip(encoders.clip_l, tokens.clip_l)
    if encoders.clip_g is not None:
        g_seq, g_pooled = _run_clip(encoders.clip_g, tokens.clip_g)
    if encoders.t5xxl is not None:
        if tokens.t5 is None:
            raise ValueError("T5 is loaded but the prompts were tokenized without a T5 tokenizer")
        t5_seq = _run_t5(encoders.t5xxl, tokens.t5, tokens.t5_mask if apply_t5_attn_mask else None)
    masks = (tokens.clip_l_mask, tokens.clip_g_mask, tokens.t5_mask)
    return EncoderOutputs(l_seq, l_pooled, g_seq, g_pooled, t5_seq, *masks)


def dropout_mask(batch: int, spec: DropoutSpec, generator: torch.Generator | None = None) -> torch.Tensor | None:
    """(B,) bool, True = drop: from a rate (drawn with ``generator``) or given per-sample flags."""
    if spec is None:
        return None
    if isinstance(spec, (float, int)) and not isinstance(spec, bool):
        if not 0.0 <= spec <= 1.0:
            raise ValueError(f"dropout rate must be in [0, 1], got {spec}")
        return torch.rand(batch, generator=generator) < spec
    mask = torch.as_tensor(spec, dtype=torch.bool).flatten().cpu()
    if mask.shape[0] != batch:
        raise ValueError(f"dropout mask has {mask.shape[0]} entries for a batch of {batch}")
    return mask


def _zero_rows(x: torch.Tensor | None, drop: torch.Tensor | None) -> torch.Tensor | None:
    if x is None or drop is None:
        return x
    keep = ~drop.to(x.device).view(-1, *([1] * (x.dim() - 1)))
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def apply_dropout(
    outputs: EncoderOutputs,
    *,
    clip_l: DropoutSpec = None,
    clip_g: DropoutSpec = None,
    t5: DropoutSpec = None,
    generator: torch.Generator | None = None,
) -> EncoderOutputs:
    """Zero the dropped samples of each encoder (rates draw from ``generator`` in L, G, T5 order)."""
    batch = outputs.batch_size
    drop_l, drop_g, drop_t5 = (dropout_mask(batch, spec, generator) for spec in (clip_l, clip_g, t5))
    return replace(
        outputs,
        clip_l=_zero_rows(outputs.clip_l, drop_l),
        clip_l_pooled=_zero_rows(outputs.clip_l_pooled, drop_l),
        clip_g=_zero_rows(outputs.clip_g, drop_g),
        clip_g_pooled=_zero_rows(outputs.clip_g_pooled, drop_g),
        t5=_zero_rows(outputs.t5, drop_t5),
    )


def _masked(x: torch.Tensor, mask: torch.Tensor | None, apply: bool) -> torch.Tensor:
    if not apply or mask is None:
        return x
    return x * mask.to(device=x.device, dtype=x.dtype).unsqueeze(-1)


def _or_zeros(
    x: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    return x.to(device=device, dtype=dtype) if x is not None else torch.zeros(shape, dtype=dtype, device=device)


def assemble_conditioning(
    outputs: EncoderOutputs,
    layout: TextLayout = SD3_TEXT_LAYOUT,
    *,
    t5_length: int = DEFAULT_T5_MAX_LENGTH,
    apply_lg_attn_mask: bool = False,
    apply_t5_attn_mask: bool = False,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Conditioning:
    """``context`` (B, 77 + T, D) and ``pooled`` (B, Pl + Pg) from per-encoder outputs."""
    present = [t for t in (outputs.clip_l, outputs.clip_g, outputs.t5, outputs.clip_l_pooled) if t is not None]
    dtype = dtype or (present[0].dtype if present else torch.float32)
    device = torch.device(device) if device is not None else (present[0].device if present else torch.device("cpu"))
    b, d = outputs.batch_size, layout.context_dim
    l_seq = _or_zeros(outputs.clip_l, (b, CLIP_TOKENS, layout.clip_l_width), dtype, device)
    g_seq = _or_zeros(outputs.clip_g, (b, CLIP_TOKENS, layout.clip_g_width), dtype, device)
    l_seq = _masked(l_seq, outputs.clip_l_mask, apply_lg_attn_mask)
    g_seq = _masked(g_seq, outputs.clip_g_mask, apply_lg_attn_mask)
    lg = torch.cat([l_seq, g_seq], dim=-1)  # (B, 77, Wl + Wg)
    if lg.shape[-1] > d:
        raise ValueError(f"CLIP widths {l_seq.shape[-1]} + {g_seq.shape[-1]} exceed the context width {d}")
    lg = F.pad(lg, (0, d - lg.shape[-1]))  # (B, 77, D)
    t5 = _masked(_or_zeros(outputs.t5, (b, t5_length, d), dtype, device), outputs.t5_mask, apply_t5_attn_mask)
    if t5.shape[-1] != d:
        raise ValueError(f"T5 width {t5.shape[-1]} differs from the context width {d}")
    pooled = torch.cat(
        [
            _or_zeros(outputs.clip_l_pooled, (b, layout.clip_l_pooled), dtype, device),
            _or_zeros(outputs.clip_g_pooled, (b, layout.clip_g_pooled), dtype, device),
        ],
        dim=-1,
    )  # (B, Pl + Pg)
    context = torch.cat([lg, t5], dim=1)  # (B, 77 + T, D)
    return Conditioning(context, pooled, outputs.clip_l_mask, outputs.clip_g_mask, outputs.t5_mask)


def encode_prompts(
    encoders: Any,
    tokenizers: Any,
    prompts: str | Sequence[str],
    *,
    t5_max_length: int = DEFAULT_T5_MAX_LENGTH,
    apply_lg_attn_mask: bool = False,
    apply_t5_attn_mask: bool = False,
    clip_l_dropout: DropoutSpec = None,
    clip_g_dropout: DropoutSpec = None,
    t5_dropout: DropoutSpec = None,
    generator: torch.Generator | None = None,
    layout: TextLayout | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Conditioning:
    """Tokenize, encode, drop out and assemble in one call (see the module docstring)."""
    tokens = tokenize_prompts(tokenizers, prompts, t5_max_length=t5_max_length)
    outputs = encode_tokens(encoders, tokens, apply_t5_attn_mask=apply_t5_attn_mask)
    outputs = apply_dropout(outputs, clip_l=clip_l_dropout, clip_g=clip_g_dropout, t5=t5_dropout, generator=generator)
    return assemble_conditioning(
        outputs,
        layout or layout_from_encoders(encoders),
        t5_length=t5_max_length,
        apply_lg_attn_mask=apply_lg_attn_mask,
        apply_t5_attn_mask=apply_t5_attn_mask,
        dtype=dtype,
        device=device,
    )
