#!/usr/bin/env bash
# The test suite: sets up the venv if needed (scripts/setup.sh), then runs pytest on CPU.
#   bash test.sh               the suite on .venv (your torch, or torch 2.13 CPU)
#   bash test.sh --gpu-stack   the suite on the GPU machines' versions (torch 2.11, transformers 5.17, triton 3.6)
# Extra arguments go to pytest (e.g. bash test.sh -x tests/test_sampler.py).
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv
if [ "${1:-}" = "--gpu-stack" ]; then
  shift
  bash scripts/setup.sh gpu-stack
  VENV=.venv-gpu-stack
else
  bash scripts/setup.sh
fi
exec $VENV/bin/python -m pytest -q tests "$@"
