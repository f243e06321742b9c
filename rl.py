"""
GRPO math as short pure functions, imported by grpo.py. Each function cites the paper it implements.

Notation: B responses, T response positions, V vocabulary, C model width. `mask` (B,T) is 1 (or True) on
response tokens and 0 on prompt/padding. `advantages` are per response (B,), broadcast over its tokens.

  group_advantages      GRPO / Dr.GRPO outcome advantages per group of n samples
  agg_loss              per-token loss -> scalar: R1V3 eq. 7 (default), DAPO token mean, Dr.GRPO constant
  ppo_clip_loss         PPO clipped surrogate with clip-higher (DAPO), plus clip/KL stats
  kl_k3                 Schulman's k3 KL estimator (optional KL to a frozen reference; off by default in R1V3)
  EntropyControl        Skywork-OR1 adaptive entropy coefficient
  informative_groups    groups whose rewards are not all equal (OR1 rejection sampling, R1V2 SSB motivation)
  dynamic_sampling      DAPO dynamic sampling: accumulate informative groups across rounds, with a cap
  SampleBuffer          R1V2 Selective Sample Buffer (non-zero |A| samples, FIFO, drawn in proportion to |A|)
  zero_truncated        Skywork-OR1: truncated responses get reward 0
(log-probs and entropies come from model.py: model(ids, pix, targets=...) -> token_logprobs, in chunks)

How grpo.py puts the loss together (on each micro-batch, with the FULL batch's normaliser `denom`):
    logp, ent = model(input_ids, pixel_values, targets=targets)   # model.token_logprobs, chunked
    loss, stats = ppo_clip_loss(logp, old_logp, advantages, mask, eps_low, eps_high, agg, norm_const, denom)
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


# PPO clipped surrogate (Schulman et al. 2017, eq. 7) as used by GRPO, with the ratio against the OLD (rollout)
# policy (R1V3 eq. 7; its pi_ref is a typo) and decoupled clip range [1-eps_low, 1+eps_high] (DAPO sec. 3.1,
# "clip-higher"; R1V3 default symmetric 0.2). Per token: -min(r*A, clip(r)*A).
# Returns (loss, stats); stats are detached 0-dim tensors over this call's response tokens:
#   clip_frac_low / clip_frac_high: share of tokens whose gradient the clip zeroes (r < 1-eps_low with A < 0,
#   r > 1+eps_high with A > 0); clip_frac their sum; approx_kl: k3 estimate of KL(old || new) (samples are
#   from old); ratio_mean / ratio_max.
def ppo_clip_loss(logp, old_logp, advantages, mask, eps_low=0.2, eps_high=0.2, agg="seq_mean_token_mean",
                  norm_const=None, denom=None):
    if logp.shape != old_logp.shape or logp.shape != mask.shape or advantages.shape != logp.shape[:1]:
        raise ValueError(f"rl.py ppo_clip_loss: need logp, old_logp, mask (B,T) and advantages (B,); got "
                         f"{tuple(logp.shape)}, {tuple(old_logp.shape)}, {tuple(mask.shape)}, "
                         f"{tuple(advantages.shape)}")
    m = mask.bool()
    log_ratio = torch.where(m, logp - old_logp, torch.zeros_like(logp))  # 0 on padding: exp never overflows there
    ratio = torch.exp(log_ratio)  # (B,T)
    A = advantages.to(logp.dtype)[:, None]  # (B,1)
    per_token = torch.maximum(-ratio * A, -ratio.clamp(1 - eps_low, 1 + eps_high) * A)  # (B,T)
    loss = agg_loss(per_token, mask, agg, norm_const, denom)
    with torch.no_grad():
        low = _masked_mean(((ratio < 1 - eps_low) & (A < 0)).float(), m)
        high = _masked_mean(((ratio > 1 + eps_high) & (A > 0)).float(), m)
        stats = dict(clip_frac=low + high, clip_frac_low=low, clip_frac_high=high,
                     approx_kl=_masked_mean(kl_k3(old_logp, logp), m),
                     ratio_mean=_masked_mean(ratio, m),
                     ratio_max=torch.where(m, ratio, torch.zeros_like(ratio)).max())
    return loss, stats


# Schulman's k3 estimator ("Approximating KL divergence", 2020), per token, of KL(pi || ref) from samples of pi:
# with d = ref_logp - logp, k3 = exp(d) - d - 1 >= 0, unbiased, low variance. GRPO (DeepSeekMath eq. 4) adds
# it to the loss as + kl_coef * agg_loss(kl_k3(logp, ref_logp), mask, agg) (R1V3 and OR1: kl_coef = 0).
def kl_k3(logp, ref_logp):
    d = ref_logp - logp
    return torch.exp(d) - d - 1


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

    def state_dict(self):
        return dict(target=self.target, delta=self.delta, c_max=self.c_max, c=self.c)

    def load_state_dict(self, sd):
        self.target, self.delta, self.c_max, self.c = sd["target"], sd["delta"], sd["c_max"], sd["c"]


# -----------------------------------------------------------------------------
# data side


# Skywork-OR1 sec. 3 (MAGIC, "rejection sampling") / R1V2 (SSB motivation): a group whose n rewards are all
# equal (all correct or all wrong) has zero advantage everywhere and carries no gradient signal.
def informative_groups(rewards, n):
    r = _check_groups(rewards, n, "informative_groups")
    return r.amax(dim=1) > r.amin(dim=1)  # (G,) bool


# DAPO (arXiv 2503.14476) sec. 3.2, dynamic sampling: keep sampling rounds of groups and keep only the
# informative ones until `target` groups are collected, at most `max_rounds` rounds (0-based round_idx).
# groups: list of G per-group payloads (anything; e.g. dicts with the n responses), rewards (G*n,) for this
# round, acc: list of groups kept so far. Returns (acc, done); done when acc holds `target` groups (extra ones
# are dropped) or the last round was used, in which case acc may hold fewer than target: the caller logs it.
def dynamic_sampling(groups, rewards, n, acc, target, round_idx, max_rounds):
    keep = informative_groups(rewards, n)
    if len(groups) != keep.numel():
        raise ValueError(f"rl.py dynamic_sampling: {len(groups)} groups but {rewards.numel()} rewards for n={n}")
    acc = acc + [g for g, k in zip(groups, keep.tolist()) if k]
    if len(acc) >= target:
        return acc[:target], True
    return acc, round_idx + 1 >= max_rounds


# Skywork-OR1 sec. 3 (MAGIC, "no advantage mask for truncated responses"): a response cut at the length limit
# gets reward 0 (no mask; it then gets a negative advantage in a group with any success).
# rewards (N,), truncated (N,) bool.
def zero_truncated(rewards, truncated):
    return torch.where(truncated.bool(), torch.zeros_like(rewards), rewards)


class SampleBuffer:
    """R1V2 (arXiv 2504.16656), Selective Sample Buffer (SSB): zero-advantage samples carry no signal and
    their share grows in training, so keep samples with non-zero advantage and mix them into later batches,
    drawn in proportion to |A|. Bounded (max_size), oldest evicted first. A sample is any picklable object
    (JSON-serialisable too if state_dict must go to JSON); its advantage is stored beside it."""

    def __init__(self, max_size=1024):
        self.max_size, self.items = max_size, []  # items: list of {"sample": s, "adv": float}, oldest first

    def __len__(self):
        return len(self.items)

    def add(self, samples, advantages):
        # samples: list of N, advantages: (N,) tensor or list; returns how many were kept
        advs = torch.as_tensor(advantages, dtype=torch.float32).view(-1).tolist()
        if len(samples) != len(advs):
            raise ValueError(f"rl.py SampleBuffer.add: {len(samples)} samples but {len(advs)} advantages")
        new = [dict(sample=s, adv=a) for s, a in zip(samples, advs) if a != 0.0]
        self.items = (self.items + new)[-self.max_size:]  # FIFO eviction
        return len(new)

    def sample(self, k, generator=None, remove=False):
        # draws min(k, len) distinct samples, P(item) proportional to |A| (torch.multinomial without
        # replacement); remove=True takes them out of the buffer. Returns (samples list, advantages (k,)).
        k = min(k, len(self.items))
        if k == 0:
            return [], torch.zeros(0)
        w = torch.tensor([abs(it["adv"]) for it in self.items])
        idx = torch.multinomial(w, k, replacement=False, generator=generator).tolist()
        picked = [self.items[i] for i in idx]
        if remove:
            drop = set(idx)
            self.items = [it for i, it in enumerate(self.items) if i not in drop]
        return [it["sample"] for it in picked], torch.tensor([it["adv"] for it in picked])

    def state_dict(self):
        return dict(max_size=self.max_size, items=[dict(it) for it in self.items])

    def load_state_dict(self, sd):
        self.max_size, self.items = sd["max_size"], [dict(it) for it in sd["items"]]
