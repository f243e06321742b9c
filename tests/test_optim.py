"""plumbing/optim.py (issue 20): bf16 masters, gradients and AdamW state with stochastic rounding. At an RL learning
rate (1e-6) on O(1) weights, plain bf16 AdamW does not move the weights at all (every update is below half a bf16
spacing); ours moves them as far as fp32 masters do. The step on FSDP2 DTensor shards and the checkpoint round trip
run under torchrun, 2 gloo processes (tests/optim_worker.py). The memory plan models the option (tools/plan.py):
Skywork-R1V3-38B GRPO fits one 8 x 80 GB node without offload."""
import os
import re
import subprocess
import sys

import pytest
import torch

import plan
from model import VLMConfig
from plumbing import AdamW, build_model, build_optimizer, master_torch_dtype, stochastic_round_

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "optim_worker.py")


def test_stochastic_round_is_unbiased_and_exact_on_bf16_values():
    g = torch.Generator().manual_seed(0)
    # values between two bf16 neighbours, both signs, several binades
    lo = (torch.randn(64, generator=g) * 10.0 ** torch.randint(-3, 3, (64,), generator=g).float()).bfloat16()
    spacing = (lo.float().abs() * 2 ** -7).clamp_min(1e-30)  # at most the bf16 spacing at |lo|
    x = lo.float() + torch.sign(lo.float()) * spacing * torch.rand(64, generator=g)
    draws = torch.stack([stochastic_round_(torch.empty(64, dtype=torch.bfloat16), x.clone(), g).float()
                         for _ in range(4000)])
    # every draw is one of the two neighbours of x, and the mean is x (to the Monte-Carlo error, ~spacing / 126)
    nearest = x.bfloat16().float()
    assert ((draws - x).abs() <= 2 * spacing).all()
    err = ((draws.mean(0) - x) / spacing).abs()
    assert err.max() < 0.06, err.max()
    assert ((nearest - x) / spacing).abs().mean() > 0.1  # round-to-nearest is biased per element: the test can tell
    # a bf16 value is left exactly as it is (DCP initialises the optimizer state with an lr = 0 step)
    exact = torch.randn(1000, generator=g).bfloat16()
    for _ in range(5):
        assert torch.equal(stochastic_round_(torch.empty_like(exact), exact.float(), g), exact)


def _regression(kind, steps=300, lr=1e-6, seed=0):
    """Full-batch linear regression, weights O(1) (|w| in [0.5, 1.5], every one starting at the same bf16 value):
    the gradient keeps its sign, so each Adam step moves every weight by ~lr, 1e-4 .. 1e-3 of a bf16 spacing.
    Returns the weights' displacement after `steps` (fp32)."""
    g = torch.Generator().manual_seed(0)
    w0 = ((torch.rand(256, 256, generator=g) + 0.5) * torch.randn(256, 256, generator=g).sign()).bfloat16().float()
    X = torch.randn(256, 256, generator=g)
    Y = X @ (w0 + 0.1 * torch.randn(256, 256, generator=g)).T
    W = torch.nn.Parameter(w0.to(torch.float32 if kind == "fp32" else torch.bfloat16, copy=True))
    opt = {"fp32": lambda: torch.optim.AdamW([W], lr=lr, weight_decay=0.0),
           "torch bf16": lambda: torch.optim.AdamW([W], lr=lr, weight_decay=0.0),
           "ours": lambda: AdamW([W], lr=lr, weight_decay=0.0, seed=seed),
           "ours, round to nearest": lambda: AdamW([W], lr=lr, weight_decay=0.0, stochastic_round=False)}[kind]()
    for _ in range(steps):
        ((X @ W.float().T - Y) ** 2).mean().backward()  # fp32 compute, the gradient in W's dtype
        opt.step()
        opt.zero_grad(set_to_none=True)
    return W.detach().float() - w0


def test_small_updates_are_kept():
    """300 steps at lr 1e-6: distance travelled along the fp32-master path (the displacement projected on the fp32
    run's direction; per weight the rounding noise is larger than the drift, over 65k weights it averages out)."""
    d = {k: _regression(k) for k in ("fp32", "ours", "torch bf16", "ours, round to nearest")}
    u = d["fp32"] / d["fp32"].norm()
    d32 = float(d["fp32"].norm())
    along = {k: float((v * u).sum()) for k, v in d.items()}
    print(f"d32 {d32:.5f}  d_sr {along['ours']:.5f}  d_bf16 (torch AdamW on bf16) {along['torch bf16']:.5f}  "
          f"d_rne (ours, round to nearest) {along['ours, round to nearest']:.5f}  |sr displacement| "
          f"{float(d['ours'].norm()):.4f}")
    assert abs(d32 / (300 * 1e-6 * 256) - 1) < 0.05  # fp32: ~lr per weight per step
    assert abs(along["ours"] / d32 - 1) < 0.1, along
    assert abs(along["torch bf16"]) / d32 < 0.1 and abs(along["ours, round to nearest"]) / d32 < 0.1, along
    # the rounding noise is zero-mean: another seed lands elsewhere, the same distance along the path
    other = _regression("ours", seed=1)
    assert not torch.equal(other, d["ours"]) and abs(float((other * u).sum()) / d32 - 1) < 0.1


