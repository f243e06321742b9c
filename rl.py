"""
GRPO math as short pure functions, imported by grpo.py. Each function cites the paper it implements.

Notation: B responses, T response positions, V vocabulary, C model width. `mask` (B,T) is 1 (or True) on
response tokens and 0 on prompt/padding. `advantages` are per response (B,), broadcast over its tokens.

  group_advantages      GRPO / Dr.GRPO outcome advantages per group of n samples
  agg_loss              per-token loss -> scalar: R1V3 eq. 7 (default), DAPO token mean, Dr.GRPO constant
  ppo_clip_loss         PPO clipped surrogate with clip-higher (DAPO) and dual-clip, plus clip/KL stats
  kl_k3                 Schulman's k3 KL estimator (optional KL to a frozen reference; off by default in R1V3)
  EntropyControl        Skywork-OR1 adaptive entropy coefficient
  informative_groups    groups whose rewards are not all equal (OR1 rejection sampling, R1V2 SSB motivation)
  dynamic_sampling_rounds  DAPO dynamic sampling: rounds of groups until every rank has enough informative ones
  zero_truncated        Skywork-OR1: truncated responses get reward 0
  overlong_penalty      DAPO soft overlong punishment
  SampleBuffer          R1V2 Selective Sample Buffer (earlier steps' non-zero |A| samples, drawn by |A|, capped)
(log-probs and entropies come from model.py: model(ids, pix, targets=...) -> token_logprobs, in chunks)

How grpo.py puts the loss together (on each micro-batch, with the FULL batch's normaliser `denom`):
    logp, ent = model(input_ids, pixel_values, targets=targets)   # model.token_logprobs, chunked
    loss, stats = ppo_clip_loss(logp, old_logp, advantages, mask, eps_low, eps_high, agg, norm_const, denom, c)
    if kl_coef > 0:   loss = loss + kl_coef * agg_loss(kl_k3(logp, ref_logp), mask, agg, norm_const, denom)
    if ent_coef > 0:  loss = loss - ent_coef * agg_loss(ent, mask, agg, norm_const, denom)
"""
import torch

AGGS = ("seq_mean_token_mean", "token_mean", "seq_sum_const")

# -----------------------------------------------------------------------------
# advantages


def _check_groups(rewards, n, where):
    if rewards.dim() != 1 or n < 1 or rewards.numel() % n != 0:
        raise ValueError(f"rl.py {where}: rewards must be 1-D with a length that is a multiple of the group size n; "
                         f"got shape {tuple(rewards.shape)} and n={n}")
    return rewards.float().view(-1, n)  # (G, n), prompt-major: group g is rewards[g*n:(g+1)*n]


# GRPO (DeepSeekMath arXiv 2402.03300 sec. 4.1.2, outcome supervision): A_i = (r_i - mean(r)) / std(r) per group,
# the same A_i on every token of response i. Dr.GRPO (arXiv 2503.20783 sec. 3.1): drop the std division
# (it up-weights near-all-correct / near-all-wrong groups).
# We use the POPULATION std (unbiased=False): the group is the whole distribution we normalise, not a sample
# of a larger one, so each group's advantages have exactly mean 0 and mean square ~1; it is also defined for
# n=1. (verl/TRL use the unbiased std; it only shrinks A by sqrt((n-1)/n), e.g. 0.984 at n=32.)
# Groups whose rewards are all equal get A = 0 exactly (no signal), tested by max == min rather than by a
# float std that rounding can leave at 1e-9.
def group_advantages(rewards, n, eps=1e-6, std_norm=True):
    r = _check_groups(rewards, n, "group_advantages")  # (G, n)
    centered = r - r.mean(dim=1, keepdim=True)
    if std_norm:
        centered = centered / (r.std(dim=1, unbiased=False, keepdim=True) + eps)
    flat = (r.amax(dim=1) == r.amin(dim=1))[:, None]  # (G, 1)
    return torch.where(flat, torch.zeros_like(centered), centered).view(-1)  # (G*n,)


# -----------------------------------------------------------------------------
# losses


