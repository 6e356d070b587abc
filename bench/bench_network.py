"""Network training cost: s/step and peak RSS of sd3_train_network.py (LoRA, LoKr) vs sd3_train.py (full).

Run: python bench/bench_network.py [--steps 60] [--repeats 3] [--no-record]

A miniature sd35-medium set (``make_tiny_model(..., heads_equal_depth=True)``: 3 layers x 3 heads of
64) and 32 drawn images at 128 px. Each run is the real command line in its own process (so its peak
RSS is its own, read with ``os.wait4``): cached latents and text-encoder outputs, batch 4, AdamW,
fp32 on this CPU; the s/step is the loop's own figure ("trained N steps in T s"), which includes
the first (slower) steps, so runs are long enough to make that small. Runs alternate between the
kinds (order rotated each repeat); figures are medians, ratios are network ÷ full per repeat. A row
goes to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_data import draw_images  # noqa: E402
from results import append_section, header  # noqa: E402

KINDS = {
    "full": ("sd3_train.py", []),
    "lora": ("sd3_train_network.py", ["--network_module", "networks.lora_sd3", "--network_dim", "16",
                                      "--network_train_unet_only"]),
    "lokr": ("sd3_train_network.py", ["--network_module", "networks.lokr_sd3", "--network_dim", "16",
                                      "--network_args", "factor=8", "--network_train_unet_only"]),
}
STEP_LINE = re.compile(r"trained (\d+) steps in ([\d.]+) s")


def _command(kind: str, files, data: Path, out: Path, steps: int) -> list[str]:
    script, extra = KINDS[kind]
    return [sys.executable, str(ROOT / script), "--pretrained_model_name_or_path", str(files.checkpoint),
            "--tokenizer_cache_dir", str(files.tokenizer_dir), "--train_data_dir", str(data), "--resolution", "128",
            "--enable_bucket", "--min_bucket_reso", "64", "--max_bucket_reso", "256", "--output_dir", str(out), "--output_name", kind, "--max_train_steps", str(steps),
            "--train_batch_size", "4", "--learning_rate", "1e-4", "--cache_latents", "--cache_text_encoder_outputs",
            "--seed", "1", *extra]


def run_once(command: list[str]) -> tuple[float, float]:
    """(s/step, peak RSS in MiB) of one training process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{command[1]} failed:\n{output[-2000:]}")
    steps, seconds = STEP_LINE.search(output).groups()
    return float(seconds) / int(steps), usage.ru_maxrss / 1024  # ru_maxrss is KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    from library.models.tiny.factory import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = make_tiny_model(root / "model", "sd35-medium", seed=0, heads_equal_depth=True)
        draw_images(root / "data" / "1_shapes", 32)
        times: dict[str, list[float]] = {k: [] for k in KINDS}
        rss: dict[str, list[float]] = {k: [] for k in KINDS}
        order = list(KINDS)
        for repeat in range(args.repeats):
            for kind in order[repeat % len(order):] + order[:repeat % len(order)]:
                seconds, peak = run_once(_command(kind, files, root / "data", root / f"out_{kind}", args.steps))
                times[kind].append(seconds)
                rss[kind].append(peak)
                print(f"{kind}: {seconds * 1000:.1f} ms/step, peak RSS {peak:.0f} MiB", flush=True)
    lines = header("bench_network") + [
        f"- miniature sd35-medium (heads = depth, hidden 192), 32 drawn images at 128 px, batch 4, cached latents + "
        f"text, fp32, AdamW; {args.repeats} runs of {args.steps} steps per kind, each in its own process"]
    for kind in ("lora", "lokr"):
        ratios = [n / f for n, f in zip(times[kind], times["full"])]
        lines.append(f"- {kind} (dim 16, MMDiT only): {statistics.median(times[kind]) * 1000:.1f} ms/step vs full "
                     f"{statistics.median(times['full']) * 1000:.1f} ms/step, ratio {kind} ÷ full "
                     f"**{statistics.median(ratios):.3f}**; peak RSS {statistics.median(rss[kind]):.0f} MiB vs "
                     f"{statistics.median(rss['full']):.0f} MiB (ratio {statistics.median(rss[kind]) / statistics.median(rss['full']):.3f})")
    print("\n".join(lines))
    if not args.no_record:
        append_section(lines)


if __name__ == "__main__":
    main()
