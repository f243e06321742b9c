"""
Batched GRPO rollout sampler: static KV cache, prefix sharing, on-device sampling, Triton decode kernels.

    from sampler import generate
    outs = generate(model, [(input_ids, pixel_values), ...], n=8, max_new_tokens=512, temperature=1.0,
                    eos_token_id=[eos, im_end])
    outs[i].tokens, outs[i].logprobs, outs[i].entropies, outs[i].finish_reason   # prompt-major order

CLI, like nanoGPT's sample.py:
    python sampler.py --ckpt=out/sft --image=cat.png --question="How many cats?" [--show_entropy]

How one call runs (the shape of a GRPO step: P prompts x n samples = R rows):
1. The cache is sized before it is allocated: each prompt's K/V ONCE (P x longest prompt) plus each row's generated
   K/V (R x max_new_tokens), every layer. If it does not fit (free CUDA memory, or max_cache_bytes / available RAM
   on CPU) we raise with the byte count.
2. ViT + prefill run ONCE per prompt (batched over prompts, right-padded), writing the prompt's K/V into its row of
   the prompt cache; the n rows of a prompt share that one copy (no copy into n rows: see prefix_attention).
   Only the last position's hidden state goes through lm_head (a 1k-token prompt x 152k vocab of fp32 logits
   would be 600 MB per prompt).
3. Decode: all rows step together, each at its own position (prompt length + t) for RoPE; every row has exactly t
   generated tokens, so the new k/v of a step all go to position t of the generated cache. Attention per row =
   softmax over [its prompt's shared K/V ; its own generated K/V] (Hydragen). Sampling happens on device (seeded
   torch.Generator, temperature / top-k / top-p / banned ids); the host looks at the `finished` flags only every
   `sync_every` steps (and never without EOS / stop criteria), so on GPU there is no host sync per token.
4. Finished rows stop costing work: at each sync point the still-active rows are compacted to the front of the
   generated cache in place (a gather of their own t tokens) and the decode batch shrinks; a prompt with no active
   row left leaves the prompt cache too. Measured on CPU (bench.py, the tiny VLM, 8 prompts x 8 samples, EOS ids
   holding ~1/32 of the mass, sync_every=8; see BENCHMARKS.md): compaction gives ~1.5x the tokens/s of no
   compaction. Sampling draws one uniform per ORIGINAL row every step, so the samples do not depend on
   compaction, sync_every or the kernel path (tested). (Refilling freed rows with waiting prompts would keep the
   batch full, but GRPO needs all n samples of a prompt before its advantage anyway.)
5. Outputs per row: tokens (EOS included when hit), logprobs and entropies. Both are computed in fp32 from the
   model's RAW distribution (temperature 1, no top-k/top-p/bans): that is the pi_old(a|s) of the GRPO ratio and
   the entropy the RL logs track. The token itself is drawn from the shaped distribution.

Kernels (GPU path, Triton) with a plain PyTorch reference beside each, selected by `use_triton` (None = auto:
Triton for CUDA tensors, the reference elsewhere; tests force both, the Triton path under TRITON_INTERPRET=1):
  decode_attention: one new query token per row over its cache, flash-decoding (split along the sequence, then a
    reduce kernel merges the splits with their log-sum-exp), the G query heads of a kv head packed into one tile
    (padded to >= 16 rows) so each K/V block is loaded once for all of them, ragged per-row lengths.
  prefix_attention: the same two kernels over the two-part cache. The split kernel runs once over the prompt K/V
    with the n samples x G heads of a prompt packed as the query rows of one tile (each prompt K/V block loaded
    once for n rows), once over each row's own tokens, and one reduce merges the splits of both.
  cache_append: writes each row's new k/v at its own position (a tensor, so a compiled step has static shapes).

FSDP2 (grpo.py): generate() all-gathers an FSDP2 model's units ONCE per call (unsharded(), also usable around
several calls) and keeps them for all decode steps; memory: the full bf16 weights on every GPU, 2 bytes x n_params
(~1 GB for 0.5B, ~4 GB for 2B, ~15 GB for 7B), given back (resharded) before training resumes. The alternative,
decoding through the sharded model, pays n_layer all-gathers per decode step: pure latency at decode sizes.
Checked on CPU/gloo, one process (tests): same greedy tokens as the unwrapped model, backward works afterwards.
Not measured on GPUs (none was available).

Where the speed-up over transformers' generate() comes from (bench.py on CPU, fp32, the repo's tiny VLM, 8 prompts
x 8 samples, 96-token prompts, 64 new tokens, one torch thread each; runs at load average ~3 on the shared 2-core
machine, all in BENCHMARKS.md): prefix sharing removes (n-1)/n of the ViT + prefill work (transformers ~0.9-1.1 s,
ours ~0.11 s); our 63 decode steps take ~0.92 s against ~1.4-1.5 s: the same matmuls, but each prompt's K/V is
read once for its n rows instead of once per row (attention ~5.9 -> ~3.6 ms of the step, measured before/after),
the new k/v go to one position with a strided copy, and there is no growing cache and no torch.multinomial. The
linear layers are ~60% of our step now, the same work on both sides. Overall ~2.3-2.4x its tokens/s (was ~1.8x).
"""
import functools
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model import KVCache

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path is used
    triton = None

USE_TRITON = None  # None = auto (Triton on CUDA tensors), True/False to force; tests flip this


def _want_triton(x, use_triton):
    use = USE_TRITON if use_triton is None else use_triton
    if use is None:
        use = x.is_cuda
    if use and triton is None:
        raise RuntimeError("sampler.py: use_triton=True but triton is not installed")
    if use and not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("sampler.py: Triton on CPU tensors needs TRITON_INTERPRET=1 set before importing triton")
    return use

# -----------------------------------------------------------------------------
# Cache append: write each row's new k/v (T tokens) at positions lens[b] .. lens[b]+T-1 of its cache row.

def cache_append_ref(k_cache, v_cache, k, v, lens):
    # k_cache, v_cache: (B, n_kv_head, max_len, hd) ; k, v: (B, n_kv_head, T, hd) ; lens: (B,) long
    B, _, T, _ = k.shape
    pos = lens[:, None] + torch.arange(T, device=k.device)  # (B, T)
    b = torch.arange(B, device=k.device)[:, None].expand(B, T)
    # advanced indexing on dims (0, 2) puts the indexed dims first: (B, T, n_kv_head, hd)
    k_cache[b, :, pos] = k.transpose(1, 2).to(k_cache.dtype)
    v_cache[b, :, pos] = v.transpose(1, 2).to(v_cache.dtype)


