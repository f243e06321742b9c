# Test-wide setup: runs before any test module is imported.
import os
import sys

import torch

# Triton kernels can only run under the interpreter on a machine without a GPU; it must be set before
# anything imports triton (docs/perf.md, "Triton on CPU").
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# the repo root holds flat modules (model.py, sampler.py, ...) and tools/ the tools beside the pipeline (plan.py,
# viewer.py, ...): make both importable from tests/
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
