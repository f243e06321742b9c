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

    def spy(logits, u, sampling, ban, *rest):
        seen.append(ban)
        return real(logits, u, sampling, ban, *rest)
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
    # (the margin comes off each share: undo it to compare the shares)
    free = lambda b: (b + sampler.BUDGET_RESERVE["cpu"]) / sampler.BUDGET_FRACTION  # noqa: E731
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    whole = sampler.memory_budget(torch.device("cpu"))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    share = sampler.memory_budget(torch.device("cpu"))
    assert whole > 0 and 3.5 < free(whole) / free(share) < 4.5


def test_cpu_budget_counts_the_reclaimable_page_cache(monkeypatch):
    # the host's available RAM is MemAvailable (free pages + reclaimable page cache), not the free pages alone: after
    # a checkpoint is read the page cache holds gigabytes the kernel gives back on demand
    if not os.path.isfile("/proc/meminfo"):
        pytest.skip("no /proc/meminfo (not Linux)")
    with open("/proc/meminfo") as f:
        kb = {line.split(":")[0]: int(line.split()[1]) for line in f}
    got = sampler.host_available()
    assert abs(got - kb["MemAvailable"] * 1024) < 512 * 2**20  # the two reads are a moment apart
    free_pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert got >= free_pages - 512 * 2**20
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(sampler, "host_available", lambda: 10 * 2**30)
    assert sampler.memory_budget(torch.device("cpu")) == sampler.budget_from_free(10 * 2**30, "cpu")


def test_budget_keeps_a_margin_and_counts_cuda_graphs():
    # memory_budget: 90% of the free memory minus a fixed reserve (1 GiB on CUDA, 256 MiB on the CPU), never < 0;
    # `free` stands in for the measurement, so the CUDA arithmetic runs here without a GPU
    GiB = 1 << 30
    assert sampler.memory_budget(torch.device("cuda"), free=10 * GiB) == int(9 * GiB) - GiB
    assert sampler.memory_budget(torch.device("cpu"), free=10 * GiB) == int(9 * GiB) - 256 * (1 << 20)
    assert sampler.memory_budget(torch.device("cuda"), free=GiB) == 0
    # CudaGraphStep's graphs are charged when the chunk decodes with them: each bucket's output logits (the buckets
    # sum to < 3 rows) and the shared pool's one largest step
    for R in range(1, 300):
        b = sampler.graph_buckets(R)
        assert b[0] == R and b == sorted(b, reverse=True) and sum(b) < 3 * R and b[-1] == 1
    cfg = VLMConfig(image_size=16, patch_size=8, vit_hidden=16, vit_heads=2, vit_mlp=32, vocab_size=512, n_embd=32,
                    n_head=4, n_kv_head=1, mlp_hidden=64, n_layer=2, image_token_id=31)
    e = torch.float32
    two = sampler.cache_bytes(cfg, 2, 4, 5, 6, e) + sampler.decode_bytes(cfg, 8, 6, "greedy", False) + \
        sampler.prefill_bytes(cfg, 16384, e)
    chunks = lambda g: sampler.fit_chunks(cfg, [5] * 4, 4, 6, e, two, Sampling(temperature=0), cuda_graph=g)  # noqa
    assert chunks(False) == [(0, 2), (2, 4)] and chunks(True) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert sampler.graph_bytes(cfg, 8, e) > sum(sampler.graph_buckets(8)) * cfg.vocab_size * 4


class FakeGraphs:
    """torch.cuda's graph API recorded, not run: what CudaGraphStep asks for (pools, capture order) on a CPU."""

    def __init__(self, monkeypatch):
        self.captures, self.pools = [], []
        fake = self

        class Graph:
            def replay(self):
                pass

        class Capture:
            def __init__(self, g, pool=None):
                fake.captures.append(pool)

            def __enter__(self):
                return self

            def __exit__(self, *a):
                return False

        def pool_handle():
            fake.pools.append(object())
            return fake.pools[-1]

        class Stream:
            def wait_stream(self, s):
                pass
        from contextlib import nullcontext
        for name, v in dict(graph_pool_handle=pool_handle, CUDAGraph=Graph, graph=Capture, Stream=Stream,
                            stream=lambda s: nullcontext(), current_stream=Stream).items():
            monkeypatch.setattr(torch.cuda, name, v)


