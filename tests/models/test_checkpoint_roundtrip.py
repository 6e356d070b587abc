"""Full single-file checkpoints: what we load and save again is bit-identical; metadata is right."""

from __future__ import annotations

import pytest
import torch

from library.models.loading import load_mmdit
from library.models.safetensors_io import read_metadata, read_shapes
from library.models.saving import save_sd3_checkpoint
from library.models.text_encoders import (
    load_text_encoders,
    text_encoder_metadata,
    text_encoder_state_dicts_for_checkpoint,
)
from library.models.vae import vae_ldm_tensors


@pytest.mark.parametrize("variant", ["sd3-medium", "sd35-medium", "sd35-large"])
def test_full_checkpoint_roundtrip_bit_identical(variant, tiny_models, tmp_path):
    files = tiny_models(variant)
    mmdit = load_mmdit(files.checkpoint)
    encoders = load_text_encoders(files.checkpoint)
    resaved = tmp_path / "resaved.safetensors"
    save_sd3_checkpoint(resaved, mmdit.state_dict(), mmdit.config, metadata=read_metadata(files.checkpoint),
                        vae_tensors=vae_ldm_tensors(files.checkpoint),
                        text_encoder_tensors=text_encoder_state_dicts_for_checkpoint(encoders))
    assert resaved.read_bytes() == files.checkpoint.read_bytes()


def test_modelspec_and_prefixes(tiny_models):
    files = tiny_models("sd35-medium")
    meta = read_metadata(files.checkpoint)
    assert meta["modelspec.architecture"] == "stable-diffusion-3-5-medium"
    assert meta["modelspec.prediction_type"] == "flow"
    assert meta["modelspec.sai_model_spec"].startswith("1.0.")
    prefixes = {k.split(".")[0] + "." + k.split(".")[1] for k in read_shapes(files.checkpoint)}
    assert {"model.diffusion_model", "first_stage_model.encoder", "first_stage_model.decoder",
            "text_encoders.clip_l", "text_encoders.clip_g", "text_encoders.t5xxl"} <= prefixes
    assert "model.diffusion_model.pos_embed" in read_shapes(files.checkpoint)
    assert "text_encoders.clip_g.transformer.text_projection.weight" in read_shapes(files.checkpoint)


def test_save_dtype_keeps_vae_as_stored(tiny_models, tmp_path):
    files = tiny_models("sd3-medium")
    mmdit = load_mmdit(files.checkpoint)
    vae = vae_ldm_tensors(files.checkpoint)
    out = tmp_path / "bf16.safetensors"
    encoders = load_text_encoders(files.checkpoint)
    metadata = {**text_encoder_metadata(encoders), **{k: v for k, v in read_metadata(files.checkpoint).items() if "vae" in k}}
    save_sd3_checkpoint(out, mmdit.state_dict(), mmdit.config, metadata=metadata, vae_tensors=vae,
                        text_encoder_tensors=text_encoder_state_dicts_for_checkpoint(encoders), dtype=torch.bfloat16)
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert f.get_tensor("model.diffusion_model.x_embedder.proj.weight").dtype == torch.bfloat16
        assert f.get_tensor("text_encoders.clip_g.transformer.text_projection.weight").dtype == torch.bfloat16
        for key, value in vae.items():
            assert torch.equal(f.get_tensor(key), value) and f.get_tensor(key).dtype == value.dtype
    reloaded = load_text_encoders(out)
    assert reloaded.clip_l is not None and reloaded.t5xxl is not None