# Reduce a per-token loss (B,T) to a scalar.
#  'seq_mean_token_mean' R1V3 eq. 7 (= GRPO's 1/G sum_i 1/|o_i| sum_t): each response's mean over its own tokens,
#                        then the mean over responses. Default.
#  'token_mean'          DAPO sec. 3.3 / Skywork-OR1 (MAGIC loss): sum over all response tokens / number of tokens,
#                        so long responses weigh in proportion to their length.
#  'seq_sum_const'       Dr.GRPO sec. 3.1: each response's token sum / a constant (the generation budget,
#                        norm_const; default this batch's T), then the mean over responses.
# Gradient accumulation: pass denom = the FULL batch's normaliser (total response tokens for 'token_mean',
# total responses for the other two) and the micro-batch losses sum exactly to the full-batch loss.
# For 'seq_sum_const' also pass a fixed norm_const: micro-batches trimmed to their own T would differ.
def agg_loss(per_token, mask, agg="seq_mean_token_mean", norm_const=None, denom=None):
    if per_token.shape != mask.shape or per_token.dim() != 2:
        raise ValueError(f"rl.py agg_loss: per_token {tuple(per_token.shape)} and mask {tuple(mask.shape)} "
                         "must both be (B,T)")
    m = mask.bool()
    tok = torch.where(m, per_token, torch.zeros_like(per_token))  # where, not *: a NaN/inf on padding stays out
    if agg == "token_mean":
        return tok.sum() / (m.sum().clamp(min=1) if denom is None else denom)
    if agg == "seq_mean_token_mean":
        seq = tok.sum(1) / m.sum(1).clamp(min=1)  # (B,)
    elif agg == "seq_sum_const":
        seq = tok.sum(1) / (per_token.shape[1] if norm_const is None else norm_const)  # (B,)
    else:
        raise ValueError(f"rl.py agg_loss: unknown agg={agg!r}, expected one of {AGGS}")
    return seq.sum() / (seq.shape[0] if denom is None else denom)


def _masked_mean(x, m):
    return torch.where(m, x, torch.zeros_like(x)).sum() / m.sum().clamp(min=1)


LOG_RATIO_MAX = 20.0  # verl's clamp: exp(20) ~ 5e8 is finite, so a masked or far off-policy token cannot give inf


# PPO clipped surrogate (Schulman et al. 2017, eq. 7) as used by GRPO, with the ratio against the OLD (rollout)
# policy (R1V3 eq. 7; its pi_ref is a typo) and decoupled clip range [1-eps_low, 1+eps_high] (DAPO sec. 3.1,
# "clip-higher"; R1V3 default symmetric 0.2). Per token: -min(r*A, clip(r)*A). Dual-clip (Ye et al. 2020,
# "Mastering complex control in MOBA games", eq. 5; verl's clip_ratio_c): for A < 0 the loss is also capped at
# -c*A, so a ratio far above 1 (an off-policy sample the policy now likes much more) cannot make it unbounded;
# the log-ratio is clamped to +-20 first (verl). On-policy (ratio 1) neither bites.
# Returns (loss, stats); stats are detached 0-dim tensors over this call's response tokens: clip_frac, the share
# of tokens whose gradient a clip zeroes (r < 1-eps_low with A < 0, r > 1+eps_high with A > 0, or the dual clip),
# and approx_kl, the k3 estimate of KL(old || new) (the samples are from old).
def ppo_clip_loss(logp, old_logp, advantages, mask, eps_low=0.2, eps_high=0.2, agg="seq_mean_token_mean",
                  norm_const=None, denom=None, clip_ratio_c=3.0):
    if logp.shape != old_logp.shape or logp.shape != mask.shape or advantages.shape != logp.shape[:1]:
        raise ValueError(f"rl.py ppo_clip_loss: need logp, old_logp, mask (B,T) and advantages (B,); got "
                         f"{tuple(logp.shape)}, {tuple(old_logp.shape)}, {tuple(mask.shape)}, "
                         f"{tuple(advantages.shape)}")
    m = mask.bool()
    log_ratio = torch.where(m, logp - old_logp, torch.zeros_like(logp)).clamp(-LOG_RATIO_MAX, LOG_RATIO_MAX)
    ratio = torch.exp(log_ratio)  # (B,T); 1 on padding
    A = advantages.to(logp.dtype)[:, None]  # (B,1)
    per_token = torch.maximum(-ratio * A, -ratio.clamp(1 - eps_low, 1 + eps_high) * A)  # (B,T)
    dual = (A < 0) & (per_token > -clip_ratio_c * A)
    per_token = torch.where(dual, -clip_ratio_c * A, per_token)
    loss = agg_loss(per_token, mask, agg, norm_const, denom)
    with torch.no_grad():
        clipped = ((ratio < 1 - eps_low) & (A < 0)) | ((ratio > 1 + eps_high) & (A > 0)) | dual
        stats = dict(clip_frac=_masked_mean(clipped.float(), m), approx_kl=_masked_mean(kl_k3(old_logp, logp), m))
    return loss, stats


