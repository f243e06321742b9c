"""
The sampler's decode kernels: Triton on a GPU, with a plain PyTorch reference beside each (the CPU path, and
what the tests compare the kernels with). One switch, USE_TRITON, picks the path; the tests flip it (the Triton
path runs on CPU under TRITON_INTERPRET=1, set before triton is imported).

  cache_append       write each row's new k/v at its own position of a static cache
  decode_attention   one new query per row over its own cache (flash-decoding: split the keys, merge by LSE)
  prefix_attention   rows over [their prompt's SHARED K/V ; their own generated K/V] (Hydragen): the prompt's
                     K/V is stored once and read once for its n samples

Shapes: q (B, n_head, hd); caches (rows, n_kv_head, max_len, hd); lengths are (rows,) long tensors.
GQA: query head j uses kv head j // G, G = n_head // n_kv_head (the HF repeat_kv convention).
Measurements (CPU and the kernels' history) are in BENCHMARKS.md.
"""
import functools
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path is used
    triton = None

USE_TRITON = None  # None = auto (Triton for CUDA tensors, the reference elsewhere); True/False to force

# Triton < 3.7's interpreter turns a runtime loop bound (`range(start, end, BLOCK)`, `end` loaded from memory) into
# a Python int through a 1-element numpy array, which numpy 2 refuses: there the split kernel loops with `while`.
# Compiled kernels (and newer interpreters) use the `for` loop, which Triton can software-pipeline.
_WHILE_LOOP = triton is not None and os.environ.get("TRITON_INTERPRET") == "1" and \
    tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 7)


def want_triton(x, use_triton=None):
    use = USE_TRITON if use_triton is None else use_triton
    if use is None:
        use = x.is_cuda
    if use and triton is None:
        raise RuntimeError("decode_kernels.py: Triton requested but triton is not installed")
    if use and not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("decode_kernels.py: Triton on CPU tensors needs TRITON_INTERPRET=1 set before importing triton")
    return use

# -----------------------------------------------------------------------------
# Cache append: write each row's new k/v (T tokens) at positions lens[b] .. lens[b]+T-1 of its cache row.


def cache_append_ref(k_cache, v_cache, k, v, lens):
    # k_cache, v_cache: (B, n_kv_head, max_len, hd); k, v: (B, n_kv_head, T, hd); lens: (B,) long
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
    if not want_triton(k, use_triton):
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
# Decode attention: q (B, n_head, hd), ONE new token per row, over positions < lens[b] of row b's cache.


def decode_attention_ref(q, k_cache, v_cache, lens, scale=None, len_bound=None):
    # q: (B, n_head, hd); k_cache, v_cache: (B, n_kv_head, max_len, hd); lens: (B,) valid positions per row
    B, n_head, D = q.shape
    n_kv_head = k_cache.shape[1]
    G = n_head // n_kv_head
    scale = D ** -0.5 if scale is None else scale
    L = int(lens.max()) if len_bound is None else min(len_bound, k_cache.shape[2])  # keys past every row: unused
    valid = torch.arange(L, device=q.device)[None, :] < lens[:, None]  # (B, L) ragged rows
    # GQA packed as in the kernel: the G query heads of kv head h are G "queries" over the same keys; fp32 math
    qg = q.float().view(B, n_kv_head, G, D)
    y = F.scaled_dot_product_attention(qg, k_cache[:, :, :L].float(), v_cache[:, :, :L].float(),
                                       attn_mask=valid[:, None, None, :], scale=scale)  # (B, n_kv_head, G, hd)
    return y.view(B, n_head, D).to(q.dtype)


