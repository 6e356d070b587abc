"""Two CPU processes under `accelerate launch`: disjoint data, identical weights, one checkpoint."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_sd3_train import _dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_process_ddp(tiny_models, tmp_path):
    files = tiny_models("sd3-medium")
    toml = _dataset(tmp_path)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "sd3_train.py"),
               "--pretrained_model_name_or_path", str(files.checkpoint), "--tokenizer_cache_dir", str(files.tokenizer_dir),
               "--dataset_config", str(toml), "--output_dir", str(tmp_path / "out"), "--output_name", "ddp",
               "--cache_latents", "--cache_text_encoder_outputs", "--t5xxl_max_token_length", "8",
               "--max_train_steps", "3", "--seed", "1", "--learning_rate", "1e-3"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    log = done.stdout + done.stderr
    assert done.returncode == 0, "\n".join(line for line in log.splitlines() if "error" in line.lower())[-3000:]
    ranks = re.findall(r"rank (\d)/2: trained on (\d+) samples \(digest ([0-9a-f]+)\), weights checksum ([0-9a-f]+)", log)
    assert sorted(r[0] for r in ranks) == ["0", "1"], log[-3000:]
    assert ranks[0][3] == ranks[1][3]  # identical weights on both ranks
    assert ranks[0][2] != ranks[1][2] and int(ranks[0][1]) > 0 and int(ranks[1][1]) > 0  # different data
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ddp.safetensors", "loss.png"]  # rank 0 writes
