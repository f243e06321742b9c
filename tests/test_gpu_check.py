"""tools/gpu_check.py at tiny shapes on the CPU (--smoke=True, the Triton interpreter): the script the day a GPU is lent
runs end to end against today's APIs (kernels, sampler, transformers, grpo.py, plan.py). It measures nothing here."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_smoke(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1", OUT=str(tmp_path))
    p = subprocess.run([sys.executable, "tools/gpu_check.py", "--smoke=True"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    with open(tmp_path / "gpu_check.json") as f:
        r = json.load(f)
    assert not r["errors"], r["errors"]
    assert r["kernels"] and all(k["ok"] for k in r["kernels"])
    assert r["decode"] and any(d.get("graph_same_tokens") for d in r["decode"])
    g = r["grpo"]
    assert g["clip_frac"] == 0 and g["logp_mismatch_max"] < 1e-4 and g["plan_peak_gb"] > 0
