#!/usr/bin/env bash
# Make or reuse the venv and install what is missing.
#   bash scripts/setup.sh            .venv: sees the system's packages, so a GPU machine's own torch (and triton) is
#                                    used as it is; torch==2.13.0 (CPU) is installed only when no torch is importable
#   bash scripts/setup.sh gpu-stack  .venv-gpu-stack: the GPU machines' versions (torch 2.11, transformers 5.17,
#                                    triton 3.6) in a venv of their own, to run the suite on that stack on a CPU
#                                    machine (torch 2.11's CUDA build runs without a GPU; ~3 GB)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${1:-}" = "gpu-stack" ]; then
  if [ ! -x .venv-gpu-stack/bin/python ]; then
    "$PY" -m venv .venv-gpu-stack
  fi
  .venv-gpu-stack/bin/python -m pip install -q torch==2.11.0 transformers==5.17.0 triton==3.6.0
  .venv-gpu-stack/bin/python -m pip install -q -r requirements.txt  # satisfied versions stay as they are
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv --system-site-packages .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # no torch anywhere: the CPU build (on this project's CPU machines it is a local file; elsewhere PyPI)
  .venv/bin/python -m pip install -q torch==2.13.0
fi
# only what is missing or too old; requirements.txt does not name torch, so it is never replaced
.venv/bin/python -m pip install -q -r requirements.txt
