"""MMDiT: parity with diffusers' SD3Transformer2DModel, real sizes, options and loader errors."""

from __future__ import annotations

import json

import pytest
import torch

from library.errors import UserError
from library.models.loading import build_mmdit, load_mmdit, read_mmdit_config
from library.models.mmdit_config import (
    MMDiTConfig,
    VARIANTS,
    infer_mmdit_config,
    mmdit_shapes,
    real_config,
    to_diffusers_config,
)
from library.models.modelspec import modelspec_metadata
from library.models.saving import save_sd3_checkpoint
from library.models.tiny.mmdit import tiny_mmdit_config, tiny_mmdit_state_dict

CASES = [(v, hed) for v in VARIANTS for hed in (False, True)]


def _inputs(cfg: MMDiTConfig, batch: int = 2, h: int = 24, w: int = 16, n_ctx: int = 20, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, h, w, generator=gen)
    t = torch.rand(batch, generator=gen) * 1000
    ctx = torch.randn(batch, n_ctx, cfg.context_dim, generator=gen)
    y = torch.randn(batch, cfg.pooled_dim, generator=gen)
    return x, t, ctx, y


def _save_tiny(path, variant: str, heads_equal_depth: bool = False, seed: int = 0) -> MMDiTConfig:
    cfg = tiny_mmdit_config(variant, heads_equal_depth=heads_equal_depth)
    meta = modelspec_metadata(cfg, title="tiny", date="2026-01-01T00:00:00")
    save_sd3_checkpoint(path, tiny_mmdit_state_dict(cfg, seed), cfg, metadata=meta)
    return cfg


def _diffusers_from_sai(path, cfg: MMDiTConfig):
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    from safetensors.torch import load_file

    converted = convert_sd3_transformer_checkpoint_to_diffusers(load_file(str(path)))
    config = {k: v for k, v in to_diffusers_config(cfg).items() if not k.startswith("_")}
    model = SD3Transformer2DModel(**config)
    model.load_state_dict(converted, strict=True)
    return model.eval()


@pytest.mark.parametrize("variant,heads_equal_depth", CASES)
def test_parity_with_diffusers(tmp_path, variant, heads_equal_depth):
    path = tmp_path / "m.safetensors"
    cfg = _save_tiny(path, variant, heads_equal_depth)
    ours = load_mmdit(path, dtype=torch.float32)
    assert ours.config == cfg
    theirs = _diffusers_from_sai(path, cfg)
    x, t, ctx, y = _inputs(cfg)  # 24x16 latent = 12x8 patches inside a 16x16 grid, non-square
    with torch.no_grad():
        for skip in (None, [1]):
            a = ours(x, t, ctx, y, skip_layers=skip)
            b = theirs(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t, skip_layers=skip)
            assert a.shape == x.shape
            assert (a - b.sample).abs().max().item() <= 1e-5
    # skip_layers must change the output, otherwise the check above proves nothing about it
    with torch.no_grad():
        assert (ours(x, t, ctx, y) - ours(x, t, ctx, y, skip_layers=[1])).abs().max() > 1e-3


def test_from_single_file_offline(tmp_path):
    from diffusers import SD3Transformer2DModel

    path = tmp_path / "m.safetensors"
    cfg = _save_tiny(path, "sd35-medium")
    config_dir = tmp_path / "cfg"
    config_dir.mkdir()
    (config_dir / "config.json").write_text(json.dumps(to_diffusers_config(cfg)))
    theirs = SD3Transformer2DModel.from_single_file(str(path), config=str(config_dir), local_files_only=True)
    theirs = theirs.float().eval()
    ours = load_mmdit(path)
    x, t, ctx, y = _inputs(cfg)
    with torch.no_grad():
        diff = ours(x, t, ctx, y) - theirs(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t).sample
    assert diff.abs().max().item() <= 1e-5


