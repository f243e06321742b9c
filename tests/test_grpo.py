"""grpo.py end to end on a tiny SFT'd model: it runs and logs what the issue asks for, a stopped-and-resumed run
reproduces the uninterrupted one (1 process, and 2 under torchrun with FSDP2), every option runs, bad input
gives a clear error."""
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRPO = ["--prompts_per_step=4", "--group_size=4", "--max_new_tokens=[[0, 24]]", "--micro_batch=8", "--val_n=8",
        "--eval_every=2", "--save_every=2", "--max_steps=4", "--lr=1e-3", "--dump_every=2"]


def run(script, args, nproc=1, ok=True):
    cmd = [sys.executable, script] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
    p = subprocess.run(cmd + args, cwd=ROOT, capture_output=True, text=True, timeout=400,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    if ok:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory):
    sys.path.insert(0, ROOT)
    from data.prepare import prepare
    d = tmp_path_factory.mktemp("grpo")
    synth = str(d / "synth")
    prepare(synth, n_sft=64, n_rl=32, n_val=8, n_test=8)
    # short traces, so that a tiny model learns the answer format in a few steps and rewards vary within groups
    with open(f"{synth}/sft.jsonl") as f, open(f"{synth}/short.jsonl", "w") as g:
        for line in f:
            s = json.loads(line)
            s["solution"] = "<think>\nI look.\n</think>\n\n\\boxed{" + s["answer"] + "}"
            g.write(json.dumps(s) + "\n")
    run("sft.py", [f"--out_dir={d}/sft", f"--data={synth}/short.jsonl", f"--val_data=",
                   f"--tokenizer={synth}/tokenizer", "--n_layer=1", "--n_embd=32", "--n_head=2", "--n_kv_head=1",
                   "--vit_hidden=32", "--vit_layers=1", "--vit_heads=2", "--max_steps=40", "--batch_size=16",
                   "--lr=1e-2", "--warmup_frac=0.1"])
    return synth, f"{d}/sft/hf"


def base(synth, hf, out):
    return [f"--out_dir={out}", f"--init_from={hf}", f"--data={synth}/rl.jsonl", f"--val_data={synth}/val.jsonl"] + GRPO


def log(out):
    by_step = {}
    with open(os.path.join(out, "log.jsonl")) as f:
        for line in f:
            d = json.loads(line)
            by_step.setdefault(d["step"], {}).update(d)
    return by_step


def strip_times(d):
    return {s: {k: v for k, v in m.items() if not k.startswith("t_") and k != "rollout_tok_per_s"}
            for s, m in d.items()}


def test_grpo_runs_logs_and_resumes_exactly(sft_model, tmp_path):
    synth, hf = sft_model
    a = str(tmp_path / "a")
    out = run("grpo.py", base(synth, hf, a)).stdout
    m = log(a)
    assert sorted(m) == [0, 1, 2, 3, 4] and "val_accuracy" in m[0] and "val_accuracy" in m[4]
    for key in ("reward", "accuracy", "format", "all_correct", "all_wrong", "resp_len", "truncated", "clip_frac",
                "approx_kl", "gnorm", "entropy", "high_entropy_share", "critical_entropy", "verifier_timeouts",
                "t_rollout", "t_logp", "t_update", "logp_mismatch"):
        assert key in m[1], key
    assert 0 <= m[1]["reward"] <= 1 and m[1]["entropy"] > 0
    assert any(m[s]["gnorm"] > 0 for s in range(1, 5))  # some group had different rewards: the policy moved
    assert m[1]["logp_mismatch"] < 1e-4  # sampler log-probs == training forward log-probs (fp32)
    assert "step 4/4 | reward" in out
    assert os.path.isfile(os.path.join(a, "hf", "model.safetensors"))
    with open(os.path.join(a, "rollouts.jsonl")) as f:
        dump = [json.loads(line) for line in f]
    assert dump and {"question", "response", "reward", "advantage", "images"} <= set(dump[0])
    # stop after step 2 and resume: steps 3-4 are identical (rollouts, rewards, losses, validation)
    b = str(tmp_path / "b")
    shutil.copytree(a, b)
    shutil.rmtree(os.path.join(b, "ckpt_0000004"))
    run("grpo.py", base(synth, hf, b) + ["--init_from=resume"])
    assert strip_times(log(b)) == strip_times(log(a))