if triton is not None:
    @triton.jit
    def _attend_block(q, k_base, v_base, n0, end, n, d, mask_d, s_kn, s_vn, m, l, acc, PRECISION: tl.constexpr):
        # online softmax over the keys [n0, n0 + BLOCK_N) (those < end): updates the running max m, sum l and acc
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
        return m_new, l, acc

    @triton.jit
    def _decode_attn_split_kernel(Q, K, V, Lens, MidO, MidLse,
                                  s_qb, s_qh, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
                                  s_ob, s_oh, s_os, s_lb, s_lh,
                                  scale, split_len, G, D, kv_div,
                                  BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                                  PRECISION: tl.constexpr, WHILE_LOOP: tl.constexpr):
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
        if WHILE_LOOP:  # the old interpreter (see _WHILE_LOOP)
            n0 = start
            while n0 < end:
                m, l, acc = _attend_block(q, k_base, v_base, n0, end, n, d, mask_d, s_kn, s_vn, m, l, acc, PRECISION)
                n0 += BLOCK_N
        else:
            for n0 in range(start, end, BLOCK_N):
                m, l, acc = _attend_block(q, k_base, v_base, n0, end, n, d, mask_d, s_kn, s_vn, m, l, acc, PRECISION)
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
        b = tl.program_id(0).to(tl.int64)
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
    """Positions per split: enough (row, kv head, split) programs to fill the GPU, splits a multiple of block_n."""
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
        PRECISION=precision, WHILE_LOOP=_WHILE_LOOP)
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
    if not want_triton(q, use_triton):
        return decode_attention_ref(q, k_cache, v_cache, lens, scale, len_bound)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mid_o, mid_lse = _attn_splits(q, k_cache, v_cache, lens, scale, block_n, split_len, len_bound)
    return _attn_reduce(mid_o, mid_lse, q.dtype)

# -----------------------------------------------------------------------------
# Decode attention with a SHARED PREFIX (Hydragen, Juravsky et al. 2024). The n samples of a prompt attend over
# the same prompt K/V, so it is stored ONCE per prompt; each row stores only its generated K/V. Attention over
# [prefix ; generated] = one softmax over the two sets of scores. The reference computes that softmax over the
# concatenated scores; the Triton path computes the two partial attentions separately and merges them by their
# log-sum-exp (the flash-decoding merge): y = (exp(lse_1) y_1 + exp(lse_2) y_2) / (exp(lse_1) + exp(lse_2)).
# The prefix part stacks the n samples x G query heads of (prompt, kv head) as the rows of ONE matmul: the prompt
# K/V is read once for n rows instead of once per row.
# Row b of the decode batch is sample slot[b] % n of prompt slot[b] // n (slots of finished rows are absent).


def _masked(k, v, lens, bound):
    # keys [0, bound) in fp32 and the mask (N, bound) of the positions past each item's length
    k, v = k[:, :, :bound].float(), v[:, :, :bound].float()
    return k, v, torch.arange(bound, device=k.device)[None, :] >= lens[:, None]


