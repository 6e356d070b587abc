#!/usr/bin/env bash
# The project's test command: sets up .venv when needed (CPU torch), then runs pytest.
# Extra arguments go to pytest, e.g. `bash tests/run.sh tests/models -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_venv.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec .venv/bin/python -m pytest "$@"