@pytest.mark.parametrize("variant,expected", [("sd3-medium", 2.028), ("sd35-medium", 2.243), ("sd35-large", 8.057)])
def test_real_sizes_on_meta(variant, expected):
    cfg = infer_mmdit_config(mmdit_shapes(real_config(variant)))
    assert cfg == real_config(variant) and cfg.num_heads == cfg.depth and cfg.head_dim == 64
    model = build_mmdit(cfg)
    params = sum(p.numel() for p in model.parameters())  # pos_embed is a buffer, not counted
    assert round(params / 1e9, 3) == expected
    assert model.pos_embed.shape == (1, cfg.pos_embed_max_size**2, cfg.hidden_size)


def test_roundtrip_is_bit_identical(tmp_path):
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    cfg = _save_tiny(first, "sd35-large")
    model = load_mmdit(first)
    from library.models.safetensors_io import read_metadata

    save_sd3_checkpoint(second, model.state_dict(), model.config, metadata=read_metadata(first))
    assert first.read_bytes() == second.read_bytes()
    assert read_mmdit_config(first) == cfg


def test_mmap_and_full_read_agree(tmp_path):
    path = tmp_path / "m.safetensors"
    cfg = _save_tiny(path, "sd3-medium")
    a, b = load_mmdit(path, mmap=True), load_mmdit(path, mmap=False)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_dtype_at_load_and_save(tmp_path):
    path, half = tmp_path / "m.safetensors", tmp_path / "h.safetensors"
    cfg = _save_tiny(path, "sd35-medium")
    model = load_mmdit(path)
    save_sd3_checkpoint(half, model.state_dict(), cfg, metadata={}, dtype=torch.bfloat16)
    loaded = load_mmdit(half)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert load_mmdit(half, dtype=torch.float32).pos_embed.dtype == torch.float32


def test_key_padding_mask_equals_dropping_tokens():
    cfg = tiny_mmdit_config("sd35-medium")
    model = load_mmdit(tiny_mmdit_state_dict(cfg), config=cfg)
    x, t, ctx, y = _inputs(cfg, batch=1, n_ctx=12)
    keep = torch.ones(1, 12, dtype=torch.bool)
    keep[:, 7:] = False
    with torch.no_grad():
        masked = model(x, t, ctx, y, context_mask=keep)
        dropped = model(x, t, ctx[:, :7], y)
        unmasked = model(x, t, ctx, y)
        all_true = model(x, t, ctx, y, context_mask=torch.ones(1, 12, dtype=torch.bool))
    assert (masked - dropped).abs().max() <= 1e-5
    assert (masked - unmasked).abs().max() > 1e-3
    assert (all_true - unmasked).abs().max() <= 1e-5


def test_gradient_checkpointing_same_gradients():
    cfg = tiny_mmdit_config("sd35-medium")
    sd = tiny_mmdit_state_dict(cfg)
    grads = []
    for ckpt in (False, True):
        model = load_mmdit(sd, config=cfg).train()
        model.gradient_checkpointing = ckpt
        x, t, ctx, y = _inputs(cfg)
        model(x, t, ctx, y).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_position_crop_options():
    cfg = tiny_mmdit_config("sd3-medium")
    model = load_mmdit(tiny_mmdit_state_dict(cfg), config=cfg)
    table = model.pos_embed.view(16, 16, -1)
    centre = model.cropped_pos_embed(4, 6).view(4, 6, -1)
    assert torch.equal(centre, table[6:10, 5:11])
    model.train()
    model.pos_emb_random_crop_rate = 1.0
    crops = {model.cropped_pos_embed(4, 6).sum().item() for _ in range(20)}
    assert len(crops) > 1  # random positions in training
    model.eval()
    assert torch.equal(model.cropped_pos_embed(4, 6).view(4, 6, -1), centre)  # never at inference
    x, t, ctx, y = _inputs(cfg, h=34, w=16)
    with pytest.raises(ValueError, match="larger than the position table"):
        model(x, t, ctx, y)


