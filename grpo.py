"""
GRPO with verifiable rewards: the RL stage of Skywork-R1V3 (section 3; RECIPE.md sections 3, 5, 7).

CPU, the embedded default (starts from the checkpoint `python sft.py` exported to out/sft/hf):
    python grpo.py
One GPU, a real checkpoint:
    python grpo.py --init_from=out/sft_1b/hf --data=/data/mmk12_rl.jsonl --max_new_tokens='[[0, 4096], [200, 8192]]'
8 GPUs with FSDP2:
    torchrun --standalone --nproc_per_node=8 grpo.py config/grpo_r1v3.py
Resume: the same command with --init_from=resume (reads out_dir's latest checkpoint).

What one step does (defaults reproduce R1V3):
  1. rollout: `prompts_per_step` prompts x `group_size` samples at temperature 1.0 with the current policy (sampler.py;
     the ViT and the prefill run once per prompt). Under FSDP the full weights are gathered once per
     generate() call and the same parameters are used by the update (no second model, no weight sync).
  2. score: reward = 0.8 * accuracy + 0.2 * format (rewards.py; Math-Verify in a process pool with hard timeouts).
  3. advantages: per group of group_size, A = (r - mean) / std (GRPO), the same A on every token of the response.
  4. log-probs: pi_old of every response token, recomputed by the training forward (it equals the sampler's
     log-probs to 1e-5 in fp32, tests/test_sampler.py; in bf16 the recomputation keeps the first ratio at 1).
  5. update: PPO clipped surrogate, eps 0.2 both sides, each response averaged over its own tokens then over
     responses (R1V3 eq. 7); no KL term; ONE optimizer step per rollout batch (strictly on-policy).
  6. log one line, dump a few rollouts, validate, checkpoint.
Options, each off by default unless noted (each a short function in rl.py citing its paper, unit-tested there):
  clip-higher eps_high (DAPO); loss_agg 'token_mean' (DAPO/OR1) or 'seq_sum_const' (Dr.GRPO); std_norm=False
  (Dr.GRPO); kl_coef > 0 (k3 KL to the frozen initial policy); entropy_target > 0 (Skywork-OR1 adaptive entropy
  control); drop_zero_adv (train only on groups with signal, OR1); dynamic_sampling (DAPO: re-sample until enough
  informative groups, with a cap); buffer_frac > 0 (R1V2 Selective Sample Buffer); truncated_zero (OR1: truncated
  responses get reward 0); ppo_epochs / mini_batches > 1 (off-policy PPO updates); train_vit / train_connector /
  train_llm (R1V3 section 5.2: freezing the connector during RL collapses training); a response-length schedule.
What it does not do: no value model / GAE, no LLM judge (rewards.score takes a `judge` hook), no sequence packing
(micro-batches are length-sorted instead), no asynchronous rollouts, no tensor parallelism for rollouts (a 38B
policy needs ~76 GB of gathered bf16 weights per GPU: too much for an 80 GB card; use >=8B models or add TP).
"""
import json
import os
import sys
import time

import torch

from common import (apply_activation_checkpointing, apply_fsdp, autocast_ctx, build_model, compute_cleanup,
                    compute_init, ensure_synth_data, export_hf, get_lr, latest_checkpoint, load_checkpoint,
                    load_tokenizer, log_jsonl, print0, save_checkpoint, set_trainable)
from configurator import configure
from data.common import critical_token_ids, encode_prompt, load_jsonl
from rewards import score_batch
from rl import (EntropyControl, SampleBuffer, agg_loss, group_advantages, informative_groups, kl_k3,
                ppo_clip_loss, zero_truncated)
from sampler import generate

