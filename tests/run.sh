#!/usr/bin/env bash
# The project's test command: builds .venv when needed (CPU torch), installs the requirements,
# then runs pytest. Extra arguments go to pytest, e.g. `bash tests/run.sh tests/models -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP="$VENV/.requirements-stamp"
want="torch==2.13.0 open-clip-torch==3.3.0 $(cat requirements.txt requirements-test.txt | sha256sum | cut -c1-16)"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$want" ]; then
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-test.txt
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps open-clip-torch==3.3.0
  echo "$want" > "$STAMP"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$VENV/bin/python" -m pytest "$@"
