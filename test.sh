#!/usr/bin/env bash
# The test suite: sets up .venv if needed (scripts/setup.sh), then runs pytest on CPU.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q tests "$@"