if triton is not None:
    @triton.jit
    def _cache_append_kernel(K, V, Kc, Vc, Lens,
                             s_kb, s_kh, s_kt, s_vb, s_vh, s_vt,
                             s_cb, s_ch, s_cn, s_db, s_dh, s_dn,
                             max_len, D, BLOCK_D: tl.constexpr):
        # one program per (row b, kv head h, new token t); head_dim is contiguous (stride 1)
        b = tl.program_id(0).to(tl.int64)  # int64 offsets: B x row stride can pass 2^31
        h = tl.program_id(1)
        t = tl.program_id(2)
        pos = tl.load(Lens + b) + t
        d = tl.arange(0, BLOCK_D)
        mask = (d < D) & (pos + 0 * d < max_len)  # (a scalar & block mask trips the interpreter)
        k = tl.load(K + b * s_kb + h * s_kh + t * s_kt + d, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(V + b * s_vb + h * s_vh + t * s_vt + d, mask=mask, other=0.0).to(tl.float32)
        tl.store(Kc + b * s_cb + h * s_ch + pos * s_cn + d, k.to(Kc.dtype.element_ty), mask=mask)
        tl.store(Vc + b * s_db + h * s_dh + pos * s_dn + d, v.to(Vc.dtype.element_ty), mask=mask)


def cache_append(k_cache, v_cache, k, v, lens, use_triton=None):
    """Write k, v (B, n_kv_head, T, hd) into k_cache, v_cache (B, n_kv_head, max_len, hd) at lens[b] + t."""
    if not _want_triton(k, use_triton):
        return cache_append_ref(k_cache, v_cache, k, v, lens)
    B, H, T, D = k.shape
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    _cache_append_kernel[(B, H, T)](
        k, v, k_cache, v_cache, lens,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        k_cache.shape[2], D, BLOCK_D=max(16, triton.next_power_of_2(D)))

# -----------------------------------------------------------------------------
# Decode attention: q (B, n_head, hd) for ONE new token per row, over positions < lens[b] of row b's cache.
# GQA: query head j uses kv head j // G, G = n_head // n_kv_head (Qwen2 / HF repeat_kv convention).

def decode_attention_ref(q, k_cache, v_cache, lens, scale=None, len_bound=None):
    # q: (B, n_head, hd) ; k_cache, v_cache: (B, n_kv_head, max_len, hd) ; lens: (B,) valid positions per row
    B, n_head, D = q.shape
    n_kv_head = k_cache.shape[1]
    G = n_head // n_kv_head
    scale = D ** -0.5 if scale is None else scale
    L = int(lens.max()) if len_bound is None else min(len_bound, k_cache.shape[2])  # keys past every row: unused
    valid = torch.arange(L, device=q.device)[None, :] < lens[:, None]  # (B, L) ragged rows
    # GQA packed as in the kernel: the G query heads of kv head h (heads h*G .. h*G+G-1) are G "queries" over
    # the same keys; fp32 math, as the Triton kernel does after its loads
    qg = q.float().view(B, n_kv_head, G, D)
    y = F.scaled_dot_product_attention(qg, k_cache[:, :, :L].float(), v_cache[:, :, :L].float(),
                                       attn_mask=valid[:, None, None, :], scale=scale)  # (B, n_kv_head, G, hd)
    return y.view(B, n_head, D).to(q.dtype)


if triton is not None:
    @triton.jit
    def _decode_attn_split_kernel(Q, K, V, Lens, MidO, MidLse,
                                  s_qb, s_qh, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
                                  s_ob, s_oh, s_os, s_lb, s_lh,
                                  scale, split_len, G, D, kv_div,
                                  BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                                  PRECISION: tl.constexpr):
        # Flash-decoding (Dao et al. 2023), step 1: program (b, kv head h, split s) runs online softmax over
        # positions [s*split_len, min((s+1)*split_len, lens[kb])) for all G query heads of kv head h at once.
        # Query row b reads K/V row kb = b // kv_div (1 for plain decode; a shared prefix packs the n samples of a
        # prompt as extra query heads: G = samples x GQA group, and several query rows may share one prompt).
        b = tl.program_id(0).to(tl.int64)  # int64 offsets: B x row stride can pass 2^31
        h = tl.program_id(1)
        s = tl.program_id(2)
        kb = b // kv_div
        L = tl.load(Lens + kb)
        start = s * split_len
        end = tl.minimum(start + split_len, L)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        n = tl.arange(0, BLOCK_N)
        mask_g = g < G
        mask_d = d < D
        qh = h * G + g  # query heads of this kv head
        q = tl.load(Q + b * s_qb + qh[:, None] * s_qh + d[None, :],
                    mask=mask_g[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        q = q * scale
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max per query head
        l = tl.zeros([BLOCK_G], tl.float32)  # running sum of exp
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)  # running sum of p * v
        k_base = K + kb * s_kb + h * s_kh
        v_base = V + kb * s_vb + h * s_vh
        for n0 in range(start, end, BLOCK_N):
            pos = n0 + n
            mask_n = pos < end
            kv_mask = mask_n[:, None] & mask_d[None, :]
            k = tl.load(k_base + pos[:, None] * s_kn + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
            v = tl.load(v_base + pos[:, None] * s_vn + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
            att = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BLOCK_G, BLOCK_N)
            att = tl.where(mask_n[None, :], att, float("-inf"))
            m_new = tl.maximum(m, tl.max(att, 1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(att - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
            m = m_new
        # an empty split (start >= lens[kb]) leaves l = 0: write o = 0 and lse = -inf so the reduce ignores it
        nonempty = l > 0
        o = acc / tl.where(nonempty, l, 1.0)[:, None]
        lse = tl.where(nonempty, m + tl.log(tl.where(nonempty, l, 1.0)), float("-inf"))
        tl.store(MidO + b * s_ob + qh[:, None] * s_oh + s * s_os + d[None, :], o,
                 mask=mask_g[:, None] & mask_d[None, :])
        tl.store(MidLse + b * s_lb + qh * s_lh + s, lse, mask=mask_g)

    @triton.jit
    def _decode_attn_reduce_kernel(MidO, MidLse, Out,
                                   s_ob, s_oh, s_os, s_lb, s_lh, s_yb, s_yh,
                                   n_split, D, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
        # Flash-decoding step 2: program (b, query head j) merges the splits: y = sum_s w_s o_s / sum_s w_s,
        # w_s = exp(lse_s - max lse). Empty splits carry lse = -inf (w_s = 0). The splits may come from several
        # split launches (a shared prefix + the row's own tokens), concatenated along s.
        b = tl.program_id(0).to(tl.int64)  # int64 offsets: B x row stride can pass 2^31
        j = tl.program_id(1)
        s = tl.arange(0, BLOCK_S)
        d = tl.arange(0, BLOCK_D)
        mask_s = s < n_split
        mask_d = d < D
        lse = tl.load(MidLse + b * s_lb + j * s_lh + s, mask=mask_s, other=float("-inf")).to(tl.float32)
        w = tl.exp(lse - tl.max(lse, 0))  # (BLOCK_S,), 0 for empty splits
        o = tl.load(MidO + b * s_ob + j * s_oh + s[:, None] * s_os + d[None, :],
                    mask=mask_s[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        y = tl.sum(w[:, None] * o, 0) / tl.sum(w, 0)
        tl.store(Out + b * s_yb + j * s_yh + d, y.to(Out.dtype.element_ty), mask=mask_d)


@functools.lru_cache(maxsize=None)
def _num_sms(device):
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_split_len(B, n_kv_head, max_len, block_n, device, len_bound=None):
    """Positions per split: enough (b, kv head, split) programs to fill the GPU, splits a multiple of block_n."""
    L = max_len if len_bound is None else max(1, min(len_bound, max_len))
    n_blocks = triton.cdiv(L, block_n)
    target = 4 * _num_sms(device) if device.type == "cuda" else 8
    n_split = min(n_blocks, max(1, triton.cdiv(target, B * n_kv_head)), 64)
    return triton.cdiv(n_blocks, n_split) * block_n


def _attn_splits(q, k_cache, v_cache, lens, scale, block_n=None, split_len=None, len_bound=None, kv_div=1):
    """Triton step 1. q (B, n_kv_head * G, hd); k_cache, v_cache (B // kv_div, n_kv_head, max_len, hd); lens
    (B // kv_div,) -> per-split outputs mid_o (B, n_kv_head * G, n_split, hd) fp32 and their lse (B, ., n_split)."""
    B, n_q, D = q.shape
    _, n_kv_head, max_len, _ = k_cache.shape
    G = n_q // n_kv_head
    assert G * n_kv_head == n_q and q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    # fp32 dots need about 3x the shared memory of tf32 ones (75 KB at 32 x 128 on sm_80/sm_90, checked with ptxas)
    block_n = block_n or (32 if q.dtype == torch.float32 else 64)
    if split_len is None:
        split_len = decode_split_len(B, n_kv_head, max_len, block_n, q.device, len_bound)
    L = max_len if len_bound is None else max(1, min(len_bound, max_len))
    n_split = triton.cdiv(L, split_len)
    mid_o = torch.empty(B, n_q, n_split, D, device=q.device, dtype=torch.float32)
    mid_lse = torch.empty(B, n_q, n_split, device=q.device, dtype=torch.float32)
    # fp32 inputs: exact fp32 dots. 16-bit inputs: tf32 dots (q, k are exact in tf32; p rounds at 2^-11)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _decode_attn_split_kernel[(B, n_kv_head, n_split)](
        q, k_cache, v_cache, lens, mid_o, mid_lse,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        scale, split_len, G, D, kv_div,
        BLOCK_G=max(16, triton.next_power_of_2(G)), BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(D)),
        PRECISION=precision)
    return mid_o, mid_lse


def _attn_reduce(mid_o, mid_lse, dtype):
    """Triton step 2: merge the splits of mid_o (B, n_head, n_split, hd) -> y (B, n_head, hd) in dtype."""
    B, n_head, n_split, D = mid_o.shape
    y = torch.empty(B, n_head, D, device=mid_o.device, dtype=dtype)
    _decode_attn_reduce_kernel[(B, n_head)](
        mid_o, mid_lse, y,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        y.stride(0), y.stride(1),
        n_split, D, BLOCK_S=max(16, triton.next_power_of_2(n_split)), BLOCK_D=max(16, triton.next_power_of_2(D)))
    return y


def decode_attention(q, k_cache, v_cache, lens, scale=None, use_triton=None, block_n=None, split_len=None,
                     len_bound=None):
    """q (B, n_head, hd); k_cache, v_cache (B, n_kv_head, max_len, hd); lens (B,) >= 1 -> y (B, n_head, hd).
    len_bound: optional host-side upper bound of lens (sizes the splits without a sync)."""
    if not _want_triton(q, use_triton):
        return decode_attention_ref(q, k_cache, v_cache, lens, scale, len_bound)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mid_o, mid_lse = _attn_splits(q, k_cache, v_cache, lens, scale, block_n, split_len, len_bound)
    return _attn_reduce(mid_o, mid_lse, q.dtype)

# -----------------------------------------------------------------------------
# Decode attention with a SHARED PREFIX (Hydragen, Juravsky et al. 2024). The n samples of a prompt attend over
# the same prompt K/V, so it is stored ONCE per prompt; each row stores only its generated K/V. Attention over
# [prefix ; generated] = one softmax over the two sets of scores; the Triton path computes the two partial
# attentions separately and merges them by their log-sum-exp (the flash-decoding merge):
#     y = (exp(lse_1) y_1 + exp(lse_2) y_2) / (exp(lse_1) + exp(lse_2))
# The prefix part stacks the n samples x G query heads of (prompt, kv head) as the rows of ONE matmul: the prompt
# K/V is read once for n rows (n x fewer bytes than copying it into every row; GRPO's n is 8-16), and the matmul
# has n*G rows instead of G (on CPU, G-row matmuls run at a small fraction of the GEMM rate). Measured on CPU
# (bench.py shape, one layer, t = 1..64): 0.73 ms with the prompt copied into every row (SDPA), 0.53-0.58 ms
# with two softmaxes merged by lse, 0.48 ms with one softmax over the concatenation.
# Row b of the decode batch is sample slot[b] % n of prompt slot[b] // n (slot None: row b is slot b).

def prefix_attention_ref(q, pk, pv, plen, gk, gv, glen, n, slot=None, scale=None):
    """q (B, n_head, hd); pk, pv (P, n_kv_head, Lp, hd) prompt K/V, plen (P,) tensor or int (every prompt has
    that many); gk, gv (B, n_kv_head, Lg, hd) generated K/V, glen (B,) tensor or int -> y (B, n_head, hd).
    One softmax over the concatenated scores [prompt ; own tokens]."""
    B, n_head, D = q.shape
    P, n_kv_head, Lp, _ = pk.shape
    G = n_head // n_kv_head
    scale = D ** -0.5 if scale is None else scale
    qs = q.float() * scale  # fp32 math, as the Triton kernel does after its loads
    pk, pv, pmask = _keys(pk, pv, plen)
    gk, gv, gmask = _keys(gk, gv, glen)
    Lp, Lg = pk.shape[2], gk.shape[2]
    # prompt scores: the n*G queries (samples x GQA group) of (prompt, kv head) are the rows of one matmul
    q1 = qs if slot is None else qs.new_zeros(P * n, n_head, D).index_copy_(0, slot, qs)  # finished slots: 0
    q1 = q1.view(P, n, n_kv_head, G, D).transpose(1, 2).reshape(P, n_kv_head, n * G, D)
    s1 = torch.matmul(q1, pk.transpose(-1, -2))  # (P, n_kv_head, n*G, Lp)
    if pmask is not None:
        s1.masked_fill_(pmask[:, None, None, :], float("-inf"))
    # own-token scores, per row, moved into the same (prompt, kv head, sample x group) layout
    s2 = torch.matmul(qs.view(B, n_kv_head, G, D), gk.transpose(-1, -2))  # (B, n_kv_head, G, Lg)
    if gmask is not None:
        s2.masked_fill_(gmask[:, None, None, :], float("-inf"))
    if slot is not None:
        s2 = s2.new_zeros(P * n, n_kv_head, G, Lg).index_copy_(0, slot, s2)
    s2 = s2.view(P, n, n_kv_head, G, Lg).transpose(1, 2).reshape(P, n_kv_head, n * G, Lg)
    p = torch.cat([s1, s2], dim=-1).softmax(dim=-1)  # softmax over the union of the keys
    y1 = torch.matmul(p[..., :Lp], pv)  # (P, n_kv_head, n*G, hd)
    y1 = y1.view(P, n_kv_head, n, G, D).transpose(1, 2).reshape(P * n, n_kv_head, G, D)
    p2 = p[..., Lp:].reshape(P, n_kv_head, n, G, Lg).transpose(1, 2).reshape(P * n, n_kv_head, G, Lg)
    if slot is not None:
        y1, p2 = y1[slot], p2[slot]
    y = torch.matmul(p2, gv).add_(y1)  # (B, n_kv_head, G, hd)
    return y.view(B, n_head, D).to(q.dtype)


def _keys(k, v, lens):
    # lens an int: every item has exactly that many keys (slice, no mask); else a mask (N, L) of the keys to drop
    mask = None
    if not isinstance(lens, int):
        mask = torch.arange(k.shape[2], device=k.device)[None, :] >= lens[:, None]
    elif lens < k.shape[2]:
        k, v = k[:, :, :lens], v[:, :, :lens]
    if k.dtype != torch.float32:  # (a no-op call still costs on a CPU decode step)
        k, v = k.float(), v.float()
    return k, v, mask


def prefix_attention(q, pk, pv, plen, gk, gv, glen, n, slot=None, scale=None, use_triton=None, gen_bound=None):
    """Decode attention of rows over [their prompt's shared K/V ; their own generated K/V], see above.
    q (B, n_head, hd); pk, pv (P, n_kv_head, Lp, hd), plen (P,); gk, gv (B, n_kv_head, Lg, hd), glen (B,);
    slot (B,) or None -> y (B, n_head, hd). gen_bound: optional host-side bound of glen (Triton split sizing)."""
    if not _want_triton(q, use_triton):
        return prefix_attention_ref(q, pk, pv, plen, gk, gv, glen, n, slot, scale)
    B, n_head, D = q.shape
    P, n_kv_head, Lp, _ = pk.shape
    G = n_head // n_kv_head
    scale = D ** -0.5 if scale is None else scale
    if isinstance(plen, int):
        plen = torch.full((P,), plen, device=q.device)
    if isinstance(glen, int):
        gen_bound, glen = glen, torch.full((B,), glen, device=q.device)
    # prefix: the n samples of a prompt are extra query heads, `per` samples per program (at most 64 query rows
    # per tile in 16-bit, 32 in fp32: shared memory, see test_kernels_compile_for_h100), c = n // per query rows
    # per prompt, each reading its prompt's K/V (kv_div = c)
    max_rows = 64 if q.element_size() <= 2 else 32
    per = max(d for d in range(1, n + 1) if n % d == 0 and (d * G <= max_rows or d == 1))
    c = n // per
    qs = q if slot is None else q.new_zeros(P * n, n_head, D).index_copy_(0, slot, q)
    q1 = qs.view(P, c, per, n_kv_head, G, D).transpose(2, 3).reshape(P * c, n_kv_head * per * G, D)
    mid1, lse1 = _attn_splits(q1, pk, pv, plen, scale, kv_div=c)  # (P*c, n_kv*per*G, S1, hd)
    S1 = mid1.shape[2]
    mid1 = mid1.view(P, c, n_kv_head, per, G, S1, D).transpose(2, 3).reshape(P * n, n_head, S1, D)
    lse1 = lse1.view(P, c, n_kv_head, per, G, S1).transpose(2, 3).reshape(P * n, n_head, S1)
    if slot is not None:
        mid1, lse1 = mid1[slot], lse1[slot]
    # generated part, then one reduce over the splits of both
    mid2, lse2 = _attn_splits(q, gk, gv, glen, scale, len_bound=gen_bound)  # (B, n_head, S2, hd)
    return _attn_reduce(torch.cat([mid1, mid2], 2), torch.cat([lse1, lse2], 2), q.dtype)

# -----------------------------------------------------------------------------
# The cache used by generate(): prompt K/V once per prompt (written by the prefill through a model.KVCache), the
# generated K/V per row, and in-place compaction of the active rows. model.forward calls attend() once per layer.

class DecodeCache:
    """pk, pv: (n_layer, P, n_kv_head, max_prompt, hd) the prompts' K/V ; plen (P,) their lengths.
    gk, gv: (n_layer, R, n_kv_head, max_new, hd) the generated K/V of every row, allocated once.
    The active rows are the first B rows of gk/gv (compaction moves them there); slot (B,) maps them to (prompt,
    sample) (None: row b is sample b % n of prompt b // n); lens (B,) is each row's position (its prompt length +
    t) for RoPE; t (host int) the generated tokens stored per row, the same for every row since all rows step
    together. static=True (torch.compile): only tensors inside attend(), so every step has the same graph."""

    def __init__(self, cfg, P, n, max_prompt, max_new, dtype=torch.float32, device="cpu", use_triton=None,
                 static=False):
        self.prefix = KVCache(cfg, P, max_prompt, dtype, device)  # the prefill writes here (model.KVCache.attend)
        self.pk, self.pv = self.prefix.k, self.prefix.v
        shape = (cfg.n_layer, P * n, cfg.n_kv_head, max_new, cfg.head_dim)
        self.gk = torch.zeros(shape, dtype=dtype, device=device)  # zeros: masked keys times 0 stay 0 (not NaN)
        self.gv = torch.zeros(shape, dtype=dtype, device=device)
        self.n, self.P, self.t = n, P, 0
        self.plen, self.plen_arg, self.slot, self.lens = None, None, None, None
        self.use_triton, self.static = use_triton, static
        self.tensor_pos = static or _want_triton(self.gk, use_triton)  # write positions as a tensor (B,)

    def start(self, plen):
        """After the prefill: plen (P,) prompt lengths; every row starts at its prompt's length."""
        self.plen = plen
        self.plen_arg = int(plen[0]) if bool((plen == plen[0]).all()) else plen  # equal lengths: no mask
        self.lens = plen.repeat_interleave(self.n)
        self.gpos = torch.zeros_like(self.lens)  # (B,) = t, for the Triton append and static graphs

    def attend(self, layer_idx, q, k, v):
        # q (B, n_head, 1, hd), k, v (B, n_kv_head, 1, hd): one new token per active row
        assert q.shape[2] == 1, "DecodeCache is for one-token decode steps (the prefill uses model.KVCache)"
        B = q.shape[0]
        gk, gv = self.gk[layer_idx, :B], self.gv[layer_idx, :B]
        pk, pv = self.pk[layer_idx, :self.P], self.pv[layer_idx, :self.P]
        if self.tensor_pos:
            if layer_idx == 0:  # one add per step, not one per layer
                self.glen = self.gpos + 1
            cache_append(gk, gv, k, v, self.gpos, self.use_triton)
            glen, bound = self.glen, None if self.static else self.t + 1
        else:  # every row writes position t: a strided copy, no index tensors
            gk[:, :, self.t], gv[:, :, self.t] = k[:, :, 0], v[:, :, 0]
            glen, bound = self.t + 1, None
        y = prefix_attention(q[:, :, 0], pk, pv, self.plen_arg, gk, gv, glen, self.n, self.slot,
                             use_triton=self.use_triton, gen_bound=bound)
        return y[:, :, None]  # (B, n_head, 1, hd)

    def advance(self):
        """The caller's step after a forward (model.forward never moves the cache): one more token per row."""
        self.lens += 1
        self.gpos += 1
        self.t += 1

    def keep_rows(self, idx, drop_prompts=True):
        """Move the rows idx (B_new,) to the front; the active batch becomes B_new. One layer at a time so the
        gather's temporary is one layer's K/V. drop_prompts: prompts with no active row left move out too (their
        prompt K/V is not read any more)."""
        B, t = idx.numel(), self.t
        for i in range(self.gk.shape[0]):
            self.gk[i, :B, :, :t] = self.gk[i, idx, :, :t]
            self.gv[i, :B, :, :t] = self.gv[i, idx, :, :t]
        self.lens, self.gpos = self.lens[idx], self.gpos[idx]
        slot = idx if self.slot is None else self.slot[idx]
        if drop_prompts:
            prompt = slot // self.n
            keep_p = torch.unique(prompt)  # sorted
            if keep_p.numel() < self.P:
                for i in range(self.pk.shape[0]):
                    self.pk[i, :keep_p.numel()] = self.pk[i, keep_p]
                    self.pv[i, :keep_p.numel()] = self.pv[i, keep_p]
                self.P, self.plen = keep_p.numel(), self.plen[keep_p]
                if not isinstance(self.plen_arg, int):
                    self.plen_arg = self.plen
                slot = torch.searchsorted(keep_p, prompt) * self.n + slot % self.n
        self.slot = slot


def cache_bytes(cfg, P, n, max_prompt, max_new, dtype):
    # K and V, every layer: the prompts once, the generated tokens per row
    per_pos = 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * torch.empty(0, dtype=dtype).element_size()
    return per_pos * (P * max_prompt + P * n * max_new)


def check_cache_fits(nbytes, device, max_cache_bytes, P, n, max_prompt, max_new):
    """Raise before allocating a cache that cannot fit: free CUDA memory, or max_cache_bytes / available RAM."""
    if max_cache_bytes is not None:
        limit, what = max_cache_bytes, "max_cache_bytes"
    elif device.type == "cuda":
        limit, what = torch.cuda.mem_get_info(device)[0], "free CUDA memory"
    else:
        limit, what = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "available RAM"
    if nbytes > limit:
        raise MemoryError(f"sampler.py: the KV cache needs {nbytes:,} bytes ({nbytes / 2**30:.2f} GiB) for {P} prompts "
                          f"x {max_prompt} positions + {P * n} rows x {max_new} new tokens but {what} is {limit:,} "
                          f"bytes; lower the number of prompts, n, max_new_tokens or the prompt length (or raise "
                          f"max_cache_bytes)")

# -----------------------------------------------------------------------------
# Sampling on device. Returns the token drawn from the SHAPED distribution (bans, temperature, top-k, top-p)
# together with its log-prob and the entropy under the RAW one (temperature 1, nothing masked): the GRPO ratio
# pi_theta / pi_old and the entropy logs are about the policy itself, not about the sampling transform.

def sample_next(logits, u, temperature=1.0, top_k=0, top_p=1.0, ban=None):
    # logits (B, V), u (B,) uniform [0, 1) -> tok (B,) long, logp (B,) fp32, entropy (B,) fp32
    logits = logits.float()
    logp_raw = logits.log_softmax(dim=-1)
    p_raw = logp_raw.exp()
    entropy = -(p_raw * logp_raw).sum(dim=-1)
    x = logits
    if ban is not None:
        x = x.index_fill(-1, ban, float("-inf"))
    if temperature == 0:  # greedy
        return _gather_out(x.argmax(dim=-1), logp_raw, entropy)
    if ban is None and temperature == 1.0 and not 0 < top_k < x.shape[-1] and top_p >= 1.0:
        probs = p_raw  # plain sampling from the policy: reuse the softmax
    else:
        x = x / temperature
        if 0 < top_k < x.shape[-1]:
            kth = torch.topk(x, top_k, dim=-1).values[:, -1:]  # (B, 1) the k-th largest logit
            x = x.masked_fill(x < kth, float("-inf"))
        if top_p < 1.0:  # nucleus (Holtzman et al. 2020): smallest set of top tokens with mass >= top_p
            srt, order = torch.sort(x, dim=-1, descending=True)
            p = srt.softmax(dim=-1)
            drop = (p.cumsum(dim=-1) - p) >= top_p  # mass BEFORE this token already reaches top_p; keeps the top-1
            x = x.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        probs = x.softmax(dim=-1)
    # inverse-CDF sampling: one uniform u per row (the caller draws one for EVERY row, so compaction does not change
    # which number a row gets), token = first index whose cumulative probability exceeds u * total. The fp64 cdf
    # keeps a 152k vocabulary exact enough; u * total < total, so a p = 0 token (flat cdf) can never be the first
    # index above it. No host sync (unlike torch.multinomial on CUDA), R random numbers per step, not R x V.
    cdf = probs.double().cumsum(dim=-1)  # (B, V)
    tok = torch.searchsorted(cdf, u[:, None].double() * cdf[:, -1:], right=True)[:, 0]
    return _gather_out(tok.clamp(max=x.shape[-1] - 1), logp_raw, entropy)


def _gather_out(tok, logp_raw, entropy):
    logp = logp_raw.gather(-1, tok[:, None])[:, 0]
    return tok, logp, entropy


@dataclass
class Sample:
    """One generated sequence. tokens include the EOS / stop token when one ended it. logprobs[i] and
    entropies[i] are fp32 values under the model's raw distribution (temperature 1, no top-k/top-p/bans)."""
    tokens: list
    logprobs: list
    entropies: list
    finish_reason: str  # 'eos' | 'stop' (a stop id or stop string) | 'length'
    prompt_index: int
    text: str = None  # filled when a tokenizer was given

    def __getitem__(self, key):  # results are readable as keys too: s["tokens"]
        return getattr(self, key)


def _as_ids(x, name):
    if x is None:
        return []
    ids = [x] if isinstance(x, int) else list(x)
    if not all(isinstance(i, int) for i in ids):
        raise ValueError(f"sampler.py: {name} must be an int or a list of ints, got {x!r}")
    return ids


def _check_prompts(prompts, cfg):
    for i, p in enumerate(prompts):
        if not (isinstance(p, (tuple, list)) and len(p) == 2):
            raise ValueError(f"sampler.py: prompts[{i}] must be a pair (input_ids, pixel_values), got {type(p)}")
        ids, pix = p
        if len(ids) == 0:
            raise ValueError(f"sampler.py: prompts[{i}] has no input_ids")
        bad = [t for t in ids if not 0 <= int(t) < cfg.vocab_size]
        if bad:
            raise ValueError(f"sampler.py: prompts[{i}] has token ids outside [0, {cfg.vocab_size}): {bad[:5]}")
        n_img = sum(int(t) == cfg.image_token_id for t in ids)
        n_tiles = 0 if pix is None else pix.shape[0]
        if pix is not None and pix.ndim != 4:
            raise ValueError(f"sampler.py: prompts[{i}] pixel_values must be (tiles, 3, H, W), got {tuple(pix.shape)}")
        if n_img != n_tiles * cfg.tokens_per_tile:
            raise ValueError(f"sampler.py: prompts[{i}] has {n_img} image-context tokens but {n_tiles} tiles x "
                             f"{cfg.tokens_per_tile} tokens per tile")


def _find_stop(tokenizer, toks, stop, checked):
    """Smallest k > checked such that decode(toks[:k]) contains a stop string, or None."""
    if not any(s in tokenizer.decode(toks) for s in stop):
        return None
    for k in range(checked + 1, len(toks) + 1):
        text = tokenizer.decode(toks[:k])
        if any(s in text for s in stop):
            return k
    return len(toks)


@torch.no_grad()
def prefill(model, cache, prompts, pad_id, max_tokens):
    """ViT + prefill ONCE per prompt, batched over prompts (right-padded, causal so the pads never reach a real
    token), writing K/V into row p of cache (a model.KVCache with one row per prompt). Returns the last-position
    logits (P, vocab) in fp32."""
    device = cache.k.device
    P = len(prompts)
    out = []
    p0 = 0
    while p0 < P:  # chunks of prompts of at most max_tokens padded tokens (activations, not the cache, bound this)
        p1, T = p0 + 1, len(prompts[p0][0])
        while p1 < P and (p1 + 1 - p0) * max(T, len(prompts[p1][0])) <= max_tokens:
            T = max(T, len(prompts[p1][0]))
            p1 += 1
        lens = torch.tensor([len(prompts[p][0]) for p in range(p0, p1)], device=device)
        ids = torch.full((p1 - p0, T), pad_id, dtype=torch.long)
        for j, p in enumerate(range(p0, p1)):
            ids[j, :len(prompts[p][0])] = torch.tensor(prompts[p][0], dtype=torch.long)
        ids = ids.to(device)  # one host->device copy per chunk
        pix = [prompts[p][1] for p in range(p0, p1) if prompts[p][1] is not None]
        pix = torch.cat(pix).to(device) if pix else None
        view = KVCache.__new__(KVCache)  # rows p0..p1 of the cache, sharing its storage, lens 0
        view.k, view.v, view.max_len = cache.k[:, p0:p1], cache.v[:, p0:p1], cache.max_len
        view.lens = torch.zeros(p1 - p0, dtype=torch.long, device=device)
        h = model(ids, pix, cache=view, return_hidden=True)  # (C, T, n_embd)
        last = h[torch.arange(p1 - p0, device=device), lens - 1]  # (C, n_embd): only these need logits
        out.append(model.llm.lm_head(last).float())
        p0 = p1
    return torch.cat(out)  # (P, vocab)


def generate(model, prompts, n=1, max_new_tokens=256, temperature=1.0, top_p=1.0, top_k=0, eos_token_id=None,
             seed=0, stop_token_ids=None, stop=None, tokenizer=None, ban_token_ids=None, sync_every=8,
             compact=True, use_triton=None, max_cache_bytes=None, prefill_tokens=16384, compile=False,
             stats=None):
    """
    prompts: list of (input_ids list[int] with image-context tokens expanded, pixel_values (tiles,3,H,W) | None).
    Returns len(prompts) * n Samples, prompt-major (all n samples of prompt 0 first).
    eos_token_id / stop_token_ids: int or list of ints (finish_reason 'eos' / 'stop'); stop: list of strings,
    needs tokenizer (checked every sync_every steps; the tokens are cut right after the completing token).
    ban_token_ids: ids whose logits are set to -inf before sampling (e.g. the "no-wait" mode).
    temperature 0 = greedy. sync_every: decode steps between host looks at the finished flags.
    compact: drop finished rows from the decode batch at sync points. use_triton: None = auto (CUDA).
    compile: torch.compile the decode step (CUDA only; rows compacted to power-of-2 buckets to bound recompiles).
    stats: optional dict, filled with timings and counters.
    """
    cfg = model.cfg
    if max_new_tokens < 1:
        raise ValueError(f"sampler.py: max_new_tokens must be >= 1, got {max_new_tokens}")
    if n < 1 or len(prompts) == 0:
        raise ValueError(f"sampler.py: need n >= 1 and at least one prompt (n={n}, {len(prompts)} prompts)")
    if stop and tokenizer is None:
        raise ValueError("sampler.py: stop strings need a tokenizer")
    _check_prompts(prompts, cfg)
    eos_ids, stop_ids = _as_ids(eos_token_id, "eos_token_id"), _as_ids(stop_token_ids, "stop_token_ids")
    p = next(model.parameters())
    device, dtype = p.device, p.dtype
    compile = compile and device.type == "cuda"
    P, R = len(prompts), len(prompts) * n
    max_prompt = max(len(ids) for ids, _ in prompts)
    nbytes = cache_bytes(cfg, P, n, max_prompt, max_new_tokens, dtype)
    check_cache_fits(nbytes, device, max_cache_bytes, P, n, max_prompt, max_new_tokens)

    was_training = model.training
    model.eval()
    try:
        # an FSDP2 model is gathered once for the whole call (see unsharded()); not inference_mode: the gathered
        # weights must stay usable by training
        with unsharded(model), torch.no_grad():
            return _generate(model, prompts, n, max_new_tokens, temperature, top_p, top_k, eos_ids, stop_ids,
                             stop, tokenizer, ban_token_ids, seed, sync_every, compact, use_triton, prefill_tokens,
                             compile, stats, device, dtype, P, R, max_prompt, nbytes)
    finally:
        model.train(was_training)


def _generate(model, prompts, n, max_new_tokens, temperature, top_p, top_k, eos_ids, stop_ids, stop, tokenizer,
              ban_token_ids, seed, sync_every, compact, use_triton, prefill_tokens, compile, stats, device, dtype,
              P, R, max_prompt, nbytes):
    cfg = model.cfg
    t0 = time.perf_counter()
    cache = DecodeCache(cfg, P, n, max_prompt, max_new_tokens, dtype, device, use_triton, static=compile)
    gen = torch.Generator(device=device).manual_seed(seed)
    ban = torch.tensor(_as_ids(ban_token_ids, "ban_token_ids"), dtype=torch.long, device=device) \
        if ban_token_ids else None
    eos_t = torch.tensor(eos_ids or [-1], device=device)
    stop_t = torch.tensor(stop_ids or [-1], device=device)
    pad_id = 0 if cfg.image_token_id != 0 else 1  # any id that is not an image-context token

    # 1) ViT + prefill once per prompt; its K/V stays in one copy that the n rows of the prompt share
    logits = prefill(model, cache.prefix, prompts, pad_id, prefill_tokens)  # (P, vocab)
    cache.start(torch.tensor([len(ids) for ids, _ in prompts], device=device))
    logits = logits.repeat_interleave(n, dim=0)  # (R, vocab)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t1 = time.perf_counter()

    # 2) decode. Outputs live on device, indexed by the original row; the active batch shrinks at sync points.
    out_tok = torch.full((R, max_new_tokens), pad_id, dtype=torch.long, device=device)
    out_logp = torch.zeros(R, max_new_tokens, device=device)
    out_ent = torch.zeros(R, max_new_tokens, device=device)
    gen_len = torch.full((R,), max_new_tokens, dtype=torch.long, device=device)  # final length per row
    reason = torch.zeros(R, dtype=torch.long, device=device)  # 0 length, 1 eos, 2 stop
    row_ids = torch.arange(R, device=device)  # active batch index -> original row
    done = torch.zeros(R, dtype=torch.bool, device=device)  # per active row
    checked = [0] * R  # stop strings: tokens already known to contain none
    step_fn = _decode_step
    if compile:
        step_fn = torch.compile(_decode_step, dynamic=False)
    n_steps = n_compact = 0
    t = 0
    idx = slice(None)  # row_ids as an index: a plain slice until the first compaction (no index tensors)
    while True:
        # sample token t of every active row from the logits of position t-1
        u = torch.rand(R, generator=gen, device=device)[idx]  # per original row: invariant to compaction
        tok, logp, ent = sample_next(logits, u, temperature, top_k, top_p, ban)
        out_tok[idx, t], out_logp[idx, t], out_ent[idx, t] = tok, logp, ent
        if eos_ids or stop_ids:
            hit_eos, hit_stop = torch.isin(tok, eos_t), torch.isin(tok, stop_t)
            new = ~done & (hit_eos | hit_stop)
            gen_len[idx] = torch.where(new, t + 1, gen_len[idx])
            reason[idx] = torch.where(new, torch.where(hit_eos, 1, 2), reason[idx])
            done = done | new
        t += 1
        if t == max_new_tokens:
            break
        if t % sync_every == 0 and (eos_ids or stop_ids or stop):  # the only host syncs of the loop
            if stop:
                done = _check_stop_strings(tokenizer, stop, out_tok, gen_len, reason, row_ids, done, checked, t)
            if bool(done.all()):
                break
            if compact and bool(done.any()):
                keep = (~done).nonzero()[:, 0]
                if compile:  # pad to a power-of-2 bucket with finished rows so the compiled step sees few shapes
                    B_new = min(done.numel(), 1 << (keep.numel() - 1).bit_length())
                    keep = torch.cat([keep, done.nonzero()[:, 0]])[:B_new]
                cache.keep_rows(keep, drop_prompts=not compile)  # compiled: keep the prompt count static
                tok, row_ids, done = tok[keep], row_ids[keep], done[keep]
                idx = row_ids
                n_compact += 1
        # forward the sampled token at position lens[b] (prompt length + t - 1); then every row holds t tokens
        logits = step_fn(model, cache, tok)
        cache.advance()
        n_steps += 1
    if stop:
        _check_stop_strings(tokenizer, stop, out_tok, gen_len, reason, row_ids, done, checked, t)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t2 = time.perf_counter()

    # 3) results, prompt-major; one device->host copy
    out_tok, out_logp, out_ent = out_tok.tolist(), out_logp.tolist(), out_ent.tolist()
    gen_len, reason = gen_len.tolist(), reason.tolist()
    names = ("length", "eos", "stop")
    results = []
    for r in range(R):
        L = gen_len[r]
        s = Sample(out_tok[r][:L], out_logp[r][:L], out_ent[r][:L], names[reason[r]], r // n)
        if tokenizer is not None:
            s.text = tokenizer.decode(s.tokens)
        results.append(s)
    if stats is not None:
        n_tok = sum(gen_len)
        stats.update(prefill_s=t1 - t0, decode_s=t2 - t1, decode_steps=n_steps, compactions=n_compact,
                     new_tokens=n_tok, cache_bytes=nbytes, tokens_per_s=n_tok / max(t2 - t0, 1e-9))
    return results


def _decode_step(model, cache, tok):
    # one token per active row: (B,) -> logits (B, vocab) in the model dtype
    return model(tok[:, None], cache=cache)[:, -1]


def _check_stop_strings(tokenizer, stop, out_tok, gen_len, reason, row_ids, done, checked, t):
    """Host-side stop-string check of the rows still active; cuts gen_len right after the completing token."""
    lens = gen_len[row_ids].tolist()
    toks = out_tok[row_ids].tolist()
    for i, r in enumerate(row_ids.tolist()):
        upto = min(lens[i], t)
        k = _find_stop(tokenizer, toks[i][:upto], stop, checked[r]) if upto > checked[r] else None
        if k is not None:
            gen_len[r], reason[r] = k, 2
            done[i] = True
        checked[r] = upto
    return done

# -----------------------------------------------------------------------------
# FSDP2 (grpo.py): gather the full weights ONCE for a rollout phase instead of an all-gather per layer per token


@contextmanager
def unsharded(model):
    """Inside this block an FSDP2 model keeps its full weights: memory + (full - shard) params per GPU (bf16:
    2 bytes x n_params, e.g. ~1 GB for 0.5B, ~4 GB for 2B, 15 GB for 7B), paid once per rollout phase, instead of
    n_layer all-gathers on every decode step (latency-bound at decode batch sizes). A plain module: no-op.
        with unsharded(model):
            rollouts = generate(model, prompts, n=8, ...)"""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        FSDPModule = None
    mods = [m for m in model.modules() if isinstance(m, FSDPModule)] if FSDPModule else []
    for m in mods:  # all-gather every unit now (the first call also runs FSDP's lazy init)
        m.unshard()
    # remember each unit's post-forward policy (FSDP keeps it per parameter group; the root's is special-cased)
    saved = [(st, st._auto_reshard_after_forward, [(g, g.post_forward_mesh_info) for g in st._fsdp_param_groups])
             for st in (m._get_fsdp_state() for m in mods)]
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)  # forwards inside keep the gathered weights
    try:
        yield model
    finally:
        for m in mods:
            m.reshard()
        for st, auto, groups in saved:
            st._auto_reshard_after_forward = auto
            for g, info in groups:
                g.post_forward_mesh_info = info

# -----------------------------------------------------------------------------
# CLI: python sampler.py --ckpt=DIR --image=cat.png --question="..." [--show_entropy]


def main(argv=None):
    import sys
    from configurator import configure
    cuda = torch.cuda.is_available()
    c = dict(ckpt="", tokenizer="", image="", question="", system="", think=True, n=1, max_new_tokens=512,
             temperature=0.0, top_p=1.0, top_k=0, seed=0, show_entropy=False, no_wait=False,
             device="cuda" if cuda else "cpu", dtype="bfloat16" if cuda else "float32")
    argv = sys.argv[1:] if argv is None else argv
    argv = [a + "=True" if a.startswith("--") and "=" not in a and isinstance(c.get(a[2:]), bool) else a
            for a in argv]  # bare --show_entropy means True
    configure(c, argv)
    if not c["ckpt"] or not c["question"]:
        raise SystemExit("usage: python sampler.py --ckpt=DIR --question='...' [--image=path.png] [--show_entropy]")
    from common import load_inference_model
    model, tok, path = load_inference_model(c["ckpt"], c["device"], getattr(torch, c["dtype"]), c["tokenizer"])
    cfg = model.cfg
    try:
        from data.common import build_prompt_ids, load_image
    except ImportError as e:
        raise SystemExit(f"sampler.py: data/common.py is needed to build prompts ({e})")
    pix = load_image(c["image"], cfg.image_size, cfg.max_tiles, cfg.use_thumbnail) if c["image"] else None
    n_tiles = [pix.shape[0]] if pix is not None else []
    ids = build_prompt_ids(tok, c["question"], n_tiles, cfg.tokens_per_tile, think=c["think"],
                           system=c["system"] or None)
    eos = [i for i in (tok.convert_tokens_to_ids(s) for s in ("<|im_end|>", "<|endoftext|>"))
           if i is not None and i != tok.unk_token_id]
    # the paper's "no-wait" mode bans reflection words: here the single-token spellings of "wait"
    ban = [ids_[0] for ids_ in (tok.encode(s, add_special_tokens=False) for s in ("wait", "Wait", " wait", " Wait"))
           if len(ids_) == 1] if c["no_wait"] else None
    print(f"{path}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, prompt {len(ids)} tokens, "
          f"{len(n_tiles) and n_tiles[0]} tiles")
    st = {}
    res = generate(model, [(ids, pix)], n=c["n"], max_new_tokens=c["max_new_tokens"], temperature=c["temperature"],
                   top_p=c["top_p"], top_k=c["top_k"], eos_token_id=eos, seed=c["seed"], tokenizer=tok,
                   ban_token_ids=ban, stats=st)
    for i, r in enumerate(res):
        print(f"--- sample {i} ({len(r.tokens)} tokens, {r.finish_reason}, mean entropy "
              f"{sum(r.entropies) / max(len(r.entropies), 1):.3f})")
        print(r.text)
        if c["show_entropy"]:
            print(f"{'pos':>4} {'entropy':>8} {'logp':>8}  token")
            for j, (t, e, lp) in enumerate(zip(r.tokens, r.entropies, r.logprobs)):
                print(f"{j:4d} {e:8.3f} {lp:8.3f}  {tok.decode([t])!r}")
    print(f"{st['new_tokens']} tokens in {st['prefill_s'] + st['decode_s']:.2f} s ({st['tokens_per_s']:.0f} tokens/s)")
    return res


if __name__ == "__main__":
    main()