# -----------------------------------------------------------------------------
# config: every global below can be set by a config file or --key=value
out_dir = "out/grpo"
init_from = "out/sft/hf"  # an HF directory (the SFT export), or 'resume'
data = "data/synth/rl.jsonl"  # question + answer (+ images, options)
val_data = "data/synth/val.jsonl"  # '' to skip validation
val_n = 200  # validation items (greedy)
tokenizer = ""
skip_bad = False
think = True
system_prompt = ""
# rollout
prompts_per_step = 16  # R1V3: 32 prompts x 32 samples = 1024 rollouts per step
group_size = 8  # samples per prompt: the group of GRPO (n in the papers; --n would clash with torchrun flags)
temperature = 1.0  # OR1: 1.0 (0.6 stagnated)
top_p = 1.0
max_new_tokens = [[0, 160]]  # [[from_step, length], ...]: R1V3 grows 4096 -> 8192; the default's traces are <= 123 tokens
# reward (RECIPE.md section 3)
acc_weight = 0.8
fmt_weight = 0.2
truncated_zero = False  # OR1: truncated responses get reward 0
verify_timeout = 5.0
# advantages and loss (rl.py)
std_norm = True  # False = Dr.GRPO
eps_low = 0.2
eps_high = 0.2  # DAPO clip-higher: 0.28 (OR1 found 0.25-0.265 helped, 0.28 hurt)
loss_agg = "seq_mean_token_mean"  # R1V3 eq. 7 | 'token_mean' (DAPO, OR1) | 'seq_sum_const' (Dr.GRPO)
kl_coef = 0.0  # > 0: k3 KL to the frozen initial policy
entropy_target = 0.0  # > 0: OR1 adaptive entropy control (target 0.2 in the paper)
entropy_delta = 1e-4
entropy_cmax = 0.005
# data-side options
drop_zero_adv = False  # train only on groups whose rewards differ (they carry no gradient anyway)
dynamic_sampling = False  # DAPO: keep sampling until prompts_per_step informative groups (cap: max_sample_rounds)
max_sample_rounds = 3
buffer_frac = 0.0  # R1V2 SSB: this fraction of each update batch is drawn from the buffer of non-zero-|A| samples
buffer_size = 1024
# optimisation
lr = 5e-5  # the tiny default (2e-4 wrecked the grid reading, dev/LOG.md); R1V3 used 1e-5 at 38B (config/grpo_r1v3.py)
warmup_steps = 0
min_lr_frac = 1.0  # constant lr by default
weight_decay = 0.0
beta2 = 0.999
grad_clip = 1.0
max_steps = 60
ppo_epochs = 1  # passes over each rollout batch
mini_batches = 1  # optimizer steps per pass (1 = strictly on-policy)
micro_batch = 32  # sequences per forward/backward
train_vit = True
train_connector = True
train_llm = True
activation_checkpointing = False
# logging, validation, checkpoints
high_entropy = 2.0  # "high-entropy token" threshold in nats (R1V3 uses 6.8 for Qwen's 152k vocab)
critical_words = ["Wait", "Alternatively", "Hmm"]
log_every = 1
dump_every = 10  # JSONL dump of a few rollouts
eval_every = 20
save_every = 20
keep_last = 0  # 0 = keep every checkpoint (entropy.py ranks them)
export = True
seed = 1337
debug_nan_step = 0  # tests only: > 0 makes the loss of that step NaN, to exercise the non-finite skip
wandb_log = False
wandb_project = "nanor1v"
wandb_run_name = "grpo"
config = configure(globals(), sys.argv[1:])
# -----------------------------------------------------------------------------

ddp, rank, local_rank, world_size, device = compute_init(seed)
print0(json.dumps(config, indent=1))
if data.startswith("data/synth/") or val_data.startswith("data/synth/"):
    ensure_synth_data()
assert loss_agg in ("seq_mean_token_mean", "token_mean", "seq_sum_const"), loss_agg
if prompts_per_step % world_size:
    raise ValueError(f"prompts_per_step={prompts_per_step} must be a multiple of the {world_size} processes")

resume_path = latest_checkpoint(out_dir) if init_from == "resume" else None
if init_from == "resume" and resume_path is None:
    raise FileNotFoundError(f"init_from='resume' but {out_dir} has no complete checkpoint (ckpt_*)")
if init_from not in ("resume",) and not os.path.isdir(init_from):
    raise FileNotFoundError(f"init_from={init_from!r} not found: run `python sft.py` first (it exports out/sft/hf)")
