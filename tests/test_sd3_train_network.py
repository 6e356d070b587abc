"""sd3_train_network.py end to end on a miniature SD3.5-M: files, metadata, fp8 base, resume, bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open

import sd3_train_network
from library.training.network_files import additional_network_hashes


def _dataset(root: Path) -> Path:
    folder = root / "data" / "2_shapes"
    if not folder.exists():
        folder.mkdir(parents=True)
        for i in range(4):
            image = Image.new("RGB", (64, 64), "white")
            ImageDraw.Draw(image).ellipse((8, 8, 30 + 6 * i, 44), fill=(200, 40 * i, 30))
            image.save(folder / f"img{i}.png")
            (folder / f"img{i}.caption").write_text(f"red shape, tag{i}")
    return folder.parent


def _argv(files, root: Path, *extra: str, name: str = "net") -> list[str]:
    return ["--pretrained_model_name_or_path", str(files.checkpoint), "--tokenizer_cache_dir", str(files.tokenizer_dir),
            "--train_data_dir", str(_dataset(root)), "--resolution", "64", "--output_dir", str(root / "out"),
            "--output_name", name, "--t5xxl_max_token_length", "16", "--cache_latents", "--seed", "3",
            "--train_batch_size", "2", "--learning_rate", "1e-3", "--max_train_steps", "4", *extra]


def _run(argv: list[str], capsys) -> tuple[int, str]:
    code = sd3_train_network.main(argv)
    return code, capsys.readouterr().err


def _file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.mark.slow
def test_lora_with_text_encoders_writes_a_complete_file(tiny_models, tmp_path, capsys):
    files = tiny_models("sd35-medium")
    code, err = _run(_argv(files, tmp_path, "--network_module", "networks.lora_sd3", "--network_dim", "4",
                           "--network_alpha", "2", "--text_encoder_lr", "5e-4", "2e-4", "--training_comment", "hi",
                           "--training_shift", "3", "--save_precision", "bf16"), capsys)
    assert code == 0, err
    tensors, meta = _file(tmp_path / "out" / "net.safetensors")
    prefixes = {k.split("_")[1] for k in tensors}
    assert prefixes == {"unet", "te1", "te2"}  # T5 only with train_t5xxl=True
    ups = [v for k, v in tensors.items() if k.endswith("lora_up.weight")]
    assert ups[0].dtype == torch.bfloat16 and any(u.abs().max() > 0 for u in ups)  # trained from zero
    assert all(float(v) == 2.0 for k, v in tensors.items() if k.endswith(".alpha"))
    assert meta["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"
    assert meta["ss_base_model_version"] == "sd3.5_medium" and meta["ss_training_shift"] == "3.0"
    assert (meta["ss_network_module"], meta["ss_network_dim"], meta["ss_network_alpha"]) == ("networks.lora_sd3", "4", "2.0")
    assert meta["ss_training_comment"] == "hi" and meta["ss_text_encoder_lr"] == "[0.0005, 0.0002]"
    assert meta["ss_unet_lr"] == "0.001" and meta["ss_steps"] == "4"
    assert json.loads(meta["ss_tag_frequency"]) == {"2_shapes": {"red shape": 4, **{f"tag{i}": 1 for i in range(4)}}}
    model_hash, legacy = additional_network_hashes(tensors, meta)
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == (model_hash, legacy)


@pytest.mark.slow
def test_lokr_on_an_fp8_base_trains_the_mmdit_only(tiny_models, tmp_path, capsys):
    files = tiny_models("sd35-medium")
    code, err = _run(_argv(files, tmp_path, "--network_module", "lycoris.kohya", "--network_args", "algo=lokr",
                           "factor=4", "--network_dim", "100000", "--fp8_base", "--network_train_unet_only",
                           "--cache_text_encoder_outputs", "--no_metadata"), capsys)
    assert code == 0, err
    tensors, meta = _file(tmp_path / "out" / "net.safetensors")
    assert all(k.startswith("lora_unet_") for k in tensors)
    assert any(k.endswith(".lokr_w1") for k in tensors) and any(k.endswith(".lokr_w2") for k in tensors)
    assert not any(k.endswith("lokr_w2_a") for k in tensors)  # a huge dim means full factors (LyCORIS)
    assert any(v.abs().max() > 0 for k, v in tensors.items() if k.endswith(".lokr_w2"))
    assert meta["modelspec.architecture"] == "stable-diffusion-3-5-medium/lokr"
    assert "ss_network_args" in meta and "ss_tag_frequency" not in meta  # --no_metadata keeps the minimum
    assert json.loads(meta["ss_network_args"]) == {"algo": "lokr", "factor": "4"}  # as typed


@pytest.mark.slow
def test_resumed_network_run_equals_the_uninterrupted_one(tiny_models, tmp_path, capsys):
    files = tiny_models("sd35-medium")
    common = ("--network_module", "networks.lora_sd3", "--network_dim", "4", "--network_train_unet_only",
              "--save_every_n_steps", "2", "--save_state", "--network_dropout", "0.1")
    code, err = _run(_argv(files, tmp_path, *common), capsys)
    assert code == 0, err
    state = tmp_path / "out" / "net-step00000002-state"
    assert json.loads((state / "train_state.json").read_text())["model_kind"] == "lora"
    code, err = _run(_argv(files, tmp_path, *common, "--resume", str(state), name="again"), capsys)
    assert code == 0, err
    first, _ = _file(tmp_path / "out" / "net.safetensors")
    second, _ = _file(tmp_path / "out" / "again.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.slow
def test_a_second_run_on_existing_caches_trains_the_same(tiny_models, tmp_path, capsys):
    """Caching draws random numbers; a run that finds its caches ready must still train identically."""
    files = tiny_models("sd35-medium")
    common = ("--network_module", "networks.lora_sd3", "--network_dim", "4", "--network_train_unet_only")
    for name in ("fresh", "cached"):
        code, err = _run(_argv(files, tmp_path, *common, name=name), capsys)
        assert code == 0, err
    first, _ = _file(tmp_path / "out" / "fresh.safetensors")
    second, _ = _file(tmp_path / "out" / "cached.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.slow
def test_scale_weight_norms_caps_every_module(tiny_models, tmp_path, capsys):
    files = tiny_models("sd35-medium")
    code, err = _run(_argv(files, tmp_path, "--network_module", "networks.lora_sd3", "--network_dim", "4",
                           "--network_train_unet_only", "--learning_rate", "5e-2", "--scale_weight_norms", "0.05"),
                     capsys)
    assert code == 0, err
    tensors, _ = _file(tmp_path / "out" / "net.safetensors")
    names = {k.rsplit(".", 2)[0] for k in tensors if k.endswith("lora_down.weight")}
    norms = []
    for name in names:
        down, up = tensors[f"{name}.lora_down.weight"].flatten(1), tensors[f"{name}.lora_up.weight"].flatten(1)
        norms.append(float((up @ down).norm() * tensors[f"{name}.alpha"] / down.shape[0]))
    assert max(norms) <= 0.05 + 1e-4 and max(norms) > 0.01


def _network_file(files, path: Path, dim: int) -> Path:
    from library.models.loading import load_mmdit
    from networks import lora_sd3

    network = lora_sd3.create_network(1.0, dim, dim, None, None, load_mmdit(files.checkpoint))
    network.save_weights(path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("case", ["other_model", "not_a_network", "rank"])
def test_bad_network_weights_are_one_line_errors(tiny_models, tmp_path, capsys, case):
    files = tiny_models("sd35-medium")
    weights = {"other_model": lambda: _network_file(tiny_models("sd3-medium"), tmp_path / "other.safetensors", 4),
               "not_a_network": lambda: files.clip_l,
               "rank": lambda: _network_file(files, tmp_path / "rank8.safetensors", 8)}[case]()
    code, err = _run(_argv(files, tmp_path, "--network_module", "networks.lora_sd3", "--network_dim", "4",
                           "--network_train_unet_only", "--network_weights", str(weights)), capsys)
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1, err
    expected = {"other_model": "different model", "not_a_network": "not an SD3 LoRA/LoKr file", "rank": "rank 8"}
    assert expected[case] in lines[0] and str(weights) in lines[0]


@pytest.mark.parametrize("extra, message", [
    (["--network_module", "networks.lora"], "not an SD3 network module"),
    (["--network_module", "networks.lora_sd3", "--network_args", "conv_dim=4"], "unknown network_args 'conv_dim'"),
    (["--network_module", "networks.lora_sd3", "--network_args", "split_qkv"], "not key=value"),
    (["--network_module", "networks.lora_sd3", "--cache_text_encoder_outputs"], "--network_train_unet_only"),
    (["--network_module", "networks.lora_sd3", "--text_encoder_lr", "1", "2", "3", "4"], "1 to 3 values"),
    ([], "--network_module is required"),
])
def test_bad_network_flags_are_one_line_errors(tiny_models, tmp_path, capsys, extra, message):
    files = tiny_models("sd35-medium")
    code, err = _run(_argv(files, tmp_path, *extra), capsys)
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and message in lines[0], err


@pytest.mark.slow
def test_base_weights_are_merged_into_the_base(tiny_models, tmp_path, capsys, caplog):
    from library.models.loading import load_mmdit
    from networks import lora_sd3
    from networks.training import NetworkSpec, SD3NetworkBuilder

    caplog.set_level(logging.INFO, logger="networks.training")
    files = tiny_models("sd35-medium")
    base = lora_sd3.create_network(1.0, 2, 2, None, None, load_mmdit(files.checkpoint))
    for module in base.adapters.values():
        torch.nn.init.normal_(module.lora_up[0], std=0.1)
    base.save_weights(tmp_path / "base.safetensors")
    mmdit, expected = load_mmdit(files.checkpoint), load_mmdit(files.checkpoint)
    reference = lora_sd3.create_network_from_weights(0.5, tmp_path / "base.safetensors", None, None, expected)
    reference.merge_to()
    spec = NetworkSpec("networks.lora_sd3", base_weights=((str(tmp_path / "base.safetensors"), 0.5),))
    SD3NetworkBuilder(spec).merge_base_weights(mmdit, None)
    changed = [k for k, v in mmdit.state_dict().items() if not torch.equal(v, load_mmdit(files.checkpoint).state_dict()[k])]
    assert changed and all(torch.equal(v, expected.state_dict()[k]) for k, v in mmdit.state_dict().items())
    code, err = _run(_argv(files, tmp_path, "--network_module", "networks.lora_sd3", "--network_train_unet_only",
                           "--base_weights", str(tmp_path / "base.safetensors"), "--base_weights_multiplier", "0.5",
                           "--max_train_steps", "1"), capsys)
    assert code == 0, err
    assert any("merged base weights" in r.getMessage() and "multiplier 0.5" in r.getMessage() for r in caplog.records)
