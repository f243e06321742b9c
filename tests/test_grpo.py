"""grpo.py end to end on a tiny SFT'd model: it runs and logs what the issue asks for, a stopped-and-resumed run
reproduces the uninterrupted one (1 process, and 2 under torchrun with FSDP2), one step on 2 ranks equals one step
on 1 rank over the same global batch, the on-policy ratio is exactly 1, the entropy bonus and the KL term push the
right way, every option runs, rank-local faults (injected by tests/grpo_patch.py) are decided by all ranks, bad
input gives a clear error."""
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch

from tiny_sft import tiny_sft
from test_install import check_env_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRPO = ["--prompts_per_step=4", "--group_size=4", "--max_new_tokens=[[0, 24]]", "--micro_batch=8", "--val_n=8",
        "--eval_every=2", "--save_every=2", "--max_steps=4", "--lr=1e-3", "--dump_every=2"]


def run(script, args, nproc=1, ok=True, faults=None, timeout=400):
    pre = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = pre + ([os.path.join(ROOT, "tests", "grpo_patch.py")] + faults + ["--"] if faults else [script]) + args
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    if ok:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory):
    return tiny_sft(str(tmp_path_factory.mktemp("grpo")))


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


def weights(hf):
    from safetensors.torch import load_file
    return load_file(os.path.join(hf, "model.safetensors"))


def test_grpo_runs_logs_and_resumes_exactly(sft_model, tmp_path):
    synth, hf = sft_model
    a = str(tmp_path / "a")
    out = run("grpo.py", base(synth, hf, a)).stdout
    m = log(a)
    assert sorted(m) == [0, 1, 2, 3, 4] and "val_accuracy" in m[0] and "val_accuracy" in m[4]
    for key in ("reward", "accuracy", "format", "all_correct", "all_wrong", "resp_len", "truncated", "clip_frac",
                "approx_kl", "gnorm", "loss", "lr", "entropy", "high_entropy_share", "critical_entropy",
                "verifier_timeouts", "t_rollout", "t_logp", "t_update", "logp_mismatch", "groups_kept"):
        assert key in m[1], key
    assert 0 <= m[1]["reward"] <= 1 and m[1]["entropy"] > 0
    assert any(m[s]["gnorm"] > 0 for s in range(1, 5))  # some group had different rewards: the policy moved
    # on-policy default: pi_old is the update's own forward, so the ratio is exactly 1 (verl / TRL on-policy)
    assert all(m[s]["clip_frac"] == 0 and abs(m[s]["approx_kl"]) < 1e-9 for s in range(1, 5))
    assert all(m[s]["logp_mismatch"] < 1e-4 for s in range(1, 5))  # sampler log-probs == trainer's (fp32)
    assert m[1]["t_logp"] < 0.05  # no separate log-prob pass on-policy
    assert "step 4/4 | reward" in out and "| loss " in out and " lr 1.0e-03 " in out
    assert os.path.isfile(os.path.join(a, "hf", "model.safetensors"))
    for d in (a, os.path.join(a, "hf"), os.path.join(a, "ckpt_0000004")):
        check_env_json(d, script="grpo.py")
    with open(os.path.join(a, "rollouts.jsonl")) as f:
        dump = [json.loads(line) for line in f]
    assert [d["step"] for d in dump] == [2, 2, 4, 4] and len(dump[0]["samples"]) == 4
    s = dump[0]["samples"][0]
    assert {"question", "images", "answer", "domain"} <= set(dump[0]) and os.path.isfile(dump[0]["images"][0])
    assert {"response", "pieces", "tokens", "logp", "entropy", "train_logp", "advantage", "reward", "accuracy",
            "format", "pred", "finish_reason", "critical"} <= set(s)
    assert len(s["pieces"]) == len(s["tokens"]) == len(s["logp"]) == len(s["train_logp"]) == s["n_tokens"]
    assert max(abs(x - y) for x, y in zip(s["logp"], s["train_logp"])) < 1e-4
    # stop after step 2 and resume: steps 3-4 are identical (rollouts, rewards, losses, validation)
    b = str(tmp_path / "b")
    shutil.copytree(a, b)
    shutil.rmtree(os.path.join(b, "ckpt_0000004"))
    run("grpo.py", base(synth, hf, b) + ["--init_from=resume"])
    assert strip_times(log(b)) == strip_times(log(a))


