# Test-wide setup: runs before any test module is imported.
import os
import sys

import torch

# Triton kernels can only run under the interpreter on a machine without a GPU; it must be set before
# anything imports triton (PERF.md).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# the repo root holds flat modules (model.py, sampler.py, ...): make them importable from tests/
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
