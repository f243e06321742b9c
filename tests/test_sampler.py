"""
sampler.py: Triton kernels vs their PyTorch references (under TRITON_INTERPRET=1 on CPU, set by conftest.py),
greedy parity with transformers' generate(), cached decode vs the uncached forward, the sampler's log-probs vs
the training forward's, seeding, EOS / stop / max_new_tokens per row, compaction, the cache-size check.
"""
import pytest
import torch

import hf_fixtures as hx
import sampler
from model import VLM, VLMConfig
from sampler import cache_append, decode_attention, generate

TPT = hx.TOKENS_PER_TILE


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # conftest.py sets 2 torch threads; on the shared 2-core machine, while another job holds a core, every small
    # op then waits at an OpenMP barrier (measured: one tiny generate() 0.07 s with 1 thread, 4.8 s with 2)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rand_prompt(g, n_text, n_tiles):
    # text tokens, an image span of n_tiles tiles somewhere after the first token, more text
    ids = torch.randint(0, hx.N_REGULAR, (n_text,), generator=g).tolist()
    if n_tiles:
        ids = ids[:2] + [hx.IMG_START_ID] + [hx.IMG_CONTEXT_ID] * (TPT * n_tiles) + [hx.IMG_END_ID] + ids[2:]
    pv = torch.randn(n_tiles, 3, hx.IMAGE_SIZE, hx.IMAGE_SIZE, generator=g) if n_tiles else None
    return ids, pv


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    hf, d = hx.make_hf_model(tmp_path_factory.mktemp("sampler"))
    hx.write_tokenizer(d)
    return hf, d


@pytest.fixture(scope="module")
def models(hf_dir):
    hf, d = hf_dir
    return hf, VLM.from_pretrained(d)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    return [rand_prompt(g, 7, 1), rand_prompt(g, 3, 0), rand_prompt(g, 12, 2), rand_prompt(g, 5, 1)]

# -----------------------------------------------------------------------------
# kernels: Triton (interpreter) == reference


@pytest.mark.parametrize("G,dtype", [(1, torch.float32), (2, torch.float32), (4, torch.float32),
                                     (8, torch.float32), (4, torch.float16), (2, torch.bfloat16)])
def test_decode_attention_triton_matches_ref(G, dtype):
    torch.manual_seed(G)
    B, n_kv, M, D = 4, 2, 80, 24  # head_dim 24 is not a power of 2: the masked tail of the block is exercised
    q = torch.randn(B, n_kv * G, D).to(dtype)
    # the cache is a view of a bigger buffer (as after compaction): strided rows, unused positions are garbage
    buf = torch.randn(2, B + 1, n_kv, M, D).to(dtype) * 3
    kc, vc = buf[0, :B], buf[1, :B]
    lens = torch.tensor([1, 17, 50, 80])  # ragged: 1 block, 2 blocks, several splits, the full cache
    ref = decode_attention(q, kc, vc, lens, use_triton=False)
    ref32 = decode_attention(q.float(), kc.float(), vc.float(), lens, use_triton=False)
    # block 16 x split 32 -> 3 splits, some empty for short rows; plus once the automatic split choice
    variants = [dict(block_n=16, split_len=32)] + ([dict(block_n=16, len_bound=70)] if G == 4 else [])
    for kw in variants:
        y = decode_attention(q, kc, vc, lens, use_triton=True, **kw)
        assert y.dtype == dtype and y.shape == q.shape
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(y.float(), ref.float(), atol=tol, rtol=tol)
        torch.testing.assert_close(y.float(), ref32, atol=2 * tol, rtol=2 * tol)
    # the data is sensitive to what is checked: row 0 (one position) returns exactly v[0], and reading one
    # position fewer per row changes the output
    torch.testing.assert_close(ref32[0], vc[0, :, 0].float().repeat_interleave(G, 0))
    short = decode_attention(q.float(), kc.float(), vc.float(), (lens - 1).clamp(min=1), use_triton=False)
    assert not torch.allclose(short[1:], ref32[1:], atol=1e-3)


@pytest.mark.parametrize("T,dtype", [(1, torch.float32), (3, torch.float32), (1, torch.bfloat16)])
def test_cache_append_triton_matches_ref(T, dtype):
    torch.manual_seed(T)
    B, n_kv, M, D = 3, 2, 20, 24
    buf = torch.randn(B + 1, 2, n_kv, M, D).to(dtype)  # k and v interleaved per row: strided row views
    k = torch.randn(B, n_kv, T, D).to(dtype)  # new k/v come in the cache dtype (the model's)
    v = torch.randn(B, n_kv, T, D).to(dtype)
    lens = torch.tensor([0, 5, M - T])
    outs = []
    for use in (False, True):
        base = buf.clone()
        kc, vc = base[:B, 0], base[1:, 1]
        cache_append(kc, vc, k, v, lens, use_triton=use)
        outs.append(base)
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    kc = outs[1][:B, 0]
    torch.testing.assert_close(kc[2, :, M - T:], k[2].to(dtype))  # written at its own position
    assert not torch.equal(outs[1], buf)
    torch.testing.assert_close(kc[1, :, :5], buf[1, 0, :, :5])  # positions before lens untouched


