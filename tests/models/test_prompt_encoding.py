"""Prompt encoding: parity with diffusers' StableDiffusion3Pipeline.encode_prompt, dropout, masks, layout."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from library.models.prompt_encoding import (
    CLIP_TOKENS,
    SD3_TEXT_LAYOUT,
    EncoderOutputs,
    apply_dropout,
    assemble_conditioning,
    dropout_mask,
    encode_prompts,
    encode_tokens,
    layout_from_encoders,
    tokenize_prompts,
)
from library.models.text_encoders import TextEncoders
from library.models.tiny.text import TINY_CONTEXT_DIM, TINY_POOLED_DIM, tiny_text_encoder_state_dicts
from tests.models._text_fixtures import (  # noqa: F401
    PROMPTS,
    T5_LEN,
    max_diff,
    tiny_encoders,
    tiny_text_dir,
    tiny_text_files,
    tiny_tokenizer_dir,
    tiny_tokenizers,
)


def _oracle_modules() -> dict:
    """The tiny encoders built directly with transformers (independent of our loader)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    out = {}
    for name, (sd, cfg) in tiny_text_encoder_state_dicts().items():
        cfg = json.loads(cfg)
        if name == "t5xxl":
            model = T5EncoderModel(T5Config(**cfg))
            sd = {**sd, "encoder.embed_tokens.weight": sd["shared.weight"]}
        else:
            model = CLIPTextModelWithProjection(CLIPTextConfig(**cfg))
            if name == "clip_l":  # SD3 / diffusers single-file: identity projection for CLIP-L
                sd = {**sd, "text_projection.weight": torch.eye(cfg["hidden_size"])}
        model.load_state_dict(sd, strict=True)
        out[name] = model.eval()
    return out


@pytest.fixture(scope="module")
def diffusers_pipe(tiny_tokenizer_dir: Path):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer, T5Tokenizer

    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=TINY_CONTEXT_DIM, caption_projection_dim=16, pooled_projection_dim=TINY_POOLED_DIM,
        out_channels=16, pos_embed_max_size=16,
    )  # fmt: skip
    mods = _oracle_modules()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=mods["clip_l"],
        tokenizer=CLIPTokenizer.from_pretrained(tiny_tokenizer_dir / "tokenizer"),
        text_encoder_2=mods["clip_g"],
        tokenizer_2=CLIPTokenizer.from_pretrained(tiny_tokenizer_dir / "tokenizer_2"),
        text_encoder_3=mods["t5xxl"],
        tokenizer_3=T5Tokenizer.from_pretrained(tiny_tokenizer_dir / "tokenizer_3"),
    )


def _reference(pipe, prompts, with_t5: bool) -> tuple[torch.Tensor, torch.Tensor]:
    saved = pipe.text_encoder_3
    pipe.text_encoder_3 = saved if with_t5 else None
    try:
        with torch.no_grad():
            context, _, pooled, _ = pipe.encode_prompt(
                prompt=prompts, prompt_2=None, prompt_3=None, device=torch.device("cpu"),
                do_classifier_free_guidance=False, max_sequence_length=T5_LEN,
            )  # fmt: skip
    finally:
        pipe.text_encoder_3 = saved
    return context, pooled


@pytest.mark.parametrize("with_t5", [True, False], ids=["t5", "no_t5"])
def test_matches_diffusers_encode_prompt(diffusers_pipe, tiny_encoders, tiny_tokenizers, with_t5):
    tokens = tokenize_prompts(tiny_tokenizers, PROMPTS, t5_max_length=T5_LEN)
    assert int(tokens.clip_l_mask[1].sum()) == CLIP_TOKENS and tokens.clip_l[1, -1] == 49407  # truncated
    assert (tokens.clip_g[0, 7:] == 0).all() and (tokens.clip_l[0, 7:] == 49407).all()
    encoders = TextEncoders(tiny_encoders.clip_l, tiny_encoders.clip_g, tiny_encoders.t5xxl if with_t5 else None)
    # as diffusers, take the context width from the MMDiT (it matters only without T5)
    layout = replace(layout_from_encoders(encoders), context_dim=diffusers_pipe.transformer.config.joint_attention_dim)
    with torch.no_grad():
        ours = encode_prompts(encoders, tiny_tokenizers, PROMPTS, t5_max_length=T5_LEN, layout=layout)
    ref_context, ref_pooled = _reference(diffusers_pipe, PROMPTS, with_t5)
    assert ours.context.shape == ref_context.shape == (2, CLIP_TOKENS + T5_LEN, TINY_CONTEXT_DIM)
    assert ours.pooled.shape == ref_pooled.shape == (2, TINY_POOLED_DIM)
    assert max_diff(ours.context, ref_context) <= 1e-6
    assert max_diff(ours.pooled, ref_pooled) <= 1e-6
    assert ours.context[:, :CLIP_TOKENS, 16 + 28 :].abs().max() == 0  # zero padding of the CLIP part
    assert (ours.context[:, CLIP_TOKENS:].abs().amax(dim=(1, 2)) > 0).tolist() == [with_t5, with_t5]


@pytest.fixture(scope="module")
def full(tiny_encoders, tiny_tokenizers) -> EncoderOutputs:
    tokens = tokenize_prompts(tiny_tokenizers, PROMPTS + ["", "a red cat"], t5_max_length=T5_LEN)
    with torch.no_grad():
        return encode_tokens(tiny_encoders, tokens)


