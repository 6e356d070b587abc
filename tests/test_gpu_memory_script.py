"""bench/gpu_memory.py runs end to end with --tiny (on this CPU) and appends its rows to a results file."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_run_appends_rows(tmp_path):
    results = tmp_path / "RESULTS.md"
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_memory.py"), "--tiny", "--device", "cpu", "--cases", "a1,a2",
           "--steps", "1", "--warmup", "0", "--results", str(results)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = results.read_text()
    assert re.search(r"^## gpu_memory --tiny \d{4}-\d\d-\d\d — .*cpu", text, re.M)
    assert "`python bench/gpu_memory.py --tiny --device cpu --cases a1,a2" in text  # the command that ran
    a1 = next(line for line in text.splitlines() if line.startswith("- a1 "))
    measured, planned, ratio = (float(x) for x in re.search(
        r"measured ([\d.]+) GiB, planned ([\d.]+) GiB, planned ÷ measured \*\*([\d.]+)\*\*", a1).groups())
    assert measured > 0 and planned > 0 and 0.5 < ratio < 2.0 and "s/it" in a1
    a2 = next(line for line in text.splitlines() if line.startswith("- a2 "))
    block_swap = (ROOT / "library" / "runtime" / "block_swap.py").exists()
    assert ("--blocks_to_swap 1" in a2) if block_swap else ("skipped" in a2 and "block_swap" in a2), a2


def test_real_sizes_need_a_gpu(tmp_path):
    if torch.cuda.is_available():  # on a GPU machine the real run is the benchmark itself, not a test
        return
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_memory.py"), "--cases", "a1", "--results", str(tmp_path / "r.md")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "--tiny" in proc.stderr and not (tmp_path / "r.md").exists()