def test_cuda_graphs_share_one_pool_largest_first(monkeypatch):
    # every bucket's capture gets the same graph_pool_handle(), and decode's buckets come largest first (the order
    # graph_buckets gives), so the pool holds one step's temporaries, not one per bucket. The real capture and the
    # replays are unverified here (no GPU): tools/gpu_check.py runs them
    fake = FakeGraphs(monkeypatch)
    torch.manual_seed(0)
    cfg = VLMConfig(image_size=16, patch_size=8, vit_hidden=16, vit_heads=2, vit_mlp=32, vocab_size=32, n_embd=32,
                    n_head=4, n_kv_head=1, mlp_hidden=64, n_layer=2, image_token_id=31)
    m = VLM(cfg).eval()
    cache = sampler.DecodeCache(cfg, 2, 6, 5, 8, torch.float32, "cpu", static=True)
    cache.start(torch.tensor([3, 5]))
    step = sampler.CudaGraphStep(m, cache, model_lm_head_weight(m))
    with torch.no_grad():
        for B in (12, 12, 8, 8, 2, 1):
            assert step(torch.ones(B, dtype=torch.long)).shape == (B, cfg.vocab_size)
    assert len(fake.pools) == 1 and fake.captures == [fake.pools[0]] * 4 and step.order == [12, 8, 2, 1]
    # the static path's buckets as the batch empties: a subsequence of graph_buckets, largest first
    for R in (12, 16, 7):
        seen, B = [R], R
        for active in range(R, 0, -1):
            keep = sampler.should_compact(B, min(active, B), True, sampler.COMPACT_FRAC)
            if keep is not None:
                seen.append(keep)
                B = keep
        it = iter(sampler.graph_buckets(R))
        assert all(b in it for b in seen), (R, seen)


def model_lm_head_weight(m):
    import model
    return model.lm_head_weight(m.llm.lm_head.weight)


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


# -----------------------------------------------------------------------------
# repetition penalty


def test_repetition_penalty_is_transformers_processor():
    # the same logits in, the same bits out as transformers' RepetitionPenaltyLogitsProcessor, from a seen-ids mask
    # instead of the token history (repeated ids, penalties above and below 1)
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
    g = torch.Generator().manual_seed(0)
    B, V = 5, 64
    logits = torch.randn(B, V, generator=g) * 3
    hist = torch.randint(0, V, (B, 30), generator=g)
    seen = torch.zeros(B, V, dtype=torch.bool).scatter_(1, hist, True)
    for p in (1.05, 1.3, 0.8):
        want = RepetitionPenaltyLogitsProcessor(p)(hist, logits.clone())
        got = sampler.repetition_penalty(logits, seen, p)
        assert torch.equal(got, want) and not torch.equal(got, logits), p
    # seen_mask: each prompt's ids (repeats once), the same for its n rows (G samples share one prefill)
    s = sampler.seen_mask([([3, 5, 3, 9], None), ([7], None)], 2, 12, "cpu")
    assert s.shape == (4, 12) and [r.nonzero()[:, 0].tolist() for r in s] == [[3, 5, 9]] * 2 + [[7]] * 2
    # the Sampling field: its mode, its check, and sample_next refuses to run without the mask
    assert Sampling(repetition_penalty=1.05).mode == "shaped" and Sampling(repetition_penalty=1.05).penalizes
    assert Sampling(temperature=0, repetition_penalty=1.05).mode == "greedy" and not Sampling().penalizes
    for bad in (0.0, -1.05):
        with pytest.raises(ValueError, match="repetition_penalty"):
            Sampling(repetition_penalty=bad)
    with pytest.raises(ValueError, match="seen"):
        sampler.sample_next(torch.zeros(1, 8), torch.rand(1), Sampling(repetition_penalty=1.05))
    # the penalty shapes what is drawn, never the log-probs: greedy picks the unseen id, logp is the raw one
    x = torch.tensor([[2.0, 1.9, -1.0]])
    tok, logp, ent = sampler.sample_next(x, torch.rand(1), Sampling(temperature=0, repetition_penalty=1.3),
                                         seen=torch.tensor([[True, False, False]]))
    assert tok.item() == 1 and torch.allclose(logp, x.log_softmax(-1)[:, 1])


