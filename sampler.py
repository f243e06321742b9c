"""
Batched rollouts for GRPO: P prompts x n samples. Each prompt's ViT + prefill runs once and its K/V is stored once,
shared by its n samples; all rows then decode together from a static cache, sampling on device, and rows that hit
EOS stop costing work (they are compacted out at sync points). The decode kernels are in decode_kernels.py; the
command line is sample.py.

    from sampler import Sampling, generate
    out = generate(model, [(input_ids, pixel_values), ...], n=8, max_new_tokens=512, eos_token_id=[im_end],
                   sampling=Sampling(temperature=1.0, ban=vision_ids),
                   seed=[s_0, s_1, ...])          # one seed per prompt: its samples do not depend on the batch
    out.tokens[r, :out.lengths[r]]                # row r = sample r % n of prompt r // n
    out.logprobs, out.entropies                   # fp32, under the model's raw distribution (GRPO's pi_old)

How one call runs:
1. Under FSDP2 every unit is all-gathered ONCE (unsharded(): a plain module sharing the gathered bf16 weights, no
   FSDP hooks), not once per decode step. The prompts are split into chunks whose KV cache and decode buffers fit
   the memory budget (free + cached-but-unused memory, which the caller may agree on across ranks; the arithmetic
   is at the end of this file).
2. Per chunk: the prefill runs the ViT and the LLM over the prompts (right-padded, causal, a fused SDPA kernel)
   and writes each prompt's K/V into its row of the prompt cache. Only the last position reaches lm_head.
3. Decode: every row steps at once; token t of a row attends over [its prompt's K/V ; its own t tokens]. Each row
   draws its uniforms from its prompt's seed before decoding starts, so a sample does not depend on chunking,
   compaction or the kernel path. The host looks at the finished flags only every `sync_every` steps, and drops
   finished rows from the batch only once enough of them have (compact_rule).
4. Log-probs and entropies come from model.lm_head_logits (fp32 logits: fp32 matmul on the CPU, bf16 inputs with fp32
   accumulation on CUDA; the trainer's token_logprobs uses the same function) under the raw distribution
   (temperature 1, no top-k/top-p/bans/repetition penalty): that is the pi_old(a|s) of the GRPO ratio; the token
   itself is drawn as the Sampling says.
"""
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from decode_kernels import cache_append, prefix_attention
from model import lm_head_logits, lm_head_weight

# -----------------------------------------------------------------------------
# the result


@dataclass
class Rollouts:
    """R = P * n rows, prompt-major (the n samples of prompt 0 first), on the CPU.
    tokens (R, max_new) long, 0 after each row's end; logprobs, entropies (R, max_new) fp32 under the raw
    distribution; lengths (R,) the tokens of each row (its EOS included); truncated (R,) True where the row hit
    max_new_tokens without an EOS."""
    tokens: torch.Tensor
    logprobs: torch.Tensor
    entropies: torch.Tensor
    lengths: torch.Tensor
    truncated: torch.Tensor
    n: int

    def response(self, r):  # row r's tokens as a list
        return self.tokens[r, :self.lengths[r]].tolist()

    @staticmethod
    def cat(parts):
        return Rollouts(*(torch.cat([getattr(p, f) for p in parts]) for f in
                          ("tokens", "logprobs", "entropies", "lengths", "truncated")), parts[0].n)

# -----------------------------------------------------------------------------
# sampling, on device: no host sync, one uniform per row per step


@dataclass(frozen=True)
class Sampling:
    """How each token is drawn: temperature (0 = greedy), top_k (0 = off), top_p (1 = off), ban (ids never drawn),
    repetition_penalty (1 = off; Skywork-R1V3's inference uses 1.05): transformers' RepetitionPenaltyLogitsProcessor,
    applied first, as generate() does: the logit of every id already in the row's sequence (its prompt, image-context
    tokens included, and its own tokens so far) is multiplied by the penalty where < 0, else divided by it.
    The log-probs and entropies stay those of the raw distribution whatever it says. A new knob is a field here, its
    branch in sample_next and, if it allocates, its mode (the memory accounting, DECODE_BYTES, reads mode)."""
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    ban: tuple = ()
    repetition_penalty: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "ban", tuple(sorted({int(t) for t in self.ban})))  # any iterable of ids
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or not self.repetition_penalty > 0:
            raise ValueError(f"sampler.py: need temperature >= 0, top_k >= 0, 0 < top_p <= 1 and "
                             f"repetition_penalty > 0, got {self}")

    @property
    def mode(self):
        """'greedy', 'sample' (plain sampling from the policy: sample_next's fast path) or 'shaped': which path
        sample_next takes, and so what it allocates (a repetition penalty adds REP_BYTES on top, any mode)."""
        if self.temperature == 0:
            return "greedy"
        plain = self.temperature == 1 and self.top_k == 0 and self.top_p == 1 and self.repetition_penalty == 1
        return "sample" if plain else "shaped"

    @property
    def penalizes(self):
        """Whether a repetition penalty applies: decode then keeps each row's seen-ids mask (rows, vocab) bool."""
        return self.repetition_penalty != 1

    def banning(self, ids):
        """The same sampling with ids banned too."""
        return replace(self, ban=self.ban + tuple(ids))


