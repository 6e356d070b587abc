"""tools/steps.py agrees with the trainer: the same optimizer steps, epochs and saved files as a real run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import sd3_train_network  # noqa: E402
import steps  # noqa: E402
from library.models.safetensors_io import read_metadata  # noqa: E402


def _images(root: Path, sizes: list[tuple[int, int]], repeats: int = 3, name: str = "shapes") -> Path:
    folder = root / "data" / f"{repeats}_{name}"
    folder.mkdir(parents=True)
    for i, size in enumerate(sizes):
        Image.new("RGB", size, (40 * (i % 6), 90, 160)).save(folder / f"i{i}.png")
        (folder / f"i{i}.caption").write_text(f"shape {i}")
    return root / "data"


def _plan(capsys, argv: list[str]) -> dict:
    assert steps.main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_steps_agree_with_a_real_training_run(tiny_models, tmp_path, capsys):
    files = tiny_models("sd3-medium")
    # 3 images x 3 repeats: 6 samples in the 64x64 bucket (3 batches of 2), 3 in 96x64 (2 batches) = 5 batches
    data = _images(tmp_path, [(64, 64), (64, 64), (96, 64)])
    out = tmp_path / "out"
    argv = ["--pretrained_model_name_or_path", str(files.checkpoint), "--tokenizer_cache_dir", str(files.tokenizer_dir),
            "--train_data_dir", str(data), "--resolution", "64", "--enable_bucket", "--min_bucket_reso", "32",
            "--max_bucket_reso", "128", "--bucket_reso_steps", "32", "--train_batch_size", "2",
            "--gradient_accumulation_steps", "2", "--max_train_epochs", "2", "--save_every_n_epochs", "1",
            "--save_every_n_steps", "3", "--output_dir", str(out), "--output_name", "net", "--seed", "1",
            "--t5xxl_max_token_length", "16", "--cache_latents", "--network_module", "networks.lora_sd3",
            "--network_dim", "2", "--network_train_unet_only", "--learning_rate", "1e-3"]
    plan = _plan(capsys, argv)
    assert (plan["batches_per_epoch"], plan["steps_per_epoch"], plan["total_steps"]) == (5, 2, 4)
    assert sd3_train_network.main(argv) == 0
    capsys.readouterr()
    meta = read_metadata(out / "net.safetensors")
    assert int(meta["ss_steps"]) == plan["total_steps"] == int(meta["ss_max_train_steps"])
    assert int(meta["ss_num_batches_per_epoch"]) == plan["batches_per_epoch"]
    assert int(meta["ss_num_epochs"]) == plan["epochs"] == 2
    # epoch 1 ends after floor(5 / 2) = 2 steps, the step save comes at 3, the final file at 4
    assert [(s["step"], s["name"]) for s in plan["saves"]] == [
        (2, "net-000001.safetensors"), (3, "net-step00000003.safetensors"), (4, "net.safetensors")]
    assert int(read_metadata(out / "net-000001.safetensors")["ss_steps"]) == 2
    assert int(read_metadata(out / "net-step00000003.safetensors")["ss_steps"]) == 3
    written = sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors")
    assert written == sorted(plan["kept"])


def test_tutorial_arithmetic_processes_accumulation_and_retention(tmp_path, capsys):
    # the tutorial's example: 476 images x 10 repeats, batch size 6, 30 epochs -> about 793 steps per epoch
    data = _images(tmp_path, [(16, 16)] * 476, repeats=10)
    base = ["--train_data_dir", str(data), "--resolution", "16", "--train_batch_size", "6", "--max_train_epochs", "30",
            "--output_name", "fantasy"]
    plan = _plan(capsys, base)
    # ⌈4760 / 6⌉ = 794 batches (the tutorial's 4760 / 6 = 793.3, rounded up as the last batch is kept)
    assert (plan["batches_per_epoch"], plan["steps_per_epoch"], plan["total_steps"]) == (794, 794, 23820)
    plan = _plan(capsys, [*base, "--gradient_accumulation_steps", "2", "--num_processes", "2",
                          "--save_every_n_epochs", "5", "--save_last_n_epochs", "2", "--save_state",
                          "--lr_warmup_steps", "0.1"])
    assert (plan["batches_per_process"], plan["steps_per_epoch"], plan["total_steps"]) == (397, 198, 5940)
    assert plan["warmup_steps"] == 594
    assert [s["name"] for s in plan["saves"]][:2] == ["fantasy-000005.safetensors", "fantasy-000010.safetensors"]
    assert plan["saves"][0]["step"] == 5 * 397 // 2 and plan["saves"][0]["state"] == "fantasy-000005-state"
    assert plan["kept"] == ["fantasy-000020.safetensors", "fantasy-000020-state", "fantasy-000025.safetensors",
                            "fantasy-000025-state", "fantasy.safetensors", "fantasy-state"]
    assert steps.main([*base, "--max_train_epochs", "2"]) == 0
    text = capsys.readouterr().out
    assert "samples 4760  batches 794" in text and "total optimizer steps: 1588 over 2 epoch(s)" in text


def test_bad_input_is_one_line(tmp_path, capsys):
    assert steps.main(["--train_data_dir", str(tmp_path / "missing"), "--resolution", "64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
    data = _images(tmp_path, [(16, 16)])
    assert steps.main(["--train_data_dir", str(data), "--resolution", "16", "--num_processes", "9"]) == 2
    assert "cannot be shared by 9 processes" in capsys.readouterr().err
