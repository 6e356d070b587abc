"""SD3 VAE: loading every file layout, parity with diffusers, latent scale/shift, posterior sampling."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from library.errors import UserError
from library.models.safetensors_io import load_safetensors, save_safetensors
from library.models.tiny.vae import tiny_vae_config, tiny_vae_config_json, tiny_vae_ldm_state_dict, tiny_vae_metadata
from library.models.vae import (
    LDM_PREFIX,
    SD3VAE,
    infer_vae_config,
    latents_from_vae_space,
    ldm_vae_shapes,
    load_vae,
    sample_posterior,
    vae_ldm_tensors,
    vae_space_from_latents,
)

SEED = 3
SD3_VAE_CONFIG = {
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 16,
    "mid_block_add_attention": True,
}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny VAE written as an all-in-one checkpoint, a separate LDM file and a diffusers-named file."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    root = tmp_path_factory.mktemp("vae")
    ldm = tiny_vae_ldm_state_dict(SEED)
    out = {name: root / f"{name}.safetensors" for name in ("all_in_one", "ldm", "diffusers")}
    all_in_one = {LDM_PREFIX + k: v for k, v in ldm.items()}
    all_in_one["model.diffusion_model.pos_embed"] = torch.zeros(1, 4, 8)
    save_safetensors(all_in_one, out["all_in_one"], tiny_vae_metadata())
    save_safetensors(ldm, out["ldm"], tiny_vae_metadata())
    model = AutoencoderKL(**tiny_vae_config())
    model.load_state_dict(convert_ldm_vae_checkpoint(ldm, tiny_vae_config()), strict=True)
    save_safetensors(model.state_dict(), out["diffusers"], tiny_vae_metadata())
    config_dir = root / "diffusers_config"
    config_dir.mkdir()
    (config_dir / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **tiny_vae_config()}))
    out["config_dir"] = config_dir
    return out


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _single_line_error(excinfo: pytest.ExceptionInfo[UserError]) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


def test_tiny_weights_are_deterministic_random_and_fast() -> None:
    start = time.perf_counter()
    a = tiny_vae_ldm_state_dict(SEED)
    assert time.perf_counter() - start < 0.5
    b = tiny_vae_ldm_state_dict(SEED)
    c = tiny_vae_ldm_state_dict(SEED + 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in a)
    for key, tensor in a.items():
        assert tensor.std() > 0, key
        if tensor.ndim == 1 and key.endswith(".weight"):
            assert 0.5 < tensor.mean() < 1.5, key
    assert a["encoder.mid.attn_1.q.weight"].shape == (32, 32, 1, 1)
    assert json.loads(tiny_vae_config_json()) == tiny_vae_config()


def test_ldm_key_list_matches_diffusers_converter_strictly() -> None:
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ldm = tiny_vae_ldm_state_dict(SEED)
    converted = convert_ldm_vae_checkpoint(ldm, tiny_vae_config())
    assert len(converted) == len(ldm)  # the converter dropped no key
    AutoencoderKL(**tiny_vae_config()).load_state_dict(converted, strict=True)


def test_real_sd3_layout_converts_and_infers() -> None:
    """Shapes only (meta tensors): the full-size SD3 VAE layout round-trips through the converter."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    shapes = ldm_vae_shapes({**tiny_vae_config(), **SD3_VAE_CONFIG})
    inferred = infer_vae_config(shapes)
    assert {k: inferred[k] for k in SD3_VAE_CONFIG} == SD3_VAE_CONFIG
    assert inferred["norm_num_groups"] == 32 and not inferred["use_quant_conv"]
    meta = {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}
    with torch.device("meta"):
        model = AutoencoderKL(**inferred)
    model.load_state_dict(convert_ldm_vae_checkpoint(meta, inferred), strict=True, assign=True)
    assert sum(p.numel() for p in model.parameters()) == sum(t.numel() for t in meta.values())


def test_parity_with_diffusers_from_single_file(files: dict[str, Path], images: torch.Tensor) -> None:
    """Exact: both sides run the same AutoencoderKL code on the same fp32 weights."""
    from diffusers import AutoencoderKL

    oracle = AutoencoderKL.from_single_file(
        str(files["all_in_one"]), config=str(files["config_dir"]), local_files_only=True
    ).eval()
    vae = load_vae(files["all_in_one"])
    with torch.no_grad():
        latents = vae.encode(images, sample=False)
        expected = (oracle.encode(images).latent_dist.mean - 0.0609) * 1.5305
        assert latents.shape == (2, 16, 8, 6)
        assert torch.equal(latents, expected)
        assert torch.equal(vae.decode(latents), oracle.decode(latents / 1.5305 + 0.0609).sample)


@pytest.mark.parametrize("layout", ["ldm", "diffusers"])
def test_all_layouts_give_the_same_vae(files: dict[str, Path], images: torch.Tensor, layout: str) -> None:
    reference = load_vae(files["all_in_one"])
    vae = load_vae(files[layout], mmap=False)
    with torch.no_grad():
        latents = reference.encode(images, sample=False)
        assert torch.equal(vae.encode(images, sample=False), latents)
        assert torch.equal(vae.decode(latents), reference.decode(latents))