def copied_rows_attention(q, pk, pv, plen, gk, gv, glen, n, slot):
    """The plain layout the shared prefix replaces: each row's cache = its prompt's K/V copied in, then its own
    generated K/V; decode_attention_ref over that."""
    B, Lp, Lg = q.shape[0], pk.shape[2], gk.shape[2]
    prompt = slot // n
    kc = torch.zeros(B, pk.shape[1], Lp + Lg, pk.shape[3])
    vc = torch.zeros_like(kc)
    for b in range(B):
        p, L, g = int(prompt[b]), int(plen[prompt[b]]), int(glen[b])
        kc[b, :, :L], vc[b, :, :L] = pk[p, :, :L], pv[p, :, :L]
        kc[b, :, L:L + g], vc[b, :, L:L + g] = gk[b, :, :g], gv[b, :, :g]
    return decode_attention(q, kc, vc, plen[prompt] + glen, use_triton=False)


@pytest.mark.parametrize("G,n,n_kv", [(1, 3, 2), (2, 4, 2), (4, 2, 2), (16, 6, 1)])
def test_prefix_attention_matches_copied_rows(G, n, n_kv):
    # shared-prefix attention (prompt K/V once, merged by log-sum-exp with each row's own K/V) == attention over
    # rows with the prompt copied in; ragged prompt and generated lengths, compacted rows (slot), Triton == ref.
    # G=16, n=6: 96 query rows per prompt > 64, so the Triton path splits a prompt over 2 programs (kv_div=2)
    torch.manual_seed(G * n)
    P, Lp, Lg, D = 3, 21, 9, 24
    pk, pv = torch.randn(P, n_kv, Lp, D) * 2, torch.randn(P, n_kv, Lp, D)
    plen = torch.tensor([Lp, 5, 13])
    slot = torch.tensor([0, n - 1, n, 2 * n + 1, 2 * n])  # some samples of each prompt, not in order
    B = slot.numel()
    q = torch.randn(B, n_kv * G, D)
    gk, gv = torch.randn(B, n_kv, Lg, D) * 2, torch.randn(B, n_kv, Lg, D)
    glen = torch.tensor([1, 9, 4, 7, 2])
    want = copied_rows_attention(q, pk, pv, plen, gk, gv, glen, n, slot)
    for use in (False, True):
        y = sampler.prefix_attention(q, pk, pv, plen, gk, gv, glen, n, slot, use_triton=use)
        torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    # int lengths (every prompt / row has that many: no masks) and slot None (all P * n rows, in order)
    uses = (False, True) if G * n <= 16 else (False,)  # (the interpreter is slow on the big case)
    qa, ga, va = torch.randn(P * n, n_kv * G, D), torch.randn(P * n, n_kv, Lg, D), torch.randn(P * n, n_kv, Lg, D)
    want = copied_rows_attention(qa, pk, pv, torch.full((P,), Lp), ga, va, torch.full((P * n,), 6), n,
                                 torch.arange(P * n))
    for use in uses:
        y = sampler.prefix_attention(qa, pk, pv, Lp, ga, va, 6, n, None, use_triton=use)
        torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    # sensitive to both parts: one prompt position or one generated position fewer changes the rows that use them
    y = sampler.prefix_attention(q, pk, pv, plen, gk, gv, glen, n, slot, use_triton=False)
    assert not torch.allclose(sampler.prefix_attention(q, pk, pv, plen - 1, gk, gv, glen, n, slot), y, atol=1e-3)
    fewer = sampler.prefix_attention(q, pk, pv, plen, gk, gv, (glen - 1).clamp(min=1), n, slot)
    torch.testing.assert_close(fewer[0], y[0])  # row 0 has one generated token either way
    assert not torch.allclose(fewer[1:], y[1:], atol=1e-3)