def test_repetition_penalty_memory_is_charged():
    # decode_bytes charges a penalty's buffers (REP_BYTES: decode's seen mask + the where() transient): greedy's
    # measured peak matches it within 15%; the sampling paths stay under it (their own peaks are higher)
    from plan_worker import LiveBytes
    V, R = 4096, 64
    logits, u, seen = torch.randn(R, V), torch.rand(R), torch.rand(R, V) < 0.3
    for s in (Sampling(temperature=0, repetition_penalty=1.05), Sampling(repetition_penalty=1.05),
              Sampling(temperature=0.7, top_p=0.9, repetition_penalty=1.05)):
        live = LiveBytes()
        with live:
            sampler.sample_next(logits, u, s, seen=seen)
        # the input logits and the seen mask exist before sample_next runs
        predicted = sampler.decode_bytes(VLMConfig(vocab_size=V), R, 0, s.mode, False, True) - (4 + 1) * R * V
        assert live.peak <= 1.15 * predicted, s
        if s.mode == "greedy":
            assert live.peak >= 0.85 * predicted and live.peak > (sampler.DECODE_BYTES["greedy"] - 4) * R * V * 1.15


def hf_greedy_penalty(hf, ids, pv, max_new_tokens, penalty):
    kw = dict(pixel_values=pv) if pv is not None else {}
    out = hf.generate(input_ids=torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                      repetition_penalty=penalty, **kw)
    return out[0, len(ids):].tolist()


def test_repetition_penalty_greedy_matches_transformers(models, prompts):
    # greedy decoding with transformers' generate(repetition_penalty=p): the same tokens, for 1.05 (R1V3's
    # inference value) and 1.3, eager and static paths, n=2 samples sharing one prefill; the penalty does change
    # the rollouts here (the check can fail), and the log-probs stay the trainer's raw ones
    hf, m = models
    plain = generate(m, prompts, n=1, max_new_tokens=10, sampling=Sampling(temperature=0))
    # and a prompt that already holds the tokens its greedy continuation repeats: the prompt's ids count as seen
    prompts = prompts + [(prompts[2][0] + plain.response(2)[:3], prompts[2][1])]
    plain = generate(m, prompts, n=1, max_new_tokens=10, sampling=Sampling(temperature=0))
    for p in (1.05, 1.3):
        s = Sampling(temperature=0, repetition_penalty=p)
        out = generate(m, prompts, n=2, max_new_tokens=10, sampling=s, sync_every=3)
        static = generate(m, prompts, n=2, max_new_tokens=10, sampling=s, sync_every=3, cuda_graph=True)
        same(out, static)
        changed = 0
        for i, (ids, pv) in enumerate(prompts):
            want = hf_greedy_penalty(hf, ids, pv, 10, p)
            assert out.response(2 * i) == out.response(2 * i + 1) == want, f"penalty {p} prompt {i}"
            changed += want != plain.response(i)
        assert changed >= 1, p
        for r, (logp, _) in enumerate(full_forward_logp(m, prompts, out)):
            torch.testing.assert_close(out.logprobs[r], logp, atol=1e-5, rtol=0)


def test_repetition_penalty_sampled_rows_match_a_reference(models, prompts):
    # sampled rows (temperature, top-p, penalty, G samples of one prefill, rows ending at different times, compacted
    # at every sync, and the static path): each token is the one drawn with the row's own uniform from transformers'
    # processor applied to the uncached forward's logits over the row's whole sequence
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
    _, m = models
    ps, n, new, seeds = prompts[:2], 3, 8, [5, 6]
    vision = [hx.IMG_CONTEXT_ID]  # as rollouts do: an image-context token without its image cannot be re-forwarded
    s = Sampling(temperature=0.8, top_p=0.95, repetition_penalty=1.3, ban=vision)
    base = generate(m, ps, n=n, max_new_tokens=new, sampling=s, seed=seeds)
    eos = [base.response(0)[2]]
    u = sampler.draw_uniforms(seeds, n, new, "cpu")
    plain = Sampling(temperature=0.8, top_p=0.95, ban=vision)
    for kw in (dict(compact=0.0, sync_every=1), dict(compact=False), dict(cuda_graph=True, sync_every=1)):
        out = generate(m, ps, n=n, max_new_tokens=new, sampling=s, seed=seeds, eos_token_id=eos, **kw)
        assert not out.truncated.all() and out.truncated.any()
        for r in range(n * len(ps)):
            ids, pv = ps[r // n]
            toks = out.response(r)
            for t, want in enumerate(toks):
                with torch.no_grad():
                    logits = m(torch.tensor([ids + toks[:t]]), pv)[:, -1].float()
                x = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([ids + toks[:t]]), logits)
                tok = sampler.sample_next(x, u[r, t:t + 1], plain, torch.tensor(vision))[0]
                assert tok.item() == want, (kw, r, t)

