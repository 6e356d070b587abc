"""Text encoder loading: sources, config inference and metadata, dtypes, errors, saving."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from library.errors import UserError
from library.models.safetensors_io import load_safetensors, read_metadata, save_safetensors
from library.models.text_encoders import (
    TextEncoders,
    clip_from_state_dict,
    infer_clip_config,
    infer_t5_config,
    load_text_encoders,
    t5_from_state_dict,
    text_encoder_metadata,
    text_encoder_state_dicts_for_checkpoint,
)
from library.models.tiny.text import TINY_CONFIGS, tiny_text_encoder_state_dicts
from tests.models._text_fixtures import (  # noqa: F401
    max_diff,
    one_line,
    tiny_encoders,
    tiny_text_dir,
    tiny_text_files,
)

IDS = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70, [49406, 2368] + [49407] * 75])
T5_IDS = torch.tensor([[5, 9, 17, 40, 1, 0, 0, 0], [7, 7, 1, 0, 0, 0, 0, 0]])


def _clip_out(model, ids=IDS):
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    return out.hidden_states[-2], out.text_embeds


def _t5_out(model, ids=T5_IDS):
    with torch.no_grad():
        return model(ids).last_hidden_state


def _assert_same_encoders(a, b, tol: float = 0.0) -> None:
    for name in ("clip_l", "clip_g"):
        for x, y in zip(_clip_out(getattr(a, name)), _clip_out(getattr(b, name))):
            assert max_diff(x, y) <= tol, name
    assert max_diff(_t5_out(a.t5xxl), _t5_out(b.t5xxl)) <= tol


def test_all_in_one_and_separate_files_give_identical_encoders(tiny_encoders, tiny_text_files):
    separate = load_text_encoders(
        None, tiny_text_files["clip_l"], tiny_text_files["clip_g"], tiny_text_files["t5xxl"]
    )
    _assert_same_encoders(tiny_encoders, separate)
    assert _clip_out(tiny_encoders.clip_l)[1].shape == (2, 16)
    assert _clip_out(tiny_encoders.clip_g)[1].shape == (2, 24)


def test_separate_file_wins_and_transformer_prefix_is_tolerated(tmp_path, tiny_encoders, tiny_text_files):
    sd, cfg = tiny_text_encoder_state_dicts(seed=7)["clip_g"]
    path = tmp_path / "clip_g_prefixed.safetensors"
    save_safetensors({"transformer." + k: v for k, v in sd.items()}, path, {"sd3_trainer.clip_g_config": cfg})
    enc = load_text_encoders(tiny_text_files["all_in_one"], clip_g_path=path)
    other = _clip_out(enc.clip_g)[1]
    assert max_diff(other, _clip_out(tiny_encoders.clip_g)[1]) > 1e-3  # seed 7, not the checkpoint's
    direct = clip_from_state_dict(sd, cfg, "g")
    assert max_diff(other, _clip_out(direct)[1]) == 0.0
    assert max_diff(_clip_out(enc.clip_l)[0], _clip_out(tiny_encoders.clip_l)[0]) == 0.0


def test_modules_are_eval_frozen_and_t5_is_deterministic(tiny_encoders):
    for model in tiny_encoders.present().values():
        assert not model.training
        assert not any(p.requires_grad for p in model.parameters())
    t5 = tiny_encoders.t5xxl
    assert t5.config.dropout_rate == pytest.approx(0.1)  # real value, harmless in eval mode
    assert torch.equal(_t5_out(t5), _t5_out(t5))
    assert t5.encoder.embed_tokens.weight is t5.shared.weight


def test_t5_config_inference_recovers_the_tiny_config():
    sd, _ = tiny_text_encoder_state_dicts()["t5xxl"]
    assert infer_t5_config(sd) == TINY_CONFIGS["t5xxl"]


REAL_CONFIGS = {
    "clip_l": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
               "projection_dim": 768, "hidden_act": "quick_gelu"},
    "clip_g": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
               "projection_dim": 1280, "hidden_act": "gelu"},
    "t5xxl": {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
              "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
              "relative_attention_max_distance": 128},
}  # fmt: skip


def test_config_inference_at_real_sizes():
    """Shapes of the real CLIP-L / CLIP-G / T5-XXL (built on the meta device) give the real configs."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    for name, real in REAL_CONFIGS.items():
        with torch.device("meta"):
            if name == "t5xxl":
                sd = T5EncoderModel(T5Config(**real)).state_dict()
            else:
                sd = CLIPTextModelWithProjection(CLIPTextConfig(**real)).state_dict()
        inferred = infer_t5_config(sd) if name == "t5xxl" else infer_clip_config(sd, name[-1])
        assert {k: inferred[k] for k in real} == real, name