def repetition_penalty(logits, seen, penalty):
    """transformers' RepetitionPenaltyLogitsProcessor on (B, V) logits, with seen (B, V) bool the ids already in each
    row's sequence (instead of its token history): the same elementwise formula, so the same bits."""
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def seen_mask(prompts, n, V, device):
    """(len(prompts) * n, V) bool: row r has seen the ids of its prompt r // n (what generate() gives transformers'
    repetition penalty: the prompt ids, image-context tokens included). One host -> device copy."""
    T = max(len(ids) for ids, _ in prompts)
    ids = torch.tensor([list(ids) + [ids[0]] * (T - len(ids)) for ids, _ in prompts])  # padded with an id it has
    seen = torch.zeros(len(prompts), V, dtype=torch.bool).scatter_(1, ids, True)
    return seen.to(device).repeat_interleave(n, dim=0)


def sample_next(logits, u, sampling=Sampling(), ban=None, seen=None):
    """logits (B, V) fp32, u (B,) uniform in [0, 1) -> token (B,) drawn as `sampling` says, and its log-prob and the
    entropy (B,) under the RAW distribution: the GRPO ratio and the entropy logs are about the policy itself.
    ban: sampling.ban as a long tensor on the logits' device, made once per generate() (a copy per step would sync).
    seen: (B, V) bool, the ids each row has seen (seen_mask, updated by decode after every step), needed by a
    repetition penalty; the penalty shapes what is drawn only, never the log-probs."""
    if sampling.ban and ban is None:
        raise ValueError("sampler.py: sample_next needs sampling.ban as a device tensor (ban=)")
    if sampling.penalizes and seen is None:
        raise ValueError("sampler.py: sample_next needs the seen-ids mask (seen=) for a repetition penalty")
    s, mode = sampling, sampling.mode
    logp_raw = logits.log_softmax(dim=-1)
    p_raw = logp_raw.exp()
    entropy = -(p_raw * logp_raw).sum(dim=-1)
    V = logits.shape[-1]
    if mode == "sample":
        # plain sampling from the policy (the rollouts): reuse the softmax; a banned id gets probability 0 (the cdf
        # renormalises): one (B, V) copy
        probs = p_raw if ban is None else p_raw.index_fill(-1, ban, 0.0)
    else:
        # transformers' order: the repetition penalty on the raw logits, then temperature, top-k, top-p. The ban
        # commutes with the penalty (-inf stays -inf)
        x = repetition_penalty(logits, seen, s.repetition_penalty) if s.penalizes else logits
        if ban is not None:  # banned ids: never drawn
            x = x.index_fill(-1, ban, float("-inf")) if x is logits else x.index_fill_(-1, ban, float("-inf"))
        if mode == "greedy":
            tok = x.argmax(dim=-1)
            return tok, logp_raw.gather(-1, tok[:, None])[:, 0], entropy
        x = x / s.temperature
        if 0 < s.top_k < V:
            kth = torch.topk(x, s.top_k, dim=-1).values[:, -1:]  # (B, 1) the k-th largest logit
            x = x.masked_fill(x < kth, float("-inf"))
        if s.top_p < 1.0:  # nucleus (Holtzman et al. 2020): smallest set of top tokens with mass >= top_p
            srt, order = torch.sort(x, dim=-1, descending=True)
            p = srt.softmax(dim=-1)
            drop = (p.cumsum(dim=-1) - p) >= s.top_p  # the mass BEFORE this token reaches top_p; keeps the top-1
            x = x.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        probs = x.softmax(dim=-1)
    # inverse CDF: the first token whose cumulative probability exceeds u * total. fp64 keeps a 152k vocabulary
    # exact enough, and a p = 0 token (a flat step of the cdf) can never be the first one above u * total
    cdf = probs.double().cumsum(dim=-1)
    tok = torch.searchsorted(cdf, u[:, None].double() * cdf[:, -1:], right=True)[:, 0].clamp(max=V - 1)
    return tok, logp_raw.gather(-1, tok[:, None])[:, 0], entropy


