"""sft.py end to end on a tiny model: loss goes down, resume reproduces the uninterrupted run exactly
(single process and 2 processes under torchrun with FSDP2), and 2 processes equal 1 process on the same
global batch (the loss normalisation over ranks and micro-batches is right)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from test_install import check_env_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--n_kv_head=1", "--vit_hidden=32", "--vit_layers=1",
        "--vit_heads=2", "--max_steps=6", "--save_every=3", "--eval_every=3", "--log_every=1", "--lr=3e-3"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    sys.path.insert(0, ROOT)
    from data.prepare import prepare
    out = tmp_path_factory.mktemp("synth")
    prepare(str(out), n_sft=48, n_rl=8, n_val=8, n_test=8)
    return str(out)


def run(args, out_dir, synth, nproc=1):
    base = [f"--out_dir={out_dir}", f"--data={synth}/sft.jsonl", f"--val_data={synth}/val.jsonl",
            f"--tokenizer={synth}/tokenizer"] + TINY
    if nproc == 1:
        cmd = [sys.executable, "sft.py"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "sft.py"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd + base + args, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def losses(out_dir):
    by_step = {}
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        for line in f:
            d = json.loads(line)
            if "loss" in d:
                by_step[d["step"]] = d["loss"]  # a resumed run re-logs steps after its checkpoint: keep the last
    return [by_step[s] for s in sorted(by_step)]


def interrupt_and_resume(out_dir, args, synth, nproc):
    # the checkpoint at step 3 is the same file whether or not the run went on: drop what came after it
    # (as if the run had died after step 3), then resume
    shutil.rmtree(os.path.join(out_dir, "ckpt_0000006"))
    shutil.rmtree(os.path.join(out_dir, "hf"))
    run(args + ["--init_from=resume"], out_dir, synth, nproc)


def test_sft_trains_and_resumes_exactly(synth, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    out = run(["--batch_size=4"], a, synth)
    full = losses(a)
    assert len(full) == 6 and full[-1] < full[0], full  # it learns
    assert "val loss" in out
    assert os.path.isfile(os.path.join(a, "hf", "config.json")) and os.path.isfile(os.path.join(a, "hf", "tokenizer.json"))
    for d in (a, os.path.join(a, "hf"), os.path.join(a, "ckpt_0000006")):  # the run, its export, its checkpoints
        check_env_json(d, script="sft.py")
    shutil.copytree(a, b)
    interrupt_and_resume(b, ["--batch_size=4"], synth, 1)
    assert losses(b) == full  # bit-exact: same data order, optimizer state, schedule
    # grad accumulation: 2 micro-batches of 2 give the same step as one of 4 (token-mean over the global batch)
    c = str(tmp_path / "c")
    run(["--batch_size=2", "--grad_accum=2"], c, synth)
    assert losses(c) == pytest.approx(full, rel=1e-5)


def test_sft_fsdp_two_processes(synth, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run(["--batch_size=4"], one, synth)
    run(["--batch_size=2"], two, synth, nproc=2)  # same global batch of 4, sharded over 2 ranks
    assert os.path.isfile(os.path.join(two, "hf", "config.json"))
    check_env_json(two, world_size=2, script="sft.py")
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)
    resumed = str(tmp_path / "resumed")
    shutil.copytree(two, resumed)
    interrupt_and_resume(resumed, ["--batch_size=2"], synth, 2)
    assert losses(resumed) == pytest.approx(losses(two), rel=1e-6)