def test_fp32_parameters_step_as_torch_adamw():
    """On fp32 parameters (no rounding) AdamW is torch.optim.AdamW: param groups, weight decay, bias correction."""
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(8, 5)), torch.nn.Parameter(torch.randn(5))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    groups = lambda ps: [{"params": [ps[0]], "weight_decay": 0.1}, {"params": [ps[1]], "weight_decay": 0.0}]  # noqa
    ours = AdamW(groups(a), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    ref = torch.optim.AdamW(groups(b), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for step in range(20):
        grads = [torch.randn_like(p) for p in a]
        for ps, opt in ((a, ours), (b, ref)):
            for p, gr in zip(ps, grads):
                p.grad = gr.clone()
            opt.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert set(ours.state[a[0]]) == {"step", "exp_avg", "exp_avg_sq"} and ours.state[a[0]]["step"].item() == 20


def test_resume_draws_what_the_uninterrupted_run_draws():
    """The rounding noise of a step is a function of (seed, parameter, step, shard): an optimizer rebuilt from a
    state_dict continues bit for bit as the uninterrupted one."""
    def make(seed=0):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(64, 32).bfloat16())
        return p, AdamW([p], lr=1e-4, weight_decay=0.01, seed=seed)

    def steps(p, opt, k0, k1):
        for k in range(k0, k1):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(k)).bfloat16()
            opt.step()

    p, opt = make()
    steps(p, opt, 0, 20)
    q, opt2 = make()
    steps(q, opt2, 0, 10)
    sd = opt2.state_dict()
    r = torch.nn.Parameter(q.detach().clone())
    opt3 = AdamW([r], lr=1e-4, weight_decay=0.01, seed=0)
    opt3.load_state_dict(sd)
    steps(r, opt3, 10, 20)
    assert torch.equal(r, p) and torch.equal(opt3.state[r]["exp_avg_sq"], opt.state[p]["exp_avg_sq"])
    assert opt3.state[r]["exp_avg"].dtype == torch.bfloat16
    s, opt4 = make(seed=1)  # another seed: other draws
    steps(s, opt4, 0, 20)
    assert not torch.equal(s, p)


def test_build_optimizer_and_bf16_build_model():
    assert type(build_optimizer([torch.nn.Parameter(torch.ones(2))], "float32", lr=1.0)) is torch.optim.AdamW
    assert type(build_optimizer([torch.nn.Parameter(torch.ones(2).bfloat16())], "bfloat16", lr=1.0)) is AdamW
    with pytest.raises(ValueError, match="master_dtype='fp16'"):
        master_torch_dtype("fp16")

    class Tok:  # what build_model('scratch') asks of a tokenizer
        unk_token_id, name_or_path = 0, "stub"

        def __len__(self):
            return 128

        def convert_tokens_to_ids(self, t):
            return 125 if t == "<IMG_CONTEXT>" else 0

    scratch = dict(image_size=16, patch_size=4, vit_hidden=16, vit_layers=1, vit_heads=2, vit_mlp=32, n_embd=32,
                   n_layer=1, n_head=2, n_kv_head=1, mlp_hidden=64)
    model, n, n_train = build_model("scratch", Tok(), "cpu", scratch=scratch, master_dtype=torch.bfloat16,
                                    train=(False, True, True))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and n_train < n
    ids = torch.randint(6, 120, (2, 10))
    ids[:, 1:1 + model.cfg.tokens_per_tile] = 125
    logits = model(ids, torch.randn(2, 3, 16, 16))
    logits.float().logsumexp(-1).mean().backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in trained)
    opt = build_optimizer(trained, "bfloat16", lr=1e-3)
    before = [p.detach().clone() for p in trained]
    opt.step()
    assert all(not torch.equal(p, b) for p, b in zip(trained, before) if p.numel() > 8)
    assert all(v.dtype == torch.bfloat16 for s in opt.state.values() for k, v in s.items() if k != "step")