def draw_uniforms(seeds, n, max_new, device):
    """(len(seeds) * n, max_new) uniforms: prompt p's n rows from its own seed."""
    out = []
    for s in seeds:
        g = torch.Generator(device=device).manual_seed(int(s))
        out.append(torch.rand(n, max_new, generator=g, device=device))
    return torch.cat(out)

# -----------------------------------------------------------------------------
# the cache


class DecodeCache:
    """All layers' K/V of one chunk of prompts, in two parts:
      pk, pv (n_layer, P, n_kv_head, max_prompt, hd)  each prompt's K/V once (the prefill writes it); plen (P,)
      gk, gv (n_layer, P*n, n_kv_head, max_new, hd)   each row's generated K/V; the active rows are the first B
    Active row b is sample slot[b] % n of prompt slot[b] // n; pos (B,) is the position its next token takes; t is
    the number of tokens every row has generated (rows step together). model.forward calls attend() once per layer.
    static=True (CUDA graphs): tensor write positions, full-length key bounds and no prompt dropping, so every
    decode step of a bucket has the same shapes and addresses."""

    def __init__(self, cfg, P, n, max_prompt, max_new, dtype, device, static=False):
        self.pk = torch.zeros(cfg.n_layer, P, cfg.n_kv_head, max_prompt, cfg.head_dim, dtype=dtype, device=device)
        self.pv = torch.zeros_like(self.pk)
        # zeros: masked keys times 0 stay 0 (not NaN)
        self.gk = torch.zeros(cfg.n_layer, P * n, cfg.n_kv_head, max_new, cfg.head_dim, dtype=dtype, device=device)
        self.gv = torch.zeros_like(self.gk)
        self.n, self.P, self.t, self.static = n, P, 0, static
        self.prefill_rows = None  # (p0, p1) while the prefill writes prompts p0..p1
        self.slot = torch.arange(P * n, device=device)
        self.gpos = torch.zeros(P * n, dtype=torch.long, device=device)  # = t, as a tensor (static mode)
        self.glen = None  # gpos + 1 of the active rows, made by the first layer of a step
        self.compactions = 0  # keep_rows calls (generate's stats)

    def start(self, plen):
        """After the prefill: plen (P,) prompt lengths; every row's next token sits right after its prompt."""
        self.plen, self.prefill_rows = plen, None
        self.pos = plen.repeat_interleave(self.n)

    def attend(self, layer, q, k, v):
        if self.prefill_rows is not None:  # q, k, v (C, heads, T, hd) of prompts p0..p1, right-padded
            p0, p1 = self.prefill_rows
            T = k.shape[2]
            self.pk[layer, p0:p1, :, :T], self.pv[layer, p0:p1, :, :T] = k, v
            # causal and no mask: a pad never reaches a real token, so the fused (flash) kernel can run
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
        B = q.shape[0]  # decode: q (B, n_head, 1, hd), k, v (B, n_kv_head, 1, hd)
        gk, gv = self.gk[layer, :B], self.gv[layer, :B]
        if layer == 0 or self.glen is None:  # once per step (and inside a captured CUDA graph), not once per layer
            self.glen = self.gpos[:B] + 1
        if self.static:
            cache_append(gk, gv, k, v, self.gpos[:B])
            bound = None
        else:  # every row writes position t: a strided copy
            gk[:, :, self.t], gv[:, :, self.t] = k[:, :, 0], v[:, :, 0]
            bound = self.t + 1
        pk, pv = self.pk[layer, :self.P], self.pv[layer, :self.P]
        y = prefix_attention(q[:, :, 0], pk, pv, self.plen, gk, gv, self.glen, self.n, self.slot[:B],
                             gen_bound=bound)
        return y[:, :, None]

    def advance(self, B):
        """After a decode step of the first B rows: one more token each."""
        self.pos[:B] += 1
        self.gpos[:B] += 1
        self.t, self.glen = self.t + 1, None

    def keep_rows(self, idx):
        """Move the active rows idx (B_new,) to the front, one layer at a time (the gather's temporary is one layer's
        K/V). Prompts with no active row left leave the prompt cache too (not in static mode)."""
        B, t = idx.numel(), self.t
        self.compactions += 1
        for i in range(self.gk.shape[0]):
            self.gk[i, :B, :, :t] = self.gk[i, idx, :, :t]
            self.gv[i, :B, :, :t] = self.gv[i, idx, :, :t]
        self.pos[:B], self.gpos[:B], slot = self.pos[idx], self.gpos[idx], self.slot[idx]
        if not self.static:
            prompt = slot // self.n
            keep_p = torch.unique(prompt)  # sorted
            if keep_p.numel() < self.P:
                for i in range(self.pk.shape[0]):
                    self.pk[i, :keep_p.numel()] = self.pk[i, keep_p]
                    self.pv[i, :keep_p.numel()] = self.pv[i, keep_p]
                self.P, self.plen = keep_p.numel(), self.plen[keep_p]
                slot = torch.searchsorted(keep_p, prompt) * self.n + slot % self.n
        self.slot[:B], self.glen = slot, None

