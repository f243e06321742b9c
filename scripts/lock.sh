#!/usr/bin/env bash
# Regenerate the locks from the ranges (never edit a lock by hand):
#   requirements.lock            requirements-dev.txt resolved for the CI stack (torch 2.13, CPU)
#   requirements-gpu-stack.lock  the same, resolved with the GPU machines' transformers 5.17 and triton 3.6 (torch 2.11)
# torch (and its CUDA wheels) is left out of both: it is installed separately (scripts/setup.sh).
# Uses uv (installed into a throw-away venv). After relocking, run the suite on both stacks (bash .ci/run) and
# update the README's numbers before committing the new locks.
set -euo pipefail
cd "$(dirname "$0")/.."
UV=$(mktemp -d)/uv
python3 -m venv "$UV" && "$UV/bin/python" -m pip install -q uv
lock() {  # lock OUT [constraint...]
  local out=$1; shift
  local c; c=$(mktemp)
  printf '%s\n' torch "$@" > "$c"
  "$UV/bin/uv" pip compile -q requirements-dev.txt -c "$c" -o "$out" --python-version 3.11 \
    --python-platform x86_64-unknown-linux-gnu --no-emit-package torch --custom-compile-command "bash scripts/lock.sh"
  sed -i "s|$c|the versions of this stack (scripts/lock.sh)|" "$out"  # not the temporary file's name
}
lock requirements.lock "torch==2.13.0"
lock requirements-gpu-stack.lock "torch==2.11.0" "transformers==5.17.0" "triton==3.6.0"
