"""tools/gpu_check.py on the CPU. End to end at tiny shapes (--smoke=True, the Triton interpreter): the script a lent
GPU will run works against today's APIs (kernels, sampler, transformers, grpo.py, plan.py), and so does its rehearsal
of the real configs. In process: the machinery (each section in its own try and time limit, the report written after
every row, the exit code), transformers' batch sized to the card, the sections and shapes of --quick and of the full
run, the arguments, the rehearsal's command. Nothing here measures speed."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import gpu_check as gc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(args, out, timeout=900):
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1", OUT=str(out))
    p = subprocess.run([sys.executable, "tools/gpu_check.py", "--smoke=True"] + args, cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    with open(out / "gpu_check.json") as f:
        r = json.load(f)
    with open(out / "gpu_check.jsonl") as f:
        lines = [json.loads(line) for line in f]
    return p, r, lines


def test_gpu_check_smoke(tmp_path):
    p, r, lines = run_script([], tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert not r["errors"], r["errors"]
    assert [(k, v["status"]) for k, v in r["sections"].items()] == [
        ("env", "ok"), ("kernels", "ok"), ("grpo", "ok"), ("decode", "ok")]
    # kernels: n = 32 samples a prompt runs prefix attention's kv_div > 1 variant
    assert r["kernels"] and all(k["ok"] for k in r["kernels"])
    assert {k["n"] for k in r["kernels"]} == {8, 32} and max(k["kv_div"] for k in r["kernels"]) > 1
    # decode: the graphs give the same tokens; the EOS rollout ended rows at different steps, compacted the batch
    # (the static path's buckets shrank), and its graphs match the same static path run eagerly
    d = r["decode"]
    assert d and all(x["ok"] for x in d) and any(x.get("graph_same_tokens") for x in d)
    eos = next(x for x in d if "eos_compactions" in x)
    assert eos["eos_graph_same_as_eager"] and 0 < eos["eos_rows_ended"] < eos["eos_rows"]
    assert eos["eos_compactions"] and eos["eos_compactions"] == sorted(eos["eos_compactions"], reverse=True)
    assert eos["eos_static_rows_same_as_dynamic"] == 1.0  # fp32 on the CPU: bit for bit
    assert any(x["n"] == 32 for x in d) and all(x.get("hf_batch") == x["batch"] for x in d if "hf_batch" in x)
    # grpo: one step, on-policy, no checkpoint and no export written (save_every=0, export=False), the plan beside it
    (g,) = r["grpo"]
    assert g["ok"] and g["written"] == [] and g["clip_frac"] == 0 and g["approx_kl"] == 0
    assert g["logp_mismatch_max"] < 1e-4 and g["plan_step_gb"] > 0 and g["plan_prompt_tokens"] > 0
    # the .jsonl: the header, one line per row, one per section status, in the order they happened
    rows = sum(len(r[s]) for s in ("env", "kernels", "grpo", "decode"))
    assert len(lines) == 1 + rows + 4 and "header" in lines[0]
    assert [x["section"] for x in lines[1:] if "status" in x] == ["env", "kernels", "grpo", "decode"]


def test_rehearsal_smoke(tmp_path):
    # two runs as configured, on a machine without their weights (the random model and synthetic data instead):
    # the 38B GRPO config over the R1V3 one (32 prompts x 32 samples; tp lowered to 1, and offload off: one CPU
    # process has no FSDP2), and the InternVL3-1B SFT config; one step each, nothing written
    p, r, _ = run_script(["--rehearsal=True",
                          "--configs=config/grpo_r1v3.py,config/grpo_r1v3_38b.py;config/sft_internvl3_1b.py"], tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert [(k, v["status"]) for k, v in r["sections"].items()] == [("env", "ok"), ("rehearsal", "ok")]
    grpo, sft = r["rehearsal"]
    for row in (grpo, sft):
        assert row["ok"] and row["written"] == [] and row["returncode"] == 0 and "random InternVL3-1B" in row["fallback"]
        for flag in ("--max_steps=1", "--save_every=0", "--export=False", "--val_data="):
            assert flag in row["command"], flag
    assert "(tp=1)" in grpo["fallback"] and "t_update" in grpo and grpo["plan_step_gb"] > 0
    assert "config/grpo_r1v3.py config/grpo_r1v3_38b.py" in grpo["command"] and "--max_new_tokens=8" in grpo["command"]
    assert sft["script"] == "sft.py" and "loss" in sft

# -----------------------------------------------------------------------------
# in process


def test_sections_each_in_its_own_try_rows_written_at_once_and_the_exit_code(tmp_path):
    rep = gc.Report(str(tmp_path), {"mode": "test"})

    def on_disk():
        with open(tmp_path / "gpu_check.json") as f:
            return json.load(f)

    def good():
        rep.add("good", dict(i=0, ok=True))
        assert on_disk()["good"] == [dict(i=0, ok=True)]  # written before the section goes on
        with open(tmp_path / "gpu_check.jsonl") as f:
            assert json.loads(f.readlines()[-1]) == dict(section="good", i=0, ok=True)
        rep.add("good", dict(i=1, ok=True))

    def broken():
        rep.add("broken", dict(i=0, ok=True))
        raise RuntimeError("boom")

    def slow():
        rep.add("slow", dict(i=0, ok=True))
        try:
            while True:
                time.sleep(0.05)
        except Exception:  # a section's own handler does not swallow the timeout
            pytest.fail("SectionTimeout was caught as an Exception")

    def wrong():
        rep.add("wrong", dict(i=0, ok=False))

    called = []
    rc = gc.run_sections(rep, [("good", good, None), ("broken", broken, 60), ("slow", slow, 1.0),
                               ("wrong", wrong, None)], time.time() + 60, min_start=1)
    assert rc == 1
    r = on_disk()
    assert {k: v["status"] for k, v in r["sections"].items()} == dict(good="ok", broken="failed", slow="timeout",
                                                                      wrong="failed")
    assert len(r["good"]) == 2 and r["broken"] == [dict(i=0, ok=True)] and r["slow"] == [dict(i=0, ok=True)]
    assert "RuntimeError: boom" in r["sections"]["broken"]["error"] and r["sections"]["slow"]["seconds"] < 10
    # every section ok -> 0; past the budget a section is skipped (listed, not run, not a failure)
    rep2 = gc.Report(str(tmp_path / "two"), {})
    first = lambda: (rep2.add("a", dict(ok=True)), time.sleep(1.5))  # noqa: E731  (leaves < min_start)
    assert gc.run_sections(rep2, [("a", first, None), ("late", lambda: called.append(1), None)], time.time() + 2,
                           min_start=1) == 0
    assert not called and rep2.data["sections"]["late"]["status"] == "skipped"


def test_hf_batch_is_sized_to_the_card():
    # transformers' generate() on the 7B shape: 64 x 4096 (its prefill over 262k tokens, the KV cache, the mask) does
    # not fit what an 80 GB card has left beside both models; it runs at a smaller batch there, whole on 141 GB
    from model import VLM
    cfg = gc.llm_shape("internvl3_8b")
    with torch.device("meta"):
        w = sum(p.numel() for p in VLM(cfg).llm.parameters()) * 2  # bf16: ours, and transformers' twin as much
    free_h100, free_h200 = 79.6 * gc.GB - 2 * w - gc.GB, 140.4 * gc.GB - 2 * w - gc.GB
    assert gc.hf_bytes(64, 4096, 128, cfg) > 0.75 * free_h100
    assert 1 <= gc.hf_batch(64, 4096, 128, cfg, free_h100) < 64
    assert gc.hf_batch(64, 4096, 128, cfg, free_h200) == 64 and gc.hf_batch(64, 1024, 128, cfg, free_h100) == 64
    b = gc.hf_batch(64, 4096, 128, cfg, free_h100)
    assert gc.hf_bytes(b, 4096, 128, cfg) <= 0.75 * free_h100 < gc.hf_bytes(2 * b, 4096, 128, cfg)
    assert gc.hf_batch(64, 4096, 128, cfg, 0) == 0 and gc.hf_batch(1, 32, 4, gc.llm_shape("tiny"), gc.GB) == 1
    # the terms: the KV cache alone is rows x (prompt + new) x 2 x layers x kv heads x head dim x 2 bytes
    kv = 64 * (4096 + 128) * 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * 2
    assert kv < gc.hf_bytes(64, 4096, 128, cfg) < 5 * kv


def test_quick_and_full_sections_and_shapes():
    quick = gc.parse_args(["--quick=True"])
    assert [s[0] for s in gc.sections(quick)] == ["env", "kernels", "grpo", "decode"]
    (one,) = gc.decode_configs(quick)  # one decode shape, with every check on it
    assert one[0] == "internvl3_8b" and set(one[4]) == {"hf", "graph", "eos"}
    full = gc.parse_args([])
    assert [s[0] for s in gc.sections(full)] == ["env", "kernels", "grpo", "decode"]
    dc = gc.decode_configs(full)
    assert {c[0] for c in dc} == {"internvl3_8b", "internvl3_1b", "internvl3_2b"} and all(c[1] % c[3] == 0 for c in dc)
    assert any(c[3] == 32 for c in dc) and sum("eos" in c[4] for c in dc) == 3
    assert [s[0] for s in gc.sections(gc.parse_args(["--rehearsal=True", "--configs=config/grpo_r1v3.py"]))] == [
        "env", "rehearsal"]
    # the limits of the sections fit one device-tool command of 600 s
    assert full["budget_s"] <= 540 and all(lim is None or lim <= full["budget_s"] for _, _, lim in gc.sections(full))
    assert gc.QUICK_BUDGET_S <= 300  # --quick: under 5 minutes


def test_kv_div_is_what_prefix_attention_picks(monkeypatch):
    # n = 32 samples of a 7-query-head GQA group in bf16: 224 query rows, more than one 64-row tile, so 4 programs
    # read each prompt's K/V; the kernel's own choice, caught at its call
    import decode_kernels
    assert gc.kv_div(7, 32, 2) == 4 and gc.kv_div(7, 8, 2) == 1 and gc.kv_div(5, 32, 2) == 4
    seen = []

    class Stop(Exception):
        pass

    def spy(*a, kv_div=1, **k):
        seen.append(kv_div)
        raise Stop

    monkeypatch.setattr(decode_kernels, "_attn_splits", spy)
    for G, n in ((7, 32), (7, 8), (5, 32), (1, 32)):
        K, P, D, Lp, Lg = 2, 1, 16, 8, 4
        q = torch.randn(P * n, K * G, D).bfloat16()
        pk = torch.randn(P, K, Lp, D).bfloat16()
        gk = torch.randn(P * n, K, Lg, D).bfloat16()
        with pytest.raises(Stop):
            decode_kernels.prefix_attention(q, pk, pk, torch.tensor([Lp]), gk, gk, torch.full((P * n,), Lg), n,
                                            torch.arange(P * n), use_triton=True)
        assert seen[-1] == gc.kv_div(G, n, 2), (G, n)


def test_arguments():
    d = gc.parse_args([])
    assert (d["quick"], d["rehearsal"], d["smoke"]) == (False, False, False)
    assert gc.parse_args(["--quick=True", "--budget_s=300"])["budget_s"] == 300
    with pytest.raises(ValueError, match="pick one"):
        gc.parse_args(["--quick=True", "--rehearsal=True", "--configs=config/grpo_r1v3.py"])
    with pytest.raises(ValueError, match="needs --configs"):
        gc.parse_args(["--rehearsal=True"])
    with pytest.raises(ValueError, match="unknown config key 'quik'"):
        gc.parse_args(["--quik=True"])
    with pytest.raises(ValueError, match="script="):
        gc.parse_args(["--rehearsal=True", "--configs=x.py", "--script=eval.py"])
    with pytest.raises(ValueError):
        gc.parse_args(["--quick=yes"])  # a bool is True or False


def test_rehearsal_command():
    cfg = gc.parse_args(["--rehearsal=True",
                         "--configs=config/grpo_r1v3.py, config/grpo_r1v3_38b.py ; config/sft_r1v3_38b.py"])
    runs = gc.rehearsal_runs(cfg)
    assert runs == [["config/grpo_r1v3.py", "config/grpo_r1v3_38b.py"], ["config/sft_r1v3_38b.py"]]
    assert [gc.script_of(r) for r in runs] == ["grpo.py", "sft.py"]
    assert gc.script_of(["config/connector_tune_r1v3_38b.py"]) == "connector_tune.py"
    assert gc.script_of(["my.py"], "sft.py") == "sft.py"
    with pytest.raises(ValueError, match="--script="):
        gc.script_of(["my.py"])
    cmd = gc.rehearsal_command(runs[0], "grpo.py", 8, "/tmp/x", 64, ["--init_from=/models/r1v3", "--max_steps=2"],
                               fallback=["--tp=1"])
    assert cmd[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=8"]
    assert cmd[5:8] == ["grpo.py", "config/grpo_r1v3.py", "config/grpo_r1v3_38b.py"]
    for flag in ("--max_steps=1", "--val_data=", "--save_every=0", "--export=False", "--out_dir=/tmp/x",
                 "--max_new_tokens=64", "--eval_every=0", "--dump_every=0"):
        assert flag in cmd, flag
    assert cmd[-3:] == ["--tp=1", "--init_from=/models/r1v3", "--max_steps=2"]  # the job's own flags win
    sft = gc.rehearsal_command(runs[1], "sft.py", 1, "/tmp/y", 64, [])
    assert sft[:2] == [sys.executable, "sft.py"] and "--save_every=0" in sft and "--early_stop_patience=0" in sft
    assert not any(a.startswith("--max_new_tokens") for a in sft)
    # every override is a key the script has (the configurator would refuse anything else)
    import plan
    for files, script_name, c in ((runs[0], "grpo.py", cmd), (runs[1], "sft.py", sft)):
        plan.script_config(script_name, c[c.index(script_name) + 1:])