# -----------------------------------------------------------------------------
# prefill and decode


def prefill(model, cache, prompts, max_tokens, w):
    """ViT + prefill of every prompt, in sub-batches of at most max_tokens padded tokens (they bound the activations,
    not the cache), writing each prompt's K/V into its row of cache. Returns the last positions' fp32 logits (P, V)
    (w: lm_head's weight from lm_head_weight; the logits are lm_head_logits', the trainer's own)."""
    device = cache.pk.device
    pad = 1 if model.cfg.image_token_id == 0 else 0  # any id that is not the image-context token
    out, p0 = [], 0
    while p0 < len(prompts):
        p1, T = p0 + 1, len(prompts[p0][0])
        while p1 < len(prompts) and (p1 + 1 - p0) * max(T, len(prompts[p1][0])) <= max_tokens:
            T, p1 = max(T, len(prompts[p1][0])), p1 + 1
        ids = torch.full((p1 - p0, T), pad, dtype=torch.long)  # right-padded (causal: a pad never reaches a token)
        for j, (p_ids, _) in enumerate(prompts[p0:p1]):
            ids[j, :len(p_ids)] = torch.tensor(p_ids)
        ids = ids.to(device)  # one host -> device copy per sub-batch
        pix = [p for _, p in prompts[p0:p1] if p is not None]
        pix = torch.cat(pix).to(device, non_blocking=True) if pix else None
        cache.prefill_rows = (p0, p1)
        pos = torch.arange(T, device=device)[None].expand(p1 - p0, T)
        h = model(ids, pix, cache=cache, pos=pos, return_hidden=True)  # (C, T, n_embd)
        last = torch.tensor([len(p_ids) - 1 for p_ids, _ in prompts[p0:p1]], device=device)
        out.append(lm_head_logits(h[torch.arange(p1 - p0, device=device), last], w))
        p0 = p1
    return torch.cat(out)


# compaction of the non-static path (compact=True): at a sync point, once at least this fraction of the active rows
# has finished. A compaction copies every layer's generated K/V of the B_keep kept rows (read + write: 2 B_keep t
# positions) and the prompt K/V of prompts that keep a row; not compacting costs every later step the finished rows'
# attention reads (d (plen + t) positions) and their share of the MLP and lm_head. At d >= B/4 a compaction is repaid
# in about 2 (1 - 1/4) / (1/4) = 6 steps at most (t <= plen + t), fewer with long prompts, and no more than a quarter
# of the batch is ever wasted; compacting for every finished row (compact=0.0, the old rule) pays the copy over and
# over near the end of a batch, when rows finish one by one.
COMPACT_FRAC = 0.25


def compact_rule(compact):
    """generate()'s compact argument -> the finished fraction that triggers a compaction, or None (never):
    True -> COMPACT_FRAC, False -> None, a float in [0, 1] -> itself (0.0: whenever a row has finished)."""
    if compact is True:
        return COMPACT_FRAC
    if compact is False or compact is None:
        return None
    if not 0 <= float(compact) <= 1:
        raise ValueError(f"sampler.py: compact must be a bool or a fraction in [0, 1], got {compact}")
    return float(compact)


def should_compact(n_rows, n_active, static, frac):
    """At a sync point with n_active of the n_rows decoding rows unfinished: the rows to keep (a prefix of the
    active-first order), or None to leave the batch as it is. static (CUDA graphs): the power-of-2 bucket that holds
    the active rows, when it is smaller than the batch (few distinct shapes, each captured once); else every active
    row, once the finished ones are at least frac of the batch."""
    if frac is None:
        return None
    if static:
        bucket = min(n_rows, 1 << (n_active - 1).bit_length())
        return bucket if bucket < n_rows else None
    done = n_rows - n_active
    return n_active if done > 0 and done >= frac * n_rows else None