def test_decode_cache_compaction_drops_prompts():
    # DecodeCache.keep_rows: the kept rows move to the front, prompts without active rows leave the prefix cache,
    # and every kept row's attention output is unchanged (its slot still finds its prompt and its own tokens)
    torch.manual_seed(0)
    cfg = VLMConfig(image_size=16, patch_size=8, vit_hidden=16, vit_heads=2, vit_mlp=32, vocab_size=32, n_embd=32,
                    n_head=4, n_kv_head=2, mlp_hidden=64, n_layer=2, image_token_id=31)
    P, n, Lp, T = 3, 2, 7, 5
    c = sampler.DecodeCache(cfg, P, n, Lp, T, use_triton=False)
    c.pk.normal_(), c.pv.normal_()
    c.start(torch.tensor([7, 3, 6]))
    c.gk[:, :, :, :3].normal_(), c.gv[:, :, :, :3].normal_()
    for _ in range(3):  # three generated tokens per row; the next step writes position 3
        c.advance()
    q = torch.randn(P * n, cfg.n_head, 1, cfg.head_dim)
    k, v = torch.randn(P * n, cfg.n_kv_head, 1, cfg.head_dim), torch.randn(P * n, cfg.n_kv_head, 1, cfg.head_dim)
    before = c.attend(1, q, k, v)  # (6, n_head, 1, hd)
    keep = torch.tensor([5, 2, 4])  # prompt 0 has no row left; rows reordered
    c.keep_rows(keep)
    assert c.P == 2 and c.plen.tolist() == [3, 6] and c.slot.tolist() == [3, 0, 2]
    assert c.lens.tolist() == [6 + 3, 3 + 3, 6 + 3]
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
    res = generate(m, prompts, n=2, max_new_tokens=10, temperature=0, sync_every=3)
    assert len(res) == 2 * len(prompts)
    for i, (ids, pv) in enumerate(prompts):  # 0, 1 and 2 tiles, lengths 3..23
        want = hf_greedy(hf, ids, pv, 10)
        for j in range(2):
            r = res[2 * i + j]
            assert r.prompt_index == i and r.finish_reason == "length"
            assert r.tokens == want, f"prompt {i} sample {j}: {r.tokens} != transformers {want}"


def full_forward_logp(m, prompts, res):
    """The training-side computation: one right-padded, uncached forward over prompt + response, then
    model.token_logprobs on the final hidden states (as grpo.py computes pi_theta)."""
    from model import token_logprobs
    seqs = [prompts[r.prompt_index][0] + r.tokens for r in res]
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s)
    pv = [prompts[r.prompt_index][1] for r in res if prompts[r.prompt_index][1] is not None]
    with torch.no_grad():
        h = m(ids, torch.cat(pv) if pv else None, return_hidden=True)
        logp, ent = token_logprobs(h[:, :-1], m.llm.lm_head.weight, ids[:, 1:])
    out = []
    for b, r in enumerate(res):
        P = len(prompts[r.prompt_index][0])
        out.append((logp[b, P - 1:P - 1 + len(r.tokens)], ent[b, P - 1:P - 1 + len(r.tokens)]))
    return out


def test_logprobs_match_uncached_and_training_forward(models, prompts):
    _, m = models
    res = generate(m, prompts, n=3, max_new_tokens=9, temperature=1.0, top_k=50, top_p=0.9, seed=3)
    # (a) the uncached model forward, plain log_softmax over its logits: within 1e-4
    for r in res:
        ids, pv = prompts[r.prompt_index]
        with torch.no_grad():
            logits = m(torch.tensor([ids + r.tokens]), pv)[0].float()
        lp = logits.log_softmax(-1)[len(ids) - 1:-1]  # position t predicts token t+1
        want_logp = lp.gather(-1, torch.tensor(r.tokens)[:, None])[:, 0]
        want_ent = -(lp.exp() * lp).sum(-1)
        assert len(r.tokens) == len(r.logprobs) == len(r.entropies) == 9
        torch.testing.assert_close(torch.tensor(r.logprobs), want_logp, atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor(r.entropies), want_ent, atol=1e-4, rtol=0)
    # (b) the trainer's batched forward + model.token_logprobs: within 1e-5 (the GRPO ratio starts at 1)
    for r, (logp, ent) in zip(res, full_forward_logp(m, prompts, res)):
        torch.testing.assert_close(torch.tensor(r.logprobs), logp, atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(r.entropies), ent, atol=1e-5, rtol=0)


def test_triton_path_matches_reference_path(models, prompts):
    # the whole sampler with the Triton decode kernels (interpreter) gives the same rollouts as the reference
    _, m = models
    kw = dict(n=2, max_new_tokens=4, temperature=1.0, seed=5, sync_every=2)
    a = generate(m, prompts[1:3], use_triton=False, **kw)
    b = generate(m, prompts[1:3], use_triton=True, **kw)
    for x, y in zip(a, b):
        assert x.tokens == y.tokens and x.finish_reason == y.finish_reason
        torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5, rtol=0)


