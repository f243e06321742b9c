#!/usr/bin/env bash
# Make or reuse a venv and install the locked versions (requirements*.lock, made by scripts/lock.sh).
#   bash scripts/setup.sh            .venv: sees the system's packages, so a GPU machine's own torch (and its triton)
#                                    is used as it is; torch==2.13.0 (CPU) is installed only when no torch is
#                                    importable. Then the lock tested with that torch: requirements-gpu-stack.lock
#                                    for torch 2.11 (the GPU machines'), requirements.lock otherwise.
#   bash scripts/setup.sh gpu-stack  .venv-gpu-stack: the GPU machines' versions (torch 2.11, transformers 5.17,
#                                    triton 3.6) in a venv of their own, to run the suite on that stack on a CPU
#                                    machine (torch 2.11's CUDA build runs without a GPU; ~3 GB)
#   bash scripts/setup.sh latest     .venv-latest: the newest versions requirements-dev.txt allows (not locked), to
#                                    see a new release break something before a user does (bash test.sh --latest)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pipi() { "$1/bin/python" -m pip install -q "${@:2}"; }
case "${1:-}" in
  gpu-stack)
    [ -x .venv-gpu-stack/bin/python ] || "$PY" -m venv .venv-gpu-stack
    pipi .venv-gpu-stack torch==2.11.0
    pipi .venv-gpu-stack -r requirements-gpu-stack.lock
    # transformers' InternVL processor needs torchvision (tests/test_export.py loads our export with it). 0.26.0 is
    # the build for torch 2.11; --no-deps, so it cannot pull another torch. The CI stack has none (the registry has
    # no CPU torchvision for torch 2.13): that test skips there, saying why.
    pipi .venv-gpu-stack --no-deps torchvision==0.26.0
    exit 0 ;;
  latest)
    [ -x .venv-latest/bin/python ] || "$PY" -m venv .venv-latest
    pipi .venv-latest torch==2.13.0
    pipi .venv-latest --upgrade --upgrade-strategy eager -r requirements-dev.txt
    exit 0 ;;
  "") ;;
  *) echo "scripts/setup.sh: unknown argument '$1' (expected nothing, gpu-stack or latest)" >&2; exit 2 ;;
esac
[ -x .venv/bin/python ] || "$PY" -m venv --system-site-packages .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # no torch anywhere: the CPU build (on this project's CPU machines it is a local file; elsewhere PyPI)
  pipi .venv torch==2.13.0
fi
TORCH=$(.venv/bin/python -c "import torch; print(torch.__version__.split('+')[0])")
LOCK=requirements.lock
case "$TORCH" in 2.11.*) LOCK=requirements-gpu-stack.lock ;; esac
if .venv/bin/python -c "import torch, triton" 2>/dev/null && [ -n "$(.venv/bin/python -c "import torch; print(torch.version.cuda or '')")" ]; then
  # a CUDA torch comes with the triton it was built against: keep that one, whatever the lock says
  grep -v '^triton==' "$LOCK" > .venv/lock.txt
else
  cp "$LOCK" .venv/lock.txt
fi
pipi .venv -r .venv/lock.txt