def decode(model, cache, logits, u, w, eos, sync_every, compact, sampling, ban, seen=None):
    """Decode every row of a prefilled cache from the prefill's logits (P, V); u (R, max_new) the rows' uniforms;
    w lm_head's weight from lm_head_weight; ban: sampling.ban on the device (or None); compact: see compact_rule;
    seen: seen_mask's (R, V) for a repetition penalty (updated in place, compacted with the rows). Returns Rollouts
    (on the CPU)."""
    R, max_new = u.shape
    device = u.device
    frac = compact_rule(compact)
    out_tok = torch.zeros(R, max_new, dtype=torch.long, device=device)
    out_logp = torch.zeros(R, max_new, device=device)
    out_ent = torch.zeros(R, max_new, device=device)
    length = torch.full((R,), max_new, dtype=torch.long, device=device)
    ended = torch.zeros(R, dtype=torch.bool, device=device)  # by an EOS id
    eos_t = torch.tensor(eos or [-1], device=device)
    logits = logits.repeat_interleave(cache.n, dim=0)  # (R, V)
    rows = torch.arange(R, device=device)  # active row -> original row
    done = torch.zeros(R, dtype=torch.bool, device=device)
    # the sampling (penalty included) runs eagerly between graph replays: the graph holds the forward + lm_head only
    graph = CudaGraphStep(model, cache, w) if cache.static and device.type == "cuda" else None
    t = 0
    while True:
        tok, logp, ent = sample_next(logits, u[rows, t], sampling, ban, seen)  # token t of every active row
        out_tok[rows, t], out_logp[rows, t], out_ent[rows, t] = tok, logp, ent
        if seen is not None:  # one scatter per step, no scan over the history
            seen.scatter_(1, tok[:, None], True)
        new = ~done & torch.isin(tok, eos_t)
        length[rows] = torch.where(new, t + 1, length[rows])
        ended[rows] |= new
        done = done | new
        t += 1
        if t == max_new:
            break
        if eos and t % sync_every == 0:  # the only host syncs of the loop
            if bool(done.all()):
                break
            # static: pad with finished rows to a power-of-2 bucket, moved only when it shrinks
            keep_n = should_compact(done.numel(), int((~done).sum()), cache.static, frac)
            if keep_n is not None:
                keep = torch.cat([(~done).nonzero()[:, 0], done.nonzero()[:, 0]])[:keep_n]
                cache.keep_rows(keep)
                tok, rows, done = tok[keep], rows[keep], done[keep]
                seen = None if seen is None else seen[keep]
        # forward the sampled tokens at their positions; then every row holds t tokens
        B = tok.numel()
        if graph is not None:
            logits = graph(tok)
        else:
            h = model(tok[:, None], cache=cache, pos=cache.pos[:B, None], return_hidden=True)[:, -1]
            logits = lm_head_logits(h, w)
        cache.advance(B)
    past = torch.arange(max_new, device=device)[None] >= length[:, None]  # rows padded into a bucket kept going
    out_tok[past], out_logp[past], out_ent[past] = 0, 0.0, 0.0
    return Rollouts(out_tok.cpu(), out_logp.cpu(), out_ent.cpu(), length.cpu(), (~ended).cpu(), cache.n)


def graph_buckets(rows):
    """The batch sizes the static path can decode with, largest first: the whole chunk, then every power of 2
    below it (should_compact's buckets). CudaGraphStep captures in this order: decode only ever shrinks the batch,
    so the first capture is the largest and every later one fits in the memory the earlier ones freed."""
    return [rows] + [1 << k for k in range((rows - 1).bit_length() - 1, -1, -1)]


class CudaGraphStep:
    """The decode step (LLM forward + the lm_head_logits head) captured in one CUDA graph per batch bucket, replayed
    with the launch overhead of one kernel. Needs a static DecodeCache (its tensors keep their addresses) and a model
    without FSDP hooks (unsharded() gives one). The graphs share one memory pool (graph_pool_handle), captured largest
    first (graph_buckets): the pool holds the largest step's temporaries once, not once per bucket; what each graph
    keeps is its output logits (graph_bytes counts both). Sharing is safe because every replay's result is cloned
    before the next replay and the graphs never run concurrently. Sampling (bans, repetition penalty) is not in the
    graph: it runs eagerly on the cloned logits. Not verified on a GPU in this repo's CI (no GPU): tools/gpu_check.py
    runs it."""

    def __init__(self, model, cache, w):
        self.model, self.cache, self.w, self.graphs = model, cache, w, {}
        self.pool = torch.cuda.graph_pool_handle()
        self.order = []  # the buckets in capture order (largest first)

    def __call__(self, tok):
        B = tok.numel()
        if B not in self.graphs:
            tok_buf = tok.clone()
            step = lambda: lm_head_logits(  # noqa: E731
                self.model(tok_buf[:, None], cache=self.cache, pos=self.cache.pos[:B, None],
                           return_hidden=True)[:, -1], self.w)
            # the captured step must not write the cache: warm up on a side stream, then capture
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                step()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                out = step()
            self.graphs[B] = (g, tok_buf, out)
            self.order.append(B)
        g, tok_buf, out = self.graphs[B]
        tok_buf.copy_(tok)
        g.replay()
        return out.clone()