# Schulman's k3 estimator ("Approximating KL divergence", 2020), per token, of KL(pi || ref) from samples of pi:
# with d = ref_logp - logp, k3 = exp(d) - d - 1 >= 0, unbiased, low variance. GRPO (DeepSeekMath eq. 4) adds
# it to the loss as + kl_coef * agg_loss(kl_k3(logp, ref_logp), mask, agg) (R1V3 and OR1: kl_coef = 0).
# NaN-safe as verl's low_var_kl: d is clamped to +-20 and k3 to [0, 10]. Without the clamp a very negative log-prob
# at a masked position (logp < -88 in fp32) makes exp(d) inf there, and the masked 0 * inf is NaN in backward.
def kl_k3(logp, ref_logp):
    d = (ref_logp - logp).clamp(-LOG_RATIO_MAX, LOG_RATIO_MAX)
    return (torch.exp(d) - d - 1).clamp(max=10.0)


# -----------------------------------------------------------------------------
# entropy control


class EntropyControl:
    """Skywork-OR1 (arXiv 2505.22312) sec. 3, MAGIC loss, "adaptive entropy control". At step k with batch
    entropy e_k the bonus coefficient is alpha_k = c_k * 1{e_k <= target}; then
    c_{k+1} = clip(c_k + delta if e_k < target else c_k - delta, 0, c_max), c_0 = 0.
    The loss gets - alpha_k * agg_loss(entropy, mask, agg) (same aggregation as the policy loss).
    Defaults: target 0.2, delta 1e-4, c_max 0.005 (OR1's scripts; the paper text uses delta 0.005).
    A small class because its state must go into checkpoints."""

    def __init__(self, target=0.2, delta=1e-4, c_max=0.005):
        self.target, self.delta, self.c_max, self.c = target, delta, c_max, 0.0

    def update(self, entropy):
        # entropy: float (mean token entropy of this step's batch); returns alpha_k to use in this step's loss
        e = float(entropy)
        alpha = self.c if e <= self.target else 0.0
        self.c = min(max(self.c + (self.delta if e < self.target else -self.delta), 0.0), self.c_max)
        return alpha

    def state_dict(self):  # the state only: target, delta and c_max come from the config (a resume may change them)
        return dict(c=self.c)

    def load_state_dict(self, sd):
        self.c = sd["c"]


# -----------------------------------------------------------------------------
# data side


# Skywork-OR1 sec. 3 (MAGIC, "rejection sampling") / R1V2 (SSB motivation): a group whose n rewards are all
# equal (all correct or all wrong) has zero advantage everywhere and carries no gradient signal.
def informative_groups(rewards, n):
    r = _check_groups(rewards, n, "informative_groups")
    return r.amax(dim=1) > r.amin(dim=1)  # (G,) bool


# DAPO (arXiv 2503.14476) sec. 3.2, dynamic sampling: keep drawing rounds of groups, keeping only the informative
# ones, until `target` are collected, at most max_rounds rounds. draw(round) runs one round and returns its groups'
# informative flags (G,) bool. With several ranks every rank must run the same rounds (rollouts may hold
# collectives, the next round's prompts come from one shared order): the loop stops when the FEWEST kept on any
# rank reaches target (min_over_ranks: the minimum of a count over ranks). Returns the (round, group) pairs kept
# (the first `target`, in order; fewer if the cap was hit) and the number of rounds drawn.
def dynamic_sampling_rounds(draw, target, max_rounds, min_over_ranks=lambda x: x):
    kept, r = [], 0
    while r < max_rounds:
        informative = draw(r)
        kept += [(r, g) for g in informative.nonzero()[:, 0].tolist()]
        r += 1
        if min_over_ranks(len(kept)) >= target:
            break
    return kept[:target], r


# Skywork-OR1 sec. 3 (MAGIC, "no advantage mask for truncated responses"): a response cut at the length limit
# gets reward 0 (no mask; it then gets a negative advantage in a group with any success).
# rewards (N,), truncated (N,) bool.
def zero_truncated(rewards, truncated):
    return torch.where(truncated.bool(), torch.zeros_like(rewards), rewards)