def test_seed_and_sample_diversity(models, prompts):
    _, m = models
    kw = dict(n=4, max_new_tokens=8, temperature=1.0)
    a, b, c = generate(m, prompts[:2], seed=0, **kw), generate(m, prompts[:2], seed=0, **kw), \
        generate(m, prompts[:2], seed=1, **kw)
    assert [r.tokens for r in a] == [r.tokens for r in b]  # same seed -> same samples
    assert [r.tokens for r in a] != [r.tokens for r in c]
    for p in range(2):  # the n samples of one prompt differ at temperature 1
        group = [tuple(r.tokens) for r in a if r.prompt_index == p]
        assert len(set(group)) == 4


def test_eos_stop_and_length_per_row(models, prompts):
    _, m = models
    base = generate(m, prompts, n=2, max_new_tokens=12, temperature=0.7, seed=2)
    # pick as EOS ids tokens that occur at different steps in different rows, one more id as a stop id
    eos = [base[0].tokens[2], base[5].tokens[6]]
    stop_id = base[3].tokens[4]
    for sync_every, compact in ((1, True), (4, True), (4, False), (100, True)):
        res = generate(m, prompts, n=2, max_new_tokens=12, temperature=0.7, seed=2, eos_token_id=eos,
                       stop_token_ids=stop_id, sync_every=sync_every, compact=compact)
        for r, full in zip(res, base):  # each row cut at its own first EOS / stop id, else max_new_tokens
            cut = next((i for i, t in enumerate(full.tokens) if t in eos or t == stop_id), None)
            if cut is None:
                assert r.finish_reason == "length" and r.tokens == full.tokens
            else:
                assert r.tokens == full.tokens[:cut + 1]  # the EOS token itself is included
                assert r.finish_reason == ("eos" if full.tokens[cut] in eos else "stop")
                torch.testing.assert_close(torch.tensor(r.logprobs), torch.tensor(full.logprobs[:cut + 1]),
                                           atol=1e-5, rtol=0)
    reasons = {r.finish_reason for r in res}
    assert {"eos", "length"} <= reasons, reasons


def test_stop_strings(models, hf_dir, prompts):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(hf_dir[1])
    _, m = models
    base = generate(m, prompts[:2], n=2, max_new_tokens=10, temperature=0, tokenizer=tok)
    target = base[0].tokens[3:5]  # two consecutive tokens -> a stop string that completes at step 4
    s = tok.decode(target)
    res = generate(m, prompts[:2], n=2, max_new_tokens=10, temperature=0, tokenizer=tok, stop=[s], sync_every=3)
    assert res[0].tokens == base[0].tokens[:5] and res[0].finish_reason == "stop" and s in res[0].text
    for r, full in zip(res, base):
        assert (s in r.text) == (s in full.text)


def test_sampling_options(models, prompts):
    _, m = models
    greedy = generate(m, prompts[:2], n=2, max_new_tokens=6, temperature=0)
    for kw in (dict(top_k=1), dict(top_p=1e-6)):  # both reduce to the argmax
        res = generate(m, prompts[:2], n=2, max_new_tokens=6, temperature=1.0, **kw)
        assert [r.tokens for r in res] == [r.tokens for r in greedy], kw
    banned = sorted({t for r in greedy for t in r.tokens})
    res = generate(m, prompts[:2], n=2, max_new_tokens=6, temperature=0, ban_token_ids=banned)
    assert all(t not in banned for r in res for t in r.tokens)
    # logprobs stay those of the raw distribution: a banned-token run still reports raw log p (< 0, finite)
    assert all(-1e9 < lp <= 0 for r in res for lp in r.logprobs)


def test_cache_too_big_and_modes(models, prompts):
    _, m = models
    with pytest.raises(MemoryError, match="bytes"):
        generate(m, prompts, n=8, max_new_tokens=100, max_cache_bytes=10_000)
    m.train()
    generate(m, prompts[:1], max_new_tokens=2)
    assert m.training  # train mode restored
    m.eval()
    with pytest.raises(ValueError, match=r"prompts\[0\]"):  # image tokens without pixels
        generate(m, [(prompts[0][0], None)], max_new_tokens=2)


