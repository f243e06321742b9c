"""
sampler.py: greedy parity with transformers' generate(), the sampler's log-probs vs the uncached forward and the
training forward, the Triton path vs the reference path, seeds (per prompt: a sample does not depend on its batch),
EOS and length per row, the Sampling object (its mode, its checks, bans copied to the device once per call),
compaction, chunking under a memory budget, the static (CUDA-graph) path, FSDP2 rollouts on gathered weights, the CLI
(sample.py). The kernels themselves: tests/test_kernels.py.
"""
import os
import socket
import subprocess
import sys

import pytest
import torch

import hf_fixtures as hx
import decode_kernels
import sample
import sampler
from model import VLM, VLMConfig
from plumbing.hf import load_pretrained
from sampler import Sampling, generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # conftest.py sets 2 torch threads; on the shared 2-core machine, while another job holds a core, every small
    # op then waits at an OpenMP barrier (measured: one tiny generate() 0.07 s with 1 thread, 4.8 s with 2)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    hf, d = hx.make_hf_model(tmp_path_factory.mktemp("sampler"))
    hx.write_tokenizer(d)
    return hf, d


@pytest.fixture(scope="module")
def models(hf_dir):
    hf, d = hf_dir
    return hf, load_pretrained(d)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    return [hx.rand_prompt(g, 7, 1), hx.rand_prompt(g, 3, 0), hx.rand_prompt(g, 12, 2), hx.rand_prompt(g, 5, 1)]


def rows(out):
    """Rollouts -> list of (tokens, logprobs, truncated) per row, for comparisons."""
    return [(out.response(r), out.logprobs[r, :out.lengths[r]], bool(out.truncated[r]))
            for r in range(out.tokens.shape[0])]


def same(a, b, atol=1e-5):
    assert len(rows(a)) == len(rows(b))
    for (ta, la, xa), (tb, lb, xb) in zip(rows(a), rows(b)):
        assert ta == tb and xa == xb
        torch.testing.assert_close(la, lb, atol=atol, rtol=0)

# -----------------------------------------------------------------------------
# the cache


def test_decode_cache_compaction_drops_prompts():
    # DecodeCache.keep_rows: the kept rows move to the front, prompts without active rows leave the prefix cache,
    # and every kept row's attention output is unchanged (its slot still finds its prompt and its own tokens)
    torch.manual_seed(0)
    cfg = VLMConfig(image_size=16, patch_size=8, vit_hidden=16, vit_heads=2, vit_mlp=32, vocab_size=32, n_embd=32,
                    n_head=4, n_kv_head=2, mlp_hidden=64, n_layer=2, image_token_id=31)
    P, n, Lp, T = 3, 2, 7, 5
    c = sampler.DecodeCache(cfg, P, n, Lp, T, torch.float32, "cpu")
    c.pk.normal_(), c.pv.normal_()
    c.start(torch.tensor([7, 3, 6]))
    c.gk[:, :, :, :3].normal_(), c.gv[:, :, :, :3].normal_()
    for _ in range(3):  # three generated tokens per row; the next step writes position 3
        c.advance(P * n)
    q = torch.randn(P * n, cfg.n_head, 1, cfg.head_dim)
    k, v = torch.randn(P * n, cfg.n_kv_head, 1, cfg.head_dim), torch.randn(P * n, cfg.n_kv_head, 1, cfg.head_dim)
    before = c.attend(1, q, k, v)  # (6, n_head, 1, hd)
    keep = torch.tensor([5, 2, 4])  # prompt 0 has no row left; rows reordered
    c.keep_rows(keep)
    assert c.P == 2 and c.plen.tolist() == [3, 6] and c.slot[:3].tolist() == [3, 0, 2]
    assert c.pos[:3].tolist() == [6 + 3, 3 + 3, 6 + 3]
    after = c.attend(1, q[keep], k[keep], v[keep])  # position 3 rewritten with the same k, v
    torch.testing.assert_close(after, before[keep], atol=1e-6, rtol=0)
    assert not torch.allclose(after, before[[2, 5, 4]], atol=1e-3)  # rows 5 and 2 differ: the check can fail