# DAPO sec. 3.4, soft overlong punishment, added to the reward: 0 up to max_len - buffer tokens, then falling
# linearly to -penalty at max_len (DAPO: ((L_max - L_cache) - |y|) / L_cache, and -1 beyond L_max, which a
# response capped at max_len never reaches). lengths (N,) -> (N,) float.
def overlong_penalty(lengths, max_len, buffer, penalty=1.0):
    over = (lengths.float() - (max_len - buffer)).clamp(min=0)
    return -penalty * (over / buffer).clamp(max=1.0)


class SampleBuffer:
    """R1V2 (arXiv 2504.16656), Selective Sample Buffer (SSB): zero-advantage samples carry no signal and
    their share grows in training, so keep samples with non-zero advantage and mix them into later batches,
    drawn in proportion to |A|. A step draws from EARLIER steps only (its own samples would be duplicates), then
    adds its own. Each sample is trained on at most max_uses times and dropped max_age steps after it was made
    (its log-probs grow stale); bounded (max_size, oldest evicted first). A sample is a JSON-serialisable dict
    with an "adv" key."""

    def __init__(self, max_size=1024, max_uses=2, max_age=4):
        self.max_size, self.max_uses, self.max_age = max_size, max_uses, max_age
        self.items = []  # {"sample": s, "step": made at, "uses": n}, oldest first

    def __len__(self):
        return len(self.items)

    def add(self, samples, step):
        # returns how many were kept (those with A != 0)
        new = [dict(sample=s, step=step, uses=0) for s in samples if float(s["adv"]) != 0.0]
        self.items = (self.items + new)[-self.max_size:]  # FIFO eviction
        return len(new)

    def draw(self, k, step, generator=None):
        """min(k, available) distinct samples made before `step` and younger than max_age steps, P(item) in
        proportion to |A| (multinomial without replacement); each drawn sample's use count goes up, and samples
        past either cap leave the buffer."""
        self.items = [it for it in self.items if step - it["step"] <= self.max_age]
        ok = [i for i, it in enumerate(self.items) if it["step"] < step]
        k = min(k, len(ok))
        if k == 0:
            return []
        w = torch.tensor([abs(float(self.items[i]["sample"]["adv"])) for i in ok])
        picked = [ok[j] for j in torch.multinomial(w, k, replacement=False, generator=generator).tolist()]
        for i in picked:
            self.items[i]["uses"] += 1
        out = [self.items[i]["sample"] for i in picked]
        self.items = [it for it in self.items if it["uses"] < self.max_uses]
        return out

    def mix(self, batch, frac, step, generator=None):
        """One SSB step on a batch of padded tensors (prompt, length, adv, row: (N,); tokens, logp: (N, W)): draw
        round(frac / (1 - frac) * N) samples from earlier steps, so that they are `frac` of the result, remember
        the batch's non-zero-A rows, and return the batch with the drawn rows appended (row -1: not from this
        step's rollouts), every row padded to one width."""
        old = self.draw(round(frac / (1 - frac) * len(batch["prompt"])), step, generator)
        self.add([dict(prompt=int(batch["prompt"][r]), length=int(L), adv=float(batch["adv"][r]),
                       tokens=batch["tokens"][r, :L].tolist(), logp=batch["logp"][r, :L].tolist())
                  for r, L in enumerate(batch["length"].tolist()) if batch["adv"][r] != 0], step)
        if not old:
            return batch
        W = max(batch["tokens"].shape[1], max(s["length"] for s in old))
        tokens, logp = torch.zeros(len(old), W, dtype=torch.long), torch.zeros(len(old), W)
        for b, s in enumerate(old):
            tokens[b, :s["length"]], logp[b, :s["length"]] = torch.tensor(s["tokens"]), torch.tensor(s["logp"])
        pad = lambda t: torch.nn.functional.pad(t, (0, W - t.shape[1]))  # noqa: E731
        col = lambda key: torch.tensor([s[key] for s in old])  # noqa: E731
        out = {k: torch.cat([batch[k], col(k)]) for k in ("prompt", "length", "adv")}
        return dict(out, row=torch.cat([batch["row"], torch.full((len(old),), -1)]),
                    tokens=torch.cat([pad(batch["tokens"]), tokens]), logp=torch.cat([pad(batch["logp"]), logp]))

    def state_dict(self):  # the samples only: the caps come from the config (a resume may change them)
        return dict(items=[dict(it) for it in self.items])

    def load_state_dict(self, sd):
        self.items = [dict(it) for it in sd["items"]][-self.max_size:]
