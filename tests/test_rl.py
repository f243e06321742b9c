# rl.py on hand-computed batches: every expected number is written out or computed by a direct formula here,
# never by calling the function under test.
import json
import math

import pytest
import torch

import rl
from model import token_logprobs

# -----------------------------------------------------------------------------
# advantages


def test_group_advantages_grpo_and_drgrpo():
    r = torch.tensor([1., 0, 0, 1,   1, 1, 1, 1,   0, 0, 0, 1])  # 3 groups of n=4, prompt-major
    s3 = math.sqrt(3)
    # group 1: mean .5, population std .5 -> +-1; group 2: all equal -> 0; group 3: mean .25, std sqrt(3)/4
    want = torch.tensor([1., -1, -1, 1,   0, 0, 0, 0,   -1 / s3, -1 / s3, -1 / s3, s3])
    torch.testing.assert_close(rl.group_advantages(r, 4, eps=0.0), want)
    # default eps=1e-6 in the denominator: group 1 is .5 / (.5 + 1e-6)
    got = rl.group_advantages(r, 4)
    assert abs(got[0].item() - 0.5 / 0.500001) < 1e-7
    # Dr.GRPO: no std division
    want_dr = torch.tensor([.5, -.5, -.5, .5,   0, 0, 0, 0,   -.25, -.25, -.25, .75])
    torch.testing.assert_close(rl.group_advantages(r, 4, std_norm=False), want_dr)


def test_group_advantages_zero_std_groups_are_exactly_zero():
    # 0.9 three times: float32 mean/std leave ~6e-8 residue, which /(std+1e-6) would give |A| ~ 0.06
    r = torch.tensor([0.9, 0.9, 0.9, 0.2, 1.0, 0.2])
    a = rl.group_advantages(r, 3)
    assert torch.equal(a[:3], torch.zeros(3))
    assert a[4] > 0 and a[3] < 0
    assert torch.equal(rl.group_advantages(torch.tensor([1., 0.]), 1), torch.zeros(2))  # n=1: no signal


def test_group_advantages_bad_length_names_the_problem():
    with pytest.raises(ValueError, match="rl.py group_advantages.*n=3"):
        rl.group_advantages(torch.zeros(10), 3)


# -----------------------------------------------------------------------------
# PPO clipped loss on a hand-computed batch
# row 0: A=+1,  ratios .5 1.0 1.5    -> losses -.5 (r<1-eps but A>0: not clipped), -1, -1.2 (clipped high)
# row 1: A=-2,  ratios .5 1.1 1.5    -> losses 1.6 (clipped low), 2.2, 3.0 (r>1+eps but A<0: not clipped)
# row 2: A=+.5, ratios 1.0 2.0 [pad] -> losses -.5, -.6 (clipped high); the pad has logp=100 (exp overflows)

RATIOS = [[0.5, 1.0, 1.5], [0.5, 1.1, 1.5], [1.0, 2.0, 1.0]]
MASK = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 0]], dtype=torch.bool)
ADV = torch.tensor([1.0, -2.0, 0.5])


def ppo_batch():
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -2.5], [-0.7, -1.5, 0.0]])
    logp = old + torch.log(torch.tensor(RATIOS))
    logp[2, 2] = 100.0  # junk on padding
    return logp.requires_grad_(True), old


@pytest.mark.parametrize("agg,kw,want", [
    ("seq_mean_token_mean", {}, ((-.5 - 1 - 1.2) / 3 + (1.6 + 2.2 + 3.0) / 3 + (-.5 - .6) / 2) / 3),
    ("token_mean", {}, (-2.7 + 6.8 - 1.1) / 8),
    ("seq_sum_const", {"norm_const": 4}, (-2.7 / 4 + 6.8 / 4 - 1.1 / 4) / 3),
    ("seq_sum_const", {}, (-2.7 / 3 + 6.8 / 3 - 1.1 / 3) / 3),  # default constant: this batch's T=3
])
def test_ppo_clip_loss_aggregations(agg, kw, want):
    logp, old = ppo_batch()
    loss, stats = rl.ppo_clip_loss(logp, old, ADV, MASK, 0.2, 0.2, agg=agg, **kw)
    assert abs(loss.item() - want) < 1e-5, (loss.item(), want)