# -----------------------------------------------------------------------------
# generate()


def generate(model, prompts, n=1, max_new_tokens=256, *, sampling=Sampling(), eos_token_id=None, seed=0, sync_every=8,
             compact=True, budget=None, prefill_tokens=16384, cuda_graph=False, stats=None):
    """prompts: list of (input_ids list with the image-context tokens expanded, pixel_values (tiles,3,H,W) | None).
    n samples per prompt, at most max_new_tokens each; sampling: how tokens are drawn (Sampling: temperature,
    top_k, top_p, ban, repetition_penalty); eos_token_id: list of ids (or one); seed: an int (prompt p gets
    seed + p) or one seed per prompt. budget: bytes for the KV cache + decode buffers (default memory_budget()
    after the weights are gathered). cuda_graph: the static path (rows compacted into power-of-2 buckets, static
    shapes), with the decode step captured in a CUDA graph per bucket on a GPU (on the CPU the same static path
    runs without capture: that is what the tests check). compact: drop finished rows from the non-static decode
    batch (compact_rule: True = once COMPACT_FRAC of the rows have finished, a float = that fraction, False =
    never); the rollouts are the same whichever. stats: timings, chunks, decode steps and compactions. Returns
    Rollouts (prompt-major)."""
    cfg = model.cfg
    if max_new_tokens < 1 or n < 1 or not prompts:
        raise ValueError(f"sampler.py: need max_new_tokens >= 1, n >= 1 and a prompt (got {max_new_tokens}, {n}, "
                         f"{len(prompts)} prompts)")
    check_prompts(prompts, cfg)
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    seeds = [seed + p for p in range(len(prompts))] if isinstance(seed, int) else list(seed)
    if len(seeds) != len(prompts):
        raise ValueError(f"sampler.py: {len(seeds)} seeds for {len(prompts)} prompts")
    compact_rule(compact)  # refused before any work
    st = dict(prefill_s=0.0, decode_s=0.0, decode_steps=0, new_tokens=0, cache_bytes=0, chunks=0, compactions=0)
    was_training = model.training
    model.eval()
    try:
        with unsharded(model) as m, torch.no_grad():
            p = next(m.parameters())
            device, dtype = p.device, p.dtype  # the compute dtype: bf16 weights gathered from fp32 masters
            # once per call: a host -> device copy per decode step would sync
            ban = torch.tensor(sampling.ban, dtype=torch.long, device=device) if sampling.ban else None
            budget = memory_budget(device) if budget is None else budget
            lengths = [len(ids) for ids, _ in prompts]
            w = m.llm.lm_head.weight
            # the log-prob lm_head's weight for the whole call (model.lm_head_weight: fp32 on the CPU, a copy only
            # for bf16 weights; bf16 on CUDA, no copy), allocated after the budget was measured
            w_head = lm_head_weight(w)
            budget -= 0 if w_head is w else w_head.numel() * w_head.element_size()
            graphs = bool(cuda_graph) and device.type == "cuda"
            parts = []
            for a, b in fit_chunks(cfg, lengths, n, max_new_tokens, dtype, budget, sampling, prefill_tokens,
                                   cuda_graph=graphs):
                t0 = time.perf_counter()
                cache = DecodeCache(cfg, b - a, n, max(lengths[a:b]), max_new_tokens, dtype, device, bool(cuda_graph))
                logits = prefill(m, cache, prompts[a:b], prefill_tokens, w_head)
                cache.start(torch.tensor(lengths[a:b], device=device))
                u = draw_uniforms(seeds[a:b], n, max_new_tokens, device)
                seen = seen_mask(prompts[a:b], n, logits.shape[1], device) if sampling.penalizes else None
                t1 = time.perf_counter()
                parts.append(decode(m, cache, logits, u, w_head, eos, sync_every, compact, sampling, ban, seen))
                st["prefill_s"] += t1 - t0
                st["decode_s"] += time.perf_counter() - t1
                st["cache_bytes"] = max(st["cache_bytes"], cache_bytes(cfg, b - a, n, cache.pk.shape[3],
                                                                       max_new_tokens, dtype))
                st["chunks"] += 1
                st["decode_steps"] += cache.t
                st["compactions"] += cache.compactions
                del cache, logits, u, seen  # before the next chunk's: one chunk's cache at a time
    finally:
        model.train(was_training)
    out = Rollouts.cat(parts)
    st["new_tokens"] = int(out.lengths.sum())
    st["tokens_per_s"] = st["new_tokens"] / max(st["prefill_s"] + st["decode_s"], 1e-9)
    if stats is not None:
        stats.update(st)
    return out