def test_scaled_pos_embed_matches_sincos_at_base():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    from library.models.embeddings import crop_pos_embed, scaled_pos_embed, sincos_2d

    dim, grid, base = 32, 24, 8
    ref = get_2d_sincos_pos_embed(dim, grid, base_size=base, interpolation_scale=1.0, output_type="pt")
    ours = sincos_2d(dim, torch.arange(grid) * (base / grid), torch.arange(grid) * (base / grid))
    assert torch.allclose(ours.float(), ref.float(), atol=1e-6)
    table = ours.float().unsqueeze(0)
    at_base = scaled_pos_embed(dim, base, base, grid, base, patched_size=base)
    assert torch.allclose(at_base, crop_pos_embed(table, grid, base, base, 8, 8), atol=1e-6)
    double = scaled_pos_embed(dim, 2 * base, 2 * base, grid, base, patched_size=2 * base)
    # same coordinate span at twice the resolution: corners agree with the base crop's corners
    corners = double.view(2 * base, 2 * base, dim)[[0, -1]][:, [0, -1]]
    base_corners = at_base.view(base, base, dim)[[0, -1]][:, [0, -1]]
    assert (corners - base_corners).abs().max() < 0.3


def test_timestep_embedding_float32_under_autocast():
    from diffusers.models.embeddings import Timesteps

    from library.models.embeddings import timestep_embedding

    t = torch.tensor([0.0, 1.5, 999.9])
    ref = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)(t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = timestep_embedding(t)
    assert ours.dtype == torch.float32
    assert torch.allclose(ours, ref, atol=1e-6)


def test_bf16_autocast_close_to_fp32():
    cfg = tiny_mmdit_config("sd35-medium")
    model = load_mmdit(tiny_mmdit_state_dict(cfg), config=cfg)
    x, t, ctx, y = _inputs(cfg)
    with torch.no_grad():
        ref = model(x, t, ctx, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t, ctx, y)
    rel = (low.float() - ref).norm() / ref.norm()
    assert 0 < rel < 3e-2


def _write_raw(path, tensors, metadata=None):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)


@pytest.mark.parametrize(
    "keys,needle",
    [
        ({"model.diffusion_model.input_blocks.0.0.weight": (4, 4)}, "SDXL"),
        ({"double_blocks.0.img_attn.qkv.weight": (4, 4)}, "FLUX"),
        ({"encoder.down.0.block.0.conv1.weight": (4, 4)}, "VAE"),
    ],
)
def test_wrong_model_is_one_line_error(tmp_path, keys, needle):
    path = tmp_path / "wrong.safetensors"
    _write_raw(path, {k: torch.zeros(s) for k, s in keys.items()})
    with pytest.raises(UserError) as err:
        load_mmdit(path)
    message = str(err.value)
    assert needle in message and str(path) in message and "\n" not in message


def test_missing_pos_embed_truncated_and_missing_path(tmp_path):
    path = tmp_path / "m.safetensors"
    cfg = _save_tiny(path, "sd3-medium")
    sd = {("model.diffusion_model." + k): v for k, v in tiny_mmdit_state_dict(cfg).items() if k != "pos_embed"}
    no_pos = tmp_path / "nopos.safetensors"
    _write_raw(no_pos, sd)
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    cases = [(no_pos, "pos_embed"), (truncated, "truncated"), (tmp_path / "absent.safetensors", "not found")]
    for bad, needle in cases:
        with pytest.raises(UserError) as err:
            load_mmdit(bad)
        assert needle in str(err.value) and str(bad) in str(err.value) and "\n" not in str(err.value)


def test_unknown_variant_and_shape_mismatch(tmp_path):
    with pytest.raises(UserError, match="unknown model variant"):
        real_config("sd4")
    cfg = tiny_mmdit_config("sd35-large")
    sd = tiny_mmdit_state_dict(cfg)
    sd["context_embedder.weight"] = torch.zeros(cfg.hidden_size, cfg.context_dim + 1)
    with pytest.raises(UserError, match="context_embedder.weight"):
        load_mmdit(sd, config=cfg)
