#!/usr/bin/env bash
# Quick-start demo: sets up .venv when needed, builds a miniature SD3.5-Medium (random weights, real
# file formats) under outputs/demo/tiny_model and renders a 128x128 image into outputs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_venv.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python sd3_minimal_inference.py --demo --output_dir outputs/demo --seed 1 "$@"
