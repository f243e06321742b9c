"""plumbing (checkpoint.py, dist.py, run.py): LR schedule, freezing, activation checkpointing, atomic/resumable DCP checkpoints, HF export,
and FSDP2 under a real 2-process gloo torchrun (tests/dist_common_worker.py)."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

import plumbing

import plumbing.checkpoint
from plumbing import (apply_activation_checkpointing, apply_fsdp, autocast_ctx, compute_init, export_hf, get_lr,
                    latest_checkpoint, load_checkpoint, print0, save_checkpoint, set_trainable)
from dist_common_worker import draws, make_batch, tiny_cfg, train_step
from model import VLM, VLMConfig
from plumbing.hf import load_pretrained

# single-process DCP is intended (plumbing/checkpoint.py filters this warning; pytest resets filters per test)
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_common_worker.py")


def tiny(seed=0):
    torch.manual_seed(seed)
    return VLM(tiny_cfg())


def adamw(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)


def test_get_lr_warmup_then_cosine():
    kw = dict(max_steps=110, lr=1.0, warmup_steps=10, min_lr=0.1)
    assert get_lr(0, **kw) == pytest.approx(0.1)  # (0 + 1) / 10: the first step already moves
    assert get_lr(4, **kw) == pytest.approx(0.5)
    assert get_lr(9, **kw) == pytest.approx(1.0)
    assert get_lr(10, **kw) == pytest.approx(1.0)  # cosine starts at the peak
    assert get_lr(60, **kw) == pytest.approx(0.55)  # halfway: (lr + min_lr) / 2
    assert get_lr(110, **kw) == pytest.approx(0.1)
    assert get_lr(500, **kw) == pytest.approx(0.1)  # past the end: stays at min_lr
    assert get_lr(0, 100, 3e-4, 0) == pytest.approx(3e-4)  # no warmup


def test_set_trainable_counts_and_no_grads():
    m = tiny()
    n = {t: sum(p.numel() for name, p in m.named_parameters() if name.startswith(t + ".")) for t in
         ("vit", "connector", "llm")}
    assert m.llm.lm_head.weight is m.llm.wte.weight  # tied: counted once (named_parameters dedups)
    assert set_trainable(m, True, True, True) == sum(n.values()) == sum(p.numel() for p in m.parameters())
    assert set_trainable(m, False, True, False) == n["connector"]
    assert set_trainable(m, True, False, True) == n["vit"] + n["llm"]
    assert set_trainable(m, False, False, False) == 0
    # connector only: after backward nothing else holds a gradient
    set_trainable(m, True, True, True)
    ids, px, tgt = make_batch(m.cfg, 2, seed=0)
    torch.nn.functional.cross_entropy(m(ids, px).flatten(0, 1), tgt.flatten()).backward()
    set_trainable(m, False, True, False)  # also drops the stale grads of now-frozen params
    with_grad = {name.split(".")[0] for name, p in m.named_parameters() if p.grad is not None}
    assert with_grad == {"connector"}
    m.extra = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="model.extra"):
        set_trainable(m, True, True, True)


def test_compute_init_single_process(monkeypatch, capsys):
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    ddp, rank, local_rank, world, device = compute_init(seed=5)
    assert (ddp, rank, local_rank, world) == (False, 0, 0, 1)
    a = draws()
    compute_init(seed=5)
    assert draws() == a  # torch, numpy and python random all seeded
    if not torch.cuda.is_available():
        assert device.type == "cpu"
        with autocast_ctx(device):
            assert not torch.is_autocast_enabled("cpu")
    print0("hello", 1)
    monkeypatch.setenv("RANK", "1")
    print0("not shown")
    assert capsys.readouterr().out == "hello 1\n"
    with pytest.raises(RuntimeError, match="torchrun"):
        apply_fsdp(tiny())


def test_activation_checkpointing_same_grads_fewer_saved_tensors():
    ids, px, tgt = make_batch(tiny_cfg(), 2, seed=0)
    runs = []
    for ac in (False, True):
        m = tiny(0)
        if ac:
            apply_activation_checkpointing(m)
            apply_activation_checkpointing(m)  # idempotent
            m = copy.deepcopy(m)  # e.g. a GRPO reference model: its blocks must run the copy's weights
            for block in m.llm.blocks:
                assert block.forward.__self__ is block
        n_saved = [0]

        def pack(t):
            n_saved[0] += 1
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = torch.nn.functional.cross_entropy(m(ids, px).flatten(0, 1), tgt.flatten())
        loss.backward()
        with torch.no_grad():  # the sampling path bypasses checkpoint()
            out = m(ids, px)
        runs.append((loss.item(), {n: p.grad.clone() for n, p in m.named_parameters()}, n_saved[0], out,
                     list(m.state_dict())))
    (l0, g0, s0, o0, k0), (l1, g1, s1, o1, k1) = runs
    assert l0 == pytest.approx(l1, abs=1e-6) and torch.allclose(o0, o1, atol=1e-6)
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-6), n
    assert k0 == k1  # names unchanged: state dicts and HF export unaffected
    assert s1 < s0 / 2, (s0, s1)  # block internals are recomputed, not saved


def test_save_load_round_trip(tmp_path):
    m = tiny(0)
    set_trainable(m, False, True, True)
    opt = adamw(m)
    train_step(m, opt, *make_batch(m.cfg, 2, seed=1))
    saved = {k: v.clone() for k, v in m.state_dict().items()}
    path = save_checkpoint(str(tmp_path), 3, m, opt, {"epoch": 1, "pos": 17}, {"lr": 1e-2, "run": "x"})
    after_save = draws()
    assert path == str(tmp_path / "ckpt_0000003") and latest_checkpoint(str(tmp_path)) == path
    assert sorted(os.listdir(path)) == [".metadata", "__0_0.distcp", "env.json", "model_config.json", "rank0.pt",
                                        "state.json"]
    with open(os.path.join(path, "model_config.json")) as f:
        assert VLMConfig(**json.load(f)) == m.cfg  # eval can rebuild the model from the checkpoint alone
    train_step(m, opt, *make_batch(m.cfg, 2, seed=2))  # move on: params, Adam state and RNG all change

    m2 = tiny(1)
    set_trainable(m2, False, True, True)
    opt2 = adamw(m2)
    step, state, config = load_checkpoint(path, m2, opt2)
    assert (step, state, config) == (3, {"epoch": 1, "pos": 17}, {"lr": 1e-2, "run": "x"})
    assert draws() == after_save
    for k, v in m2.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert m2.llm.lm_head.weight is m2.llm.wte.weight  # tie survives set_state_dict
    s2 = opt2.state_dict()["state"]
    assert len(s2) == sum(p.requires_grad for p in m2.parameters())  # no Adam state for the frozen ViT
    for p in s2.values():
        assert p["step"].item() == 1  # one step of Adam state restored, not the two of `opt`
    # the next step from the checkpoint matches a model that never stopped
    m3 = tiny(0)
    set_trainable(m3, False, True, True)
    opt3 = adamw(m3)
    train_step(m3, opt3, *make_batch(m.cfg, 2, seed=1))
    b = make_batch(m.cfg, 2, seed=5)
    assert train_step(m2, opt2, *b) == train_step(m3, opt3, *b)
    for (k, v2), v3 in zip(m2.state_dict().items(), m3.state_dict().values()):
        assert torch.equal(v2, v3), k
    # model only (e.g. eval): no optimizer needed
    m4 = tiny(2)
    assert load_checkpoint(path, m4)[0] == 3
    assert all(torch.equal(v, saved[k]) for k, v in m4.state_dict().items())


def test_atomic_save_and_keep_last(tmp_path, monkeypatch):
    out = str(tmp_path)
    m = tiny(0)
    opt = adamw(m)
    assert latest_checkpoint(out) is None and latest_checkpoint(str(tmp_path / "missing")) is None
    for step in (1, 2, 3, 4):
        save_checkpoint(out, step, m, opt, {}, {}, keep_last=2)
    assert sorted(os.listdir(out)) == ["ckpt_0000003", "ckpt_0000004"]

    # a crash in the middle of writing step 5 leaves only .tmp_ckpt_0000005, which nothing picks up
    def crash(sd, checkpoint_id, **kw):
        open(os.path.join(checkpoint_id, "__0_0.distcp"), "w").write("half")
        raise KeyboardInterrupt("killed")
    real_save = plumbing.checkpoint.dcp.save
    monkeypatch.setattr(plumbing.checkpoint.dcp, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(out, 5, m, opt, {}, {}, keep_last=2)
    assert ".tmp_ckpt_0000005" in os.listdir(out)
    os.makedirs(os.path.join(out, "ckpt_junk"))  # not a checkpoint name either
    assert latest_checkpoint(out) == os.path.join(out, "ckpt_0000004")
    monkeypatch.setattr(plumbing.checkpoint.dcp, "save", real_save)

    # the retry cleans the leftover; re-saving an existing step replaces it
    save_checkpoint(out, 5, m, opt, {"v": 1}, {}, keep_last=2)
    with torch.no_grad():
        next(m.connector.parameters()).add_(1.0)
    want = {k: v.clone() for k, v in m.state_dict().items()}
    save_checkpoint(out, 5, m, opt, {"v": 2}, {}, keep_last=2)
    assert sorted(os.listdir(out)) == ["ckpt_0000004", "ckpt_0000005", "ckpt_junk"]
    m2 = tiny(1)
    assert load_checkpoint(latest_checkpoint(out), m2)[1] == {"v": 2}
    assert all(torch.equal(v, want[k]) for k, v in m2.state_dict().items())

    # bad input fails before anything is written
    with pytest.raises(TypeError, match="JSON-serialisable"):
        save_checkpoint(out, 6, m, opt, {"x": torch.zeros(1)}, {})
    assert not any("6" in name for name in os.listdir(out))
    with pytest.raises(FileNotFoundError, match="state.json"):
        load_checkpoint(os.path.join(out, "ckpt_junk"), m2)


def test_export_hf_single_process(tmp_path):
    m = tiny(0)
    export_hf(m, str(tmp_path / "hf"))
    back = load_pretrained(str(tmp_path / "hf"))
    sd = m.state_dict()
    for k, v in back.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_fsdp_gloo_two_processes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", WORKER,
           str(tmp_path / "run")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert "WORKER OK rank 0" in out and "WORKER OK rank 1" in out, out[-3000:]