# -----------------------------------------------------------------------------
# compaction: only when it pays, the same rollouts whenever it happens


def test_compaction_rule():
    assert sampler.compact_rule(True) == sampler.COMPACT_FRAC == 0.25 and sampler.compact_rule(False) is None
    assert sampler.compact_rule(0.0) == 0.0 and sampler.compact_rule(0.5) == 0.5
    with pytest.raises(ValueError, match="compact"):
        sampler.compact_rule(1.5)
    sc = sampler.should_compact
    assert sc(16, 15, False, 0.25) is None and sc(16, 13, False, 0.25) is None and sc(16, 12, False, 0.25) == 12
    assert sc(16, 15, False, 0.0) == 15 and sc(16, 16, False, 0.0) is None and sc(16, 1, False, None) is None
    # static: the power-of-2 bucket of the active rows, once it is smaller than the batch
    assert sc(16, 9, True, 0.25) is None and sc(16, 8, True, 0.25) == 8 and sc(12, 5, True, 0.25) == 8


def tiny_vlm(vocab=32):
    torch.manual_seed(0)
    cfg = VLMConfig(image_size=16, patch_size=8, vit_hidden=16, vit_heads=2, vit_mlp=32, vocab_size=vocab, n_embd=32,
                    n_head=4, n_kv_head=1, mlp_hidden=64, n_layer=2, image_token_id=vocab - 1)
    return VLM(cfg)


def test_compaction_only_when_it_pays():
    # one row of 16 finishes early: the old rule (compact=0.0) copies every layer's K/V for it, the default waits
    # for a quarter of the batch. The rollouts are bit-identical whatever the rule (off, default, 0.0, 0.5)
    m = tiny_vlm(vocab=64)
    ps = [([1, 2, 3], None), ([4, 5, 6, 7, 8], None)]
    kw = dict(n=8, max_new_tokens=12, sampling=Sampling(temperature=1.0, repetition_penalty=1.05), seed=4,
              sync_every=1)
    base = generate(m, ps, **kw)
    rows_with = lambda t: [r for r in range(16) if t in base.response(r)[:-2]]  # noqa: E731
    lone = next(t for t in range(64) if len(rows_with(t)) == 1 and
                not any(t in base.response(r) for r in range(16) if r not in rows_with(t)))
    fields = ("tokens", "logprobs", "entropies", "lengths", "truncated")

    def run(eos, compact):  # -> (Rollouts, compactions)
        st = {}
        return generate(m, ps, eos_token_id=eos, compact=compact, stats=st, **kw), st["compactions"]
    rules = ("off", False), ("default", True), ("every finished row", 0.0), ("half", 0.5)  # False == 0.0 as keys
    runs = {name: run([lone], c) for name, c in rules}
    ref = runs["off"][0]
    assert int(ref.truncated.sum()) == 15  # exactly one row ended early
    assert runs["every finished row"][1] >= 1
    assert runs["default"][1] == runs["half"][1] == runs["off"][1] == 0
    for name, (o, _) in runs.items():
        assert all(torch.equal(getattr(o, f), getattr(ref, f)) for f in fields), name
    # most rows end early (eos ids 0-2 too): the default compacts as well, less often than the old rule, same bits
    runs = {name: run([0, 1, 2, lone], c) for name, c in rules[:3]}
    ref = runs["off"][0]
    assert int(ref.truncated.sum()) <= 8
    assert runs["off"][1] == 0 and 1 <= runs["default"][1] < runs["every finished row"][1]
    for name, (o, _) in runs.items():
        assert all(torch.equal(getattr(o, f), getattr(ref, f)) for f in fields), name

# -----------------------------------------------------------------------------
# one lm_head for the sampler and the trainer; the entropy only when it is used