tok = load_tokenizer(tokenizer, init_from, resume_path)
model = build_model(init_from, tok, device, resume_path=resume_path)
cfg = model.cfg
# the run's starting point: a resumed run reads it from its checkpoint (the KL reference is the initial policy)
init_path = init_from
if resume_path:
    with open(os.path.join(resume_path, "state.json")) as f:
        init_path = json.load(f)["state"]["init_from"]
ref_model = None
if kl_coef > 0:  # frozen initial policy for the k3 KL term
    ref_model = build_model(init_path, tok, device).eval().requires_grad_(False)
n_train = set_trainable(model, train_vit, train_connector, train_llm)
print0(f"model: {sum(p.numel() for p in model.parameters()):,} params, {n_train:,} trainable "
       f"(vit={train_vit}, connector={train_connector}, llm={train_llm})")
if activation_checkpointing:
    apply_activation_checkpointing(model)
if ddp:
    apply_fsdp(model, param_dtype=torch.bfloat16 if device.type == "cuda" else None)
    if ref_model is not None:
        apply_fsdp(ref_model, param_dtype=torch.bfloat16 if device.type == "cuda" else None)

# prompts: validated once (missing images, bad lines -> file:line errors), encoded once
items = load_jsonl(data, skip_bad=skip_bad)
if not items:
    raise ValueError(f"{data}: no samples")
prompts = [encode_prompt(tok, s, cfg, think, system_prompt or None) for s in items]
longest = max(length for _, length in max_new_tokens)
too_long = [s["src"] for s, (ids, _) in zip(items, prompts) if len(ids) + longest > cfg.max_position_embeddings]
if too_long:
    raise ValueError(f"{too_long[0]}: prompt + {longest} new tokens exceeds the model's context "
                     f"({cfg.max_position_embeddings}); {len(too_long)} such samples (use shorter prompts/lengths)")
val_items = load_jsonl(val_data, skip_bad=skip_bad)[:val_n] if val_data else []
eos = sorted({i for i in (tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id) if i is not None})
pad_id = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
critical_ids = torch.tensor(sorted(critical_token_ids(tok, critical_words)), dtype=torch.long)
print0(f"data: {len(items)} RL prompts, {len(val_items)} val; critical tokens "
       f"{[tok.decode([i]) for i in critical_ids.tolist()]}")

params = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, beta2), eps=1e-8, weight_decay=weight_decay)
ent_ctl = EntropyControl(entropy_target, entropy_delta, entropy_cmax)
buffer = SampleBuffer(buffer_size)
step, epoch, pos = 0, 0, 0
if resume_path:
    step, state, _ = load_checkpoint(resume_path, model, optimizer)
    epoch, pos = state["epoch"], state["pos"]
    ent_ctl.load_state_dict(state["entropy_control"])
    buffer.load_state_dict(state["buffer"])
    print0(f"resumed from {resume_path} at step {step}")


def next_prompts():
    """prompts_per_step prompt indices; one permutation per epoch from (seed, epoch) -> resumable by (epoch, pos)."""
    global epoch, pos
    if pos + prompts_per_step > len(items):
        epoch, pos = epoch + 1, 0
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    idx = torch.randperm(len(items), generator=g)[pos:pos + prompts_per_step].tolist()
    pos += prompts_per_step
    return idx


def length_at(step):
    return [length for start, length in sorted(max_new_tokens) if step >= start][-1]


def rollout(idx, step, round_idx=0):
    """Generate group_size samples for each prompt index and score them. Returns a list of per-sample dicts."""
    # under FSDP, generate() gathers the full weights once for the whole call (sampler.unsharded)
    outs = generate(model, [prompts[i] for i in idx], n=group_size, max_new_tokens=length_at(step),
                    temperature=temperature, top_p=top_p, eos_token_id=eos,
                    seed=seed + 7919 * step + 104729 * round_idx + 15485863 * rank)
    texts = [tok.decode(o.tokens, skip_special_tokens=True) for o in outs]
    its = [items[i] for i in idx for _ in range(group_size)]
    scores = score_batch(texts, [s["answer"] for s in its], [s.get("options") for s in its], timeout=verify_timeout,
                         think=think, acc_weight=acc_weight, fmt_weight=fmt_weight)
    return [dict(prompt=i, tokens=o.tokens, old_logp=o.logprobs, entropies=o.entropies, text=t, reward=sc["reward"],
                 accuracy=sc["accuracy"], format=sc["format"], timeout=sc["timeout"],
                 truncated=o.finish_reason == "length")
            for i, o, t, sc in zip([i for i in idx for _ in range(group_size)], outs, texts, scores)]


