"""
decode_kernels.py: each Triton kernel against its PyTorch reference (under TRITON_INTERPRET=1 on CPU, set by conftest.py),
including the tensor-parallel shapes (fewer heads per rank), and the kernels compiled for sm_90 by Triton's own ptxas.
"""
import pytest
import torch

import decode_kernels
from decode_kernels import cache_append, decode_attention

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
        y = decode_kernels.prefix_attention(q, pk, pv, plen, gk, gv, glen, n, slot, use_triton=use)
        torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    # every row active, in order, equal lengths, and a host bound on the generated length (the sampler's case before
    # its first compaction)
    uses = (False, True) if G * n <= 16 else (False,)  # (the interpreter is slow on the big case)
    qa, ga, va = torch.randn(P * n, n_kv * G, D), torch.randn(P * n, n_kv, Lg, D), torch.randn(P * n, n_kv, Lg, D)
    full, six, every = torch.full((P,), Lp), torch.full((P * n,), 6), torch.arange(P * n)
    want = copied_rows_attention(qa, pk, pv, full, ga, va, six, n, every)
    for use in uses:
        y = decode_kernels.prefix_attention(qa, pk, pv, full, ga, va, six, n, every, use_triton=use, gen_bound=6)
        torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    # sensitive to both parts: one prompt position or one generated position fewer changes the rows that use them
    y = decode_kernels.prefix_attention(q, pk, pv, plen, gk, gv, glen, n, slot, use_triton=False)
    assert not torch.allclose(decode_kernels.prefix_attention(q, pk, pv, plen - 1, gk, gv, glen, n, slot), y, atol=1e-3)
    fewer = decode_kernels.prefix_attention(q, pk, pv, plen, gk, gv, (glen - 1).clamp(min=1), n, slot)
    torch.testing.assert_close(fewer[0], y[0])  # row 0 has one generated token either way
    assert not torch.allclose(fewer[1:], y[1:], atol=1e-3)


COMPILE_SCRIPT = r"""
import os, sys
sys.path.insert(0, os.getcwd())
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import decode_kernels
def build(fn, types, consts):
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))
for dt, bn in (("bf16", 64), ("fp32", 32)):
    for bg in (16, 64 if dt == "bf16" else 32):  # a shared prefix packs samples x GQA group query rows
        k = build(decode_kernels._decode_attn_split_kernel,
                  dict(Q=f"*{dt}", K=f"*{dt}", V=f"*{dt}", Lens="*i64", MidO="*fp32", MidLse="*fp32", scale="fp32"),
                  dict(BLOCK_G=bg, BLOCK_N=bn, BLOCK_D=128, PRECISION="ieee" if dt == "fp32" else "tf32",
                       WHILE_LOOP=False))
        assert k.metadata.shared <= 100 * 1024, (dt, bg, k.metadata.shared)
        print(dt, bg, k.metadata.shared)
    build(decode_kernels._decode_attn_reduce_kernel, dict(MidO="*fp32", MidLse="*fp32", Out=f"*{dt}"),
          dict(BLOCK_S=16, BLOCK_D=128))
    build(decode_kernels._cache_append_kernel, dict(K=f"*{dt}", V=f"*{dt}", Kc=f"*{dt}", Vc=f"*{dt}", Lens="*i64"),
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