def check_prompts(prompts, cfg):
    for i, p in enumerate(prompts):
        if not (isinstance(p, (tuple, list)) and len(p) == 2):
            raise ValueError(f"sampler.py: prompts[{i}] must be a pair (input_ids, pixel_values), got {type(p)}")
        ids, pix = p
        if len(ids) == 0:
            raise ValueError(f"sampler.py: prompts[{i}] has no input_ids")
        bad = [t for t in ids if not 0 <= int(t) < cfg.vocab_size]
        if bad:
            raise ValueError(f"sampler.py: prompts[{i}] has token ids outside [0, {cfg.vocab_size}): {bad[:5]}")
        if pix is not None and pix.ndim != 4:
            raise ValueError(f"sampler.py: prompts[{i}] pixel_values must be (tiles, 3, H, W), got {tuple(pix.shape)}")
        n_img, n_tiles = sum(int(t) == cfg.image_token_id for t in ids), 0 if pix is None else pix.shape[0]
        if n_img != n_tiles * cfg.tokens_per_tile:
            raise ValueError(f"sampler.py: prompts[{i}] has {n_img} image-context tokens but {n_tiles} tiles x "
                             f"{cfg.tokens_per_tile} tokens per tile")

# -----------------------------------------------------------------------------
# FSDP2: gather the full weights ONCE for a rollout phase, instead of n_layer all-gathers per decode step


@contextmanager
def unsharded(model):
    """Yields a plain (hook-free) module whose parameters are an FSDP2 model's gathered weights (bf16 under mixed
    precision): memory + (full - shard) bf16 params per GPU for the rollout phase; resharded on exit. A module
    that is not FSDP2 is yielded as it is."""
    from torch.distributed.fsdp import FSDPModule
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units or id(model) in _gathered:  # a plain module, or already gathered by an outer block
        yield _gathered.get(id(model), model)
        return
    for m in units:  # all-gather every unit now (the first call also runs FSDP's lazy init)
        m.unshard()
    try:
        with torch.device("meta"):
            view = type(model)(model.cfg)
        # after unshard() the modules hold the gathered tensors as plain parameters: share them, without the hooks
        view.load_state_dict(dict(model.named_parameters(remove_duplicate=False)), strict=True, assign=True)
        view.llm.tie_weights()
        _gathered[id(model)] = view.eval()
        yield view
    finally:
        _gathered.pop(id(model), None)
        for m in units:
            m.reshard()


_gathered = {}  # id(FSDP model) -> its gathered view, while an unsharded() block is open

# -----------------------------------------------------------------------------
# the memory budget: what one generate() call allocates, and the chunks that fit


def cache_bytes(cfg, P, n, max_prompt, max_new, dtype):
    # K and V, every layer: the prompts once, the generated tokens per row
    per_pos = 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * torch.empty(0, dtype=dtype).element_size()
    return per_pos * (P * max_prompt + P * n * max_new)


# sample_next's peak per row per vocab entry by Sampling.mode, the fp32 logits included (measured, tests/test_plan.py):
# plain sampling = logits + log-softmax + probs + the fp64 copy and its cumsum; greedy: logits, log-softmax, probs,
# p*logp, no cdf; temperature / top-k / top-p add the shaped copies, the sort and its softmax. Banned ids add one
# (rows, vocab) copy. A repetition penalty adds decode's seen-ids mask (bool, for the whole decode) and the
# penalty's transient (its where() over the logits: +9 bytes measured on top of greedy's peak, tests/test_sampler.py;
# within the shaped path's sort peak otherwise, so this is an upper bound there).
DECODE_BYTES = {"sample": 4 + 4 + 4 + 8 + 8, "greedy": 16, "shaped": 53}
BAN_BYTES = 4
REP_BYTES = 1 + 9


def decode_bytes(cfg, rows, max_new, mode="sample", ban=True, rep=False):
    # sample_next over (rows, vocab) (mode: Sampling.mode; ban: whether it bans ids, as rollouts always do; rep:
    # whether a repetition penalty applies), plus decode()'s outputs (tokens int64, log-probs, entropies) and uniforms
    per_entry = DECODE_BYTES[mode] + BAN_BYTES * ban + REP_BYTES * rep
    return rows * cfg.vocab_size * per_entry + rows * max_new * (8 + 4 + 4 + 4)


def graph_bytes(cfg, rows, dtype):
    """CudaGraphStep's memory for a chunk of `rows` rows: every bucket's output logits (fp32, kept by its graph:
    graph_buckets(rows) sums to < 3 rows) and the shared pool's temporaries, those of the largest bucket's step (an
    LLM layer's activations per row, as in prefill_bytes, and its fp32 logits)."""
    e = torch.empty(0, dtype=dtype).element_size()
    outputs = sum(graph_buckets(rows)) * cfg.vocab_size * 4
    return outputs + rows * (e * (3 * cfg.mlp_hidden + 4 * cfg.n_embd) + 4 * cfg.vocab_size)