def test_grpo_fsdp_two_processes_resume(sft_model, tmp_path):
    synth, hf = sft_model
    a = str(tmp_path / "a")
    run("grpo.py", base(synth, hf, a) + ["--buffer_frac=0.25"], nproc=2)  # the buffer: per-rank state
    m = log(a)
    assert sorted(m) == [0, 1, 2, 3, 4] and any(m[s]["gnorm"] > 0 for s in range(1, 5))
    # buffer_frac is the share of the update batch: 8 fresh rows a rank -> round(0.25 / 0.75 * 8) = 3 buffered
    # (fewer while the buffer holds fewer); none at step 1, nothing earlier to draw from
    assert m[1]["buffer_rows"] == 0 and max(m[s]["buffer_rows"] for s in range(2, 5)) == 6
    assert all(m[s]["train_rows"] == 16 + m[s]["buffer_rows"] for s in range(1, 5))
    b = str(tmp_path / "b")
    shutil.copytree(a, b)
    shutil.rmtree(os.path.join(b, "ckpt_0000004"))
    run("grpo.py", base(synth, hf, b) + ["--buffer_frac=0.25", "--init_from=resume"], nproc=2)
    ra, rb = strip_times(log(a)), strip_times(log(b))
    for s in (3, 4):
        for k, v in ra[s].items():
            assert rb[s][k] == (v if v is None else pytest.approx(v, rel=1e-5, abs=1e-7)), (s, k)