def test_compaction_shrinks_batch():
    # many rows end early: compaction must drop them (decode batch shrinks) and not change any output
    torch.manual_seed(0)
    cfg = VLMConfig(image_size=16, patch_size=8, vit_hidden=16, vit_heads=2, vit_mlp=32, vocab_size=32, n_embd=32,
                    n_head=4, n_kv_head=1, mlp_hidden=64, n_layer=2, image_token_id=31)
    m = VLM(cfg)
    ps = [([1, 2, 3], None), ([4, 5, 6, 7, 8], None)]
    kw = dict(n=6, max_new_tokens=20, temperature=1.0, eos_token_id=[0, 1, 2], seed=4)
    s1, s2 = {}, {}
    a = generate(m, ps, compact=True, sync_every=2, stats=s1, **kw)
    b = generate(m, ps, compact=False, sync_every=2, stats=s2, **kw)
    assert s1["compactions"] > 0
    for x, y in zip(a, b):
        assert x.tokens == y.tokens and x.finish_reason == y.finish_reason
        torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5, rtol=0)


def test_cli(hf_dir, tmp_path, capsys):
    from PIL import Image
    img = tmp_path / "x.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(img)
    res = sampler.main([f"--ckpt={hf_dir[1]}", f"--image={img}", "--question=t5 t6 t7", "--max_new_tokens=5",
                        "--show_entropy", "--device=cpu", "--dtype=float32"])
    out = capsys.readouterr().out
    assert len(res) == 1 and 1 <= len(res[0].tokens) <= 5
    assert "entropy" in out and res[0].text in out


FSDP_SCRIPT = r"""
import copy, os, sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
sys.path.insert(0, os.getcwd())
from model import VLM, VLMConfig
import sampler
dist.init_process_group("gloo", rank=0, world_size=1)
torch.manual_seed(0)
cfg = VLMConfig(image_size=16, patch_size=8, vit_hidden=16, vit_heads=2, vit_mlp=32, vocab_size=32, n_embd=32,
                n_head=4, n_kv_head=1, mlp_hidden=64, n_layer=2, image_token_id=31)
m = VLM(cfg)
ref = copy.deepcopy(m)
fully_shard(m.vit)
for b in m.llm.blocks:
    fully_shard(b)
fully_shard(m)
ps = [([1, 2, 3], None), ([4, 5, 6, 7, 8], None)]
a = sampler.generate(ref, ps, n=2, max_new_tokens=6, temperature=0)
with sampler.unsharded(m):
    b = sampler.generate(m, ps, n=2, max_new_tokens=6, temperature=0)
c = sampler.generate(m, ps, n=2, max_new_tokens=6, temperature=0)  # generate() gathers by itself
assert [x.tokens for x in a] == [x.tokens for x in b] == [x.tokens for x in c]
m(torch.tensor([[1, 2, 3]])).sum().backward()  # training still works after the rollout
print("FSDP_OK")
dist.destroy_process_group()
"""


def test_fsdp2_unsharded_rollout(tmp_path):
    # FSDP2 on CPU/gloo, one process, in a subprocess so no process group leaks into the other tests
    import os
    import socket
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", FSDP_SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "FSDP_OK" in r.stdout, r.stderr[-2000:]


COMPILE_SCRIPT = r"""
import os, sys
sys.path.insert(0, os.getcwd())
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import sampler
def build(fn, types, consts):
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))
for dt, bn in (("bf16", 64), ("fp32", 32)):
    for bg in (16, 64 if dt == "bf16" else 32):  # a shared prefix packs samples x GQA group query rows
        k = build(sampler._decode_attn_split_kernel,
                  dict(Q=f"*{dt}", K=f"*{dt}", V=f"*{dt}", Lens="*i64", MidO="*fp32", MidLse="*fp32", scale="fp32"),
                  dict(BLOCK_G=bg, BLOCK_N=bn, BLOCK_D=128, PRECISION="ieee" if dt == "fp32" else "tf32"))
        assert k.metadata.shared <= 100 * 1024, (dt, bg, k.metadata.shared)
        print(dt, bg, k.metadata.shared)
    build(sampler._decode_attn_reduce_kernel, dict(MidO="*fp32", MidLse="*fp32", Out=f"*{dt}"),
          dict(BLOCK_S=16, BLOCK_D=128))
    build(sampler._cache_append_kernel, dict(K=f"*{dt}", V=f"*{dt}", Kc=f"*{dt}", Vc=f"*{dt}", Lens="*i64"),
          dict(BLOCK_D=128))
print("COMPILED")
"""


def test_kernels_compile_for_h100():
    # no GPU here, but Triton can lower the kernels to sm_90 machine code (ptxas ships with it): catches what the
    # interpreter forgives (block sizes < 16, dot shapes, dtype mixes, shared memory)
    import os
    import subprocess
    import sys
    triton = pytest.importorskip("triton")
    if not os.path.isfile(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this triton has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "COMPILED" in r.stdout, r.stderr[-3000:]