dummy = {"prompt": 0, "tokens": [pad_id], "old_logp_t": torch.zeros(1), "adv": 0.0, "ref_logp": torch.zeros(1)}


def make_batch(samples):
    """Prompt + response sequences, right-padded. tmask[b, t] = 1 where position t predicts a response token."""
    T = max(len(prompts[s["prompt"]][0]) + len(s["tokens"]) for s in samples)
    B = len(samples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    tmask = torch.zeros(B, T)
    for b, s in enumerate(samples):
        p = prompts[s["prompt"]][0]
        ids[b, :len(p) + len(s["tokens"])] = torch.tensor(p + s["tokens"])
        tmask[b, len(p) - 1:len(p) - 1 + len(s["tokens"])] = 1
    pix = [prompts[s["prompt"]][1] for s in samples if prompts[s["prompt"]][1] is not None]
    return ids.to(device), torch.roll(ids, -1, 1).to(device), tmask.to(device), \
        (torch.cat(pix).to(device) if pix else None)


def all_reduce_sum(*xs):
    t = torch.tensor([float(x) for x in xs], dtype=torch.float64, device=device)
    if ddp:
        torch.distributed.all_reduce(t)
    return t.tolist()


def micro_batches(samples):
    order = sorted(range(len(samples)), key=lambda i: len(samples[i]["tokens"]))  # length-sorted: less padding
    return [[samples[i] for i in order[k:k + micro_batch]] for k in range(0, len(order), micro_batch)]


@torch.no_grad()
def policy_logprobs(m, samples):
    """Training-forward log-probs of each response token (old policy, or the KL reference), in the order of
    `samples`. Ranks with fewer micro-batches run extra passes on a one-sample batch (FSDP needs equal counts)."""
    mbs = micro_batches(samples)
    out = {}
    for r in range(max_over_ranks(len(mbs))):
        mb = mbs[r] if r < len(mbs) else [dummy]
        ids, tgt, tmask, pix = make_batch(mb)
        with autocast_ctx(device):
            logp, _ = m(ids, pix, targets=tgt, dummy_vision=ddp)
        if r < len(mbs):
            for b, s in enumerate(mb):
                out[id(s)] = logp[b][tmask[b].bool()].float().cpu()
    return [out[id(s)] for s in samples]


def max_over_ranks(k):  # every rank must run the same number of FSDP forwards/backwards
    if not ddp:
        return k
    t = torch.tensor([k], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def update(samples):
    """PPO-clip policy update on one rollout batch (ppo_epochs x mini_batches optimizer steps). Returns stats."""
    stats = {"clip_frac": 0.0, "approx_kl": 0.0, "gnorm": 0.0, "loss": 0.0, "skipped": 0}
    n_opt = 0
    g = torch.Generator().manual_seed(seed + step)
    for _ in range(ppo_epochs):
        perm = torch.randperm(len(samples), generator=g).tolist() if mini_batches > 1 else range(len(samples))
        shuffled = [samples[i] for i in perm]
        for k in range(mini_batches):
            mini = shuffled[k::mini_batches]
            # the normaliser of the WHOLE mini-batch over all ranks, so micro-batches and ranks add up exactly
            n_tok, n_seq = all_reduce_sum(sum(len(s["tokens"]) for s in mini), len(mini))
            if n_seq == 0:
                continue
            denom = n_tok if loss_agg == "token_mean" else n_seq
            norm_const = max_len_now if loss_agg == "seq_sum_const" else None
            mbs = micro_batches(mini)
            loss_sum, clip, kl, ntok_local = 0.0, 0.0, 0.0, 0
            for r in range(max_over_ranks(len(mbs))):
                # a rank with fewer micro-batches (or none) runs zero-weight passes so FSDP collectives match
                mb = mbs[r] if r < len(mbs) else [dummy]
                weight = 1.0 if r < len(mbs) else 0.0
                ids, tgt, tmask, pix = make_batch(mb)
                old = torch.zeros_like(tmask)
                for b, s in enumerate(mb):
                    old[b][tmask[b].bool()] = s["old_logp_t"].to(device)
                adv = torch.tensor([s["adv"] for s in mb], device=device)
                with autocast_ctx(device):
                    logp, ent = model(ids, pix, targets=tgt, dummy_vision=ddp)
                loss, st = ppo_clip_loss(logp, old, adv, tmask, eps_low, eps_high, loss_agg, norm_const, denom)
                if kl_coef > 0:
                    ref = torch.zeros_like(tmask)
                    for b, s in enumerate(mb):
                        ref[b][tmask[b].bool()] = s["ref_logp"].to(device)
                    loss = loss + kl_coef * agg_loss(kl_k3(logp, ref), tmask, loss_agg, norm_const, denom)
                if ent_coef_now > 0:
                    loss = loss - ent_coef_now * agg_loss(ent, tmask, loss_agg, norm_const, denom)
                if step + 1 == debug_nan_step:
                    loss = loss * float("nan")
                # FSDP averages gradients over ranks; the loss is already a global mean: scale back by world_size
                (loss * weight * world_size).backward()
                nt = int(tmask.sum()) * weight
                loss_sum += loss.item() * weight
                clip += st["clip_frac"].item() * nt
                kl += st["approx_kl"].item() * nt
                ntok_local += nt
            gnorm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
            gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
            loss_g, clip_g, kl_g, nt_g = all_reduce_sum(loss_sum, clip, kl, ntok_local)
            if not (torch.isfinite(torch.tensor(loss_g)) and torch.isfinite(torch.tensor(gnorm))):
                print0(f"step {step + 1}: non-finite loss {loss_g} or grad norm {gnorm}: update skipped")
                stats["skipped"] += 1
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            n_opt += 1
            stats["loss"] += loss_g  # each rank's loss is its share of the global mean
            stats["clip_frac"] += clip_g / max(nt_g, 1)
            stats["approx_kl"] += kl_g / max(nt_g, 1)
            stats["gnorm"] += gnorm
    return {k: (v / max(n_opt, 1) if k != "skipped" else v) for k, v in stats.items()}


@torch.no_grad()
def validate():
    """Greedy accuracy on the first val_n validation items; each rank takes its share."""
    from eval import evaluate
    mine = val_items[rank::world_size]
    rows = evaluate(model, tok, mine, 1, 0.0, length_at(step), "think" if think else "nothink",
                    batch_prompts=64, system=system_prompt or None, log=lambda *a: None) if mine else []
    correct, total = all_reduce_sum(sum(r["correct"] for r in rows), len(rows))
    return correct / max(total, 1)


def save():
    state = {"epoch": epoch, "pos": pos, "tokenizer": tok.name_or_path, "init_from": init_path,
             "entropy_control": ent_ctl.state_dict(),
             "buffer": buffer.state_dict()}
    save_checkpoint(out_dir, step, model, optimizer, state, config, keep_last=keep_last or None)


if wandb_log and rank == 0:
    import wandb
    wandb.init(project=wandb_project, name=wandb_run_name, config=config)

if step == 0 and val_items and eval_every > 0:
    acc0 = validate()
    print0(f"step 0: val accuracy {acc0:.4f}")
    log_jsonl(out_dir, {"step": 0, "val_accuracy": acc0})

while step < max_steps:
    t_step = time.time()
    lr_now = get_lr(step, max_steps, lr, warmup_steps, lr * min_lr_frac)
    for grp in optimizer.param_groups:
        grp["lr"] = lr_now
    max_len_now = length_at(step)
    my_prompts = next_prompts()[rank::world_size]

    # 1-2. rollout + score (DAPO dynamic sampling: more rounds until enough informative groups)
    t0 = time.time()
    samples, seen, n_rounds = [], [], 0  # samples: the groups trained on; seen: every rollout (for the logs)
    want = len(my_prompts)
    pending = my_prompts
    while True:
        new = rollout(pending, step, n_rounds)
        seen += new
        n_rounds += 1
        r = torch.tensor([s["reward"] for s in new])
        if truncated_zero:
            r = zero_truncated(r, torch.tensor([s["truncated"] for s in new]))
            for s, v in zip(new, r.tolist()):
                s["reward"] = v
        if not dynamic_sampling:
            samples = new
            break
        keep = informative_groups(r, group_size)
        samples += [s for g, k in enumerate(keep.tolist()) if k for s in new[g * group_size:(g + 1) * group_size]]
        (have,) = all_reduce_sum(len(samples) // group_size)
        if have >= want * world_size or n_rounds >= max_sample_rounds:
            samples = samples[:want * group_size]
            break
        pending = next_prompts()[rank::world_size]
    t_rollout = time.time() - t0

    # 3. advantages per group (groups never straddle ranks: each rank rolls out whole groups)
    rewards = torch.tensor([s["reward"] for s in samples])
    adv = group_advantages(rewards, group_size, std_norm=std_norm) if samples else torch.zeros(0)
    for s, a in zip(samples, adv.tolist()):
        s["adv"] = a
    info = informative_groups(rewards, group_size) if samples else torch.zeros(0, dtype=torch.bool)
    grp_acc = torch.tensor([s["accuracy"] for s in seen], dtype=torch.float).view(-1, group_size)
    all_correct, all_wrong = int((grp_acc.min(1).values == 1).sum()), int((grp_acc.max(1).values == 0).sum())
    train = samples
    if drop_zero_adv:
        train = [s for g, k in enumerate(info.tolist()) if k for s in samples[g * group_size:(g + 1) * group_size]]
    if buffer_frac > 0:  # R1V2 SSB: remember informative samples, mix some back into this batch
        buffer.add([{k: s[k] for k in ("prompt", "tokens", "old_logp")} for s in samples if s["adv"] != 0],
                   [s["adv"] for s in samples if s["adv"] != 0])
        k_buf = int(buffer_frac * len(samples))
        old_s, old_a = buffer.sample(k_buf, torch.Generator().manual_seed(seed + 31 * step + rank))
        train = train + [dict(s, adv=a, from_buffer=True) for s, a in zip(old_s, old_a)]

    # 4. old log-probs by the training forward (and the reference's, for the KL option)
    t0 = time.time()
    old_lp = policy_logprobs(model, train)
    mismatch = 0.0
    for s, lp in zip(train, old_lp):
        s["old_logp_t"] = lp
        if not s.get("from_buffer"):
            mismatch = max(mismatch, (lp - torch.tensor(s["old_logp"])).abs().max().item() if len(lp) else 0.0)
        else:  # buffered samples are off-policy: their ratio is against the policy that generated them
            s["old_logp_t"] = torch.tensor(s["old_logp"])
    if kl_coef > 0:
        for s, lp in zip(train, policy_logprobs(ref_model, train)):
            s["ref_logp"] = lp
    t_logp = time.time() - t0

    # entropy statistics from the sampler (the distribution each token was drawn from)
    ents = torch.tensor([e for s in seen for e in s["entropies"]])
    toks = torch.tensor([t for s in seen for t in s["tokens"]], dtype=torch.long)
    crit = torch.isin(toks, critical_ids)
    ent_sum, ent_n, hi_n, crit_sum, crit_n = all_reduce_sum(ents.sum(), ents.numel(), (ents > high_entropy).sum(),
                                                            ents[crit].sum(), crit.sum())
    mean_ent = ent_sum / max(ent_n, 1)
    ent_coef_now = ent_ctl.update(mean_ent) if entropy_target > 0 else 0.0

    # 5. policy update (every rank takes part even with nothing to train on, to keep FSDP collectives in step)
    t0 = time.time()
    (n_train_g,) = all_reduce_sum(len(train))
    if n_train_g > 0:
        ustats = update(train)  # a rank with nothing to train on still joins (zero-weight passes)
    else:
        ustats = {"clip_frac": 0.0, "approx_kl": 0.0, "gnorm": 0.0, "loss": 0.0, "skipped": 1}
        print0(f"step {step + 1}: no informative samples on any rank: update skipped")
    t_update = time.time() - t0
    step += 1

    # 6. logging
    tot = all_reduce_sum(len(seen), sum(s["reward"] for s in seen), sum(s["accuracy"] for s in seen),
                         sum(s["format"] for s in seen), sum(len(s["tokens"]) for s in seen),
                         sum(s["truncated"] for s in seen), sum(s["timeout"] for s in seen),
                         all_correct, all_wrong, len(seen) // group_size, n_rounds, len(samples) // group_size)
    N, R, A, F, L, TR, TO, AC, AW, G, NR, GK = tot  # N rollouts in G groups, GK groups kept for training
    dt = time.time() - t_step
    m = {"step": step, "reward": R / N, "accuracy": A / N, "format": F / N, "all_correct": AC / G,
         "all_wrong": AW / G, "resp_len": L / N, "truncated": TR / N,
         "loss": ustats["loss"], "clip_frac": ustats["clip_frac"],
         "approx_kl": ustats["approx_kl"], "gnorm": ustats["gnorm"], "entropy": mean_ent,
         "high_entropy_share": hi_n / max(ent_n, 1), "critical_entropy": crit_sum / crit_n if crit_n else None,
         "critical_count": int(crit_n), "entropy_coef": ent_coef_now, "verifier_timeouts": int(TO),
         "logp_mismatch": mismatch, "lr": lr_now, "sample_rounds": NR / world_size, "groups_kept": GK / G, "skipped": ustats["skipped"],
         "t_rollout": t_rollout, "t_logp": t_logp, "t_update": t_update, "t_step": dt,
         "rollout_tok_per_s": L / max(t_rollout, 1e-9)}
    log_jsonl(out_dir, m)
    if step % log_every == 0:
        ce = f"{m['critical_entropy']:.3f}" if m["critical_entropy"] is not None else "-"
        print0(f"step {step}/{max_steps} | reward {m['reward']:.3f} acc {m['accuracy']:.3f} fmt {m['format']:.3f} | "
               f"all-correct {m['all_correct']:.2f} all-wrong {m['all_wrong']:.2f} | len {m['resp_len']:.0f} "
               f"trunc {m['truncated']:.2f} | clip {m['clip_frac']:.3f} kl {m['approx_kl']:.4f} gnorm "
               f"{m['gnorm']:.2f} | ent {mean_ent:.3f} crit-ent {ce} | rollout {t_rollout:.1f}s "
               f"({m['rollout_tok_per_s']:,.0f} tok/s) logp {t_logp:.1f}s update {t_update:.1f}s")
    if wandb_log and rank == 0:
        wandb.log({k: v for k, v in m.items() if v is not None}, step=step)
    if dump_every and step % dump_every == 0 and rank == 0:
        with open(os.path.join(out_dir, "rollouts.jsonl"), "a") as f:
            for s in seen[:2 * group_size:group_size // 2 or 1]:
                it = items[s["prompt"]]
                f.write(json.dumps({"step": step, "id": it["id"], "question": it["question"],
                                    "images": it["images"], "answer": it["answer"], "response": s["text"],
                                    "reward": s["reward"], "advantage": s.get("adv")}) + "\n")
    if val_items and eval_every > 0 and (step % eval_every == 0 or step == max_steps):
        acc = validate()
        print0(f"step {step}: val accuracy {acc:.4f}")
        log_jsonl(out_dir, {"step": step, "val_accuracy": acc})
    if step % save_every == 0 or step == max_steps:
        save()

if export:
    export_hf(model, os.path.join(out_dir, "hf"), tok)
compute_cleanup()
