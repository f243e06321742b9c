"""plan.py against MEASURED bytes on the CPU (issue #11 item 7): every prediction must be within 15% of what real
tensors take, in one process and in 2 FSDP2 processes (gloo), for the tiny model. The measurements are in
tests/plan_worker.py (storages of params / grads / AdamW state after a real step, saved_tensors_hooks during a
real forward, sampler.unsharded's parameters, the KV cache generate() allocates, a dispatch mode's peak for the
decode and log-prob buffers). test_a_wrong_formula_fails shows the check catches a formula that is off. The last
tests pin the plan's verdicts for the R1V3 configurations (README table). Nothing is timed."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import plan
import sampler
from plumbing import apply_activation_checkpointing, set_trainable
from model import VLM, VLMConfig, token_logprobs
from plumbing.hf import load_config
from plan_worker import LiveBytes, batch, measure_train, saved_bytes, storage_bytes, tiny_cfg

TOL = 0.15
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "plan_worker.py")
TABLE = []  # (what, measured, predicted): printed at the end of a test (pytest -s shows it; a failure shows it)


def sampler_chunks(cfg, P, prompt, n, max_new, e, budget, tp=1, decode=None):
    """How many chunks of P equal prompts fit `budget` by sampler.fit_chunks' rule (a chunk's KV cache + its decode
    buffers <= budget; decode(cfg, rows) defaults to the sampler's own sampler.decode_bytes). Returns (chunks,
    prompts per chunk), or (None, 0) when one prompt does not fit. The plan itself sizes chunks with its measured
    buffers and the prefill (plan_run); this is the sampler's arithmetic, checked against generate()'s chunks."""
    if decode is None:
        decode = lambda cfg, rows: sampler.decode_bytes(cfg, rows, max_new)  # noqa: E731
    budget = budget - sampler.prefill_bytes(cfg, 16384, {2: torch.bfloat16, 4: torch.float32}[e])
    per = P
    while per > 0 and plan.kv_bytes(cfg, per, n, prompt, max_new, e, tp) + decode(cfg, per * n) > budget:
        per -= 1
    return (None, 0) if per == 0 else (-(-P // per), per)


def check(what, measured, predicted, tol=TOL):
    err = predicted / measured - 1 if measured else (0.0 if predicted == 0 else float("inf"))
    TABLE.append((what, measured, predicted, err))
    assert abs(err) <= tol, f"{what}: predicted {predicted:,} bytes, measured {measured:,} ({err:+.1%})"


def show():
    print("\n| what | measured (bytes) | predicted | error |\n|---|---|---|---|")
    for w, m, p, e in TABLE:
        print(f"| {w} | {m:,} | {p:,.0f} | {e:+.1%} |")
    TABLE.clear()


def tiny_model(cfg, train, ac):  # seeded, with the training switches and activation checkpointing as given
    torch.manual_seed(0)
    m = VLM(cfg)
    set_trainable(m, *train)
    if ac:
        apply_activation_checkpointing(m)
    return m


def sft_config(B, T, train, ac):
    return dict(max_len=T, batch_size=B, grad_accum=1, train_vit=train[0], train_connector=train[1],
                train_llm=train[2], activation_checkpointing=ac, val_data="")


# (name, model config overrides, (vit, connector, llm) trainable, activation checkpointing)
CASES = [("all trained", {}, (1, 1, 1), False),
         ("all trained, ckpt", {}, (1, 1, 1), True),
         ("connector only (connector_tune)", {}, (0, 1, 0), False),
         ("connector only, ckpt", {}, (0, 1, 0), True),
         ("LLM only, ckpt, tied", dict(tie_embeddings=True), (0, 0, 1), True),
         ("InternViT-6B-like (RMSNorm, QK-norm), Qwen3 QK-norm", dict(vit_norm="rms_norm", vit_qk_norm=True,
                                                                      vit_qkv_bias=False, llm_qk_norm=True),
          (1, 1, 1), False)]


@pytest.mark.parametrize("name,kw,train,ac", CASES, ids=[c[0] for c in CASES])
def test_one_process_states_and_activations(name, kw, train, ac):
    cfg, B, T = tiny_cfg(**kw), 3, 40
    tiles = plan.image_tiles(cfg)  # one image per sample: max_tiles + thumbnail
    m = tiny_model(cfg, train, ac)
    got = measure_train(m, cfg, B, T, tiles)
    d = plan.plan_run("sft", sft_config(B, T, train, ac), cfg, gpus=1, device="cpu")
    tr = d["phases"]["train"]
    check(f"{name}: fp32 params", got["params"], tr["fp32 master shard"])
    check(f"{name}: fp32 grads", got["grads"], tr["fp32 grad shard"])
    check(f"{name}: AdamW state", got["optim"], tr["AdamW state (2 x fp32)"])
    check(f"{name}: saved activations", got["act"], sum(d["activations"].values()))
    show()


def test_one_process_bf16_activations():
    # the GPU's compute dtype on the CPU: bf16 weights + autocast (CPU autocast keeps LayerNorm in bf16, CUDA's runs
    # it in fp32: plan's cuda=False). The fp32 copy of lm_head that token_logprobs saves is part of the prediction.
    for kw, train, ac in (({}, (1, 1, 1), False), ({}, (1, 1, 1), True), ({}, (0, 1, 0), True),
                          (dict(vit_norm="rms_norm", vit_qk_norm=True), (1, 1, 1), False)):
        cfg, B, T = tiny_cfg(**kw), 2, 48
        tiles = plan.image_tiles(cfg)
        m = tiny_model(cfg, train, ac)
        m = m.to(torch.bfloat16)
        ids, px, tgt = batch(cfg, B, T, tiles)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, _ = saved_bytes(m, lambda: m(ids, px.bfloat16(), targets=tgt))
        pred = plan.activation_bytes(cfg, B, T, B * tiles, 2, train, ac, cuda=False)
        check(f"bf16 {kw or ''} train={train} ckpt={ac}: saved activations", got, sum(pred.values()))
    show()


def test_one_process_kv_cache_and_chunks():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    m = VLM(cfg).eval()
    allocated = []
    init = sampler.DecodeCache.__init__

    def spy(self, *a, **k):  # the cache's real tensors, whatever the formula says
        init(self, *a, **k)
        allocated.append(storage_bytes([self.pk, self.pv, self.gk, self.gv]))

    P, n, plen, new = 5, 3, 11, 7
    prompts = [([7 + (i * 3 + j) % 40 for j in range(plen)], None) for i in range(P)]
    sampler.DecodeCache.__init__ = spy
    try:
        st = {}
        sampler.generate(m, prompts, n=n, max_new_tokens=new, seed=0, stats=st, sampling=sampler.Sampling())
        check("KV cache: DecodeCache tensors", allocated[0], plan.kv_bytes(cfg, P, n, plen, new, 4))
        check("KV cache: generate stats cache_bytes", st["cache_bytes"], plan.kv_bytes(cfg, P, n, plen, new, 4))
        # a budget that holds two prompts: the sampler's chunks are the plan's
        budget = plan.kv_bytes(cfg, 2, n, plen, new, 4) + sampler.decode_bytes(cfg, 2 * n, new) + \
            sampler.prefill_bytes(cfg, 16384, torch.float32)
        allocated.clear()
        st = {}
        sampler.generate(m, prompts, n=n, max_new_tokens=new, seed=0, stats=st, sampling=sampler.Sampling(),
                         budget=budget)
        chunks, per = sampler_chunks(cfg, P, plen, n, new, 4, budget)
        assert (st["chunks"], max(allocated)) == (chunks, plan.kv_bytes(cfg, per, n, plen, new, 4)), (st, chunks)
    finally:
        sampler.DecodeCache.__init__ = init
    show()


def test_one_process_decode_and_logprob_buffers():
    # sampler.sample_next over (rows, vocab): the plan's bytes per row-vocab entry minus the input logits (fp32)
    V, R = 4096, 64
    logits, u = torch.randn(R, V), torch.rand(R)
    for s in (sampler.Sampling(), sampler.Sampling(temperature=0.0), sampler.Sampling(temperature=0.7, top_p=0.9)):
        mode = s.mode
        live = LiveBytes()
        with live:
            sampler.sample_next(logits, u, s)
        check(f"sample_next peak ({mode})", live.peak, (sampler.DECODE_BYTES[mode] - 4) * R * V)
    # model.token_logprobs' chunks, forward + backward (the lm_head weight's gradient included)
    C, N = 64, 2048
    cfg = VLMConfig(vocab_size=V, n_embd=C)
    w, h, tgt = torch.randn(V, C, requires_grad=True), torch.randn(1, N, C, requires_grad=True), \
        torch.randint(0, V, (1, N))
    live = LiveBytes()
    with live:
        logp, ent = token_logprobs(h, w, tgt)
        (-(logp.sum()) + 0.01 * ent.sum()).backward()
    check("log-prob chunks: backward peak", live.peak, plan.backward_transient(cfg, 1, N, 0, 4, (0, 0, 1), False,
                                                                                False)["logp"])
    show()


def test_one_process_training_step_peak():
    # the peak of a micro-batch's forward + backward after the first (grads exist): saved activations + the
    # backward transient, where the log-prob chunks (big vocabulary) or a recomputed block (long sequences) lead
    for kw, B, T, train, ac in ((dict(vocab_size=4096), 2, 300, (1, 1, 1), False),
                                (dict(vocab_size=4096), 4, 300, (1, 1, 1), True),
                                (dict(vocab_size=64, mlp_hidden=1024, n_layer=4), 2, 800, (1, 1, 1), True),
                                (dict(vocab_size=64, mlp_hidden=1024, n_layer=4), 2, 800, (0, 1, 0), True)):
        cfg = tiny_cfg(**kw)
        tiles = plan.image_tiles(cfg)
        m = tiny_model(cfg, train, ac)
        ids, px, tgt = batch(cfg, B, T, tiles)
        logp, ent = m(ids, px, targets=tgt)  # the first micro-batch creates the gradients
        (-(logp.sum()) + 0.01 * ent.sum()).backward()
        del logp, ent
        live = LiveBytes()
        with live:
            logp, ent = m(ids, px, targets=tgt)
            (-(logp.sum()) + 0.01 * ent.sum()).backward()
        d = plan.plan_run("sft", sft_config(B, T, train, ac), cfg, gpus=1, device="cpu")
        tr = d["phases"]["train"]
        pred = sum(v for k, v in tr.items() if k.startswith(("activations", "backward transient")))
        check(f"train step peak V={cfg.vocab_size} B={B} T={T} train={train} ckpt={ac}", live.peak, pred)
    show()


def test_a_wrong_formula_fails(monkeypatch):
    # the same measurement against formulas that are off: the MLP saving one (mlp_hidden) tensor instead of four
    # (silu's input, silu's output, up's output, down's input), AdamW with one state, fp32 activations counted as
    # bf16. Each must fail the 15% check.
    cfg, B, T, train = tiny_cfg(), 3, 40, (1, 1, 1)
    torch.manual_seed(0)
    m = VLM(cfg)
    got = measure_train(m, cfg, B, T, plan.image_tiles(cfg))
    right = plan._act_per_token

    def wrong(cfg, e, train, cuda):
        out = right(cfg, e, train, cuda)
        out["llm_block"] -= 3 * cfg.mlp_hidden * e
        return out

    monkeypatch.setattr(plan, "_act_per_token", wrong)
    d = plan.plan_run("sft", sft_config(B, T, train, False), cfg, gpus=1, device="cpu")
    with pytest.raises(AssertionError, match="saved activations"):
        check("wrong formula (MLP saves 1 tensor): saved activations", got["act"], sum(d["activations"].values()))
    monkeypatch.setattr(plan, "_act_per_token", right)
    with pytest.raises(AssertionError, match="AdamW"):
        check("wrong formula (1 state): AdamW state", got["optim"], d["phases"]["train"]["AdamW state (2 x fp32)"] / 2)
    d = plan.plan_run("sft", sft_config(B, T, train, False), cfg, gpus=1, device="cpu", compute_bytes=2)
    with pytest.raises(AssertionError, match="saved activations"):
        check("wrong formula (bf16 bytes): saved activations", got["act"], sum(d["activations"].values()))
    show()


# a ViT big next to the rest (its blocks' weights lead the ViT's backward) and an LLM whose blocks lead (a small
# vocabulary: the log-prob chunks do not)
VIT_HEAVY = dict(vit_hidden=128, vit_layers=4, vit_mlp=512, vit_heads=4, vocab_size=64)
LLM_HEAVY = dict(vocab_size=64, mlp_hidden=1024, n_layer=4)
STATES = ("fp32 master shard", "fp32 grad shard", "AdamW state (2 x fp32)", "KL reference shard")


def _whole_vit(params):
    # plan._params with the ViT as ONE FSDP unit (what plumbing.apply_fsdp did before each ViT block was its own)
    return lambda key: [(n, s, "vit" if u.startswith("vit.") else u, t, d) for n, s, u, t, d in params(key)]


def test_two_processes_fsdp2(tmp_path, monkeypatch):
    """2 gloo processes, FSDP2 (plumbing.apply_fsdp): per-rank shards (rank 0 holds the larger chunks), saved
    activations, sampler.unsharded's gathered weights and the rollout's KV cache; fp32 and bf16 mixed precision.
    step_peak: the peak of a micro-batch's forward + backward after the first beyond the states (the gathered units,
    their grads and reduce-scatter buffers, the activations, the backward transients), at each of the plan's
    moments: the log-prob chunks, an LLM block, a ViT block."""
    cases = [dict(name="fp32 all trained", train=[1, 1, 1], ac=False, B=2, T=40, tiles=3, rollout=[3, 2, 9, 5],
                  tp=2, step_peak=True, stage="log-prob backward"),
             dict(name="fp32 connector only, ckpt", train=[0, 1, 0], ac=True, B=2, T=40, tiles=3, step_peak=True,
                  stage="log-prob backward"),
             dict(name="bf16 mixed precision, ckpt", train=[1, 1, 1], ac=True, B=2, T=40, tiles=3, bf16=True,
                  rollout=[2, 3, 7, 4], step_peak=True, stage="log-prob backward"),
             dict(name="fp32 big ViT, ckpt", cfg=VIT_HEAVY, train=[1, 1, 1], ac=True, B=2, T=60, tiles=3,
                  step_peak=True, stage="ViT backward"),
             dict(name="bf16 big LLM blocks, ckpt", cfg=LLM_HEAVY, train=[1, 1, 1], ac=True, B=2, T=200, tiles=3,
                  bf16=True, step_peak=True, stage="LLM backward")]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PLAN_SPEC=json.dumps({"cases": cases}))
    out = tmp_path / "measured.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", WORKER, str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    log = r.stdout + r.stderr
    assert r.returncode == 0 and "PLAN WORKER OK rank 0" in log and "PLAN WORKER OK rank 1" in log, log[-6000:]
    ranks = json.loads(out.read_text())
    for case in cases:
        cfg = tiny_cfg(**case.get("cfg", {}))
        train, e = tuple(case["train"]), 2 if case.get("bf16") else 4
        c = dict(sft_config(case["B"], case["T"], train, case["ac"]))
        d = plan.plan_run("sft", c, cfg, gpus=2, device="cpu", compute_bytes=e)
        tr = d["phases"]["train"]
        got = [rk[case["name"]] for rk in ranks]
        name = case["name"]
        check(f"FSDP2 {name}: fp32 param shard (rank 0)", got[0]["params"], tr["fp32 master shard"])
        check(f"FSDP2 {name}: fp32 param shard (rank 1, padded)", got[1]["params"], tr["fp32 master shard"])
        check(f"FSDP2 {name}: fp32 grad shard (rank 0)", got[0]["grads"], tr["fp32 grad shard"])
        check(f"FSDP2 {name}: AdamW state (rank 0)", got[0]["optim"], tr["AdamW state (2 x fp32)"])
        for k in range(2):
            check(f"FSDP2 {name}: saved activations (rank {k})", got[k]["act"], sum(d["activations"].values()))
        if case.get("step_peak"):
            assert d["train_stage"] == case["stage"], (name, d["train_stage"])
            pred = sum(v for t, v in tr.items() if t not in STATES)
            for k in range(2):
                check(f"FSDP2 {name}: training-step peak beyond the states, at the {d['train_stage']} (rank {k})",
                      got[k]["step_peak"], pred)
            if case["stage"] == "ViT backward":
                # measured: a ViT block's backward holds its own unit gathered (the next one's prefetch is a buffer),
                # never the whole tower; a plan that gathers the ViT as one unit is off by far more than the bound
                vit_units = [u for u in got[0]["step_peak_units"] if u.startswith("vit.blocks.")]
                assert 1 <= len(vit_units) < cfg.vit_layers, got[0]["step_peak_units"]
                with monkeypatch.context() as mp:
                    mp.setattr(plan, "_params", _whole_vit(plan._params))
                    dw = plan.plan_run("sft", c, cfg, gpus=2, device="cpu", compute_bytes=e)
                    wrong = sum(v for t, v in dw["phases"]["train"].items() if t not in STATES)
                with pytest.raises(AssertionError, match="ViT as one unit"):
                    check(f"FSDP2 {name}: the ViT as one unit (wrong): training-step peak", got[0]["step_peak"],
                          wrong)
        if case.get("rollout"):
            P, n, plen, new = case["rollout"]
            g = dict(prompts_per_step=2 * P, group_size=n, max_new_tokens=[[0, new]], micro_batch=2, val_data="",
                     train_vit=True, train_connector=True, train_llm=True)
            dg = plan.plan_run("grpo", g, cfg, gpus=2, device="cpu", compute_bytes=e, prompt_tokens=plen)
            check(f"FSDP2 {name}: gathered weights (sampler.unsharded)", got[0]["gathered"],
                  dg["phases"]["rollout"]["gathered weights (full model)"])
            for k in range(2):
                check(f"FSDP2 {name}: KV cache (rank {k})", got[k]["cache_bytes"], dg["phases"]["rollout"]["KV cache"])
        if case.get("tp"):  # tp=2 (tp.py): each rank's 1/2 of the blocks + replicated parts, half the kv heads
            dt = plan.plan_run("grpo", g, cfg, gpus=2, device="cpu", compute_bytes=e, prompt_tokens=plen, tp=2)
            for k in range(2):
                check(f"FSDP2 {name}: tp=2 rollout weights (rank {k})", got[k]["tp_weights"],
                      dt["phases"]["rollout"]["TP shard + replicated (tp=2)"])
                check(f"FSDP2 {name}: tp=2 KV cache of the group's {2 * P} prompts (rank {k})",
                      got[k]["tp_cache_bytes"], dt["phases"]["rollout"]["KV cache"])
                # tp.tp_model_from's peak: the TP model + the last LLM block's all-gather (FSDP2's flat buffer + the
                # gathered parameters it is copied out to)
                check(f"FSDP2 {name}: tp=2 build peak (rank {k})", got[k]["tp_build_peak"],
                      dt["phases"]["rollout"]["TP shard + replicated (tp=2)"] + dt["tp_build_transient"])
    show()

# -----------------------------------------------------------------------------
# the real configurations (README table): parameter counts and verdicts


def r1v3_38b():
    # docs/models.md: InternViT-6B-448px-V2.5 (45 layers, RMSNorm, QK-norm) + Qwen2.5-32B, untied, vocab 151674
    return VLMConfig(image_size=448, patch_size=14, vit_hidden=3200, vit_layers=45, vit_heads=25, vit_mlp=12800,
                     vit_norm="rms_norm", vit_qk_norm=True, vit_qkv_bias=False, vocab_size=151674, n_embd=5120,
                     n_layer=64, n_head=40, n_kv_head=8, mlp_hidden=27648, image_token_id=151667)


def test_parameter_counts():
    cfg = r1v3_38b()
    pi = plan.param_info(cfg)
    with torch.device("meta"):
        assert pi["total"] == sum(p.numel() for p in VLM(cfg).parameters())
    assert round(pi["total"] / 1e9, 2) == 38.39 and abs(pi["llm"] / 1e9 - 32.76) < 0.01
    # plumbing.apply_fsdp's units: 45 ViT blocks, the rest of the ViT (patch embedding, cls, positions), 64 LLM blocks,
    # the root
    assert sum(pi["units"].values()) == pi["total"] and len(pi["units"]) == 45 + 1 + 64 + 1
    kinds = [plan.unit_kind(u) for u in pi["units"]]
    assert [kinds.count(k) for k in ("vit block", "vit", "llm block", "root")] == [45, 1, 64, 1]
    vit_block = pi["units"]["vit.blocks.0"]  # InternViT-6B: 45 blocks of 123M, + 5M of embeddings
    assert abs(vit_block / 1e6 - 123.0) < 0.5 and abs(pi["vit"] - 45 * vit_block - pi["units"]["vit"]) == 0
    assert max(pi["units"].values()) == pi["units"]["root"]  # wte + lm_head + connector: 1.64B
    d = plan.plan_run("grpo", plan.script_config("grpo.py", [os.path.join(ROOT, "config", "grpo_r1v3.py")]), cfg,
                      gpus=8, gpus_per_node=8, gpu_gb=80, tp=8, offload=True)
    assert "38.39B params" in plan.format_plan(d)
    path = os.path.join(ROOT, "config", "models", "skywork_r1v3_38b")
    if os.path.isdir(path):  # the shipped config-only directory builds the same model
        shipped = load_config(path)[0]
        assert plan.param_info(shipped)["total"] == pi["total"]
    # tp=8: 1/8 of every block's attention and MLP, the ViT / embeddings / head replicated
    blocks = pi["llm"] - 2 * cfg.vocab_size * cfg.n_embd - cfg.n_embd
    norms = 2 * cfg.n_embd * cfg.n_layer
    assert plan.tp_numel(cfg, 8) == (blocks - norms) // 8 + norms + pi["total"] - pi["llm"] + \
        2 * cfg.vocab_size * cfg.n_embd + cfg.n_embd


def _grpo_38b(**over):
    c = plan.script_config("grpo.py", [os.path.join(ROOT, "config", "grpo_r1v3.py")])
    c.update(over)
    return c


def test_r1v3_verdicts():
    cfg = r1v3_38b()
    last = lambda d: plan.format_plan(d).splitlines()[-1]  # noqa: E731
    fits = re.compile(r"^plan: fits \(peak [\d.]+ GB of [\d.]+ GB per GPU\)$")
    # 8 x 80 GB, tp=8, offload: fits once a micro-batch is <= 2 sequences of 12k tokens
    d = plan.plan_run("grpo", _grpo_38b(micro_batch=2), cfg, gpus=8, gpus_per_node=8, gpu_gb=80, tp=8, offload=True)
    assert d["fits"] and fits.match(last(d)), last(d)
    assert d["chunks"] > 1  # 32 prompts x 32 samples x 8192 tokens of KV cache: the rollout is chunked
    # max_new_tokens as one length instead of a schedule: the plan of the schedule's longest
    longest = max(length for _, length in _grpo_38b()["max_new_tokens"])
    one = plan.plan_run("grpo", _grpo_38b(micro_batch=2, max_new_tokens=longest), cfg, gpus=8, gpus_per_node=8,
                        gpu_gb=80, tp=8, offload=True)
    assert (one["max_new"], one["peak_gb"]) == (d["max_new"], d["peak_gb"]) and longest == 8192
    # without offload it cannot: the fp32 masters + grads + AdamW state alone are ~72 GB per GPU
    d = plan.plan_run("grpo", _grpo_38b(micro_batch=2), cfg, gpus=8, gpus_per_node=8, gpu_gb=80, tp=8)
    assert not d["fits"] and last(d).startswith("plan: does not fit:") and "AdamW" in last(d), last(d)
    assert "--offload=True" in last(d)
    # 2 nodes x 8 x 80 GB, no offload: fits with one sequence per micro-batch. The training step (~65.5 GB) is led by
    # the first LLM blocks' backward, no longer by the log-prob chunks (on CUDA they hold no fp32 copy of lm_head:
    # model.lm_head_logits) nor by the ViT (each InternViT-6B block is its own FSDP unit; as one unit its backward
    # held 5.5B bf16 weights + grads + their fp32 reduce-scatter input, ~31 GB). The peak is the validation rollout,
    # chunked to the sampler's budget (sampler.budget_from_free, sampler.fit_chunks).
    d = plan.plan_run("grpo", _grpo_38b(micro_batch=1), cfg, gpus=16, gpus_per_node=8, gpu_gb=80, tp=8)
    assert d["fits"] and fits.match(last(d)) and d["train_stage"] == "LLM backward", last(d)
    assert max(d["peaks"], key=d["peaks"].get) == "eval"
    assert d["peaks"]["train"] * (1 + plan.FRAG) / plan.GB + plan.OVERHEAD_GB < d["gpu_capacity_gb"] - 10
    # two sequences per micro-batch do not fit there: the LLM blocks' activations; the plan names micro_batch=1
    d = plan.plan_run("grpo", _grpo_38b(micro_batch=2), cfg, gpus=16, gpus_per_node=8, gpu_gb=80, tp=8)
    assert not d["fits"] and d["train_stage"] == "LLM backward" and "--micro_batch=1" in last(d), last(d)
    # the config as written (micro_batch=4) doubles the LLM's activations of micro_batch=2: the training step leads,
    # within 1 GB of the capacity (config/grpo_r1v3_38b.py runs micro_batch=2)
    d4 = plan.plan_run("grpo", _grpo_38b(), cfg, gpus=8, gpus_per_node=8, gpu_gb=80, tp=8, offload=True)
    d2 = plan.plan_run("grpo", _grpo_38b(micro_batch=2), cfg, gpus=8, gpus_per_node=8, gpu_gb=80, tp=8, offload=True)
    assert max(d4["peaks"], key=d4["peaks"].get) == "train" and max(d2["peaks"], key=d2["peaks"].get) == "rollout"
    assert d4["peaks"]["train"] - d2["peaks"]["train"] > 20 * plan.GB and d4["peak_gb"] > d4["gpu_capacity_gb"] - 1
    # tp=1 on 80 GB: the gathered bf16 model (77 GB) does not fit beside anything
    d = plan.plan_run("grpo", _grpo_38b(micro_batch=1), cfg, gpus=8, gpus_per_node=8, gpu_gb=80, offload=True)
    assert not d["fits"] and "--tp=" in last(d), last(d)



def test_cuda_plan_has_no_fp32_lm_head():
    # model.lm_head_logits on CUDA: torch.mm(bf16, bf16, out_dtype=fp32) on the bf16 weight itself, no fp32 copy, in
    # the sampler (generate's w_head) and the trainer (token_logprobs); on the CPU the fp32 copy stays (measured above)
    cfg = r1v3_38b()
    VC4 = cfg.vocab_size * cfg.n_embd * 4
    assert plan.lm_head_copy(cfg, 2, True) == 0 and plan.lm_head_copy(cfg, 2, False) == VC4
    assert plan.lm_head_copy(cfg, 4, False) == 0
    train = (False, False, True)  # the LLM only: the connector's CUDA-autocast LayerNorm term does not enter
    a_gpu = plan.activation_bytes(cfg, 1, 4096, 0, 2, train, True, True)
    a_cpu = plan.activation_bytes(cfg, 1, 4096, 0, 2, train, True, False)
    assert a_cpu["other"] - a_gpu["other"] == VC4
    kw = dict(gpus=8, gpus_per_node=8, gpu_gb=80, tp=8, offload=True, _search=False)
    gpu = plan.plan_run("grpo", _grpo_38b(micro_batch=2), cfg, **kw)
    cpu = plan.plan_run("grpo", _grpo_38b(micro_batch=2), cfg, device="cpu", compute_bytes=2, **kw)
    assert not any("lm_head" in t and v for t, v in gpu["phases"]["rollout"].items()), gpu["phases"]["rollout"]
    assert cpu["phases"]["rollout"]["fp32 lm_head (sampler log-probs)"] == VC4
    assert "lm_head" not in plan.format_plan(dict(gpu, time={}))


def test_rollout_budget_is_the_samplers():
    # the plan's rollout budget is sampler.budget_from_free (90% of the free memory less 1 GiB on CUDA, 256 MiB on the
    # CPU) of the memory left after the gather, less generate()'s lm_head copy; its chunks are sampler.fit_chunks'
    from plumbing.tp import tp_config
    cfg = r1v3_38b()
    for dev, e in (("cuda", 2), ("cpu", 2)):
        d = plan.plan_run("grpo", _grpo_38b(micro_batch=2), cfg, gpus=8, gpus_per_node=8, gpu_gb=80, tp=8,
                          offload=True, device=dev, compute_bytes=e, _search=False)
        ro = d["phases"]["rollout"]
        w_roll, w32 = ro["TP shard + replicated (tp=8)"], ro.get("fp32 lm_head (sampler log-probs)", 0)
        free = int((d["gpu_capacity_gb"] - plan.OVERHEAD_GB) * plan.GB - w_roll * (1 + plan.FRAG))  # offload: no states
        assert d["rollout_budget"] == sampler.budget_from_free(free, dev) - w32, dev
        assert sampler.budget_from_free(free, dev) < 0.9 * free  # the margin is there
        (a, b), *_ = sampler.fit_chunks(tp_config(cfg, 8), [d["prompt"]] * d["rollout_prompts"], 32, d["max_new"],
                                        torch.bfloat16, d["rollout_budget"], sampler.Sampling())
        assert d["prompts_per_chunk"] == b - a and d["chunks"] == -(-d["rollout_prompts"] // (b - a)), dev


def test_cuda_graph_adds_graph_bytes():
    # grpo.py --cuda_graph=True: sampler.fit_chunks charges CudaGraphStep's graphs (sampler.graph_bytes); so does the
    # plan, beside the decode buffers, on CUDA only
    from plumbing.tp import tp_config
    cfg = r1v3_38b()
    kw = dict(gpus=8, gpus_per_node=8, gpu_gb=80, tp=8, offload=True, _search=False)
    off = plan.plan_run("grpo", _grpo_38b(micro_batch=2), cfg, **kw)
    on = plan.plan_run("grpo", _grpo_38b(micro_batch=2, cuda_graph=True), cfg, **kw)
    term = "CUDA graphs (sampler.graph_bytes)"
    rows = on["prompts_per_chunk"] * 32
    assert term not in off["phases"]["rollout"]
    assert on["phases"]["rollout"][term] == sampler.graph_bytes(tp_config(cfg, 8), rows, torch.bfloat16) > 0
    assert on["prompts_per_chunk"] <= off["prompts_per_chunk"] and on["rollout_budget"] == off["rollout_budget"]
    (a, b), *_ = sampler.fit_chunks(tp_config(cfg, 8), [on["prompt"]] * on["rollout_prompts"], 32, on["max_new"],
                                    torch.bfloat16, on["rollout_budget"], sampler.Sampling(), cuda_graph=True)
    assert on["prompts_per_chunk"] == b - a
    cpu = plan.plan_run("grpo", _grpo_38b(micro_batch=2, cuda_graph=True), cfg, device="cpu", compute_bytes=2, **kw)
    assert term not in cpu["phases"]["rollout"]  # no graphs off CUDA (generate: cuda_graph and device.type == 'cuda')
    assert "eval" not in on["phases"] or term not in on["phases"]["eval"]  # validation decodes eagerly

def test_gpu_capacity():
    # a GPU sold as N GB holds what nvidia-smi reports (plan.GPU_MIB), not N GiB: the plan compares against that and
    # prints it; a size not in the table is taken as GiB
    assert plan.gpu_capacity(80)[0] == 81559 / 1024 and round(plan.gpu_capacity(141)[0], 1) == 140.4
    assert plan.gpu_capacity(40)[0] == 40.0 and plan.gpu_capacity(100)[0] == 100.0
    assert "81559 MiB" in plan.gpu_capacity(80.0)[1] and "taken as 100 GiB" in plan.gpu_capacity(100)[1]
    cfg = r1v3_38b()
    for gb, cap in ((80, 79.6), (141, 140.4), (100, 100.0)):
        d = plan.plan_run("grpo", _grpo_38b(micro_batch=2), cfg, gpus=8, gpus_per_node=8, gpu_gb=gb, tp=8,
                          offload=True)
        text = plan.format_plan(d)
        assert f"GPU capacity: {cap:.1f} GB" in text and text.splitlines()[-1].endswith(f"of {cap:.1f} GB per GPU)")
        assert d["fits"] == (d["peak_gb"] <= d["gpu_capacity_gb"]) and d["gpu_capacity_gb"] == plan.gpu_capacity(gb)[0]

# -----------------------------------------------------------------------------
# issue 20: token-budget micro-batches, activation_checkpointing='auto', the start-up check, the root FSDP unit


def _grpo_1b(**over):
    # grpo.py's defaults with InternVL3-1B and 4096-token responses (grpo.py's one-GPU command)
    c = plan.script_config("grpo.py", ["--max_new_tokens=4096"])
    c.update(over)
    return c, load_config(os.path.join(ROOT, "config", "models", "internvl3_1b"))[0]


def test_micro_batch_tokens_and_auto_checkpointing():
    c, cfg = _grpo_1b()
    assert c["micro_batch_tokens"] == 32768 and c["activation_checkpointing"] == "auto"
    d = plan.plan_run("grpo", c, cfg, gpus=1, gpu_gb=80)
    # prompts of 3840 tokens (13 tiles + text) + 4096: 4 sequences fit 32768 tokens; shorter responses pack up to
    # 32768 // 3840 = 8 rows, whose 104 tiles go through the ViT at once: the plan holds both worst cases
    assert (d["T"], d["B"], d["rows_max"], d["B_tok"] * d["T"]) == (7936, 4, 8, 32768)
    assert d["tiles"] == 8 * 13 and d["n_micro"] == 32
    assert d["fits"] and d["ac"] and d["ac_auto"]  # without checkpointing the step needs >150 GB: auto turns it on
    off = plan.plan_run("grpo", dict(c, activation_checkpointing=False), cfg, gpus=1, gpu_gb=80)
    assert not off["fits"] and off["peaks"]["train"] > d["peaks"]["train"] and not off["ac_auto"]
    assert "--activation_checkpointing=True" in off["verdict"], off["verdict"]
    # 8192 tokens a micro-batch on an H200: the step fits without it, auto leaves it off
    big = plan.plan_run("grpo", dict(c, micro_batch_tokens=8192), cfg, gpus=1, gpu_gb=141)
    assert big["fits"] and not big["ac"] and big["ac_auto"]
    # the old defaults (no token budget, no checkpointing): micro_batch=32 rows of 7936 tokens, ~740 GB
    old = plan.plan_run("grpo", dict(c, micro_batch_tokens=0, activation_checkpointing=False), cfg, gpus=1, gpu_gb=80)
    assert old["B"] == old["rows_max"] == 32 and not old["fits"] and old["peaks"]["train"] > 500 * plan.GB
    # a budget that binds: the search halves it (an A100 40GB)
    tight = plan.plan_run("grpo", dict(c, activation_checkpointing=True, micro_batch_tokens=65536), cfg, gpus=1,
                          gpu_gb=40)
    assert not tight["fits"] and "--micro_batch_tokens=" in tight["verdict"], tight["verdict"]
    # the embedded default: 32 sequences of the plan's 688 tokens (one tile, 512 text tokens, 160 new) are below the
    # budget, so it does not bind and the plan is the one without it (real prompts are shorter: tests/test_grpo.py)
    t = plan.script_config("grpo.py", [])
    tiny = plan.model_config(plan.script_config("sft.py", []))
    a, b = (plan.plan_run("grpo", dict(t, micro_batch_tokens=m), tiny, gpus=1, device="cpu", gpu_gb=8)
            for m in (t["micro_batch_tokens"], 0))
    assert a["B"] == b["B"] == 32 and a["peak"] == b["peak"] and not a["ac"]


def test_auto_is_a_config_value():
    from plumbing.configurator import check_type
    for v, want in (("auto", "auto"), (True, True), ("False", False), ("true", True)):
        assert check_type("activation_checkpointing", v, "auto", "test") == want
    with pytest.raises(ValueError, match="activation_checkpointing"):
        check_type("activation_checkpointing", 1, "auto", "test")
    c = plan.script_config("grpo.py", [os.path.join(ROOT, "config", "grpo_r1v3.py")])  # a config file's True
    assert c["activation_checkpointing"] is True
    assert plan.script_config("sft.py", ["--activation_checkpointing=False"])["activation_checkpointing"] is False


def test_startup_check(monkeypatch, capsys):
    c, _ = _grpo_1b(init_from=os.path.join(ROOT, "config", "models", "internvl3_1b"))
    monkeypatch.setattr(plan, "device_memory", lambda: ("cuda", 80.0))
    d = plan.startup_check("grpo", c)  # fits on one 80 GB GPU: auto decided, one line printed
    assert d["fits"] and c["activation_checkpointing"] is True
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("grpo.py memory plan on 1 x 80.0 GB GPU: fits") and "auto -> True" in \
        out[0]
    c, _ = _grpo_1b(init_from=os.path.join(ROOT, "config", "models", "internvl3_1b"), micro_batch_tokens=0,
                    activation_checkpointing=False)
    with pytest.raises(SystemExit) as e:  # does not fit: stops, naming the phase, its biggest term and the fixes
        plan.startup_check("grpo", c)
    msg = str(e.value.code)
    assert "\n" not in msg and msg.startswith("grpo.py on 1 x 80.0 GB GPU: does not fit: the training step needs")
    assert "biggest term: activations" in msg and "fits with" in msg and "--force=True" in msg
    assert plan.startup_check("grpo", dict(c, force=True))["fits"] is False  # --force: runs anyway
    assert "running anyway" in capsys.readouterr().out
    monkeypatch.setattr(plan, "device_memory", lambda: ("cpu", 4.0))  # the CPU: printed, never stops
    assert plan.startup_check("grpo", dict(c, force=False))["fits"] is False
    assert "not enforced" in capsys.readouterr().out
    assert plan.startup_check("grpo", dict(c, init_from="/nonexistent")) is None  # the script's own error follows


ROOT_WORKER = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
import torch
from torch.distributed.tensor import DTensor
from plumbing import apply_fsdp, compute_init
from plan_worker import batch, tiny_cfg
from model import VLM
compute_init(0, 60, 0)
m = apply_fsdp(VLM(tiny_cfg()))
ids, px, tgt = batch(m.cfg, 2, 12, 1)[:3]
sharded = lambda p: isinstance(p, DTensor)
logp, _ = m(ids, px, targets=tgt)
# after forward: every block resharded, the root (embeddings, lm_head, connector) still gathered for its backward
assert sharded(m.llm.blocks[0].attn.q_proj.weight) and sharded(m.vit.blocks[0].mlp.fc1.weight), "a block stayed gathered"
assert not sharded(m.llm.wte.weight) and not sharded(m.llm.lm_head.weight), "the root was resharded after forward"
logp.sum().backward()
assert sharded(m.llm.wte.weight), "the root is resharded after backward"
print("ROOT OK", flush=True)
"""


def test_root_unit_stays_gathered_after_forward(tmp_path):
    # plumbing.apply_fsdp: the root is not resharded after forward (torchtitan), else every micro-batch's backward
    # all-gathers the embeddings and lm_head again right after its forward freed them
    w = tmp_path / "root_worker.py"
    w.write_text(ROOT_WORKER)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(w),
                        os.path.join(ROOT, "tests")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT))
    assert p.returncode == 0 and p.stdout.count("ROOT OK") == 2, p.stdout[-2000:] + p.stderr[-3000:]
