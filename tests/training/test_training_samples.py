"""Sample images during training: files, sizes, seeds, grids, shift, and an untouched training RNG."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open

import sd3_train_network
from library.errors import UserError
from library.training.sampling import read_sample_prompts, sample_plan

PROMPTS = """# every inline option on the first line
red circle --w 64 --h 48 --d 7 --s 3 --l 2.5 --n blurry --ss euler_a --fs 7
a blue square --w 32 --h 32 --s 2 --l 1
"""


def _argv(files, root: Path, name: str, *extra: str) -> list[str]:
    data = root / "data" / "2_shapes"
    if not data.exists():
        data.mkdir(parents=True)
        for i in range(2):
            image = Image.new("RGB", (64, 64), "white")
            ImageDraw.Draw(image).ellipse((8, 8, 40 + 8 * i, 44), fill=(200, 30, 30))
            image.save(data / f"i{i}.png")
            (data / f"i{i}.caption").write_text("red circle")
    return ["--pretrained_model_name_or_path", str(files.checkpoint), "--tokenizer_cache_dir", str(files.tokenizer_dir),
            "--train_data_dir", str(root / "data"), "--resolution", "64", "--output_dir", str(root / name),
            "--output_name", name, "--t5xxl_max_token_length", "16", "--cache_latents", "--seed", "3",
            "--network_module", "networks.lora_sd3", "--learning_rate", "1e-3", "--max_train_steps", "4", *extra]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.slow
def test_samples_files_grids_and_untouched_rng(tiny_models, tmp_path):
    files = tiny_models("sd35-medium")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    sampling = ["--sample_prompts", str(prompts), "--sample_every_n_steps", "2", "--sample_at_first"]
    assert sd3_train_network.main(_argv(files, tmp_path, "with", *sampling)) == 0
    assert sd3_train_network.main(_argv(files, tmp_path, "without")) == 0
    with_net, without_net = _tensors(tmp_path / "with" / "with.safetensors"), _tensors(tmp_path / "without" / "without.safetensors")
    assert all(torch.equal(with_net[k], without_net[k]) for k in with_net)  # sampling left the training RNG alone

    sample_dir = tmp_path / "with" / "sample"
    for label in ("000000", "000002", "000004"):
        first = sorted(sample_dir.glob(f"with_{label}_00_*_7.png"))
        second = sorted(sample_dir.glob(f"with_{label}_01_*_1001.png"))  # no --d: 1000 + index
        assert len(first) == len(second) == 1, sorted(p.name for p in sample_dir.iterdir())
        assert Image.open(first[0]).size == (64, 48) and Image.open(second[0]).size == (32, 32)
        assert Image.open(sample_dir / f"with_{label}_grid.png").size == (128, 48)
        text = Image.open(first[0]).text["parameters"]
        assert "Seed: 7" in text and "Shift: 7.0" in text and "Sampler: euler_a" in text and "blurry" in text
    assert Image.open(sample_dir / "with_progress.png").size == (128, 48 * 3)  # rounds x prompts
    assert "Shift: 3.0" in Image.open(second[0]).text["parameters"]  # the model's default, not the training shift


def test_shift_option_changes_latents_and_default_is_the_models(tiny_models, tmp_path):
    from library.inference.sampling import sample_latents
    from library.models.loading import load_mmdit
    from library.models.prompt_encoding import Conditioning

    files = tiny_models("sd35-medium")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a --w 32 --h 32 --s 4 --l 1 --fs 7\nb --w 32 --h 32 --s 4 --l 1\n")
    plan = sample_plan(str(prompts), every_n_steps=1, every_n_epochs=None, at_first=False, sampler="euler",
                       shift=None, variant="sd35-large")
    assert plan.params(0).shift == 7.0 and plan.params(1).shift == 3.0
    assert plan.params(1).seed == 1001 and plan.params(0).width == 32
    assert sample_plan(str(prompts), every_n_steps=1, every_n_epochs=None, at_first=False, sampler="euler",
                       shift=5.0, variant="sd35-medium").params(1).shift == 5.0  # --sample_shift
    mmdit = load_mmdit(files.checkpoint)
    cfg = mmdit.config
    cond = Conditioning(torch.randn(1, 77 + 16, cfg.context_dim), torch.randn(1, cfg.pooled_dim))
    seven = sample_latents(mmdit, cond, None, plan.params(0))
    three = sample_latents(mmdit, cond, None, plan.params(1).__class__(**{**plan.params(0).__dict__, "shift": 3.0}))
    assert not torch.allclose(seven, three)


@pytest.mark.parametrize("suffix, body", [
    (".toml", '[[prompt]]\nprompt = "x"\nwidth = 32\nheight = 32\nsample_steps = 2\nscale = 1.0\nseed = 5\nshift = 4.0\n'),
    (".json", '[{"prompt": "x", "width": 32, "height": 32, "sample_steps": 2, "scale": 1.0, "seed": 5, "shift": 4.0}]'),
])
def test_toml_and_json_prompt_files(tmp_path, suffix, body):
    path = tmp_path / f"p{suffix}"
    path.write_text(body)
    (spec,) = read_sample_prompts(str(path))
    assert (spec.prompt, spec.width, spec.steps, spec.cfg_scale, spec.seed, spec.shift) == ("x", 32, 2, 1.0, 5, 4.0)
    path.write_text(body.replace("scale", "scael"))
    with pytest.raises(UserError, match="scael"):
        read_sample_prompts(str(path))
