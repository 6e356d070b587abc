"""sd3_train.py end to end on a miniature model: the seed card's command, resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

import sd3_train
from tests.test_train_config import ADOPT, SEED_CARD


def _dataset(root: Path) -> Path:
    folder = root / "images"
    folder.mkdir(parents=True)
    for i in range(4):
        image = Image.new("RGB", (96, 64) if i % 2 else (64, 64), "white")
        ImageDraw.Draw(image).rectangle((8, 8, 30 + 4 * i, 40), fill=(60 * i, 90, 200))
        image.save(folder / f"img{i}.png")
        (folder / f"img{i}.caption").write_text(f"1girl, solo ||| shape{i}, blue ||| newest, safe")
    toml = root / "dataset.toml"
    # the miniature's position grid is 256 px: the dataset file sets the resolution and bucket range,
    # which wins over the card's --min/max_bucket_reso (sd-scripts' cascade)
    toml.write_text(f"""[general]
enable_bucket = true
min_bucket_reso = 64
max_bucket_reso = 128
bucket_reso_steps = 32
[[datasets]]
resolution = 64
[[datasets.subsets]]
image_dir = '{folder.as_posix()}'
num_repeats = 2
""")
    return toml


def _argv(files, root: Path, *extra: str) -> list[str]:
    return [*SEED_CARD, "--pretrained_model_name_or_path", str(files.checkpoint), "--tokenizer_cache_dir",
            str(files.tokenizer_dir), "--dataset_config", str(_dataset(root)) if not (root / "dataset.toml").exists()
            else str(root / "dataset.toml"), "--output_dir", str(root / "out"), "--output_name", "card",
            "--t5xxl_max_token_length", "16", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", [[], ADOPT])
def test_seed_card_command_trains_and_saves(tiny_models, tmp_path, optimizer, capsys):
    files = tiny_models("sd35-medium")
    code = sd3_train.main(_argv(files, tmp_path, *optimizer))
    out = capsys.readouterr()
    assert code == 0, out.err
    final = tmp_path / "out" / "card.safetensors"
    assert final.is_file()
    from safetensors import safe_open

    from library.models.loading import load_mmdit
    from library.models.text_encoders import load_text_encoders

    with safe_open(str(final), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert any(k.startswith("first_stage_model.") for k in keys)
    assert any(k.startswith("text_encoders.clip_l.") for k in keys) and any(k.startswith("text_encoders.clip_g.") for k in keys)
    assert not any(k.startswith("text_encoders.t5xxl.") for k in keys)  # no --save_t5xxl
    assert meta["modelspec.prediction_type"] == "flow" and meta.get("ss_training_shift") == "7.0"
    trained, base = load_mmdit(final), load_mmdit(files.checkpoint)
    assert next(trained.parameters()).dtype == torch.bfloat16  # --save_precision bf16
    changed = [k for k, v in trained.state_dict().items() if not torch.equal(v.float(), base.state_dict()[k].float().to(torch.bfloat16).float())]
    assert changed  # the weights were trained
    clip_trained = load_text_encoders(final).clip_l
    assert clip_trained is not None
    from diffusers import SD3Transformer2DModel

    from library.models.mmdit_config import to_diffusers_config

    config_dir = tmp_path / "diffusers_config"
    config_dir.mkdir()
    (config_dir / "config.json").write_text(json.dumps(to_diffusers_config(trained.config)))
    theirs = SD3Transformer2DModel.from_single_file(str(final), config=str(config_dir), local_files_only=True)
    ours_w = trained.joint_blocks[0].x_block.attn.qkv.weight[: trained.config.hidden_size].float()
    assert torch.equal(theirs.transformer_blocks[0].attn.to_q.weight.float(), ours_w)  # the trained weights


def _plain(files, root: Path, steps: int, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(files.checkpoint), "--tokenizer_cache_dir", str(files.tokenizer_dir),
            "--dataset_config", str(_dataset(root) if not (root / "dataset.toml").exists() else root / "dataset.toml"),
            "--output_dir", str(root / "out"), "--output_name", "m", "--t5xxl_max_token_length", "8",
            "--cache_latents", "--cache_text_encoder_outputs", "--max_train_steps", str(steps), "--seed", "3",
            "--learning_rate", "1e-3", "--lr_scheduler", "cosine", "--lr_warmup_steps", "2", *extra]


@pytest.mark.slow
def test_resume_gives_identical_weights(tiny_models, tmp_path):
    """7 steps in one run == 3 steps, a state, a new process resuming it, 4 more steps."""
    from library.models.loading import load_mmdit

    files = tiny_models("sd3-medium")
    a = tmp_path / "a"
    assert sd3_train.main(_plain(files, a, 7, "--save_every_n_steps", "3", "--save_state")) == 0
    state = a / "out" / "m-step00000003-state"
    assert json.loads((state / "train_state.json").read_text())["global_step"] == 3
    b = tmp_path / "b"
    (b).mkdir()
    (b / "dataset.toml").write_text((a / "dataset.toml").read_text())
    assert sd3_train.main(_plain(files, b, 7, "--resume", str(state))) == 0
    full, resumed = load_mmdit(a / "out" / "m.safetensors"), load_mmdit(b / "out" / "m.safetensors")
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_bad_input_is_one_line(tiny_models, tmp_path, capsys):
    files = tiny_models("sd3-medium")
    cases = [
        (["--fp8_base"], "--fp8_base is for network training"),
        (["--resume", str(tmp_path / "nowhere")], "nowhere"),
        (["--mixed_precision", "fp16"], "needs a GPU"),
    ]
    for extra, needle in cases:
        code = sd3_train.main(_plain(files, tmp_path, 2, *extra))
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(err) == 1 and needle in err[0], (extra, err)
    assert not (tmp_path / "out" / "m.safetensors").exists()


@pytest.mark.slow
def test_schedule_free_optimizer_saves_in_eval_mode(tiny_models, tmp_path):
    files = tiny_models("sd3-medium")
    argv = _plain(files, tmp_path, 3, "--optimizer_type", "AdamWScheduleFree", "--lr_scheduler", "constant",
                  "--lr_warmup_steps", "0", "--save_every_n_steps", "2")
    assert sd3_train.main(argv) == 0
    assert (tmp_path / "out" / "m-step00000002.safetensors").is_file() and (tmp_path / "out" / "m.safetensors").is_file()