def test_ppo_clip_loss_gradients_and_stats():
    logp, old = ppo_batch()
    loss, stats = rl.ppo_clip_loss(logp, old, ADV, MASK)
    loss.backward()
    # d/dlogp of -r*A is -A*r, divided by (tokens of the row * rows); clipped tokens get 0; padding 0
    want = torch.tensor([[-1 * .5 / 9, -1 * 1.0 / 9, 0.0],
                         [0.0, 2 * 1.1 / 9, 2 * 1.5 / 9],
                         [-.5 * 1.0 / 6, 0.0, 0.0]])
    torch.testing.assert_close(logp.grad, want)
    assert abs(stats["clip_frac"].item() - 3 / 8) < 1e-6  # row0 t2 (high), row1 t0 (low), row2 t1 (high)
    assert abs(stats["clip_frac_low"].item() - 1 / 8) < 1e-6
    assert abs(stats["clip_frac_high"].item() - 2 / 8) < 1e-6
    flat = [0.5, 1.0, 1.5, 0.5, 1.1, 1.5, 1.0, 2.0]  # masked ratios
    assert abs(stats["ratio_mean"].item() - sum(flat) / 8) < 1e-6
    assert abs(stats["ratio_max"].item() - 2.0) < 1e-6
    k3 = sum(r - 1 - math.log(r) for r in flat) / 8  # KL(old || new) from samples of old
    assert abs(stats["approx_kl"].item() - k3) < 1e-6
    assert all(not t.requires_grad for t in stats.values())


def test_ppo_clip_loss_asymmetric_clip_higher():
    logp, old = ppo_batch()
    # eps_low .6: r=.5 (A<0) is inside [.4, 1.28] -> 1.0 not 1.6; eps_high .28: 1.5 -> 1.28, 2.0 -> 1.28
    loss, stats = rl.ppo_clip_loss(logp, old, ADV, MASK, eps_low=0.6, eps_high=0.28, agg="token_mean")
    want = ((-.5 - 1 - 1.28) + (1.0 + 2.2 + 3.0) + (-.5 - .5 * 1.28)) / 8
    assert abs(loss.item() - want) < 1e-5
    assert abs(stats["clip_frac_low"].item()) < 1e-9 and abs(stats["clip_frac_high"].item() - 2 / 8) < 1e-6


def test_ppo_clip_loss_on_policy_gradient_is_plain_policy_gradient():
    # one step on-policy (old = logp.detach()): ratio 1, loss = -mean A, grad = -A / (len * B)
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.1]], requires_grad=True)
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, stats = rl.ppo_clip_loss(logp, logp.detach(), torch.tensor([2.0, -1.0]), mask)
    loss.backward()
    assert abs(loss.item() - (-2.0 + 1.0) / 2) < 1e-6
    torch.testing.assert_close(logp.grad, torch.tensor([[-2 / 4, -2 / 4], [1 / 2, 0.0]]))
    assert stats["clip_frac"].item() == 0 and abs(stats["approx_kl"].item()) < 1e-7


def test_agg_loss_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown agg"):
        rl.agg_loss(torch.zeros(2, 3), torch.ones(2, 3), agg="mean")
    with pytest.raises(ValueError, match="rl.py agg_loss"):
        rl.agg_loss(torch.zeros(2, 3), torch.ones(2, 4))


# -----------------------------------------------------------------------------
# gradient accumulation: micro-batches (each trimmed to its own max length) sum to the full-batch loss


