"""--mem_eff_save: the same file, byte for byte, without a cast copy of the model in memory.

Byte-identical is the right bar (not "tensors and metadata equal"): the writer's layout is deterministic
(sorted metadata, widest dtype first then name) and the per-tensor cast is the same op on the same values
as the whole-dict cast, so any difference would be a bug.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from library.models.loading import load_mmdit
from library.models.text_encoders import load_text_encoders
from library.training.checkpoints import checkpoint_metadata, save_full_checkpoint

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_mem_eff_save_writes_identical_bytes(tiny_models, tmp_path, dtype):
    files = tiny_models("sd35-medium")
    model = load_mmdit(files.checkpoint)
    trained = {k: v + 0.01 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    meta = checkpoint_metadata(files.config, title="t", settings={"training_shift": 3.0}, date="2026-01-01T00:00:00")
    encoders = load_text_encoders(files.checkpoint)
    out = {}
    for mem_eff in (False, True):
        out[mem_eff] = save_full_checkpoint(tmp_path / f"m{int(mem_eff)}.safetensors", trained, files.config,
                                            base_checkpoint_path=files.checkpoint, metadata=meta, text_encoders=encoders,
                                            save_clip=True, save_t5xxl=True, dtype=dtype, mem_eff_save=mem_eff)
    assert out[True].read_bytes() == out[False].read_bytes()
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind


_CHILD = r"""
import importlib.util, json, sys, torch
sys.path.insert(0, sys.argv[1])
from library.models.mmdit_config import MMDiTConfig
from library.training.checkpoints import save_full_checkpoint
spec = importlib.util.spec_from_file_location("bench_gpu_memory", sys.argv[1] + "/bench/gpu_memory.py")
bench = importlib.util.module_from_spec(spec)
sys.modules["bench_gpu_memory"] = bench
spec.loader.exec_module(bench)
cfg = MMDiTConfig.from_json(sys.argv[3])
def save(state):
    save_full_checkpoint(sys.argv[4], state, cfg, base_checkpoint_path=sys.argv[2], metadata={}, dtype=torch.bfloat16,
                         mem_eff_save=sys.argv[5] == "1")
torch.manual_seed(0)
save({"w": torch.randn(1024, 1024)})  # the imports the save path makes (VAE/encoder modules) happen here
state = {f"joint_blocks.{i}.w": torch.randn(1024, 1024) for i in range(64)}  # 256 MiB of float32
_, increase = bench.measure_peak_rss(lambda: save(state))
print(json.dumps(increase))
"""


@pytest.mark.slow
def test_mem_eff_save_needs_no_cast_copy(tiny_models, tmp_path):
    """Saving 256 MiB of float32 as bf16: the plain save holds the 128 MiB cast copy, mem_eff_save one tensor."""
    files = tiny_models("sd3-medium")
    increase = {}
    for flag in ("0", "1"):
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(ROOT), str(files.checkpoint), files.config.to_json(),
                               str(tmp_path / f"m{flag}.safetensors"), flag], capture_output=True, text=True,
                              env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        increase[flag] = json.loads(proc.stdout.strip().splitlines()[-1]) / 2**20
    assert increase["0"] > 100, increase  # the whole cast copy (128 MiB)
    assert increase["1"] < 40, increase  # one tensor at a time (4 MiB cast + write buffers)
    assert (tmp_path / "m0.safetensors").read_bytes() == (tmp_path / "m1.safetensors").read_bytes()