def test_one_lm_head_for_sampler_and_trainer(models, prompts, monkeypatch):
    # the sampler's logits (prefill, every decode step) and the trainer's log-probs (token_logprobs' chunks) go
    # through the same model.lm_head_logits: whatever that function does on a device, both sides do it
    import model
    _, m = models
    assert sampler.lm_head_logits is model.lm_head_logits and sampler.lm_head_weight is model.lm_head_weight
    calls, real = [], model.lm_head_logits

    def spy(h, w):
        calls.append(h.shape[0])
        return real(h, w)
    monkeypatch.setattr(model, "lm_head_logits", spy)
    monkeypatch.setattr(sampler, "lm_head_logits", spy)
    out = generate(m, prompts[:2], n=2, max_new_tokens=4, sampling=Sampling(temperature=0))
    assert calls == [2, 4, 4, 4]  # the prefill's last positions, then 3 decode steps of 4 rows
    calls.clear()
    full_forward_logp(m, prompts[:2], out)
    assert calls == [4 * 4]  # the trainer's response positions (4 rows x 4 tokens), one chunk


def test_lm_head_cuda_branch_plumbing_on_meta(monkeypatch):
    # the CUDA branch (bf16 inputs, fp32 accumulation and output: torch.mm(..., out_dtype=torch.float32), no autograd
    # formula in torch, hence model._MMBF16F32) run on the meta device, which has mm.dtype's shapes and dtypes but no
    # numbers: output fp32, the weight used in bf16 (no fp32 copy), gradients of the inputs' shapes and dtypes.
    # The numerics need a GPU (unverified here). On the CPU the path is today's fp32 matmul, bit for bit.
    import model
    V, C, N = 40, 16, 6
    w, h = torch.randn(V, C), torch.randn(N, C)
    assert model.lm_head_weight(w) is w and torch.equal(model.lm_head_logits(h, w), h @ w.t())
    monkeypatch.setattr(model, "MM_OUT_DTYPE_DEVICES", ("meta",))
    wm = torch.empty(V, C, device="meta", dtype=torch.bfloat16, requires_grad=True)
    hm = torch.empty(N, C, device="meta", dtype=torch.float32, requires_grad=True)
    assert model.lm_head_weight(wm) is wm  # a bf16 weight is used as it is
    y = model.lm_head_logits(hm, model.lm_head_weight(wm))
    assert y.dtype == torch.float32 and y.shape == (N, V) and type(y.grad_fn).__name__ == "_MMBF16F32Backward"
    y.sum().backward()
    assert (hm.grad.dtype, hm.grad.shape, wm.grad.dtype, wm.grad.shape) == (torch.float32, (N, C), torch.bfloat16,
                                                                          (V, C))
    w32 = torch.empty(V, C, device="meta", requires_grad=True)  # fp32 masters: cast to bf16, differentiably
    model.lm_head_logits(hm, model.lm_head_weight(w32)).sum().backward()
    assert model.lm_head_weight(w32).dtype == torch.bfloat16 and w32.grad.dtype == torch.float32


def test_unused_entropy_is_not_computed(models, prompts):
    # the update's forward without an entropy bonus: with_entropy=False computes no entropy (no exp over the
    # (tokens x vocab) log-probs, neither in the forward nor in the checkpoint's recompute), same log-probs and grads
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountExp(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountExp.n += func is torch.ops.aten.exp.default
            return func(*args, **(kwargs or {}))
    _, m = models
    ids, pv = prompts[0]
    x = torch.tensor([ids + [5, 6, 7]])
    mask = torch.zeros(x.shape)
    mask[0, len(ids) - 1:-1] = 1
    got = {}
    for with_entropy in (True, False):
        m.zero_grad(set_to_none=True)
        CountExp.n = 0
        with CountExp():
            logp, ent = m(x, pv, targets=torch.roll(x, -1, 1), target_mask=mask, with_entropy=with_entropy)
            logp.sum().backward()
        got[with_entropy] = (logp.detach(), m.llm.lm_head.weight.grad.clone(), CountExp.n, ent)
    m.zero_grad(set_to_none=True)
    assert got[False][3] is None and got[True][3] is not None
    assert got[False][2] == 0 and got[True][2] >= 2  # the entropy's exp, in the forward and again in the recompute
    assert torch.equal(got[True][0], got[False][0]) and torch.equal(got[True][1], got[False][1])


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
