#!/usr/bin/env bash
# The test suite: sets up the venv if needed (scripts/setup.sh, the locked versions), then runs pytest on CPU.
#   bash test.sh               the suite on .venv (your torch, or torch 2.13 CPU; requirements.lock)
#   bash test.sh --gpu-stack   the suite on the GPU machines' versions (torch 2.11, transformers 5.17, triton 3.6;
#                              requirements-gpu-stack.lock)
#   bash test.sh --latest      the suite on the newest versions requirements-dev.txt allows (not locked)
#   bash test.sh --fast        the quick subset (pytest -m "not slow": rl, sampler core and kernels, model, rewards,
#                              data; ~1.5 min on 2 cores); also after --gpu-stack / --latest
# Extra arguments go to pytest (e.g. bash test.sh -x tests/test_sampler.py).
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv
case "${1:-}" in
  --gpu-stack) shift; bash scripts/setup.sh gpu-stack; VENV=.venv-gpu-stack ;;
  --latest) shift; bash scripts/setup.sh latest; VENV=.venv-latest ;;
  *) bash scripts/setup.sh ;;
esac
ARGS=()
if [ "${1:-}" = "--fast" ]; then shift; ARGS=(-m "not slow"); fi
exec $VENV/bin/python -m pytest -q tests "${ARGS[@]}" "$@"