def test_checkpoints_switch_master_dtype_both_ways(tmp_path):
    """save_checkpoint / load_checkpoint (DCP, one process) between an fp32-master run (torch.optim.AdamW) and a
    bf16-master one (AdamW here), both ways: the weights and moments arrive cast, the step counts as saved."""
    from dist_common_worker import make_batch, tiny_cfg, train_step
    from model import VLM
    from plumbing import load_checkpoint, save_checkpoint
    cfg = tiny_cfg()

    def run(dtype, seed=0):
        torch.manual_seed(seed)
        m = VLM(cfg).to(dtype)
        return m, build_optimizer(list(m.parameters()), {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype],
                                  lr=1e-3, weight_decay=0.1)

    m, opt = run(torch.float32)
    train_step(m, opt, *make_batch(cfg, 2, 0))
    path = save_checkpoint(str(tmp_path), 1, m, opt, {}, {})
    for src, dst_dtype in (((m, opt), torch.bfloat16), (None, torch.float32)):
        if src is None:  # back: the bf16 run's checkpoint after one more step into an fp32 run
            train_step(m2, opt2, *make_batch(cfg, 2, 1))
            path = save_checkpoint(str(tmp_path), 2, m2, opt2, {}, {})
            m, opt = m2, opt2
        m2, opt2 = run(dst_dtype, seed=1)
        load_checkpoint(path, m2, opt2)
        for (n, a), (_, b) in zip(m.named_parameters(), m2.named_parameters()):
            assert b.dtype == dst_dtype and torch.equal(a.detach().to(dst_dtype), b.detach()), n
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(opt.state[a][key].to(dst_dtype), opt2.state[b][key]), (n, key)
            assert opt2.state[b]["step"].item() == opt.state[a]["step"].item()
    assert type(opt2) is torch.optim.AdamW and type(opt) is AdamW


def _r1v3_38b():
    # docs/models.md: InternViT-6B-448px-V2.5 + Qwen2.5-32B (tests/test_plan.py's r1v3_38b)
    return VLMConfig(image_size=448, patch_size=14, vit_hidden=3200, vit_layers=45, vit_heads=25, vit_mlp=12800,
                     vit_norm="rms_norm", vit_qk_norm=True, vit_qkv_bias=False, vocab_size=151674, n_embd=5120,
                     n_layer=64, n_head=40, n_kv_head=8, mlp_hidden=27648, image_token_id=151667)


@pytest.mark.slow  # the memory plan (conftest.py)
def test_plan_38b_on_8x80gb_without_offload():
    """The plan of config/grpo_r1v3.py + config/grpo_r1v3_38b.py on 8 x 80 GB, tp=8, no offload, one sequence per
    micro-batch: fp32 masters do not fit (the states alone 71.5 GB per GPU), bf16 masters do (8 bytes a parameter:
    35.8 GB), and the plan's search names --master_dtype=bfloat16 among the changes that fit."""
    cfg = _r1v3_38b()
    config = plan.script_config("grpo.py", [os.path.join(ROOT, "config", "grpo_r1v3.py"),
                                            os.path.join(ROOT, "config", "grpo_r1v3_38b.py"), "--offload=False",
                                            "--micro_batch=1"])
    kw = dict(gpus=8, gpus_per_node=8, gpu_gb=80, tp=8, offload=False)
    fp32 = plan.plan_run("grpo", config, cfg, **kw)
    bf16 = plan.plan_run("grpo", dict(config, master_dtype="bfloat16"), cfg, **kw)
    shard = plan.shard_numel(cfg, 8)
    tr = bf16["phases"]["train"]
    assert tr["bf16 master shard"] == tr["bf16 grad shard"] == 2 * shard
    assert tr["AdamW state (2 x bf16)"] == 4 * shard + 4 * plan.n_tensors(cfg, ("vit", "connector", "llm"))
    assert fp32["phases"]["train"]["fp32 master shard"] == 4 * shard
    assert abs(fp32["states"] / bf16["states"] - 2) < 1e-3 and round(bf16["states"] / plan.GB, 1) == 35.8
    assert not fp32["fits"] and "--master_dtype=bfloat16" in fp32["verdict"], fp32["verdict"]
    text = plan.format_plan(bf16)
    print(text)
    assert bf16["fits"] and re.match(r"^plan: fits \(peak [\d.]+ GB of 79.6 GB per GPU\)$", text.splitlines()[-1])
    assert "master_dtype=bfloat16" in text.splitlines()[0]
    # the training step itself has room (the rollout's chunks fill what is left by design)
    assert bf16["peaks"]["train"] * (1 + plan.FRAG) / plan.GB + plan.OVERHEAD_GB < 79.6 - 2
    # the optimizer step: the states + fp32 copies of the largest tensor's shard (wte / lm_head: 151674 x 5120 / 8)
    big = -(-cfg.vocab_size // 8) * cfg.n_embd
    assert bf16["optimizer_step_peak"] - bf16["states"] == plan.OPT_TMP * big


@pytest.mark.slow
def test_fsdp2_two_processes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", WORKER,
           str(tmp_path / "run")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=ROOT)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert "OPTIM WORKER OK rank 0" in out and "OPTIM WORKER OK rank 1" in out, out[-3000:]
    print("\n".join(line for line in out.splitlines() if "OPTIM" in line))
