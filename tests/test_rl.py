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
    flat = [0.5, 1.0, 1.5, 0.5, 1.1, 1.5, 1.0, 2.0]  # masked ratios
    k3 = sum(r - 1 - math.log(r) for r in flat) / 8  # KL(old || new) from samples of old
    assert abs(stats["approx_kl"].item() - k3) < 1e-6
    assert all(not t.requires_grad for t in stats.values())


def test_ppo_clip_loss_asymmetric_clip_higher():
    logp, old = ppo_batch()
    # eps_low .6: r=.5 (A<0) is inside [.4, 1.28] -> 1.0 not 1.6; eps_high .28: 1.5 -> 1.28, 2.0 -> 1.28
    loss, stats = rl.ppo_clip_loss(logp, old, ADV, MASK, eps_low=0.6, eps_high=0.28, agg="token_mean")
    want = ((-.5 - 1 - 1.28) + (1.0 + 2.2 + 3.0) + (-.5 - .5 * 1.28)) / 8
    assert abs(loss.item() - want) < 1e-5
    assert abs(stats["clip_frac"].item() - 2 / 8) < 1e-6  # only the two high ones (row 0 t2, row 2 t1)


def test_ppo_dual_clip_caps_negative_advantage_loss():
    # Dual-clip (verl clip_ratio_c): for A < 0 the per-token loss is min(c * |A|, the PPO loss). A buffered
    # (off-policy) token the policy now likes 10x more, with A = -2: PPO alone gives 10 * 2 = 20 and a gradient
    # that grows with the ratio; dual-clip caps it at 3 * 2 = 6 with zero gradient. A > 0 is untouched.
    old = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    logp = torch.log(torch.tensor([[10.0, 2.0], [10.0, 1.0]])).requires_grad_(True)
    adv, mask = torch.tensor([-2.0, 1.0]), torch.ones(2, 2, dtype=torch.bool)
    loss, stats = rl.ppo_clip_loss(logp, old, adv, mask, agg="token_mean", clip_ratio_c=3.0)
    loss.backward()
    # row 0: min(6, 20) = 6 and min(6, 2 * 2) = 4; row 1 (A=+1): -clip(10, .8, 1.2) = -1.2, -1
    assert abs(loss.item() - (6 + 4 - 1.2 - 1) / 4) < 1e-5
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 2 * 2 / 4], [0.0, -1 / 4]]))
    assert abs(stats["clip_frac"].item() - 2 / 4) < 1e-6  # the dual clip and row 1's high clip
    loss_nodual, _ = rl.ppo_clip_loss(logp, old, adv, mask, agg="token_mean", clip_ratio_c=float("inf"))
    assert abs(loss_nodual.item() - (20 + 4 - 1.2 - 1) / 4) < 1e-5  # the check can fail


def test_ppo_extreme_log_ratio_stays_finite():
    # a buffered token whose old log-prob was -1e4 (or a stale one): exp(1e4) overflows without the log-ratio clamp
    logp = torch.tensor([[0.0, -1.0]], requires_grad=True)
    old = torch.tensor([[-1e4, -1.0]])
    for adv in (1.0, -1.0):
        loss, stats = rl.ppo_clip_loss(logp, old, torch.tensor([adv]), torch.ones(1, 2, dtype=torch.bool))
        (g,) = torch.autograd.grad(loss, logp)
        assert torch.isfinite(loss) and torch.isfinite(g).all() and torch.isfinite(stats["approx_kl"])


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


