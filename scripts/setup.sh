#!/usr/bin/env bash
# Make or reuse .venv and install what is missing. Never reinstalls a torch that is already importable:
# the venv sees the system's packages, so a GPU machine's own torch (and triton) is used as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv --system-site-packages .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # no torch anywhere: the CPU build (on this project's CPU machines it is a local file; elsewhere PyPI)
  .venv/bin/python -m pip install -q torch==2.13.0
fi
# only what is missing or too old; requirements.txt does not name torch, so it is never replaced
.venv/bin/python -m pip install -q -r requirements.txt
