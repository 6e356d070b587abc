#!/usr/bin/env bash
# Quick-start demo: sets up .venv when needed, then fine-tunes a miniature SD3.5-Medium (random weights,
# real file formats) on drawn shapes, samples it, and prints where everything is (outputs/demo/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_venv.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python tools/train_demo.py "$@"