def prefix_attention_ref(q, pk, pv, plen, gk, gv, glen, n, slot, scale=None, gen_bound=None):
    """q (B, n_head, hd); pk, pv (P, n_kv_head, Lp, hd) prompt K/V, plen (P,); gk, gv (B, n_kv_head, Lg, hd)
    generated K/V, glen (B,); slot (B,) -> y (B, n_head, hd). gen_bound: host bound of glen (default Lg)."""
    B, n_head, D = q.shape
    P, n_kv_head, Lp, _ = pk.shape
    G = n_head // n_kv_head
    scale = D ** -0.5 if scale is None else scale
    qs = q.float() * scale  # fp32 math, as the Triton kernel does after its loads
    pk, pv, pmask = _masked(pk, pv, plen, Lp)
    gk, gv, gmask = _masked(gk, gv, glen, gen_bound or gk.shape[2])
    Lg = gk.shape[2]
    # prompt scores: the n*G queries (samples x GQA group) of (prompt, kv head) are the rows of one matmul
    q1 = qs.new_zeros(P * n, n_head, D).index_copy_(0, slot, qs)  # finished slots: 0
    q1 = q1.view(P, n, n_kv_head, G, D).transpose(1, 2).reshape(P, n_kv_head, n * G, D)
    s1 = torch.matmul(q1, pk.transpose(-1, -2)).masked_fill_(pmask[:, None, None, :], float("-inf"))
    # own-token scores, per row, moved into the same (prompt, kv head, sample x group) layout
    s2 = torch.matmul(qs.view(B, n_kv_head, G, D), gk.transpose(-1, -2))  # (B, n_kv_head, G, Lg)
    s2 = s2.masked_fill_(gmask[:, None, None, :], float("-inf"))
    s2 = s2.new_zeros(P * n, n_kv_head, G, Lg).index_copy_(0, slot, s2)
    s2 = s2.view(P, n, n_kv_head, G, Lg).transpose(1, 2).reshape(P, n_kv_head, n * G, Lg)
    p = torch.cat([s1, s2], dim=-1).softmax(dim=-1)  # softmax over the union of the keys
    y1 = torch.matmul(p[..., :Lp], pv)  # (P, n_kv_head, n*G, hd)
    y1 = y1.view(P, n_kv_head, n, G, D).transpose(1, 2).reshape(P * n, n_kv_head, G, D)[slot]
    p2 = p[..., Lp:].reshape(P, n_kv_head, n, G, Lg).transpose(1, 2).reshape(P * n, n_kv_head, G, Lg)[slot]
    y = torch.matmul(p2, gv).add_(y1)  # (B, n_kv_head, G, hd)
    return y.view(B, n_head, D).to(q.dtype)


def prefix_attention(q, pk, pv, plen, gk, gv, glen, n, slot, scale=None, use_triton=None, gen_bound=None):
    """Decode attention of rows over [their prompt's shared K/V ; their own generated K/V], see above.
    q (B, n_head, hd); pk, pv (P, n_kv_head, Lp, hd), plen (P,); gk, gv (B, n_kv_head, Lg, hd), glen (B,);
    slot (B,) -> y (B, n_head, hd). gen_bound: optional host-side bound of glen (slices the keys, sizes splits)."""
    if not want_triton(q, use_triton):
        return prefix_attention_ref(q, pk, pv, plen, gk, gv, glen, n, slot, scale, gen_bound)
    B, n_head, D = q.shape
    P, n_kv_head, Lp, _ = pk.shape
    G = n_head // n_kv_head
    scale = D ** -0.5 if scale is None else scale
    # prefix: the n samples of a prompt are extra query heads, `per` samples per program (at most 64 query rows
    # per tile in 16-bit, 32 in fp32: shared memory, see test_kernels_compile_for_h100), c = n // per query rows
    # per prompt, each reading its prompt's K/V (kv_div = c)
    max_rows = 64 if q.element_size() <= 2 else 32
    per = max(d for d in range(1, n + 1) if n % d == 0 and (d * G <= max_rows or d == 1))
    c = n // per
    qs = q.new_zeros(P * n, n_head, D).index_copy_(0, slot, q)
    q1 = qs.view(P, c, per, n_kv_head, G, D).transpose(2, 3).reshape(P * c, n_kv_head * per * G, D)
    mid1, lse1 = _attn_splits(q1, pk, pv, plen, scale, kv_div=c)  # (P*c, n_kv*per*G, S1, hd)
    S1 = mid1.shape[2]
    mid1 = mid1.view(P, c, n_kv_head, per, G, S1, D).transpose(2, 3).reshape(P * n, n_head, S1, D)[slot]
    lse1 = lse1.view(P, c, n_kv_head, per, G, S1).transpose(2, 3).reshape(P * n, n_head, S1)[slot]
    # generated part, then one reduce over the splits of both
    mid2, lse2 = _attn_splits(q, gk, gv, glen, scale, len_bound=gen_bound)  # (B, n_head, S2, hd)
    return _attn_reduce(torch.cat([mid1, mid2], 2), torch.cat([lse1, lse2], 2), q.dtype)