def test_kl_k3_is_nan_safe_at_masked_positions():
    # fp32 log-probs below ~-88 at masked (padding / prompt) positions: exp(ref - logp) is inf there, and the masked
    # 0 * inf of the backward pass was NaN, which skipped the step. Clamped as verl's low_var_kl: finite everywhere.
    logits = torch.tensor([[[0.0, 0.0, 0.0], [200.0, -200.0, 0.0]]], requires_grad=True)  # (1, T=2, V=3)
    logp = logits.log_softmax(-1)[..., 1]  # position 1: log p = -400 (a masked position)
    ref = torch.tensor([[math.log(1 / 3), -1.0]])
    mask = torch.tensor([[1, 0]])
    loss = rl.agg_loss(rl.kl_k3(logp, ref), mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert abs(loss.item()) < 1e-6  # position 0: logp == ref, so k3 = 0


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
    ec2 = rl.EntropyControl(target=0.2, delta=0.1, c_max=0.25)
    ec2.load_state_dict(json.loads(json.dumps(ec.state_dict())))
    assert [ec2.update(e) for e in ents[5:]] == pytest.approx(want_alpha[5:], abs=1e-9)
    # the settings are the resumed run's own, not the checkpoint's: a run saved without entropy control (target 0)
    # and resumed with one must control the entropy (it did not: the checkpoint's target 0 came back)
    off = rl.EntropyControl(target=0.0, delta=0.1, c_max=0.25)
    off.update(0.05)
    on = rl.EntropyControl(target=0.2, delta=0.1, c_max=0.25)
    on.load_state_dict(json.loads(json.dumps(off.state_dict())))
    assert on.target == 0.2 and [on.update(0.05) for _ in range(3)] == pytest.approx([0.0, 0.1, 0.2], abs=1e-9)


# -----------------------------------------------------------------------------
# data side


def test_informative_groups_and_truncation():
    r = torch.tensor([1., 0, 0, 1,   1, 1, 1, 1,   0, 0, 0, 0,   .2, .2, .2, .8])
    assert rl.informative_groups(r, 4).tolist() == [True, False, False, True]
    got = rl.zero_truncated(torch.tensor([1.0, 0.8, 0.2, 1.0]), torch.tensor([False, True, False, True]))
    assert got.tolist() == pytest.approx([1.0, 0.0, 0.2, 0.0])


def test_dynamic_sampling_rounds_stops_when_every_rank_has_enough():
    # two ranks: this one finds informative groups faster than the other; both must run the same rounds, so the
    # loop stops only when the SMALLER count reaches the target (the old loop stopped on the sum over ranks)
    mine = [torch.tensor([True, False, True]), torch.tensor([True, True, False]), torch.tensor([False, True, True])]
    other = [1, 2, 3]  # the other rank's running count of kept groups after each round
    calls = []

    def draw(r):
        calls.append(r)
        return mine[r]

    min_over_ranks = lambda x: min(x, other[len(calls) - 1])  # noqa: E731  (what agree_min returns)
    kept, rounds = rl.dynamic_sampling_rounds(draw, 3, 5, min_over_ranks)
    assert rounds == 3 and calls == [0, 1, 2]  # this rank had 4 >= 3 after round 1, the other only 2
    assert kept == [(0, 0), (0, 2), (1, 0)]  # the first 3, in order (the overshoot is dropped)
    # one process: stops as soon as it has enough
    kept, rounds = rl.dynamic_sampling_rounds(lambda r: mine[r], 3, 5)
    assert rounds == 2 and kept == [(0, 0), (0, 2), (1, 0)]
    # the cap ends sampling with fewer groups than the target
    kept, rounds = rl.dynamic_sampling_rounds(lambda r: torch.tensor([False, True]), 3, 2)
    assert rounds == 2 and kept == [(0, 1), (1, 1)]


def test_overlong_penalty_dapo():
    # DAPO eq. 13 with L_max = 20, L_cache = 8: 0 up to 12 tokens, then ((20 - 8) - |y|) / 8, -1 at 20
    got = rl.overlong_penalty(torch.tensor([5, 12, 13, 16, 20]), max_len=20, buffer=8)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, -1 / 8, -4 / 8, -1.0]))
    torch.testing.assert_close(rl.overlong_penalty(torch.tensor([16]), 20, 8, penalty=0.5), torch.tensor([-0.25]))


def S(i, adv):  # a buffered sample
    return {"id": i, "adv": adv}


def test_sample_buffer_draws_from_earlier_steps_only():
    # R1V2 SSB: a step draws before it adds its own samples, and never a sample made at this step: at step 1 the
    # buffer is empty (the old code added first, so every drawn sample duplicated one in the batch)
    buf = rl.SampleBuffer(max_size=8)
    g = torch.Generator().manual_seed(0)
    assert buf.draw(4, step=0, generator=g) == []
    assert buf.add([S(0, 1.0), S(1, 0.0), S(2, -2.0)], step=0) == 2  # zero advantage: not kept
    buf.add([S(3, 3.0)], step=1)  # made at step 1...
    got = buf.draw(8, step=1, generator=g)  # ... so step 1 cannot draw it
    assert sorted(s["id"] for s in got) == [0, 2]
    assert len(buf.draw(8, step=2, generator=g)) >= 1  # now it can