@pytest.mark.parametrize("agg", rl.AGGS)
def test_micro_batches_add_up_to_full_batch(agg):
    g = torch.Generator().manual_seed(0)
    lens = [5, 1, 3, 7, 2, 4]
    B, T = len(lens), max(lens)
    mask = torch.arange(T)[None, :] < torch.tensor(lens)[:, None]  # (B,T) right-padded
    old = -torch.rand(B, T, generator=g) * 3
    logp = (old + 0.3 * torch.randn(B, T, generator=g)).requires_grad_(True)
    adv = torch.randn(B, generator=g)
    # full-batch reference by the direct formula
    r = torch.exp(logp - old)
    pt = torch.maximum(-r * adv[:, None], -r.clamp(0.8, 1.2) * adv[:, None]) * mask
    L = torch.tensor(lens, dtype=torch.float32)
    want = {"seq_mean_token_mean": (pt.sum(1) / L).mean(), "token_mean": pt.sum() / L.sum(),
            "seq_sum_const": (pt.sum(1) / 8).mean()}[agg]
    want_grad, = torch.autograd.grad(want, logp)
    denom = L.sum() if agg == "token_mean" else B
    total, naive = 0.0, 0.0
    for i in range(0, B, 2):  # micro-batches of 2 rows, trimmed to their own longest row
        t = max(lens[i:i + 2])
        args = (logp[i:i + 2, :t], old[i:i + 2, :t], adv[i:i + 2], mask[i:i + 2, :t], 0.2, 0.2, agg, 8)
        total = total + rl.ppo_clip_loss(*args, denom=denom)[0]
        naive = naive + rl.ppo_clip_loss(*args)[0] / (B // 2)  # averaging local means: NOT the full loss
    got_grad, = torch.autograd.grad(total, logp)
    assert abs(total.item() - want.item()) < 1e-6
    torch.testing.assert_close(got_grad, want_grad)
    if agg == "token_mean":
        assert abs(naive.item() - want.item()) > 1e-3  # uneven lengths: the local normaliser is wrong


# -----------------------------------------------------------------------------
# KL


def test_kl_k3_values_and_direction():
    lp, ref = torch.log(torch.tensor([0.5, 0.2])), torch.log(torch.tensor([0.25, 0.2]))
    want = torch.tensor([0.5 - math.log(0.5) - 1, 0.0])  # d = log(.25/.5): e^d - d - 1
    torch.testing.assert_close(rl.kl_k3(lp, ref), want)
    # expectation under p over the full support equals KL(p || q) exactly (direction check)
    p, q = torch.tensor([0.1, 0.6, 0.3]), torch.tensor([0.3, 0.3, 0.4])
    kl_pq = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist()))
    assert abs((p * rl.kl_k3(p.log(), q.log())).sum().item() - kl_pq) < 1e-6


# -----------------------------------------------------------------------------
# entropy control


def test_entropy_control_trajectory_and_resume():
    ents = [0.1, 0.1, 0.1, 0.1, 0.3, 0.2, 0.1, 0.5, 0.5, 0.5]
    # alpha_k = c_k * [e_k <= .2]; c_{k+1} = clip(c_k +- .1, 0, .25) (+ when e_k < .2)
    want_alpha = [0, .1, .2, .25, 0, .15, .05, 0, 0, 0]
    want_c = [.1, .2, .25, .25, .15, .05, .15, .05, 0, 0]
    ec = rl.EntropyControl(target=0.2, delta=0.1, c_max=0.25)
    got_alpha, got_c = [], []
    for e in ents:
        got_alpha.append(ec.update(e))
        got_c.append(ec.c)
    assert got_alpha == pytest.approx(want_alpha, abs=1e-9)
    assert got_c == pytest.approx(want_c, abs=1e-9)
    # resume mid-way through a JSON round trip reproduces the rest
    ec = rl.EntropyControl(target=0.2, delta=0.1, c_max=0.25)
    for e in ents[:5]:
        ec.update(e)
    ec2 = rl.EntropyControl()
    ec2.load_state_dict(json.loads(json.dumps(ec.state_dict())))
    assert [ec2.update(e) for e in ents[5:]] == pytest.approx(want_alpha[5:], abs=1e-9)


# -----------------------------------------------------------------------------
# data side


