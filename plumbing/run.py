"""
What every run does beside training: the LR schedule, log.jsonl, env.json (what the run ran on), wandb, and the
embedded default's data.
"""
import json
import math
import os
import sys
import time

import torch

from plumbing.dist import barrier, print0, rank


def _write_json(path, text):
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def get_lr(step, max_steps, lr, warmup_steps, min_lr=0.0):
    """Linear warmup from lr/warmup_steps to lr over warmup_steps, then cosine decay to min_lr at max_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def log_jsonl(out_dir, d):
    """Append one metrics record to out_dir/log.jsonl on rank 0: full precision, continued across resumes
    (a resumed run re-logs the steps after its checkpoint; readers keep the last record of a step)."""
    if rank() == 0:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(d) + "\n")


def ensure_synth_data(out="data/synth"):
    """Render the embedded synthetic task (and its tokenizer) if it is not there yet: rank 0 renders, the others
    wait. prepare() is idempotent and deterministic."""
    if rank() == 0:
        from data.prepare import prepare
        prepare(out)
    barrier()

# -----------------------------------------------------------------------------
# env.json: what a run ran on, in every run directory, checkpoint and export

_PACKAGES = ("torch", "transformers", "triton", "tokenizers", "safetensors", "numpy", "pillow", "math-verify", "tqdm")
_ENV = None


def _cmd(args):
    import subprocess
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment():
    """What this process runs on, for env.json: Python, the packages that decide the numbers, GPUs and driver, the
    code (git commit, dirty or not) and the command line. Computed once per process."""
    global _ENV
    if _ENV is None:
        import importlib.metadata
        import platform

        def version(name):
            try:
                return importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                return None
        here = os.path.dirname(os.path.abspath(__file__))
        commit = _cmd(["git", "-C", here, "rev-parse", "HEAD"])
        dirty = _cmd(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"])
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
            if torch.cuda.is_available() else []
        driver = _cmd(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) if gpus else None
        _ENV = {"python": platform.python_version(), "platform": platform.platform(),
                "packages": dict({n: version(n) for n in _PACKAGES}, torch=torch.__version__),  # with its +cpu/+cuXXX
                "torch_cuda": torch.version.cuda,
                "gpus": gpus, "gpu_count": len(gpus), "driver": driver.splitlines()[0] if driver else None,
                "cpu_count": os.cpu_count(), "git_commit": commit, "git_dirty": None if dirty is None else bool(dirty),
                "command": [sys.executable] + sys.argv, "world_size": int(os.environ.get("WORLD_SIZE", 1)),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return _ENV


def write_env(directory):
    """Rank 0: directory/env.json (the run's environment(), see above). Written atomically."""
    if rank() != 0:
        return
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, ".env.json.tmp")
    _write_json(tmp, json.dumps(environment(), indent=2))
    os.replace(tmp, os.path.join(directory, "env.json"))


def wandb_init(enabled, project, name, config, out_dir, resume):
    """Rank 0 with enabled: import wandb and start the run, or, when resuming, continue the run this out_dir started
    (its id is kept in out_dir/wandb_run_id.txt). Call it before any heavy work: a missing wandb stops the job at
    once, on every rank. Returns the wandb module (rank 0, enabled) or None."""
    if not enabled:
        return None
    try:
        import wandb
    except ImportError as e:
        raise ImportError("wandb_log=True needs wandb: pip install -r requirements-extras.txt") from e
    if rank() != 0:
        return None
    id_path = os.path.join(out_dir, "wandb_run_id.txt")
    run_id = open(id_path).read().strip() if resume and os.path.isfile(id_path) else None
    if resume and run_id is None:
        print0(f"wandb: {id_path} missing: starting a new wandb run rather than continuing the old one")
    run = wandb.init(project=project, name=name, config=config, id=run_id, resume="must" if run_id else None)
    os.makedirs(out_dir, exist_ok=True)
    with open(id_path, "w") as f:
        f.write(run.id + "\n")
    return wandb