# -----------------------------------------------------------------------------
# generate(): parity and consistency


def hf_greedy(hf, ids, pv, max_new_tokens):
    kw = dict(pixel_values=pv) if pv is not None else {}  # transformers' InternVL fails on pixel_values=None
    out = hf.generate(input_ids=torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, **kw)
    return out[0, len(ids):].tolist()


def test_greedy_matches_transformers(models, prompts):
    hf, m = models
    out = generate(m, prompts, n=2, max_new_tokens=10, sampling=Sampling(temperature=0), sync_every=3)
    assert out.tokens.shape == (2 * len(prompts), 10)
    for i, (ids, pv) in enumerate(prompts):  # 0, 1 and 2 tiles, lengths 3..23
        want = hf_greedy(hf, ids, pv, 10)
        for j in range(2):
            r = 2 * i + j
            assert bool(out.truncated[r]) and out.response(r) == want, f"prompt {i} sample {j}"


def full_forward_logp(m, prompts, out):
    """The training-side computation: one right-padded, uncached forward over prompt + response, log-probs at the
    response positions only (model.forward's target_mask), as grpo.py computes pi_theta."""
    n = out.n
    seqs = [prompts[r // n][0] + out.response(r) for r in range(out.tokens.shape[0])]
    T = max(len(s) for s in seqs)
    ids, mask = torch.zeros(len(seqs), T, dtype=torch.long), torch.zeros(len(seqs), T)
    for b, s in enumerate(seqs):
        P = len(prompts[b // n][0])
        ids[b, :len(s)] = torch.tensor(s)
        mask[b, P - 1:len(s) - 1] = 1
    pv = [prompts[r // n][1] for r in range(len(seqs)) if prompts[r // n][1] is not None]
    with torch.no_grad():
        logp, ent = m(ids, torch.cat(pv) if pv else None, targets=torch.roll(ids, -1, 1), target_mask=mask)
    return [(logp[b][mask[b].bool()], ent[b][mask[b].bool()]) for b in range(len(seqs))]


def test_logprobs_match_uncached_and_training_forward(models, prompts):
    _, m = models
    out = generate(m, prompts, n=3, max_new_tokens=9, sampling=Sampling(temperature=1.0, top_k=50, top_p=0.9), seed=3)
    # (a) the uncached model forward, plain log_softmax over its logits: within 1e-4
    for r in range(out.tokens.shape[0]):
        ids, pv = prompts[r // 3]
        toks = out.response(r)
        with torch.no_grad():
            logits = m(torch.tensor([ids + toks]), pv)[0].float()
        lp = logits.log_softmax(-1)[len(ids) - 1:-1]  # position t predicts token t+1
        assert len(toks) == 9
        torch.testing.assert_close(out.logprobs[r], lp.gather(-1, torch.tensor(toks)[:, None])[:, 0], atol=1e-4,
                                   rtol=0)
        torch.testing.assert_close(out.entropies[r], -(lp.exp() * lp).sum(-1), atol=1e-4, rtol=0)
    # (b) the trainer's batched forward + model.token_logprobs: within 1e-5 (the GRPO ratio starts at 1)
    for r, (logp, ent) in enumerate(full_forward_logp(m, prompts, out)):
        torch.testing.assert_close(out.logprobs[r], logp, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.entropies[r], ent, atol=1e-5, rtol=0)


def test_triton_path_matches_reference_path(models, prompts, monkeypatch):
    # the whole sampler with the Triton decode kernels (interpreter) gives the same rollouts as the reference
    _, m = models
    kw = dict(n=2, max_new_tokens=4, sampling=Sampling(temperature=1.0), seed=5, sync_every=2)
    monkeypatch.setattr(decode_kernels, "USE_TRITON", False)
    a = generate(m, prompts[1:3], **kw)
    monkeypatch.setattr(decode_kernels, "USE_TRITON", True)
    b = generate(m, prompts[1:3], **kw)
    c = generate(m, prompts[1:3], cuda_graph=True, **kw)  # the static path: tensor positions, full-length bounds
    same(a, b)
    same(a, c)


def test_seeds_are_per_prompt(models, prompts):
    # a prompt's samples depend on its seed only: not on the other prompts of the call, their order or the chunking
    # (so 1 rank, 2 ranks or a tensor-parallel group give a prompt the same samples)
    _, m = models
    kw = dict(n=4, max_new_tokens=8, sampling=Sampling(temperature=1.0))
    a = generate(m, prompts, seed=[10, 11, 12, 13], **kw)
    b = generate(m, prompts[2:] + prompts[:2], seed=[12, 13, 10, 11], **kw)
    c = generate(m, [prompts[2]], seed=[12], **kw)
    ta, tb, tc = [r[0] for r in rows(a)], [r[0] for r in rows(b)], [r[0] for r in rows(c)]
    assert ta[8:] + ta[:8] == tb and ta[8:12] == tc
    d = generate(m, prompts, seed=[10, 11, 12, 99], **kw)
    assert [r[0] for r in rows(d)][:12] == ta[:12] and [r[0] for r in rows(d)][12:] != ta[12:]
    for p in range(4):  # the n samples of one prompt differ at temperature 1
        assert len({tuple(t) for t in ta[4 * p:4 * p + 4]}) == 4


def test_eos_and_length_per_row(models, prompts):
    _, m = models
    base = generate(m, prompts, n=2, max_new_tokens=12, sampling=Sampling(temperature=0.7), seed=2)
    # as EOS ids: tokens that occur at different steps in different rows
    eos = [base.response(0)[2], base.response(5)[6]]
    for sync_every, compact in ((1, True), (4, True), (4, False), (100, True)):
        out = generate(m, prompts, n=2, max_new_tokens=12, sampling=Sampling(temperature=0.7), seed=2, eos_token_id=eos,
                       sync_every=sync_every, compact=compact)
        for r in range(out.tokens.shape[0]):  # each row cut at its own first EOS, else max_new_tokens
            full = base.response(r)
            cut = next((i for i, t in enumerate(full) if t in eos), None)
            if cut is None:
                assert bool(out.truncated[r]) and out.response(r) == full
            else:
                assert not out.truncated[r] and out.response(r) == full[:cut + 1]  # the EOS itself is included
                torch.testing.assert_close(out.logprobs[r, :cut + 1], base.logprobs[r, :cut + 1], atol=1e-5, rtol=0)
            assert (out.tokens[r, out.lengths[r]:] == 0).all() and (out.logprobs[r, out.lengths[r]:] == 0).all()
    assert out.truncated.any() and not out.truncated.all()


def test_sampling_options(models, prompts, monkeypatch):
    _, m = models
    greedy = generate(m, prompts[:2], n=2, max_new_tokens=6, sampling=Sampling(temperature=0))
    for s in (Sampling(top_k=1), Sampling(top_p=1e-6)):  # both reduce to the argmax
        out = generate(m, prompts[:2], n=2, max_new_tokens=6, sampling=s)
        assert [r[0] for r in rows(out)] == [r[0] for r in rows(greedy)], s
    banned = sorted({t for r in rows(greedy) for t in r[0]})
    seen, real = [], sampler.sample_next

    def spy(logits, u, sampling, ban):
        seen.append(ban)
        return real(logits, u, sampling, ban)
    monkeypatch.setattr(sampler, "sample_next", spy)
    for s in (Sampling(temperature=0, ban=banned), Sampling(ban=banned)):  # greedy, and plain sampling's fast path
        seen.clear()
        out = generate(m, prompts[:2], n=2, max_new_tokens=6, sampling=s, seed=1)
        assert all(t not in banned for r in rows(out) for t in r[0])
        # log-probs stay those of the raw distribution: a banned-token run still reports raw log p (< 0, finite)
        assert all(-1e9 < lp <= 0 for r in rows(out) for lp in r[1].tolist())
        # the ids went to the device once for the call, not once per decode step (a copy per step would sync)
        assert len(seen) == 6 and all(b is seen[0] for b in seen) and seen[0].tolist() == banned


def test_sampling_mode_checks_and_chunks():
    # one object says which path sample_next takes and what the memory accounting charges for it
    assert Sampling().mode == "sample" and Sampling(temperature=0, top_k=5).mode == "greedy"
    assert {Sampling(temperature=0.7).mode, Sampling(top_k=5).mode, Sampling(top_p=0.9).mode} == {"shaped"}
    s = Sampling(ban=[7, 3, 7]).banning((1, 3))
    assert s.ban == (1, 3, 7) and s.mode == "sample" and Sampling(ban=[3]) == Sampling(ban=(3,))
    for bad in (dict(temperature=-1), dict(top_k=-1), dict(top_p=0), dict(top_p=1.5)):
        with pytest.raises(ValueError, match="sampler.py"):
            Sampling(**bad)
    with pytest.raises(ValueError, match="device tensor"):  # bans are the caller's tensor, never copied per step
        sampler.sample_next(torch.zeros(1, 8), torch.rand(1), Sampling(ban=(1,)))
    # fit_chunks charges the mode's buffers: a budget that holds 2 greedy prompts holds 1 shaped or banning one
    cfg = VLMConfig(image_size=16, patch_size=8, vit_hidden=16, vit_heads=2, vit_mlp=32, vocab_size=32, n_embd=32,
                    n_head=4, n_kv_head=1, mlp_hidden=64, n_layer=2, image_token_id=31)
    budget = sampler.cache_bytes(cfg, 2, 2, 5, 4, torch.float32) + sampler.decode_bytes(cfg, 4, 4, "greedy", False) + \
        sampler.prefill_bytes(cfg, 16384, torch.float32)
    chunks = lambda s: sampler.fit_chunks(cfg, [5] * 4, 2, 4, torch.float32, budget, s)  # noqa: E731
    assert chunks(Sampling(temperature=0)) == [(0, 2), (2, 4)]
    assert chunks(Sampling(top_p=0.9)) == chunks(Sampling(ban=(1,))) == [(0, 1), (1, 2), (2, 3), (3, 4)]


def test_budget_chunks_and_refusal(models, prompts):
    # a budget that holds two prompts at a time splits the call into chunks; the rollouts are the same
    _, m = models
    kw = dict(n=3, max_new_tokens=8, sampling=Sampling(temperature=1.0), seed=[1, 2, 3, 4])
    one, st1 = {}, {}
    a = generate(m, prompts, stats=one, **kw)
    lengths = [len(p[0]) for p in prompts]
    two = sampler.cache_bytes(m.cfg, 2, 3, max(lengths), 8, torch.float32) + sampler.decode_bytes(m.cfg, 6, 8) + \
        sampler.prefill_bytes(m.cfg, 16384, torch.float32)
    b = generate(m, prompts, budget=two, stats=st1, **kw)
    assert one["chunks"] == 1 and st1["chunks"] >= 2
    same(a, b)
    with pytest.raises(MemoryError, match="budget"):  # not even one prompt fits: a clear error before any work
        generate(m, prompts, n=8, max_new_tokens=100, budget=10_000)
    m.train()
    generate(m, prompts[:1], max_new_tokens=2)
    assert m.training  # train mode restored
    m.eval()
    with pytest.raises(ValueError, match=r"prompts\[0\]"):  # image tokens without pixels
        generate(m, [(prompts[0][0], None)], max_new_tokens=2)


def test_cpu_budget_is_this_ranks_share_of_the_host(monkeypatch):
    # torchrun's ranks on one host share its RAM: each may plan for 1/LOCAL_WORLD_SIZE of what is available, not all
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    whole = sampler.memory_budget(torch.device("cpu"))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    share = sampler.memory_budget(torch.device("cpu"))
    assert whole > 0 and 3.5 < whole / share < 4.5


def test_compaction_shrinks_batch():
    # many rows end early: compaction must drop them (decode batch shrinks) and not change any output; the static
    # bucketed path (what CUDA graphs replay) gives the same rollouts
    torch.manual_seed(0)
    cfg = VLMConfig(image_size=16, patch_size=8, vit_hidden=16, vit_heads=2, vit_mlp=32, vocab_size=32, n_embd=32,
                    n_head=4, n_kv_head=1, mlp_hidden=64, n_layer=2, image_token_id=31)
    m = VLM(cfg)
    ps = [([1, 2, 3], None), ([4, 5, 6, 7, 8], None)]
    kw = dict(n=6, max_new_tokens=20, sampling=Sampling(temperature=1.0), eos_token_id=[0, 1, 2], seed=4, sync_every=2)
    a = generate(m, ps, compact=True, **kw)
    b = generate(m, ps, compact=False, **kw)
    c = generate(m, ps, compact=True, cuda_graph=True, **kw)
    assert a.truncated.sum() < len(a.truncated) - 3  # most rows ended early: the batch did shrink
    same(a, b)
    same(a, c)


def test_cli(hf_dir, tmp_path, capsys):
    from PIL import Image
    img = tmp_path / "x.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(img)
    out, texts = sample.main([f"--init_from={hf_dir[1]}", f"--image={img}", "--question=t5 t6 t7",
                              "--max_new_tokens=5", "--group_size=2", "--temperature=1.0", "--show_entropy=True"])
    printed = capsys.readouterr().out
    assert out.tokens.shape[0] == 2 and all(1 <= int(L) <= 5 for L in out.lengths)
    assert "entropy" in printed and texts[0] in printed


FSDP_SCRIPT = r"""
import copy, os, sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
sys.path.insert(0, os.getcwd())
from model import VLM, VLMConfig
import sampler
dist.init_process_group("gloo", rank=0, world_size=1)
torch.manual_seed(0)
cfg = VLMConfig(image_size=16, patch_size=8, vit_hidden=16, vit_heads=2, vit_mlp=32, vocab_size=32, n_embd=32,
                n_head=4, n_kv_head=1, mlp_hidden=64, n_layer=2, image_token_id=31, tie_embeddings=True)
m = VLM(cfg)
ref = copy.deepcopy(m)
fully_shard(m.vit)
for b in m.llm.blocks:
    fully_shard(b)
fully_shard(m)
ps = [([1, 2, 3], None), ([4, 5, 6, 7, 8], None)]
toks = lambda out: [out.response(r) for r in range(out.tokens.shape[0])]
greedy = sampler.Sampling(temperature=0)
a = sampler.generate(ref, ps, n=2, max_new_tokens=6, sampling=greedy)
with sampler.unsharded(m) as view:
    assert not any(type(p).__name__ == "DTensor" for p in view.parameters())
    b = sampler.generate(view, ps, n=2, max_new_tokens=6, sampling=greedy)
    b2 = sampler.generate(m, ps, n=2, max_new_tokens=6, sampling=greedy)  # nested: the outer gather is reused
c = sampler.generate(m, ps, n=2, max_new_tokens=6, sampling=greedy)  # generate() gathers by itself
assert toks(a) == toks(b) == toks(b2) == toks(c)
assert all(type(p).__name__ == "DTensor" for p in m.parameters())  # resharded afterwards
m(torch.tensor([[1, 2, 3]])).sum().backward()  # training still works after the rollout
print("FSDP_OK")
dist.destroy_process_group()
"""


def test_fsdp2_unsharded_rollout(tmp_path):
    # FSDP2 on CPU/gloo, one process, in a subprocess so no process group leaks into the other tests
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    r = subprocess.run([sys.executable, "-c", FSDP_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "FSDP_OK" in r.stdout, r.stderr[-2000:]