def test_dropout_zeroes_exactly_the_dropped_samples(full, tiny_encoders):
    layout = layout_from_encoders(tiny_encoders)
    base = assemble_conditioning(full, layout, t5_length=T5_LEN)
    drop_l, drop_g, drop_t5 = [True, False, False, True], [False, True, False, True], [False, False, True, True]
    outputs = apply_dropout(full, clip_l=drop_l, clip_g=drop_g, t5=drop_t5)
    dropped = assemble_conditioning(outputs, layout, t5_length=T5_LEN)
    parts = {  # name: (context slice, pooled slice, drop flags)
        "clip_l": ((slice(None, CLIP_TOKENS), slice(0, 16)), slice(0, 16), drop_l),
        "clip_g": ((slice(None, CLIP_TOKENS), slice(16, 44)), slice(16, 40), drop_g),
        "t5": ((slice(CLIP_TOKENS, None), slice(None)), None, drop_t5),
    }
    for name, (ctx_idx, pooled_idx, flags) in parts.items():
        for i, drop in enumerate(flags):
            got, ref = dropped.context[i][ctx_idx], base.context[i][ctx_idx]
            assert torch.equal(got, torch.zeros_like(got) if drop else ref), (name, i)
            if pooled_idx is not None:
                p_got, p_ref = dropped.pooled[i, pooled_idx], base.pooled[i, pooled_idx]
                assert torch.equal(p_got, torch.zeros_like(p_got) if drop else p_ref), (name, i)


def test_dropout_rates_use_the_generator(full):
    a = apply_dropout(full, clip_l=0.5, t5=0.5, generator=torch.Generator().manual_seed(3))
    b = apply_dropout(full, clip_l=0.5, t5=0.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.clip_l, b.clip_l) and torch.equal(a.t5, b.t5)
    assert apply_dropout(full, clip_g=1.0).clip_g.abs().max() == 0
    assert torch.equal(apply_dropout(full, clip_g=0.0).clip_g, full.clip_g)
    flags = dropout_mask(1000, 0.3, torch.Generator().manual_seed(0))
    assert 200 < int(flags.sum()) < 400
    with pytest.raises(ValueError):
        dropout_mask(4, [True, False])


def test_missing_encoders_contribute_zeros(tiny_encoders, tiny_tokenizers):
    with torch.no_grad():
        full = encode_prompts(tiny_encoders, tiny_tokenizers, PROMPTS, t5_max_length=T5_LEN)
        no_l = encode_prompts(
            TextEncoders(None, tiny_encoders.clip_g, tiny_encoders.t5xxl), tiny_tokenizers, PROMPTS,
            t5_max_length=T5_LEN, layout=layout_from_encoders(tiny_encoders),
        )  # fmt: skip
    assert no_l.context[:, :CLIP_TOKENS, :16].abs().max() == 0 and no_l.pooled[:, :16].abs().max() == 0
    assert torch.equal(no_l.context[:, :, 16:], full.context[:, :, 16:])
    assert torch.equal(no_l.pooled[:, 16:], full.pooled[:, 16:])


def test_real_layout_without_encoders_is_all_zeros():
    outputs = EncoderOutputs(None, None, None, None, None, clip_l_mask=torch.ones(2, CLIP_TOKENS))
    cond = assemble_conditioning(outputs, SD3_TEXT_LAYOUT, t5_length=256)
    assert cond.context.shape == (2, 77 + 256, 4096) and cond.pooled.shape == (2, 2048)
    assert cond.context.abs().max() == 0 and cond.pooled.abs().max() == 0


def test_attention_masks_zero_padding_embeddings(full, tiny_encoders, tiny_tokenizers):
    layout = layout_from_encoders(tiny_encoders)
    masked = assemble_conditioning(full, layout, t5_length=T5_LEN, apply_lg_attn_mask=True, apply_t5_attn_mask=True)
    plain = assemble_conditioning(full, layout, t5_length=T5_LEN)
    keep = masked.context_mask  # (B, 77 + T)
    assert keep.shape == (4, CLIP_TOKENS + T5_LEN) and keep[:, 0].all()
    assert masked.context[~keep].abs().max() == 0
    assert torch.equal(masked.context[keep], plain.context[keep])  # CLIP is causal: real tokens unchanged
    assert torch.equal(masked.pooled, plain.pooled)
    with torch.no_grad():
        args = (tiny_encoders, tiny_tokenizers, ["a red cat"])
        t5_masked = encode_prompts(*args, t5_max_length=T5_LEN, apply_t5_attn_mask=True)
        t5_plain = encode_prompts(*args, t5_max_length=T5_LEN)
    real = t5_masked.context_mask[0, CLIP_TOKENS:]
    # T5 is bidirectional: masking the padding changes the real tokens' embeddings too
    assert max_diff(t5_masked.context[0, CLIP_TOKENS:][real], t5_plain.context[0, CLIP_TOKENS:][real]) > 1e-4


def test_output_dtype_and_layout(tiny_encoders, tiny_tokenizers):
    layout = layout_from_encoders(tiny_encoders)
    assert (layout.context_dim, layout.pooled_dim, layout.clip_g_width) == (TINY_CONTEXT_DIM, TINY_POOLED_DIM, 28)
    with torch.no_grad():
        cond = encode_prompts(tiny_encoders, tiny_tokenizers, "a photo of a cat", t5_max_length=8, dtype=torch.bfloat16)
    assert cond.context.dtype == cond.pooled.dtype == torch.bfloat16
    assert cond.context.shape == (1, CLIP_TOKENS + 8, TINY_CONTEXT_DIM)