def test_sample_buffer_caps_uses_and_age():
    buf = rl.SampleBuffer(max_size=8, max_uses=2, max_age=3)
    g = torch.Generator().manual_seed(0)
    buf.add([S(0, 1.0), S(1, -1.0)], step=0)
    assert len(buf.draw(2, 1, g)) == 2 and len(buf.draw(2, 2, g)) == 2
    assert buf.draw(2, 3, g) == [] and len(buf) == 0  # each used twice: gone
    buf.add([S(2, 1.0)], step=10)
    assert len(buf.draw(1, 13, g)) == 1  # 3 steps old: still fresh enough
    buf.add([S(3, 1.0)], step=10)
    assert buf.draw(1, 14, g) == [] and len(buf) == 0  # 4 steps old: too stale, dropped
    buf = rl.SampleBuffer(max_size=2)
    buf.add([S(i, 1.0) for i in range(3)], step=0)  # FIFO: the oldest goes
    assert [it["sample"]["id"] for it in buf.items] == [1, 2]


def test_sample_buffer_mix_appends_earlier_rows_as_a_share_of_the_batch():
    # SampleBuffer.mix is what grpo.py's loop calls: buffer_frac is the share of the RESULT that comes from the
    # buffer; step 1 has nothing earlier; drawn rows keep their own tokens and sampler log-probs, padded to one width
    def batch(step, W, advs):
        N = len(advs)
        return dict(prompt=torch.arange(N) + 10 * step, length=torch.full((N,), W), adv=torch.tensor(advs),
                    row=torch.arange(N), tokens=torch.arange(N * W).view(N, W) + 100 * step,
                    logp=-torch.rand(N, W, generator=torch.Generator().manual_seed(step)))
    buf, g = rl.SampleBuffer(max_size=16), torch.Generator().manual_seed(0)
    b1 = batch(1, 3, [1.0, -1.0, 0.0, 0.5, -0.5, 0.0])
    assert buf.mix(b1, 0.25, step=1, generator=g) is b1 and len(buf) == 4  # the 4 non-zero-A rows are kept
    b2 = batch(2, 5, [0.0] * 9)
    out = buf.mix(b2, 0.25, step=2, generator=g)
    assert len(out["prompt"]) == 12 and (out["row"] == -1).sum() == 3  # 0.25 / 0.75 * 9 = 3 = 25% of 12
    assert out["tokens"].shape == out["logp"].shape == (12, 5) and torch.equal(out["tokens"][:9], b2["tokens"])
    assert len(set(out["prompt"][9:].tolist())) == 3  # distinct samples
    for r in range(9, 12):  # a drawn row is one of step 1's kept rows, with its tokens, log-probs and advantage
        i = int(out["prompt"][r]) - 10
        assert b1["adv"][i] != 0 and out["adv"][r] == b1["adv"][i] and out["length"][r] == 3
        assert torch.equal(out["tokens"][r, :3], b1["tokens"][i]) and not out["tokens"][r, 3:].any()
        torch.testing.assert_close(out["logp"][r, :3], b1["logp"][i])
    assert len(buf) == 4  # step 2's rows all had A = 0: none added


def test_sample_buffer_draws_in_proportion_to_abs_advantage():
    g = torch.Generator().manual_seed(1234)
    N = 4000
    counts = {i: 0 for i in range(4)}
    for _ in range(N):
        buf = rl.SampleBuffer(max_size=8)
        buf.add([S(0, 1.0), S(1, -2.0), S(2, 3.0), S(3, -4.0)], step=0)  # P = .1 .2 .3 .4
        counts[buf.draw(1, 1, g)[0]["id"]] += 1
    for i, p in enumerate([0.1, 0.2, 0.3, 0.4]):
        assert abs(counts[i] / N - p) < 4 * math.sqrt(p * (1 - p) / N), (i, counts)


def test_sample_buffer_state_dict_round_trip():
    buf = rl.SampleBuffer(max_size=3, max_uses=3, max_age=5)
    buf.add([S(0, 0.5), S(1, -1.5), S(2, 0.0), S(3, 2.5)], step=0)
    buf.draw(1, 1, torch.Generator().manual_seed(3))
    buf2 = rl.SampleBuffer(max_size=3, max_uses=3, max_age=5)
    buf2.load_state_dict(json.loads(json.dumps(buf.state_dict())))
    assert buf2.items == buf.items
    s1 = buf.draw(2, 2, torch.Generator().manual_seed(7))
    s2 = buf2.draw(2, 2, torch.Generator().manual_seed(7))
    assert s1 == s2 and buf.items == buf2.items
    # the caps are the resumed run's own: a smaller buffer keeps the newest samples, max_uses=1 applies at once
    small = rl.SampleBuffer(max_size=1, max_uses=1, max_age=5)
    small.load_state_dict(json.loads(json.dumps(buf.state_dict())))
    assert small.items == buf.items[-1:] and len(small.draw(1, 3)) == 1 and len(small) == 0


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
