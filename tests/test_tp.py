"""
tp.py, tensor-parallel rollouts, on CPU with gloo (2 processes, tp=2): sampler.generate on the TP model equals one
process (greedy tokens, fp32 log-probs and entropies within 1e-5, seeded samples; kv heads 2 and 4, with and without
images, ragged prompts, EOS compaction, the static path, the Triton kernels); the TP shards made from FSDP2 shards are
exactly the slices of the full weights (fp32, bf16 mixed precision, CPU offload); the CLI under torchrun prints the
one-process text on rank 0 only; one GRPO step at fsdp=2, tp=2 gives the tp=1 weights; plan.py's rollout memory at
tp=2 matches the measured bytes. One worker launch (tests/tp_worker.py) serves the generate, reshard and memory tests.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import hf_fixtures as hx
import decode_kernels
import tp_worker
from tiny_sft import tiny_sft
from model import VLMConfig
from plumbing.hf import load_pretrained
from sampler import generate
from plumbing.tp import check_tp, split_dim, tp_config, tp_slice

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()  # (see tests/test_sampler.py: 2 threads on the shared 2 cores are slower)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def torchrun(args, nproc=2, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] + args
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def make_hf(d, kv, tie, seed):
    """A random transformers InternVL (tests/hf_fixtures.py's tiny config with num_key_value_heads=kv), saved with
    save_pretrained, plus the tokenizer."""
    from transformers import InternVLForConditionalGeneration
    config = hx.tiny_internvl_config(tie=tie)
    config.text_config.num_key_value_heads = kv
    torch.manual_seed(seed)
    hf = InternVLForConditionalGeneration(config).float().eval()
    hx.randomize_(hf, seed)
    hf.save_pretrained(d)
    hx.write_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    t = tmp_path_factory.mktemp("tp")
    return [make_hf(str(t / "kv2"), 2, False, 0), make_hf(str(t / "kv4"), 4, True, 1)]  # 4 heads; tied in the 2nd


@pytest.fixture(scope="module")
def worker(hf_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("tp_out")
    spec = out / "spec.json"
    spec.write_text(json.dumps({"out": str(out), "hf": hf_dirs, "parts": ["generate", "reshard", "memory"]}))
    torchrun([os.path.join(ROOT, "tests", "tp_worker.py"), str(spec)])
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]

# -----------------------------------------------------------------------------
# no process group needed


def test_tp_config_slices_and_errors():
    cfg = VLMConfig(n_embd=64, n_head=4, n_kv_head=2, mlp_hidden=96, head_dim=24)
    c = tp_config(cfg, 2)
    assert (c.n_head, c.n_kv_head, c.mlp_hidden, c.head_dim, c.n_embd, c.vocab_size) == (2, 1, 48, 24, 64, cfg.vocab_size)
    w = torch.arange(4 * 24 * 64).view(96, 64)  # q_proj: heads along the output rows
    assert torch.equal(tp_slice("llm.blocks.0.attn.q_proj.weight", w, 2, 1), w[48:])
    assert torch.equal(tp_slice("llm.blocks.3.attn.o_proj.weight", w.t(), 2, 0), w.t()[:, :48])  # input columns
    assert torch.equal(tp_slice("llm.blocks.0.mlp.down_proj.weight", w.t(), 2, 1), w.t()[:, 48:])
    for name in ("llm.wte.weight", "llm.lm_head.weight", "llm.norm.weight", "llm.blocks.0.attn_norm.weight",
                 "vit.blocks.0.attn.qkv.weight", "connector.fc1.weight", "vit.blocks.0.mlp.fc1.weight"):
        assert split_dim(name) is None, name  # replicated
    check_tp(cfg, 2, 4)
    for K, world, what in ((3, 6, "n_head=4"), (4, 4, "n_kv_head=2"), (2, 3, "3 processes")):
        with pytest.raises(ValueError, match=what):
            check_tp(cfg, K, world)
    with pytest.raises(ValueError, match="mlp_hidden=99"):
        check_tp(VLMConfig(n_embd=64, n_head=4, n_kv_head=2, mlp_hidden=99), 2, 2)


@pytest.mark.parametrize("n_kv", [1, 2])
def test_kernels_at_tp_shapes(n_kv):
    # one rank's shapes of the test models at tp=2: 2 query heads over 1 kv head (GQA G=2) or 2 (G=1), head_dim 16;
    # the Triton kernels (interpreter) == the references the CPU path runs
    torch.manual_seed(n_kv)
    G, n, P, Lp, Lg, D = 2 // n_kv, 3, 2, 11, 6, 16
    q = torch.randn(P * n, n_kv * G, D)
    pk, pv = torch.randn(P, n_kv, Lp, D), torch.randn(P, n_kv, Lp, D)
    gk, gv = torch.randn(P * n, n_kv, Lg, D), torch.randn(P * n, n_kv, Lg, D)
    plen, glen, slot = torch.tensor([Lp, 4]), torch.tensor([1, 6, 3, 2, 5, 4]), torch.arange(P * n)
    y = [decode_kernels.prefix_attention(q, pk, pv, plen, gk, gv, glen, n, slot, use_triton=u) for u in (False, True)]
    torch.testing.assert_close(y[1], y[0], atol=1e-5, rtol=1e-5)
    k, v = torch.randn(P * n, n_kv, 1, D), torch.randn(P * n, n_kv, 1, D)
    caches = []
    for use in (False, True):
        kc, vc = gk.clone(), gv.clone()
        decode_kernels.cache_append(kc, vc, k, v, glen - 1, use_triton=use)  # each row's next position
        caches.append((kc, vc))
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])
    assert not torch.equal(caches[1][0], gk)  # (the append did write)


def test_tp_group_warms_its_communicator_when_made(monkeypatch):
    # NCCL allocates its buffers outside PyTorch's allocator at a group's first collectives: tp_group all-reduces on
    # the new group at once, so the rollout's memory budget (measured later) sees them. Here: a one-process gloo group,
    # every all-reduce counted (the warm-up's group, and that it happened inside tp_group, before any rollout)
    import torch.distributed as dist
    from plumbing import tp as tpm
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    seen, real = [], dist.all_reduce

    def counting(t, *a, group=None, **k):
        seen.append((group, t.numel()))
        return real(t, *a, group=group, **k)

    monkeypatch.setattr(dist, "all_reduce", counting)
    monkeypatch.setattr(tpm, "_GROUPS", {})
    try:
        g = tpm.tp_group(1)
        assert seen and all(grp is g for grp, _ in seen), seen  # warmed on the TP group itself
        n = len(seen)
        assert tpm.tp_group(1) is g and len(seen) == n  # cached: warmed once
    finally:
        dist.destroy_process_group()

# -----------------------------------------------------------------------------
# 2 processes, tp=2 (one worker launch)


def test_generate_tp2_equals_one_process(worker, hf_dirs):
    # per checkpoint (kv heads 2 and 4) and case: both ranks' rollouts == one process's on the full model
    for d in hf_dirs:
        m = load_pretrained(d)
        ps = tp_worker.prompts()
        for name, (idx, kw, triton) in tp_worker.CASES.items():
            decode_kernels.USE_TRITON = True if triton else False
            try:
                ref = generate(m, [ps[i] for i in idx], **kw)
            finally:
                decode_kernels.USE_TRITON = None
            for r in range(2):
                tok, logp, ent, length, trunc = worker[r][d][name]
                assert torch.equal(tok, ref.tokens) and torch.equal(length, ref.lengths), (d, name, r)
                assert torch.equal(trunc, ref.truncated), (d, name, r)
                torch.testing.assert_close(logp, ref.logprobs, atol=1e-5, rtol=0, msg=f"{d} {name} rank {r}")
                torch.testing.assert_close(ent, ref.entropies, atol=1e-5, rtol=0, msg=f"{d} {name} rank {r}")
            if name == "eos":  # rows ended at different steps: the decode batch was compacted
                assert 0 < int(ref.truncated.sum()) < len(ref.truncated) and len(set(ref.lengths.tolist())) > 2
    # the sampled case is not the greedy one (the samples follow the seeds, not the argmax)
    out = worker[0][hf_dirs[0]]
    assert not torch.equal(out["sample"][0][::3][:, :8], out["greedy"][0][::2])


def test_tp_shards_from_fsdp2_equal_slices(worker, hf_dirs):
    # the TP model made from FSDP2 shards, streamed unit by unit: every tensor is exactly rank r's slice of the full
    # weight (heads by output rows for q/k/v and gate/up, input columns for o/down; everything else whole), also
    # from bf16 mixed-precision gathers and from CPU-offloaded shards; its weights are freed after the block, and
    # the FSDP2 model is sharded and trains afterwards
    full = load_pretrained(hf_dirs[0]).state_dict()
    cols = ("o_proj.weight", "down_proj.weight")
    rows = ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias",
            "gate_proj.weight", "up_proj.weight")
    ref = load_pretrained(hf_dirs[0])
    greedy = generate(ref, [tp_worker.prompts()[i] for i in tp_worker.CASES["greedy"][0]],
                      **tp_worker.CASES["greedy"][1])
    for mode, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("offload", torch.float32)):
        for r in range(2):
            res = worker[r]["reshard", mode]
            assert sorted(res["sd"]) == sorted(full), mode
            for name, t in res["sd"].items():
                want = full[name]
                if name.startswith("llm.blocks.") and name.endswith(rows):
                    n = want.shape[0] // 2
                    want = want[r * n:(r + 1) * n]
                elif name.startswith("llm.blocks.") and name.endswith(cols):
                    n = want.shape[1] // 2
                    want = want[:, r * n:(r + 1) * n]
                assert t.dtype == dtype and torch.equal(t, want.to(dtype)), (mode, r, name)
            assert res["freed"] and res["sharded"] and res["grads"], (mode, r)
            if res["greedy"] is not None:  # generate on the resharded TP model == one process
                assert torch.equal(res["greedy"][0], greedy.tokens), (mode, r)


def test_plan_predicts_tp_rollout_memory(worker):
    # plan.py's rollout phase at tp=2 for the default tiny model (grpo.py, 2 GPUs, 4 prompts x 4 samples): its TP
    # weights and KV cache within 15% of the tensor bytes the worker measured (fp32, and bf16 as on a GPU)
    import plan
    M = tp_worker.MEM
    config = dict(prompts_per_step=M["prompts_per_step"], group_size=M["group_size"],
                  max_new_tokens=[[0, M["max_new"]]], micro_batch=8, temperature=1.0, top_p=1.0, val_data="")
    for dtype, e in ((torch.float32, 4), (torch.bfloat16, 2)):
        got = worker[0]["memory"][str(dtype)]
        assert worker[1]["memory"][str(dtype)] == got and got["chunks"] == 1
        d = plan.plan_run("grpo", config, VLMConfig(), gpus=2, tp=2, device="cpu", compute_bytes=e,
                          prompt_tokens=M["prompt"])
        ro = d["phases"]["rollout"]
        pred_w, pred_kv = ro["TP shard + replicated (tp=2)"], ro["KV cache"]
        assert pred_w == pytest.approx(got["weights"], rel=0.15), (dtype, pred_w, got)
        assert pred_kv == pytest.approx(got["kv"], rel=0.15), (dtype, pred_kv, got)
        assert pred_w + pred_kv == pytest.approx(got["weights"] + got["kv"], rel=0.15)

# -----------------------------------------------------------------------------
# the CLI, and one GRPO step


def test_cli_tp2_prints_the_one_process_text_on_rank0(hf_dirs, tmp_path, capsys):
    from PIL import Image
    import sample
    img = tmp_path / "x.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(img)
    # two seeded samples at temperature 1
    args = [f"--init_from={hf_dirs[0]}", f"--image={img}", "--question=t5 t6 t7", "--max_new_tokens=6",
            "--group_size=2", "--temperature=1.0", "--seed=4"]
    _, texts = sample.main(args)
    capsys.readouterr()
    assert len(texts) == 2
    printed = torchrun([os.path.join(ROOT, "sample.py")] + args + ["--tp=2"]).stdout
    for r, text in enumerate(texts):
        assert printed.count(f"--- sample {r} ") == 1  # rank 0 alone prints
        assert f"\n{text}\n" in printed, (text, printed)
    assert printed.count("tokens in ") == 1 and "params per rank" in printed


@pytest.fixture(scope="module")
def sft_tp_model(tmp_path_factory):
    # test_grpo.py's fixture with 2 kv heads (tp=2 splits them): a tiny SFT'd model whose rewards vary within
    # groups, so the update has real gradients (Adam's first step is ~lr * sign(g): float noise must not decide it)
    return tiny_sft(str(tmp_path_factory.mktemp("tp_grpo")), n_kv_head=2)


def test_grpo_step_tp2_equals_tp1(sft_tp_model, tmp_path):
    # the same 8 prompts x 4 samples and 8 validation items: 1 process (tp=1), or fsdp=2 with tp=2 on the same 2
    # ranks (each rank's 4 prompts generated by the TP group as a union of 8, its own rows taken back) -> the same
    # rollouts, validation, loss and weights after one optimizer step
    from safetensors.torch import load_file
    synth, hf = sft_tp_model
    args = [f"--init_from={hf}", f"--data={synth}/rl.jsonl", f"--val_data={synth}/val.jsonl", "--val_n=8",
            "--prompts_per_step=8", "--group_size=4", "--max_new_tokens=[[0, 24]]", "--max_steps=1", "--micro_batch=4",
            "--lr=1e-3", "--dump_every=0", "--save_every=1", "--eval_every=1"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    log_one = tmp_path / "one.log"
    with open(log_one, "w") as f:  # the 1-process run alongside the 2 ranks
        p = subprocess.Popen([sys.executable, "grpo.py", f"--out_dir={one}"] + args, cwd=ROOT, env=ENV, stdout=f,
                             stderr=subprocess.STDOUT)
        try:
            torchrun(["grpo.py", f"--out_dir={two}", "--tp=2"] + args)
        finally:
            p.wait(timeout=300)
    assert p.returncode == 0, log_one.read_text()[-3000:]
    logs = []
    for out in (one, two):
        by_step = {}
        with open(os.path.join(out, "log.jsonl")) as f:
            for line in f:
                rec = json.loads(line)
                by_step.setdefault(rec["step"], {}).update(rec)
        logs.append(by_step)
    assert logs[0][0]["val_accuracy"] == logs[1][0]["val_accuracy"] and logs[0][1]["val_accuracy"] == \
        logs[1][1]["val_accuracy"]
    for key in ("reward", "accuracy", "resp_len", "truncated", "loss", "gnorm", "entropy"):
        assert logs[1][1][key] == pytest.approx(logs[0][1][key], rel=1e-4, abs=1e-7), key
    assert logs[0][1]["gnorm"] > 0 and 0 < logs[0][1]["reward"] < 1
    w0, w1, w2 = (load_file(os.path.join(d, "model.safetensors")) for d in (hf, f"{one}/hf", f"{two}/hf"))
    moved = 0
    for k in w1:
        if "k_proj.bias" in k:  # its exact gradient is 0 (softmax ignores a constant shift): Adam moves it by noise
            continue
        torch.testing.assert_close(w2[k], w1[k], atol=1e-6, rtol=1e-5, msg=k)
        moved += int(not torch.equal(w1[k], w0[k]))
    assert moved > len(w1) // 2