def test_one_step_two_ranks_equals_one_rank(sft_model, tmp_path):
    # the same 8 prompts x 4 samples: on 1 rank, or 4 prompts on each of 2 ranks (per-prompt seeds: the same
    # samples), one optimizer step -> the same weights, loss and grad norm (the normalisers are global)
    synth, hf = sft_model
    args = ["--prompts_per_step=8", "--max_steps=1", "--val_data=", "--dump_every=0", "--save_every=1",
            "--micro_batch=4", "--lr=1e-3"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run("grpo.py", base(synth, hf, one) + args)
    run("grpo.py", base(synth, hf, two) + args, nproc=2)
    m1, m2 = log(one)[1], log(two)[1]
    for key in ("reward", "accuracy", "resp_len", "loss", "gnorm", "entropy"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-7), key
    assert m1["gnorm"] > 0
    w0, w1, w2 = weights(hf), weights(os.path.join(one, "hf")), weights(os.path.join(two, "hf"))
    moved = 0
    for k in w1:
        # Adam's first step is ~lr * sign(g): a parameter whose gradient is exactly 0 in exact arithmetic
        # (k_proj's bias: softmax ignores a constant shift) moves by float noise, differently on each side
        if "k_proj.bias" in k:
            continue
        torch.testing.assert_close(w2[k], w1[k], atol=1e-6, rtol=1e-5, msg=k)
        moved += int(not torch.equal(w1[k], w0[k]))
    assert moved > len(w1) // 2


def policy_stats(hf_a, hf_b, seqs):
    """(mean entropy of a, mean entropy of b, KL(b || a)) over the response positions of seqs (token ids,
    prompt length) — text-only sequences, so no images are needed."""
    sys.path.insert(0, ROOT)
    from plumbing.hf import load_pretrained
    out = []
    for hf in (hf_a, hf_b):
        m = load_pretrained(hf).eval()
        logps = []
        for ids, p in seqs:
            with torch.no_grad():
                logits = m(torch.tensor([ids]))[0, p - 1:-1].float()
            logps.append(logits.log_softmax(-1))
        out.append(torch.cat(logps))
    la, lb = out
    ent = lambda lp: float(-(lp.exp() * lp).sum(-1).mean())  # noqa: E731
    return ent(la), ent(lb), float((lb.exp() * (lb - la)).sum(-1).mean())


def test_entropy_bonus_and_kl_have_the_right_sign(sft_model, tmp_path):
    # all rewards 0 (both weights 0): every advantage is 0, so the only gradient is the entropy bonus (and the KL)
    synth, hf = sft_model
    args = ["--acc_weight=0", "--fmt_weight=0", "--val_data=", "--dump_every=0", "--lr=1e-2", "--max_steps=4",
            "--save_every=4", "--entropy_coef=0.5"]
    ent, kl = str(tmp_path / "ent"), str(tmp_path / "kl")
    run("grpo.py", base(synth, hf, ent) + args)
    run("grpo.py", base(synth, hf, kl) + args + ["--kl_coef=5.0"])
    g = torch.Generator().manual_seed(0)
    seqs = [(torch.randint(4, 200, (30,), generator=g).tolist(), 10) for _ in range(8)]
    e0, e1, kl1 = policy_stats(hf, os.path.join(ent, "hf"), seqs)
    _, _, kl2 = policy_stats(hf, os.path.join(kl, "hf"), seqs)
    assert e1 > e0 + 0.01, (e0, e1)  # the bonus raised the policy's entropy
    assert kl2 < 0.7 * kl1, (kl1, kl2)  # the KL term held the policy nearer the initial one


def test_grpo_every_option_runs(sft_model, tmp_path):
    synth, hf = sft_model
    out = str(tmp_path / "opts")
    args = base(synth, hf, out) + ["--max_steps=3", "--dynamic_sampling=True", "--max_sample_rounds=2",
                                   "--buffer_frac=0.25", "--kl_coef=0.01", "--entropy_target=5.0",
                                   "--drop_zero_adv=True", "--loss_agg=token_mean", "--eps_high=0.28",
                                   "--ppo_epochs=2", "--mini_batches=2", "--truncated_zero=True", "--std_norm=False",
                                   "--train_connector=False", "--max_new_tokens=[[0, 16], [1, 24]]",
                                   "--overlong_buffer=8", "--group_filter=reward"]
    p = run("grpo.py", args)
    m = log(out)
    assert m[3]["entropy_coef"] >= 0 and m[1]["sample_rounds"] >= 1
    assert any(m[s]["buffer_rows"] > 0 for s in (2, 3))  # step 1 has nothing earlier to draw from
    assert m[1]["buffer_rows"] == 0
    if any(m[s]["groups_trained"] < 4 for s in (1, 2, 3)):  # the cap was hit: the log says so
        assert "informative groups after" in p.stdout
    # Dr.GRPO constant normaliser too
    run("grpo.py", base(synth, hf, str(tmp_path / "dr")) + ["--max_steps=1", "--loss_agg=seq_sum_const"])


def test_drgrpo_normaliser_ignores_the_length_schedule(sft_model, tmp_path):
    # Dr.GRPO's normaliser is one constant for the run (default: the schedule's longest length), not the current
    # length of the schedule (before: 16 at step 1, 24 at step 2 -- the gradient changed with the schedule)
    synth, hf = sft_model
    rec = tmp_path / "norms.txt"
    run("grpo.py", base(synth, hf, str(tmp_path / "a")) + ["--max_steps=2", "--loss_agg=seq_sum_const",
        "--std_norm=False", "--val_data=", "--dump_every=0", "--max_new_tokens=[[0, 16], [1, 24]]"],
        faults=[f"record_norm={rec}"])
    norms = {float(x) for x in rec.read_text().split()}
    assert norms == {24.0}, norms
    rec.unlink()
    run("grpo.py", base(synth, hf, str(tmp_path / "b")) + ["--max_steps=1", "--loss_agg=seq_sum_const",
        "--val_data=", "--dump_every=0", "--seq_sum_norm=100"], faults=[f"record_norm={rec}"])
    assert {float(x) for x in rec.read_text().split()} == {100.0}


def test_group_filter_is_accuracy_by_default(sft_model, tmp_path):
    # DAPO / OR1 filter groups on accuracy: groups whose rewards differ only by the format reward are not
    # informative by default (drop_zero_adv trains on none of them); group_filter=reward keeps them
    synth, hf = sft_model
    args = ["--max_steps=1", "--val_data=", "--dump_every=0", "--drop_zero_adv=True"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    out = run("grpo.py", base(synth, hf, a) + args, faults=["scores=format_only"]).stdout
    assert log(a)[1]["train_rows"] == 0 and "no informative samples on any rank: update skipped" in out
    run("grpo.py", base(synth, hf, b) + args + ["--group_filter=reward"], faults=["scores=format_only"])
    assert log(b)[1]["train_rows"] == 16 and log(b)[1]["gnorm"] > 0


def test_a_rank_with_nothing_to_train_on_still_joins(sft_model, tmp_path):
    # rank 1 has no informative group (all its rewards 0) and drops every sample; rank 0 trains. Rank 1 still runs
    # zero-weight passes, so the FSDP collectives match, and the step completes on both
    synth, hf = sft_model
    a = str(tmp_path / "a")
    run("grpo.py", base(synth, hf, a) + ["--max_steps=1", "--val_data=", "--dump_every=0", "--drop_zero_adv=True",
        "--group_filter=reward"], nproc=2, faults=["scores=format_only@0", "scores=zero@1"])
    m = log(a)[1]
    assert m["train_rows"] == 8 and m["gnorm"] > 0 and m["skipped"] == 0


def test_grpo_nonfinite_step_is_skipped(sft_model, tmp_path):
    # a NaN loss at step 2: the update is skipped and logged, the run goes on, weights and checkpoints stay finite
    synth, hf = sft_model
    a = str(tmp_path / "a")
    out = run("grpo.py", base(synth, hf, a), faults=["nan_step=2"]).stdout
    assert "step 2: non-finite loss" in out and "update skipped" in out
    m = log(a)
    assert [m[s]["skipped"] for s in (1, 2, 3, 4)] == [0, 1, 0, 0]
    assert all(torch.isfinite(t).all() for t in weights(os.path.join(a, "hf")).values())
    shutil.rmtree(os.path.join(a, "ckpt_0000004"))  # resume from the checkpoint written right after the skip
    run("grpo.py", base(synth, hf, a) + ["--init_from=resume"])
    assert log(a)[4]["skipped"] == 0


def test_rank_local_faults_are_decided_by_all_ranks(sft_model, tmp_path):
    # only rank 1 sees the fault; both ranks act on it together (no rank left waiting in a collective)
    synth, hf = sft_model
    a = str(tmp_path / "a")
    args = base(synth, hf, a) + ["--max_steps=2", "--val_data=", "--save_every=2"]
    out = run("grpo.py", args, nproc=2, faults=["nan_step=2@1"]).stdout  # a NaN on rank 1 only: both skip
    assert [log(a)[s]["skipped"] for s in (1, 2)] == [0, 1] and "update skipped" in out
    t0 = time.time()  # the KV-cache budget (agreed: the smallest rank's) is too small: every rank says so, with sizes
    p = run("grpo.py", base(synth, hf, str(tmp_path / "b")), nproc=2, faults=["budget=1000@1"], ok=False)
    assert p.returncode != 0 and "budget is" in p.stderr and time.time() - t0 < 90
    # rank 1's own prompts alone do not fit, in a rollout and in the validation: both ranks refuse together (rank 0
    # raising its own error naming the other rank) instead of rank 0 waiting in a collective until the watchdog
    # stops it
    for what, extra in (("rollout", ["--val_data="]), ("validation", [])):
        p = run("grpo.py", base(synth, hf, str(tmp_path / f"b_{what}")) + extra, nproc=2, faults=["oom=1@1"], ok=False)
        assert p.returncode != 0 and "injected: rank 1's prompts do not fit" in p.stderr
        assert f"rank 0: {what} failed on rank 1: MemoryError" in p.stderr, p.stderr[-3000:]  # rank 0's own error
    t0 = time.time()  # an exception on rank 1 mid-update: both stop within a minute, the last checkpoint intact
    c = str(tmp_path / "c")
    p = run("grpo.py", base(synth, hf, c) + ["--val_data="], nproc=2, faults=["raise_step=3@1"], ok=False)
    assert p.returncode != 0 and "injected failure on rank 1" in p.stderr and time.time() - t0 < 90
    assert sorted(os.listdir(c)).count("ckpt_0000002") == 1 and "ckpt_0000004" not in os.listdir(c)


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


def test_rl_images_load_lazily(sft_model, tmp_path):
    # 10,000 RL items with images: the images are decoded per rollout, for the rank's own prompts only, so peak RSS
    # is the same as with 100 items (eager decoding of every item's tiles up front: +~500 MB here)
    from PIL import Image
    synth, hf = sft_model
    with open(f"{synth}/rl.jsonl") as f:
        recs = [json.loads(line) for line in f]
    d = tmp_path / "big"
    (d / "img").mkdir(parents=True)
    for i in range(10):
        Image.open(os.path.join(synth, recs[i].get("image") or recs[i]["images"][0])).save(d / "img" / f"{i}.png")
    for n in (100, 10_000):
        with open(d / f"rl{n}.jsonl", "w") as f:
            for i in range(n):
                r = dict(recs[i % len(recs)], id=f"x{i}")
                r.pop("images", None)
                f.write(json.dumps(dict(r, image=f"img/{i % 10}.png")) + "\n")
    code = ("import resource, runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path('grpo.py', run_name='__main__'); "
            "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    rss = {}
    for n in (100, 10_000):
        args = base(synth, hf, str(tmp_path / f"o{n}")) + [f"--data={d}/rl{n}.jsonl", "--val_data=", "--max_steps=2",
                                                            "--save_every=100", "--export=False", "--dump_every=0"]
        p = subprocess.run([sys.executable, "-c", code, "grpo.py"] + args, cwd=ROOT, capture_output=True, text=True,
                           timeout=400, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert p.returncode == 0, p.stderr[-3000:]
        rss[n] = int(p.stdout.split("MAXRSS")[-1]) / 1024  # MiB (ru_maxrss is in KiB on Linux)
    assert rss[10_000] - rss[100] < 60, rss  # 10,000 item records are ~15 MB; their decoded tiles would be ~500


# -----------------------------------------------------------------------------
# issue 20: token-budget micro-batches, the start-up memory plan, CUDA out-of-memory retries, the entropy's graph


def test_token_batches_and_the_default_micro_batches_are_unchanged(sft_model):
    from data.common import load_jsonl, prompt_length, token_batches
    assert token_batches([3, 3, 4, 5, 9, 20], max_tokens=12) == [[0, 1, 2], [3], [4], [5]]  # 3 x 4 <= 12 < 4 x 5
    assert token_batches([3, 3, 4, 5, 9, 20], max_tokens=11) == [[0, 1], [2, 3], [4], [5]]
    assert token_batches([1, 2, 3, 4, 5], max_tokens=100, max_rows=2) == [[0, 1], [2, 3], [4]]
    assert token_batches([50, 60], max_tokens=10) == [[0], [1]]  # a row longer than the budget goes alone
    assert token_batches([1] * 5, max_rows=2) == [[0, 1], [2, 3], [4]] and token_batches([], 10, 2) == []
    # the embedded default (32 rows a micro-batch, 160 new tokens): the longest sequence of its data x 32 is far below
    # micro_batch_tokens, so the token budget never binds and the micro-batches are exactly micro_batch rows each
    sys.path.insert(0, ROOT)
    from transformers import AutoTokenizer
    from plumbing.hf import load_config
    synth, hf = sft_model
    tok, cfg = AutoTokenizer.from_pretrained(hf), load_config(hf)[0]
    import plan
    d = plan.script_config("grpo.py", [])
    longest = max(prompt_length(tok, s, cfg) for s in load_jsonl(f"{synth}/rl.jsonl")) + d["max_new_tokens"][0][1]
    assert d["micro_batch"] * longest < d["micro_batch_tokens"] / 2, longest
    g = torch.Generator().manual_seed(0)
    rows = sorted(torch.randint(longest // 2, longest + 1, (d["prompts_per_step"] * d["group_size"],), generator=g))
    assert token_batches(rows, d["micro_batch_tokens"], d["micro_batch"]) == \
        [list(range(k, k + 32)) for k in range(0, len(rows), 32)]


def test_a_run_that_does_not_fit_stops_before_loading(sft_model, tmp_path):
    # a (faked) 0.5 GB GPU: grpo.py, sft.py and connector_tune.py stop at start-up with the plan's one line, before
    # build_model; --force=True runs anyway
    synth, hf = sft_model
    args = base(synth, hf, str(tmp_path / "a")) + ["--max_steps=1", "--val_data=", "--dump_every=0"]
    for script, extra in (("grpo.py", []), ("sft.py", [f"--data={synth}/sft.jsonl", f"--tokenizer={synth}/tokenizer",
                                                       "--val_data=", f"--out_dir={tmp_path}/s"]),
                          ("connector_tune.py", [f"--init_from={hf}", f"--data={synth}/sft.jsonl",
                                                 f"--val_data={synth}/val.jsonl", f"--out_dir={tmp_path}/c"])):
        p = run(script, args if script == "grpo.py" else extra, ok=False, faults=["gpu_gb=0.5", f"script={script}"])
        stage = "connector_tune" if script == "connector_tune.py" else script[:-3]
        err = [line for line in p.stderr.splitlines() if line.strip()]
        assert p.returncode != 0 and err[-1].startswith(f"{stage}.py on 1 x 0.5 GB GPU: does not fit:"), p.stderr
        assert "biggest term" in err[-1] and "--force=True" in err[-1] and "grpo_patch: build_model" not in p.stdout
    p = run("grpo.py", args + ["--force=True"], faults=["gpu_gb=0.5"])
    assert "running anyway" in p.stdout and "grpo_patch: build_model" in p.stdout and log(str(tmp_path / "a"))[1]
    # on the CPU the verdict is printed, never enforced
    assert "grpo.py memory plan on the CPU" in run("grpo.py", [f"--out_dir={tmp_path}/b"] + args[1:]).stdout


def test_cuda_out_of_memory_is_agreed_and_retried(sft_model, tmp_path):
    # rank 1 alone runs out of CUDA memory in the step-0 validation and in the rollout: both ranks retry with half
    # the budget, and the run goes on (before: torch.OutOfMemoryError stopped it)
    synth, hf = sft_model
    a = str(tmp_path / "a")
    p = run("grpo.py", base(synth, hf, a) + ["--max_steps=1", "--dump_every=0"], nproc=2, faults=["cuda_oom=2@1"])
    assert p.stdout.count("every rank retries with half the budget") == 2, p.stdout[-3000:]
    assert "rank 1: validation: CUDA out of memory" in p.stdout and "rank 1: rollout: CUDA out of memory" in p.stdout
    budgets = [int(b) for b in re.findall(r"grpo_patch: generate budget (\d+)", p.stdout)]
    assert budgets[1] == budgets[0] // 2 and budgets[3] == budgets[2] // 2, budgets
    m = log(a)
    assert "val_accuracy" in m[0] and m[1]["resp_len"] > 0


def test_entropy_graph_only_when_used_and_eval_at_start(sft_model, tmp_path):
    # the update computes the entropy (and its graph) only for the entropy bonus; eval_at_start=False skips step 0
    synth, hf = sft_model
    rec = tmp_path / "ent.txt"
    a = str(tmp_path / "a")
    run("grpo.py", base(synth, hf, a) + ["--max_steps=1", "--eval_every=1", "--eval_at_start=False",
                                         "--dump_every=0"], faults=[f"record_entropy={rec}"])
    assert 0 not in log(a) and "val_accuracy" in log(a)[1]
    assert set(rec.read_text().split("\n")[:-1]) == {"False True"}  # with grad, never with the entropy
    rec.unlink()
    run("grpo.py", base(synth, hf, str(tmp_path / "b")) + ["--max_steps=1", "--val_data=", "--dump_every=0",
                                                           "--entropy_coef=0.1"], faults=[f"record_entropy={rec}"])
    assert set(rec.read_text().split("\n")[:-1]) == {"True True"}


def test_check_disk_says_what_a_checkpoint_holds(tmp_path):
    sys.path.insert(0, ROOT)
    from plumbing import check_disk
    with pytest.raises(RuntimeError, match=r"one checkpoint needs .* AdamW state .* point out_dir"):
        check_disk(str(tmp_path), 10**18, 1)