def prefill_bytes(cfg, max_tokens, dtype):
    """The largest activations of one prefill sub-batch of max_tokens padded tokens: an LLM layer's MLP (gate, up,
    their product) and residual stream, or the ViT's MLP over the sub-batch's tiles (at most one tile per
    tokens_per_tile prompt tokens)."""
    e = torch.empty(0, dtype=dtype).element_size()
    vit_tokens = max_tokens // cfg.tokens_per_tile * (cfg.grid ** 2 + 1)
    return e * max(max_tokens * (3 * cfg.mlp_hidden + 4 * cfg.n_embd),
                   vit_tokens * (2 * cfg.vit_mlp + 6 * cfg.vit_hidden))


# The rollout budget keeps a margin: BUDGET_FRACTION of what is free, minus BUDGET_RESERVE. The 10% covers what the
# arithmetic here does not model exactly: the formulas above are checked to within 15% of measured bytes
# (tests/test_plan.py) and the caching allocator rounds and splits blocks (2 MiB pages, 20 MiB segments for large
# tensors on CUDA). The fixed reserve is memory that other code takes outside these formulas while the rollout runs:
# on CUDA (1 GiB) the cuBLAS / cuBLASLt workspaces, NCCL's buffers (allocated outside PyTorch's allocator), the
# CUDA-graph capture's own allocations and Triton's launches; on the CPU (256 MiB) the Python heap, the tokenizer and
# the reward verifiers' processes. These numbers are a judgement, not a measurement: no GPU in this repo's CI.
BUDGET_FRACTION = 0.9
BUDGET_RESERVE = {"cuda": 1 << 30, "cpu": 256 << 20}


def budget_from_free(free, device_type):
    """The rollout budget for `free` bytes of free memory on a device of this type (memory_budget's arithmetic)."""
    return max(0, int(free * BUDGET_FRACTION) - BUDGET_RESERVE.get(device_type, BUDGET_RESERVE["cuda"]))


def host_available():
    """Bytes of host RAM a process can still allocate: Linux's MemAvailable (free pages plus the page cache and
    slabs the kernel can reclaim), else the free pages. Free pages alone undercount it by the page cache, which
    after reading a checkpoint is gigabytes (dev/rehearsal.sh's grpo stage saw a negative budget that way)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def memory_budget(device, free=None):
    """Bytes a rollout may allocate now: budget_from_free of the free memory. On CUDA that is the free memory once
    the allocator has returned what it caches but does not use (counting that cached memory as free would count the
    free space inside segments that still hold live tensors, which one big cache tensor cannot use); on the CPU this
    process's share of the available RAM (the host's ranks share it: torchrun's LOCAL_WORLD_SIZE). free: bytes
    to use instead of measuring (tests)."""
    if free is None:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            free = torch.cuda.mem_get_info(device)[0]
        else:
            free = host_available() // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return budget_from_free(free, device.type)


def fit_chunks(cfg, lengths, n, max_new, dtype, budget, sampling=Sampling(), prefill_tokens=16384, cuda_graph=False):
    """Split prompts (their lengths, in order) into consecutive chunks whose cache + decode buffers (those of
    sampling; with cuda_graph, CudaGraphStep's graphs too), next to one prefill sub-batch's activations, fit
    budget."""
    chunks, a = [], 0
    budget = budget - prefill_bytes(cfg, prefill_tokens, dtype)
    mode, ban, rep = sampling.mode, bool(sampling.ban), sampling.penalizes

    def need(k, longest):  # k prompts, the longest of them
        return cache_bytes(cfg, k, n, longest, max_new, dtype) + decode_bytes(cfg, k * n, max_new, mode, ban, rep) + \
            (graph_bytes(cfg, k * n, dtype) if cuda_graph else 0)
    while a < len(lengths):
        b, longest = a, 0
        while b < len(lengths) and need(b + 1 - a, max(longest, lengths[b])) <= budget:
            longest, b = max(longest, lengths[b]), b + 1
        if b == a:
            raise MemoryError(f"sampler.py: one prompt of {lengths[a]} tokens x {n} samples x {max_new} new tokens "
                              f"needs {need(1, lengths[a]) / 2**30:.2f} GiB of KV cache and decode buffers, but the "
                              f"budget is {budget / 2**30:.2f} GiB after the prefill's; lower n or max_new_tokens "
                              f"(or use tensor parallelism)")
        chunks.append((a, b))
        a = b
    return chunks