def test_informative_groups_and_truncation():
    r = torch.tensor([1., 0, 0, 1,   1, 1, 1, 1,   0, 0, 0, 0,   .2, .2, .2, .8])
    assert rl.informative_groups(r, 4).tolist() == [True, False, False, True]
    got = rl.zero_truncated(torch.tensor([1.0, 0.8, 0.2, 1.0]), torch.tensor([False, True, False, True]))
    assert got.tolist() == pytest.approx([1.0, 0.0, 0.2, 0.0])


def test_dynamic_sampling_accumulates_until_target_or_cap():
    acc, done = rl.dynamic_sampling(["a", "b", "c"], torch.tensor([1., 0, 1, 1, 0, 1]), 2, [], 3, 0, 3)
    assert acc == ["a", "c"] and not done
    acc, done = rl.dynamic_sampling(["d", "e"], torch.tensor([0., 0, 1, 0]), 2, acc, 3, 1, 3)
    assert acc == ["a", "c", "e"] and done
    # overshoot is trimmed to the target
    acc, done = rl.dynamic_sampling(["f", "g"], torch.tensor([1., 0, 0, 1]), 2, ["a", "c"], 3, 1, 3)
    assert acc == ["a", "c", "f"] and done
    # the cap ends sampling with fewer groups than the target
    acc, done = rl.dynamic_sampling(["h"], torch.tensor([1., 1]), 2, ["a"], 3, 1, 2)
    assert acc == ["a"] and done
    with pytest.raises(ValueError, match="rl.py dynamic_sampling"):
        rl.dynamic_sampling(["a"], torch.tensor([1., 0, 1, 0]), 2, [], 3, 0, 3)


def test_sample_buffer_keeps_nonzero_fifo():
    buf = rl.SampleBuffer(max_size=4)
    assert buf.add([{"id": i} for i in range(5)], torch.tensor([0., 1., -2., 0., 3.])) == 3
    assert [it["sample"]["id"] for it in buf.items] == [1, 2, 4]
    buf.add([{"id": 5}, {"id": 6}], [4.0, -1.0])  # 5 items > 4: the oldest (id 1) goes
    assert [it["sample"]["id"] for it in buf.items] == [2, 4, 5, 6]
    assert [it["adv"] for it in buf.items] == [-2.0, 3.0, 4.0, -1.0]
    g = torch.Generator().manual_seed(0)
    s, a = buf.sample(10, g)  # more than held: all, distinct
    assert sorted(x["id"] for x in s) == [2, 4, 5, 6] and sorted(a.tolist()) == [-2.0, -1.0, 3.0, 4.0]
    s, a = buf.sample(2, g, remove=True)
    assert len(buf) == 2 and not {x["id"] for x in s} & {it["sample"]["id"] for it in buf.items}
    with pytest.raises(ValueError, match="SampleBuffer.add"):
        buf.add([{"id": 7}], [1.0, 2.0])


def test_sample_buffer_draws_in_proportion_to_abs_advantage():
    buf = rl.SampleBuffer(max_size=8)
    buf.add(["a", "b", "c", "d"], [1.0, -2.0, 3.0, -4.0])  # P = .1 .2 .3 .4
    g = torch.Generator().manual_seed(1234)
    N = 4000
    counts = {k: 0 for k in "abcd"}
    for _ in range(N):
        counts[buf.sample(1, g)[0][0]] += 1
    for k, p in zip("abcd", [0.1, 0.2, 0.3, 0.4]):
        assert abs(counts[k] / N - p) < 4 * math.sqrt(p * (1 - p) / N), (k, counts)


def test_sample_buffer_state_dict_round_trip():
    buf = rl.SampleBuffer(max_size=3)
    buf.add([{"ids": [1, 2]}, {"ids": [3]}, {"ids": [4, 5, 6]}, {"ids": [7]}], [0.5, -1.5, 0.0, 2.5])
    buf2 = rl.SampleBuffer()
    buf2.load_state_dict(json.loads(json.dumps(buf.state_dict())))
    assert buf2.max_size == 3 and buf2.items == buf.items
    s1 = buf.sample(2, torch.Generator().manual_seed(7))
    s2 = buf2.sample(2, torch.Generator().manual_seed(7))
    assert s1[0] == s2[0] and torch.equal(s1[1], s2[1])


