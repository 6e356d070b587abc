#!/usr/bin/env bash
# Builds ./.venv (CPU torch 2.13.0 + requirements + test requirements) when missing or stale.
# Used by tests/run.sh and tools/demo.sh. For a GPU install see README "Install".
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
  pip_install() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@"; }
  pip_install torch==2.13.0
  pip_install -r requirements.txt -r requirements-test.txt
  pip_install --no-deps open-clip-torch==3.3.0
  echo "$want" > "$STAMP"
fi
