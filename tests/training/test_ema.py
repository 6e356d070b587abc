"""EMA of the trained weights: the update rule, swapping in and out, and the files both trainers write."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open

import sd3_train
import sd3_train_network
from library.errors import UserError
from library.training.ema import EmaWeights


def _tensors(path: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


def test_update_rule_matches_hand_computation_and_decay_zero_is_raw():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    steps = [torch.tensor([2.0, 0.0]), torch.tensor([4.0, 1.0]), torch.tensor([-1.0, 3.0])]
    ema, raw = EmaWeights({"w": w}, decay=0.9), EmaWeights({"w": w}, decay=0.0)
    expected = w.detach().clone().double()
    for value in steps:
        with torch.no_grad():
            w.copy_(value)
        ema.update({"w": w})
        raw.update({"w": w})
        expected = 0.9 * expected + 0.1 * value.double()
    assert torch.allclose(ema.shadow["w"].double(), expected, atol=1e-6)
    assert torch.equal(raw.shadow["w"], steps[-1])


def test_applied_swaps_in_and_restores_bf16_weights():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.bfloat16))
    ema = EmaWeights({"w": w}, decay=0.5)
    assert ema.shadow["w"].dtype == torch.float32  # the average is kept in float32
    with torch.no_grad():
        w.copy_(torch.tensor([3.0, 4.0]))
    ema.update({"w": w})
    with ema.applied({"w": w}):
        assert torch.equal(w.detach(), torch.tensor([2.0, 3.0], dtype=torch.bfloat16))
    assert torch.equal(w.detach(), torch.tensor([3.0, 4.0], dtype=torch.bfloat16))
    other = EmaWeights({"w": w}, decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.shadow["w"], ema.shadow["w"])
    with pytest.raises(UserError, match="lacks 1 tensors"):
        EmaWeights({"w": w, "v": w}, decay=0.5).load_state_dict(ema.state_dict())


def _images(root: Path) -> Path:
    folder = root / "img" / "1_dots"
    folder.mkdir(parents=True)
    for i in range(2):
        image = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(image).ellipse((8 + 8 * i, 8, 48, 40), fill=(30, 60 * i, 200))
        image.save(folder / f"d{i}.png")
        (folder / f"d{i}.caption").write_text("blue dot")
    return root / "img"


def _common(files, root: Path, name: str, *extra: str) -> list[str]:
    data = root / "img" if (root / "img").exists() else _images(root)
    return ["--pretrained_model_name_or_path", str(files.checkpoint), "--tokenizer_cache_dir", str(files.tokenizer_dir),
            "--train_data_dir", str(data), "--resolution", "64", "--output_dir", str(root / name), "--output_name",
            name, "--t5xxl_max_token_length", "16", "--cache_latents", "--seed", "5", "--max_train_steps", "3", *extra]


@pytest.mark.slow
def test_full_finetune_ema_file_equals_hand_computed_average(tiny_models, tmp_path):
    files = tiny_models("sd3-medium")
    argv = _common(files, tmp_path, "full", "--learning_rate", "1e-3", "--optimizer_type", "AdamW",
                   "--save_every_n_steps", "1", "--ema", "--ema_decay", "0.6")
    assert sd3_train.main(argv) == 0
    out, prefix = tmp_path / "full", "model.diffusion_model."
    weights = [_tensors(files.checkpoint, prefix)]
    weights += [_tensors(out / f"full-step{s:08d}.safetensors", prefix) for s in (1, 2)]
    weights.append(_tensors(out / "full.safetensors", prefix))
    ema = _tensors(out / "full_ema.safetensors", prefix)
    assert set(ema) == set(weights[0]) and (out / "full_ema-step00000002.safetensors").is_file()
    changed = 0
    for key, value in ema.items():
        expected = weights[0][key].double()
        for w in weights[1:]:
            expected = 0.6 * expected + 0.4 * w[key].double()
        assert torch.allclose(value.double(), expected, atol=1e-6), key
        changed += not torch.equal(value, weights[-1][key])
    assert changed > 0  # the average is not the raw weights


@pytest.mark.slow
def test_network_ema_with_decay_zero_is_the_raw_network(tiny_models, tmp_path):
    files = tiny_models("sd35-medium")
    argv = _common(files, tmp_path, "net", "--network_module", "networks.lora_sd3", "--network_dim", "4",
                   "--learning_rate", "1e-2", "--ema", "--ema_decay", "0")
    assert sd3_train_network.main(argv) == 0
    raw, ema = _tensors(tmp_path / "net" / "net.safetensors"), _tensors(tmp_path / "net" / "net_ema.safetensors")
    assert raw.keys() == ema.keys() and all(torch.equal(raw[k], ema[k]) for k in raw)
    assert any(k.endswith("lora_up.weight") and raw[k].abs().sum() > 0 for k in raw)  # it did train


@pytest.mark.slow
def test_sample_ema_renders_with_the_average(tiny_models, tmp_path):
    """Decay 1 keeps the starting weights as the average: --sample_ema samples at the end equal the first ones."""
    files = tiny_models("sd35-medium")
    prompts = tmp_path / "p.txt"
    prompts.write_text("blue dot --w 32 --h 32 --s 2 --l 1 --d 3\n")
    pixels = {}
    for name, extra in (("avg", ["--sample_ema"]), ("raw", [])):
        argv = _common(files, tmp_path, name, "--network_module", "networks.lora_sd3", "--learning_rate", "5e-2",
                       "--ema", "--ema_decay", "1", "--sample_prompts", str(prompts), "--sample_at_first",
                       "--sample_every_n_steps", "3", *extra)
        assert sd3_train_network.main(argv) == 0
        shots = [sorted((tmp_path / name / "sample").glob(f"{name}_{label}_00_*.png")) for label in ("000000", "000003")]
        pixels[name] = [torch.tensor(list(Image.open(s[0]).getdata())) for s in shots]
    assert torch.equal(pixels["avg"][0], pixels["avg"][1])
    assert not torch.equal(pixels["raw"][0], pixels["raw"][1])  # the raw weights did move the samples