def test_clip_config_inference_real_rules(tmp_path):
    """Head width 64 and quick_gelu/gelu by encoder: a file without metadata matches transformers."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPTextConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=96,
        hidden_act="gelu",
        eos_token_id=49407,
    )
    ref = CLIPTextModelWithProjection(cfg).eval()
    sd = dict(ref.state_dict())
    path = tmp_path / "clip_g.safetensors"
    save_safetensors(sd, path)
    enc = load_text_encoders(clip_g_path=path, load_t5=False)
    assert enc.clip_l is None and enc.t5xxl is None
    assert (enc.clip_g.config.num_attention_heads, enc.clip_g.config.hidden_act) == (2, "gelu")
    for x, y in zip(_clip_out(enc.clip_g), _clip_out(ref)):
        assert max_diff(x, y) == 0.0
    clip_l = clip_from_state_dict(sd, None, "l")
    assert clip_l.config.hidden_act == "quick_gelu"
    assert torch.equal(clip_l.text_projection.weight, torch.eye(128))  # stored projection ignored for CLIP-L


def test_clip_l_pools_unprojected(tiny_encoders):
    sd, cfg = tiny_text_encoder_state_dicts()["clip_l"]
    with_proj = clip_from_state_dict({**sd, "text_projection.weight": torch.randn(16, 16)}, cfg, "l")
    pooled = _clip_out(with_proj)[1]
    with torch.no_grad():
        last = with_proj.text_model(IDS).last_hidden_state  # after the final LayerNorm
    eos = (IDS == 49407).int().argmax(-1)
    assert max_diff(pooled, last[torch.arange(2), eos]) == 0.0
    assert max_diff(pooled, _clip_out(tiny_encoders.clip_l)[1]) == 0.0


@pytest.mark.parametrize("storage", [torch.float16, torch.bfloat16, torch.float8_e4m3fn])
def test_low_precision_storage_loads_into_the_compute_dtype(tmp_path, tiny_encoders, storage):
    sds = tiny_text_encoder_state_dicts()
    path = tmp_path / f"te_{str(storage).split('.')[-1]}.safetensors"
    tensors = {f"text_encoders.{n}.transformer.{k}": v.to(storage) for n, (sd, _) in sds.items() for k, v in sd.items()}
    save_safetensors(tensors, path, {f"sd3_trainer.{n}_config": cfg for n, (_, cfg) in sds.items()})
    low = load_text_encoders(path)

    def rounded_sd(name: str) -> dict[str, torch.Tensor]:
        return {k: v.to(storage).float() for k, v in sds[name][0].items()}

    rounded = TextEncoders(
        clip_l=clip_from_state_dict(rounded_sd("clip_l"), sds["clip_l"][1], "l"),
        clip_g=clip_from_state_dict(rounded_sd("clip_g"), sds["clip_g"][1], "g"),
        t5xxl=t5_from_state_dict(rounded_sd("t5xxl"), sds["t5xxl"][1]),
    )
    assert low.t5xxl.shared.weight.dtype == torch.float32
    _assert_same_encoders(low, rounded)  # exact: only the storage rounding differs
    tol = {torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float8_e4m3fn: 0.35}[storage]  # relative to max |y|
    pairs = [(_t5_out(low.t5xxl), _t5_out(tiny_encoders.t5xxl))]
    pairs += [(_clip_out(low.clip_g)[1], _clip_out(tiny_encoders.clip_g)[1])]
    for got, ref in pairs:
        assert max_diff(got, ref) / ref.abs().max().item() < tol


def test_bf16_compute_and_scaled_fp8(tmp_path, tiny_encoders):
    sd, cfg = tiny_text_encoder_state_dicts()["t5xxl"]
    scaled = {}
    for k, v in sd.items():
        if v.dim() == 2 and "relative_attention_bias" not in k and k != "shared.weight":
            scale = v.abs().max() / 448.0
            scaled[k] = (v / scale).to(torch.float8_e4m3fn)
            scaled[k[: -len("weight")] + "scale_weight"] = scale.reshape(1)
        else:
            scaled[k] = v
    scaled["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    path = tmp_path / "t5xxl_fp8_scaled.safetensors"
    save_safetensors(scaled, path, {"sd3_trainer.t5xxl_config": cfg})
    enc = load_text_encoders(t5xxl_path=path, dtype=torch.bfloat16, t5_dtype=torch.float32)
    assert enc.clip_l is None and enc.t5xxl.shared.weight.dtype == torch.float32
    ref = _t5_out(tiny_encoders.t5xxl)
    assert max_diff(_t5_out(enc.t5xxl), ref) / ref.abs().max() < 0.3
    bf16 = load_text_encoders(t5xxl_path=path, dtype=torch.bfloat16)
    assert bf16.t5xxl.shared.weight.dtype == torch.bfloat16 and _t5_out(bf16.t5xxl).dtype == torch.bfloat16


def test_missing_file_is_a_one_line_user_error(tmp_path):
    with pytest.raises(UserError) as exc:
        load_text_encoders(clip_l_path=tmp_path / "nope.safetensors")
    assert "nope.safetensors" in one_line(exc)


def test_sdxl_file_as_clip_l_or_checkpoint_is_a_user_error(tmp_path):
    path = tmp_path / "sdxl.safetensors"
    save_safetensors(
        {
            "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(4, 2),
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2),
        },
        path,
    )
    with pytest.raises(UserError) as exc:
        load_text_encoders(clip_l_path=path)
    msg = one_line(exc)
    assert "SDXL" in msg and "--clip_l" in msg and str(path) in msg
    with pytest.raises(UserError, match="SDXL"):
        load_text_encoders(ckpt_path=path)


def test_t5_file_as_clip_g_is_a_user_error(tiny_text_files):
    with pytest.raises(UserError) as exc:
        load_text_encoders(clip_g_path=tiny_text_files["t5xxl"])
    assert "T5" in one_line(exc)


def test_missing_and_unexpected_keys_are_user_errors(tmp_path):
    sd, cfg = tiny_text_encoder_state_dicts()["clip_g"]
    broken = {k: v for k, v in sd.items() if "layers.1.mlp.fc2" not in k}
    broken["text_model.encoder.layers.1.extra.weight"] = torch.zeros(1)
    path = tmp_path / "clip_g_broken.safetensors"
    save_safetensors(broken, path, {"sd3_trainer.clip_g_config": cfg})
    with pytest.raises(UserError) as exc:
        load_text_encoders(clip_g_path=path)
    msg = one_line(exc)
    assert str(path) in msg and "layers.1.mlp.fc2.weight" in msg and "extra.weight" in msg


def test_wrong_or_broken_metadata_config_is_a_user_error(tmp_path):
    sd, cfg = tiny_text_encoder_state_dicts()["t5xxl"]
    for bad in (json.dumps({**json.loads(cfg), "d_ff": 65}), "{not json"):
        path = tmp_path / "t5.safetensors"
        save_safetensors(sd, path, {"sd3_trainer.t5xxl_config": bad})
        with pytest.raises(UserError) as exc:
            load_text_encoders(t5xxl_path=path)
        assert str(path) in one_line(exc)


def test_clip_widths_catch_swapped_files():
    shapes = {"token_embedding": (10, 1280), "position_embedding": (77, 1280)}
    sd = {f"text_model.embeddings.{k}.weight": torch.zeros(1).expand(*s) for k, s in shapes.items()}
    sd["text_model.encoder.layers.0.mlp.fc1.weight"] = torch.zeros(1).expand(5120, 1280)
    with pytest.raises(UserError, match="swap"):
        clip_from_state_dict(sd, None, "l")


def test_checkpoint_without_t5_gives_none(tmp_path, caplog):
    sds = tiny_text_encoder_state_dicts()
    tensors = {f"text_encoders.{n}.transformer.{k}": v for n in ("clip_l", "clip_g") for k, v in sds[n][0].items()}
    tensors["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"] = torch.zeros(3, 1)
    path = tmp_path / "no_t5.safetensors"
    save_safetensors(tensors, path, {f"sd3_trainer.{n}_config": sds[n][1] for n in ("clip_l", "clip_g")})
    with caplog.at_level(logging.WARNING):
        enc = load_text_encoders(path)
    assert enc.t5xxl is None and enc.clip_l is not None and "T5-XXL" in caplog.text


def test_checkpoint_state_dicts_round_trip(tmp_path, tiny_encoders):
    tensors = text_encoder_state_dicts_for_checkpoint(tiny_encoders)
    assert "text_encoders.clip_g.transformer.text_projection.weight" in tensors
    assert "text_encoders.clip_l.transformer.text_projection.weight" not in tensors
    assert "text_encoders.t5xxl.transformer.shared.weight" in tensors
    assert not any("embed_tokens" in k for k in tensors)
    path = tmp_path / "saved.safetensors"
    save_safetensors(tensors, path, text_encoder_metadata(tiny_encoders))
    assert set(read_metadata(path)) == {f"sd3_trainer.{n}_config" for n in ("clip_l", "clip_g", "t5xxl")}
    _assert_same_encoders(load_text_encoders(path), tiny_encoders)
    saved_t5 = load_safetensors(path, prefix="text_encoders.t5xxl.transformer.")
    assert set(saved_t5) == set(tiny_text_encoder_state_dicts()["t5xxl"][0])
    clip_only = text_encoder_state_dicts_for_checkpoint(tiny_encoders, t5xxl=False)
    assert clip_only and not any(k.startswith("text_encoders.t5xxl.") for k in clip_only)


def test_bad_compute_dtype_is_a_user_error(tiny_text_files):
    with pytest.raises(UserError, match="compute dtype"):
        load_text_encoders(tiny_text_files["all_in_one"], dtype=torch.float8_e4m3fn)