# -----------------------------------------------------------------------------
# chunked log-probs / entropy


def naive_logp_entropy(h, w, tgt, temperature=1.0):
    logits = (h @ w.t()) / temperature  # (B,T,V): the full fp32 logits
    logq = torch.log_softmax(logits, -1)
    return logq.gather(-1, tgt[..., None]).squeeze(-1), -(logq.exp() * logq).sum(-1)


def test_token_logprobs_entropy_hand_computed():
    # logits [0, log 3] -> p = [.25, .75]
    h = torch.ones(1, 2, 1)
    w = torch.tensor([[0.0], [math.log(3.0)]])
    logp, ent = token_logprobs(h, w, torch.tensor([[1, 0]]))
    torch.testing.assert_close(logp, torch.tensor([[math.log(0.75), math.log(0.25)]]))
    H = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    torch.testing.assert_close(ent, torch.tensor([[H, H]]))
    # all logits equal: entropy log V
    _, ent = token_logprobs(torch.zeros(1, 1, 4), torch.randn(7, 4), torch.tensor([[3]]))
    assert abs(ent.item() - math.log(7)) < 1e-6


@pytest.mark.parametrize("chunk,temperature", [(3, 1.0), (1, 1.0), (1024, 1.0), (4, 0.7)])
def test_token_logprobs_entropy_matches_naive_values_and_grads(chunk, temperature):
    g = torch.Generator().manual_seed(0)
    B, T, C, V = 2, 5, 8, 11
    h = torch.randn(B, T, C, generator=g, requires_grad=True)
    w = torch.randn(V, C, generator=g, requires_grad=True)
    tgt = torch.randint(0, V, (B, T), generator=g)
    g1, g2 = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    logp, ent = token_logprobs(h, w, tgt, chunk=chunk, temperature=temperature)
    dh, dw = torch.autograd.grad((logp * g1).sum() + (ent * g2).sum(), (h, w))
    ref_logp, ref_ent = naive_logp_entropy(h, w, tgt, temperature)
    rh, rw = torch.autograd.grad((ref_logp * g1).sum() + (ref_ent * g2).sum(), (h, w))
    assert logp.dtype == ent.dtype == torch.float32 and logp.shape == ent.shape == (B, T)
    for a, b in [(logp, ref_logp), (ent, ref_ent), (dh, rh), (dw, rw)]:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # logp only
    lp, none = token_logprobs(h, w, tgt, chunk=chunk, with_entropy=False, temperature=temperature)
    assert none is None
    torch.testing.assert_close(lp, ref_logp, rtol=1e-5, atol=1e-6)
    # no-grad path (old/ref log-probs)
    with torch.no_grad():
        lp, _ = token_logprobs(h, w, tgt, chunk=chunk, temperature=temperature)
    torch.testing.assert_close(lp, ref_logp, rtol=1e-5, atol=1e-6)


def test_token_logprobs_entropy_saves_no_logits_for_backward():
    B, T, C, V = 2, 6, 4, 13
    h = torch.randn(B, T, C, requires_grad=True)
    w = torch.randn(V, C, requires_grad=True)
    tgt = torch.randint(0, V, (B, T))
    shapes = []

    def pack(x):
        shapes.append(tuple(x.shape))
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        token_logprobs(h, w, tgt, chunk=4)
    assert not [s for s in shapes if s[-1] == V], shapes  # no (tokens, V) tensor kept alive for backward
    shapes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        naive_logp_entropy(h, w, tgt)
    assert [s for s in shapes if s[-1] == V]  # the naive path does keep them (the check can fail)


def test_token_logprobs_entropy_bad_targets():
    with pytest.raises(ValueError, match=r"target ids must be in \[0, 5\)"):
        token_logprobs(torch.zeros(1, 2, 3), torch.zeros(5, 3), torch.tensor([[0, -100]]))
    with pytest.raises(ValueError, match="do not fit"):
        token_logprobs(torch.zeros(1, 2, 3), torch.zeros(5, 4), torch.tensor([[0, 1]]))