def test_state_dict_input_and_explicit_config(images: torch.Tensor) -> None:
    ldm = tiny_vae_ldm_state_dict(SEED)
    with pytest.raises(UserError) as excinfo:  # 8 norm groups cannot be inferred from shapes
        load_vae(ldm)
    assert "norm_num_groups=32" in _single_line_error(excinfo)
    vae = load_vae({LDM_PREFIX + k: v for k, v in ldm.items()}, config={"norm_num_groups": 8})
    assert isinstance(vae, SD3VAE) and not vae.training
    assert not any(p.requires_grad for p in vae.parameters())
    assert vae.autoencoder.config.scaling_factor == 1.5305 and vae.autoencoder.config.shift_factor == 0.0609


def test_dtype_and_device(files: dict[str, Path], images: torch.Tensor) -> None:
    vae = load_vae(files["ldm"], dtype=torch.bfloat16)
    assert vae.dtype == torch.bfloat16 and vae.device == torch.device("cpu")
    latents = vae.encode(images, sample=False)
    assert latents.dtype == torch.float32
    assert vae.decode(latents).dtype == torch.float32


def test_scale_shift_round_trip() -> None:
    z = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    latents = latents_from_vae_space(z)
    assert torch.allclose(latents, (z - 0.0609) * 1.5305)
    assert torch.allclose(vae_space_from_latents(latents), z, atol=1e-6)
    assert torch.allclose(latents_from_vae_space(vae_space_from_latents(z)), z, atol=1e-6)


def test_posterior_sample_is_seeded_and_differs_from_mean(files: dict[str, Path], images: torch.Tensor) -> None:
    vae = load_vae(files["ldm"])
    with torch.no_grad():
        a = vae.encode(images, generator=torch.Generator().manual_seed(7))
        b = vae.encode(images, generator=torch.Generator().manual_seed(7))
        c = vae.encode(images, generator=torch.Generator().manual_seed(8))
        mean, logvar = vae.encode_moments(images)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.allclose(a, latents_from_vae_space(mean))
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    expected = mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * eps
    assert torch.equal(a, latents_from_vae_space(expected))
    huge = sample_posterior(torch.zeros(3), torch.full((3,), 100.0), torch.Generator().manual_seed(0))
    assert torch.isfinite(huge).all()  # logvar clamped to 20


def test_sdxl_vae_is_rejected(tmp_path: Path) -> None:
    shapes = ldm_vae_shapes({**tiny_vae_config(), "latent_channels": 4})
    shapes |= {"quant_conv.weight": (8, 8, 1, 1), "quant_conv.bias": (8,)}
    shapes |= {"post_quant_conv.weight": (4, 4, 1, 1), "post_quant_conv.bias": (4,)}
    path = tmp_path / "sdxl_vae.safetensors"
    save_safetensors({k: torch.zeros(s) for k, s in shapes.items()}, path)
    with pytest.raises(UserError) as excinfo:
        load_vae(path)
    message = _single_line_error(excinfo)
    assert "not an SD3 VAE" in message and "4 latent channels" in message and str(path) in message


def test_missing_file_and_missing_keys(tmp_path: Path) -> None:
    with pytest.raises(UserError) as excinfo:
        load_vae(tmp_path / "nope.safetensors")
    assert "not found" in _single_line_error(excinfo)
    ldm = tiny_vae_ldm_state_dict(SEED)
    del ldm["decoder.up.2.block.1.conv2.weight"]
    ldm["encoder.extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.safetensors"
    save_safetensors(ldm, path, tiny_vae_metadata())
    with pytest.raises(UserError) as excinfo:
        load_vae(path)
    message = _single_line_error(excinfo)
    assert "decoder.up.2.block.1.conv2.weight" in message and "encoder.extra.weight" in message
    assert str(path) in message
    with pytest.raises(UserError) as excinfo:
        vae_ldm_tensors(path)
    _single_line_error(excinfo)


def test_file_without_vae(tmp_path: Path) -> None:
    path = tmp_path / "mmdit_only.safetensors"
    save_safetensors({"model.diffusion_model.pos_embed": torch.zeros(1, 4, 8)}, path)
    with pytest.raises(UserError) as excinfo:
        load_vae(path)
    assert "no VAE weights" in _single_line_error(excinfo)


def test_vae_ldm_tensors_pass_through(files: dict[str, Path], tmp_path: Path) -> None:
    ldm = tiny_vae_ldm_state_dict(SEED)
    mixed = {LDM_PREFIX + k: v.to(torch.bfloat16 if "decoder" in k else torch.float16) for k, v in ldm.items()}
    mixed["model.diffusion_model.pos_embed"] = torch.zeros(1, 4, 8)
    path = tmp_path / "mixed.safetensors"
    save_safetensors(mixed, path, tiny_vae_metadata())
    stored = load_safetensors(path, prefix=LDM_PREFIX, strip_prefix=False)
    assert {p.dtype for p in load_vae(path).parameters()} == {torch.float32}
    for source in (path, files["ldm"], files["diffusers"], files["all_in_one"]):
        tensors = vae_ldm_tensors(source, mmap=source != path)
        reference = stored if source == path else {LDM_PREFIX + k: v for k, v in ldm.items()}
        assert tensors.keys() == reference.keys(), source
        for key, tensor in reference.items():
            assert tensors[key].dtype == tensor.dtype and torch.equal(tensors[key], tensor), (source, key)