def test_grpo_fsdp_two_processes_resume(sft_model, tmp_path):
    synth, hf = sft_model
    a = str(tmp_path / "a")
    run("grpo.py", base(synth, hf, a), nproc=2)
    m = log(a)
    assert sorted(m) == [0, 1, 2, 3, 4] and any(m[s]["gnorm"] > 0 for s in range(1, 5))
    b = str(tmp_path / "b")
    shutil.copytree(a, b)
    shutil.rmtree(os.path.join(b, "ckpt_0000004"))
    run("grpo.py", base(synth, hf, b) + ["--init_from=resume"], nproc=2)
    ra, rb = strip_times(log(a)), strip_times(log(b))
    for s in (3, 4):
        for k, v in ra[s].items():
            assert rb[s][k] == (v if v is None else pytest.approx(v, rel=1e-5, abs=1e-7)), (s, k)


def test_grpo_every_option_runs(sft_model, tmp_path):
    synth, hf = sft_model
    out = str(tmp_path / "opts")
    args = base(synth, hf, out) + ["--max_steps=2", "--dynamic_sampling=True", "--max_sample_rounds=2",
                                   "--buffer_frac=0.25", "--kl_coef=0.01", "--entropy_target=5.0",
                                   "--drop_zero_adv=True", "--loss_agg=token_mean", "--eps_high=0.28",
                                   "--ppo_epochs=2", "--mini_batches=2", "--truncated_zero=True", "--std_norm=False",
                                   "--train_connector=False", "--max_new_tokens=[[0, 16], [1, 24]]"]
    run("grpo.py", args)
    m = log(out)
    assert m[2]["entropy_coef"] >= 0 and m[1]["sample_rounds"] >= 1
    # Dr.GRPO constant normaliser too
    run("grpo.py", base(synth, hf, str(tmp_path / "dr")) + ["--max_steps=1", "--loss_agg=seq_sum_const"])


def test_grpo_nonfinite_step_is_skipped(sft_model, tmp_path):
    # a NaN loss at step 2: the update is skipped and logged, the run goes on, weights and checkpoints stay finite
    import torch
    from safetensors.torch import load_file
    synth, hf = sft_model
    a = str(tmp_path / "a")
    out = run("grpo.py", base(synth, hf, a) + ["--debug_nan_step=2"]).stdout
    assert "step 2: non-finite loss" in out and "update skipped" in out
    m = log(a)
    assert [m[s]["skipped"] for s in (1, 2, 3, 4)] == [0, 1, 0, 0]
    assert all(torch.isfinite(t).all() for t in load_file(os.path.join(a, "hf", "model.safetensors")).values())
    shutil.rmtree(os.path.join(a, "ckpt_0000004"))  # resume from the checkpoint written right after the skip
    run("grpo.py", base(synth, hf, a) + ["--init_from=resume"])
    assert log(a)[4]["skipped"] == 0


def test_grpo_bad_input(sft_model, tmp_path):
    synth, hf = sft_model
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    p = run("grpo.py", base(synth, hf, str(tmp_path / "e")) + [f"--data={empty}"], ok=False)
    assert p.returncode != 0 and "empty.jsonl" in p.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "image": "nope.png", "question": "q?", "answer": "1"}) + "\n")
    p = run("grpo.py", base(synth, hf, str(tmp_path / "b")) + [f"--data={bad}"], ok=False)
    assert p.returncode != 0 and "bad.jsonl:1" in p.stderr and "nope.png" in p.stderr
    p = run("grpo.py", base(synth, hf, str(tmp_path / "c")) + ["--init_from=resume"], ok=False)
    assert p.returncode != 0 and "no complete checkpoint" in p.stderr
