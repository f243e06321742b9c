"""
GRPO with verifiable rewards: the RL stage of Skywork-R1V3 (section 3; docs/recipe.md: "GRPO", "Critical-token
entropy", "R1V2 and Skywork-OR1").

CPU, the embedded default (starts from the checkpoint `python sft.py` exported to out/sft/hf):
    python grpo.py
One 80 GB GPU, a real checkpoint (InternVL3-1B; the plan: ~29 GB, micro-batches of <= 32768 tokens, activation
checkpointing on by 'auto'):
    python grpo.py --init_from=out/sft_1b/hf --data=/data/mmk12_rl.jsonl --max_new_tokens=4096
8 x 80 GB GPUs with FSDP2 (InternVL3-8B; Skywork-R1V3-38B: add config/grpo_r1v3_38b.py after it, see the README):
    torchrun --standalone --nproc_per_node=8 grpo.py config/grpo_r1v3.py
The memory plan of a command, without loading weights: add --plan=True (tools/plan.py: --plan_gpus, --plan_gpu_gb).
Every run checks it at start-up: on a GPU, a configuration that does not fit stops before any weight is read, with
the phase, its biggest term and what would fit (--force=True runs it anyway); on the CPU the verdict is printed.
Resume: the same command with --init_from=resume (reads out_dir's latest checkpoint).

One step, top to bottom in the loop below (the defaults reproduce R1V3):
  1. rollout: prompts_per_step prompts x group_size samples at temperature 1 with the current policy (rollout.py ->
     sampler.py; FSDP weights are gathered once for the phase), scored 0.8 accuracy + 0.2 format (rewards.py).
  2. advantages: A = (r - mean) / std within each group, the same A on every token of a response.
  3. update: PPO clipped surrogate, eps 0.2, each response averaged over its own tokens then over responses
     (R1V3 eq. 7), no KL, ONE optimizer step per rollout batch. Strictly on-policy: pi_old is the update forward's
     own log-probs, detached, so the ratio is exactly 1 (verl's and TRL's on-policy paths do the same).
  4. log one line, dump a few groups for viewer.py, validate, checkpoint.
Options, off by default (each a function in rl.py citing its paper, or a line in the loop): clip-higher eps_high
(DAPO); dual-clip clip_ratio_c (on, c = 3: it only bites off-policy); loss_agg 'token_mean' (DAPO, OR1) or
'seq_sum_const' (Dr.GRPO, with std_norm=False); kl_coef (k3 KL to the initial policy); entropy_coef, entropy_target
(OR1 adaptive entropy control); dynamic_sampling and drop_zero_adv (DAPO, OR1: groups filtered on accuracy);
buffer_frac (R1V2 Selective Sample Buffer); truncated_zero (OR1); overlong_buffer (DAPO soft overlong punishment);
ppo_epochs / mini_batches > 1 (off-policy: a separate pass computes pi_old); train_vit / train_connector / train_llm
(R1V3 5.2); a response-length schedule.
Simplifications: no value model, no LLM judge (rewards.score takes a `judge` hook), no sequence packing (micro-batches
are length-sorted and sized by a token budget), no asynchronous rollouts.
"""
import json
import os
import sys
import time

import torch

from plumbing import (agree, agree_max, agree_min, all_reduce_sum, autocast_ctx, build_model, check_disk,
                    checkpoint_bytes, compute_cleanup, compute_init, ensure_synth_data, export_hf, get_lr,
                    latest_checkpoint, load_checkpoint, load_tokenizer, log_jsonl, print0, save_checkpoint, together,
                    wandb_init, write_env)
from plumbing.configurator import configure
from plumbing import build_optimizer, master_torch_dtype
from data.common import (check_chat_template, critical_token_ids, encode_prompt, load_jsonl, prompt_length,
                         resolve_system, save_system, token_batches, token_pieces)
from rl import (EntropyControl, SampleBuffer, agg_loss, dynamic_sampling_rounds, group_advantages, informative_groups,
                kl_k3, overlong_penalty, ppo_clip_loss, zero_truncated)
from rollout import rollout
from sampler import Sampling, memory_budget, unsharded
from plumbing.tp import check_same, check_tp, tp_group, tp_rollout_model, tp_union
from tools.plan import startup_check

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
system_prompt = "auto"  # 'auto': the checkpoint's (data/common.py resolve_system); '': no system turn; or the text
check_template = True  # False: run even if the checkpoint's chat template renders other prompts than ours
# rollout
prompts_per_step = 16  # global, split over the processes; R1V3: 32 prompts x 32 samples = 1024 rollouts a step
group_size = 8  # samples per prompt: GRPO's group (n in the papers; --n would clash with torchrun flags)
temperature = 1.0  # OR1: 1.0 (0.6 stagnated)
top_p = 1.0
repetition_penalty = 1.0  # rollouts sample the policy itself (1 = off); only eval uses R1V3's inference 1.05
max_new_tokens = [[0, 160]]  # [[from_step, length], ...] or one length; R1V3: 4096 -> 8192; our traces are <= 123
# reward (docs/recipe.md, "GRPO")
acc_weight = 0.8
fmt_weight = 0.2
truncated_zero = False  # OR1: truncated responses get reward 0
overlong_buffer = 0  # > 0: DAPO soft overlong punishment over the last this-many tokens of the budget
overlong_penalty_max = 1.0
verify_timeout = 5.0
# advantages and loss (rl.py)
std_norm = True  # False = Dr.GRPO
eps_low = 0.2
eps_high = 0.2  # DAPO clip-higher: 0.28 (OR1 found 0.25-0.265 helped, 0.28 hurt)
clip_ratio_c = 3.0  # dual-clip (Ye et al. 2020) for A < 0: only bites off-policy (ratio far from 1)
loss_agg = "seq_mean_token_mean"  # R1V3 eq. 7 | 'token_mean' (DAPO, OR1) | 'seq_sum_const' (Dr.GRPO)
seq_sum_norm = 0  # Dr.GRPO's constant normaliser; 0 = the longest length of the max_new_tokens schedule
kl_coef = 0.0  # > 0: k3 KL to the frozen initial policy
entropy_coef = 0.0  # a constant entropy bonus
entropy_target = 0.0  # > 0: OR1 adaptive entropy control instead (target 0.2 in the paper)
entropy_delta = 1e-4
entropy_cmax = 0.005
# data-side options
group_filter = "accuracy"  # what makes a group informative for dynamic_sampling / drop_zero_adv: 'accuracy' | 'reward'
drop_zero_adv = False  # train only on informative groups
dynamic_sampling = False  # DAPO: more rounds until every rank has its prompts' worth of informative groups
max_sample_rounds = 3
buffer_frac = 0.0  # R1V2 SSB: this share of the update batch comes from the buffer of earlier non-zero-A samples
buffer_size = 1024
buffer_max_uses = 2  # a buffered sample is trained on at most this many times...
buffer_max_age = 4  # ... and at most this many steps after it was generated
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
micro_batch = 32  # at most this many sequences per forward/backward, per process...
micro_batch_tokens = 32768  # ... and at most this many padded tokens (length-sorted; a longer sequence goes alone)
train_vit = True
train_connector = True
train_llm = True
activation_checkpointing = "auto"  # 'auto': on when the plan says the training step does not fit without it
offload = False  # FSDP2 CPU offload of the fp32 masters, gradients and AdamW state
master_dtype = "float32"  # "bfloat16": params, grads, AdamW state in bf16 (8 bytes a param, not 16; plumbing/optim.py)
tp = 1  # > 1: tensor-parallel rollouts over groups of tp ranks (tp.py)
cuda_graph = False  # capture the decode step in CUDA graphs (GPU)
# logging, validation, checkpoints
high_entropy = 2.0  # "high-entropy token" threshold in nats (R1V3 uses 6.8 for Qwen's 152k vocab)
critical_words = ["Wait", "Alternatively", "Hmm"]
log_every = 1
dump_every = 10  # rollouts.jsonl: dump_groups groups every dump_every steps, for viewer.py
dump_groups = 2
eval_every = 20
eval_at_start = True  # validate the starting weights too (step 0)
save_every = 20  # 0: no checkpoint at all, not even at the end (tools/gpu_check.py's runs)
keep_last = 0  # 0 = keep every checkpoint (entropy.py ranks them)
export = True
seed = 1337
dist_timeout_s = 600  # a collective that waits longer than this stops the run (plumbing/dist.py compute_init)
heartbeat_timeout_s = 60  # a rank silent this long (killed, machine lost) stops every rank (0: no watchdog)
wandb_log = False
wandb_project = "nanor1v"
wandb_run_name = "grpo"
force = False  # run even when the memory plan says it does not fit the GPU
oom_retries = 3  # a CUDA out-of-memory in a rollout / validation: retry with half the memory budget, this often
if "--plan=true" in [a.lower() for a in sys.argv[1:]]:  # the memory plan of this command (tools/plan.py)
    os.execv(sys.executable, [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools",
                              "plan.py")] + sys.argv)
config = configure(globals(), sys.argv[1:])
startup_check("grpo", config)  # the memory plan: a GPU run that does not fit stops here, before anything loads
activation_checkpointing = config["activation_checkpointing"]  # 'auto' decided by the plan
# -----------------------------------------------------------------------------

ddp, rank, local_rank, world_size, device = compute_init(seed, dist_timeout_s, heartbeat_timeout_s)
print0(json.dumps(config, indent=1))
write_env(out_dir)  # what this run ran on (also written into every checkpoint and the export)
wandb = wandb_init(wandb_log, wandb_project, wandb_run_name, config, out_dir, resume=init_from == "resume")
if data.startswith("data/synth/") or val_data.startswith("data/synth/"):
    ensure_synth_data()
assert loss_agg in ("seq_mean_token_mean", "token_mean", "seq_sum_const"), loss_agg
assert group_filter in ("accuracy", "reward") and 0 <= buffer_frac < 1, (group_filter, buffer_frac)
if prompts_per_step % world_size:
    raise ValueError(f"prompts_per_step={prompts_per_step} must be a multiple of the {world_size} processes")

resume_path = latest_checkpoint(out_dir) if init_from == "resume" else None
if init_from == "resume" and resume_path is None:
    raise FileNotFoundError(f"init_from='resume' but {out_dir} has no complete checkpoint (ckpt_*)")
if init_from != "resume" and not os.path.isdir(init_from):
    raise FileNotFoundError(f"init_from={init_from!r} not found: run `python sft.py` first (it exports out/sft/hf)")
init_path = init_from  # the run's starting point; a resumed run reads it from its checkpoint (the KL reference)
if resume_path:
    with open(os.path.join(resume_path, "state.json")) as f:
        init_path = json.load(f)["state"]["init_from"]
tok = load_tokenizer(tokenizer, init_from, resume_path)
system_prompt = resolve_system(system_prompt, resume_path or init_from, tok)  # 'auto' -> the checkpoint's
check_chat_template(tok, system_prompt, think, resume_path or init_from, check_template)
# FSDP2 on several processes and on any GPU (one-process group): bf16 compute, fp32 masters; fp32 on one CPU process
fsdp = dict(fsdp=ddp or device.type == "cuda", param_dtype=torch.bfloat16 if device.type == "cuda" else None,
            offload=offload, master_dtype=master_torch_dtype(master_dtype))
model, n_params, n_train = build_model(init_from, tok, device, resume_path=resume_path,
                                       train=(train_vit, train_connector, train_llm),
                                       activation_checkpointing=activation_checkpointing, **fsdp)
cfg = model.cfg
ref_model = build_model(init_path, tok, device, train=(False, False, False), **fsdp)[0].eval() if kl_coef > 0 else None
if tp > 1:  # tensor-parallel rollouts: groups of tp consecutive ranks, each rank holding 1/tp of every LLM block
    check_tp(cfg, tp, world_size)
    tp_pg = tp_group(tp)
print0(f"model: {n_params:,} params, {n_train:,} trainable (vit={train_vit}, connector={train_connector}, "
       f"llm={train_llm})")

# prompts: every line validated and measured now (bad lines and images fail here, as file:line); the images are
# decoded per rollout, for this rank's prompts only
items = load_jsonl(data, skip_bad=skip_bad)
longest = max(length for _, length in max_new_tokens)
if len(items) < prompts_per_step or min(start for start, _ in max_new_tokens) != 0:
    raise ValueError(f"{data}: {len(items)} prompts for prompts_per_step={prompts_per_step}, max_new_tokens="
                     f"{max_new_tokens}: need at least prompts_per_step prompts and a schedule starting at step 0")
for s in items:
    if prompt_length(tok, s, cfg, think, system_prompt or None) + longest > cfg.max_position_embeddings:
        raise ValueError(f"{s['src']}: prompt + {longest} new tokens exceeds the model's context "
                         f"({cfg.max_position_embeddings}); use shorter prompts or lengths")
val_items = load_jsonl(val_data, skip_bad=skip_bad)[:val_n] if val_data else []
critical_ids = torch.tensor(sorted(critical_token_ids(tok, critical_words)), dtype=torch.long)
norm_const = seq_sum_norm or longest  # Dr.GRPO: one constant for the whole run, whatever the schedule does
score_kw = dict(timeout=verify_timeout, acc_weight=acc_weight, fmt_weight=fmt_weight)
# the rollouts' (validation is greedy)
sampling = Sampling(temperature=temperature, top_p=top_p, repetition_penalty=repetition_penalty)
on_policy = ppo_epochs == 1 and mini_batches == 1 and buffer_frac == 0
step_prompts = {}  # this step's encoded (input_ids, pixel_values) by item index: images decoded once a step
print0(f"data: {len(items)} RL prompts, {len(val_items)} val; critical tokens "
       f"{[tok.decode([i]) for i in critical_ids.tolist()]}")

params = [p for p in model.parameters() if p.requires_grad]
optimizer = build_optimizer(params, master_dtype, lr=lr, betas=(0.9, beta2), eps=1e-8, weight_decay=weight_decay,
                            seed=seed)
ent_ctl = EntropyControl(entropy_target, entropy_delta, entropy_cmax)
buffer = SampleBuffer(buffer_size, buffer_max_uses, buffer_max_age)
step, cursor = 0, dict(epoch=0, pos=0)  # the data position: epoch, and the next draw in its permutation
if resume_path:
    step, state, _ = load_checkpoint(resume_path, model, optimizer)
    cursor.update(epoch=state["epoch"], pos=state["pos"])
    ent_ctl.load_state_dict(state["entropy_control"])
    if "rank" in state:  # each rank's own buffer (a run resumed on more ranks starts the new ranks' empty)
        buffer.load_state_dict(state["rank"]["buffer"])
    print0(f"resumed from {resume_path} at step {step}")
tied = cfg.vocab_size * cfg.n_embd if cfg.tie_embeddings else 0  # DCP writes a tied lm_head under both names
master_bytes = master_torch_dtype(master_dtype).itemsize  # params and AdamW moments as the checkpoint holds them
if save_every > 0:
    check_disk(out_dir, checkpoint_bytes(n_params + tied, n_train, param_bytes=master_bytes, state_bytes=master_bytes),
               keep_last + 1 if keep_last else max_steps // save_every + 1)


def next_prompts():
    """This rank's share of the next prompts_per_step prompts, with one seed per prompt. One permutation per epoch
    from (seed, epoch): resumable by the cursor, and a prompt's seed names its draw, not its rank."""
    if cursor["pos"] + prompts_per_step > len(items):
        cursor.update(epoch=cursor["epoch"] + 1, pos=0)
    ep, start = cursor["epoch"], cursor["pos"]
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed * 1000 + ep)).tolist()
    draws = list(range(start, start + prompts_per_step))[rank::world_size]
    cursor["pos"] = start + prompts_per_step
    return [order[d] for d in draws], [seed * 1_000_003 + ep * len(items) + d for d in draws]


def length_at(step):
    return [length for start, length in sorted(max_new_tokens) if step >= start][-1]


def take(d, rows):
    """Rows of a batch dict: tensors indexed, lists picked."""
    rows = torch.as_tensor(rows, dtype=torch.long)
    return {k: v[rows] if torch.is_tensor(v) else [v[i] for i in rows.tolist()] for k, v in d.items()}


def cat(ds):
    return {k: torch.cat([d[k] for d in ds]) if torch.is_tensor(ds[0][k]) else sum((d[k] for d in ds), [])
            for k in ds[0]}


def group_rows(g):
    return range(g * group_size, (g + 1) * group_size)


def rollout_policy():
    """The weights rollouts and validation generate with, for one phase (a context manager, collective): the FSDP2
    shards gathered once (sampler.unsharded), or with tp > 1 this rank's TP shards made from them (tp.py)."""
    if tp > 1:
        return tp_rollout_model(model, tp_pg)
    return unsharded(model)


def generating(fn, what, budget):
    """fn(budget) on every rank, together: a rollout or a validation share, work each rank does alone with the
    agreed memory budget. A MemoryError (sampler.fit_chunks: this rank's prompt does not fit even alone) raises on
    every rank, none left waiting in a collective. A CUDA out-of-memory (torch.OutOfMemoryError: the budget was too
    generous, e.g. fragmentation) on any rank is agreed by all: every rank empties its cache and runs fn again with
    half the budget, i.e. smaller chunks (the same samples: each prompt draws from its own seed), at most
    oom_retries times. With tp > 1 an out-of-memory inside the TP group's collectives stops the run instead (its
    other ranks wait there until dist_timeout_s)."""
    for _ in range(oom_retries + 1):
        def run():
            try:
                return fn(budget), None
            except torch.OutOfMemoryError as e:  # = torch.cuda.OutOfMemoryError; its traceback's tensors die here
                return None, (str(e) or "out of memory").splitlines()[0]
        out, oom = together(run, what, catch=MemoryError)
        if not agree(oom is not None):
            return out
        if oom is not None:
            print(f"rank {rank}: {what}: {oom}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        budget //= 2
        print0(f"{what}: out of memory on a rank: every rank retries with half the budget ({budget / 2**30:.2f} GiB)")
    raise torch.OutOfMemoryError(f"rank {rank}: {what} ran out of memory {oom_retries + 1} times, the last with a "
                                 f"budget of {2 * budget / 2**30:.2f} GiB: lower max_new_tokens or use --tp")


def rollout_round(policy, max_new, budget):
    """1-2. group_size samples of each of this rank's next prompts, scored, and their advantages. Returns the round
    as a batch dict, one row per sample: prompt index, tokens (R, max_new), sampler logp / entropy (R, max_new),
    lengths, truncated, reward, accuracy, format, adv (R,) and the texts / preds for the dumps. tp > 1: the TP group
    generates the union of its ranks' prompts together (only indices and seeds travel; each rank encodes the
    union's images) and this rank keeps its rows."""
    idx, seeds = next_prompts()
    mine = slice(0, len(idx))
    if tp > 1:
        idx, seeds, mine = tp_union(tp_pg, idx, seeds)
    out, texts, scores, prompts = generating(lambda b: rollout(
        policy, tok, [items[i] for i in idx], group_size, max_new, seeds, think=think, system=system_prompt or None,
        sampling=sampling, budget=b, score_kw=score_kw, cuda_graph=cuda_graph), "rollout", budget)
    if tp > 1:
        check_same(tp_pg, out.tokens)  # every rank of the group drew the same tokens
    step_prompts.update(zip(idx[mine], prompts[mine]))
    f = lambda key: torch.tensor([float(s[key]) for s in scores])  # noqa: E731
    d = dict(prompt=torch.tensor(idx).repeat_interleave(group_size), tokens=out.tokens, logp=out.logprobs,
             ent=out.entropies, length=out.lengths, truncated=out.truncated, reward=f("reward"),
             accuracy=f("accuracy"), format=f("format"), timeout=f("timeout"), text=texts,
             pred=[s["pred"] for s in scores])
    d = take(d, range(mine.start * group_size, mine.stop * group_size))
    if truncated_zero:  # OR1: a truncated response gets reward 0
        d["reward"] = zero_truncated(d["reward"], d["truncated"])
    if overlong_buffer > 0:  # DAPO: a soft length penalty over the last overlong_buffer tokens of the budget
        d["reward"] = d["reward"] + overlong_penalty(d["length"], max_new, overlong_buffer, overlong_penalty_max)
    # 2. advantages per group (groups never straddle ranks: each rank rolls out whole groups)
    d["adv"] = group_advantages(d["reward"], group_size, std_norm=std_norm)
    return d


def sample_step(policy, max_new, budget):
    """1. This step's rollouts: one round, or with DAPO dynamic sampling more rounds until every rank holds its
    share of informative groups. Returns (every rollout of the step, the kept groups as (round, group) pairs, the
    number of rounds); each rollout's `row` is its row in the first."""
    rounds = []

    def draw(r):
        d = rollout_round(policy, max_new, budget)
        d["row"] = torch.arange(len(d["prompt"])) + sum(len(x["prompt"]) for x in rounds)
        rounds.append(d)
        return informative_groups(d[group_filter], group_size)

    want = prompts_per_step // world_size
    if dynamic_sampling:
        kept, n_rounds = dynamic_sampling_rounds(draw, want, max_sample_rounds, agree_min)
    else:
        draw(0)
        kept, n_rounds = [(0, g) for g in range(want)], 1
    return rounds, kept, n_rounds


def training_rows(rounds, kept):
    """The samples the update trains on: the kept groups (without the uninformative ones with drop_zero_adv), then
    with buffer_frac > 0 earlier steps' samples (R1V2 Selective Sample Buffer; their row is -1). Also returns the
    number of this step's groups trained on."""
    fresh = cat([take(rounds[r], group_rows(g)) for r, g in kept] or [take(rounds[0], [])])
    if drop_zero_adv:  # OR1: only groups whose accuracy (or reward) varies carry a useful gradient
        keep = informative_groups(fresh[group_filter], group_size).repeat_interleave(group_size)
        fresh = take(fresh, keep.nonzero()[:, 0])
    train = {k: fresh[k] for k in ("prompt", "tokens", "logp", "length", "adv", "row")}
    if buffer_frac > 0:
        train = buffer.mix(train, buffer_frac, step, torch.Generator().manual_seed(seed + 31 * step + rank))
    return train, len(fresh["prompt"]) // group_size


def prompt_of(i):  # this step's (input_ids, pixel_values) of item i (a buffered sample's prompt is encoded again)
    if i not in step_prompts:
        step_prompts[i] = encode_prompt(tok, items[i], cfg, think, system_prompt or None)
    return step_prompts[i]


def make_batch(train):
    """Training sequences = prompt + response, right-padded: ids (N, T); mask (N, T) = 1 where position t predicts a
    response token; sampler_logp (N, T) the sampler's log-prob of that token at the same position."""
    ids_p = [prompt_of(i)[0] for i in train["prompt"].tolist()]
    N, T = len(ids_p), max((len(p) + int(L) for p, L in zip(ids_p, train["length"])), default=1)
    ids, mask, sampler_logp = torch.zeros(N, T, dtype=torch.long), torch.zeros(N, T), torch.zeros(N, T)  # N may be 0
    for b, (p, L) in enumerate(zip(ids_p, train["length"].tolist())):
        resp = slice(len(p) - 1, len(p) - 1 + L)  # the positions that predict the response's tokens
        ids[b, :len(p)], ids[b, len(p):len(p) + L] = torch.tensor(p), train["tokens"][b, :L]
        mask[b, resp], sampler_logp[b, resp] = 1, train["logp"][b, :L]
    return dict(prompt=train["prompt"], ids=ids, mask=mask, adv=train["adv"].float(), sampler_logp=sampler_logp,
                from_buffer=train["row"] < 0)


def micro_batches(batch, rows, **extra):
    """The rows as micro-batches on the device, sorted by response length (less padding), each at most micro_batch
    rows and micro_batch_tokens padded tokens (data.common.token_batches): ids, mask, pix, adv and each (N, T) tensor
    of `extra` (pi_old, the KL reference), cut to the longest row. Every rank runs the same number of forwards
    (FSDP): a rank with fewer gets padding micro-batches, one row whose mask is all 0."""
    rows = sorted(rows, key=lambda r: int(batch["mask"][r].sum()))
    ends = [int(batch["mask"][r].nonzero().max()) + 2 for r in rows]  # prompt + response: the row's tokens
    chunks = [[rows[i] for i in mb] for mb in token_batches(ends, micro_batch_tokens, micro_batch)]
    chunks += [[]] * (agree_max(len(chunks)) - len(chunks))
    for mb in chunks:
        if not mb:  # padding: its forward reaches every FSDP unit (dummy_vision), its loss is 0
            yield dict(rows=[], ids=torch.zeros(1, 1, dtype=torch.long, device=device),
                       mask=torch.zeros(1, 1, device=device), pix=None, adv=torch.zeros(1, device=device),
                       **{k: torch.zeros(1, 1, device=device) for k in extra})
            continue
        T = int(max(batch["mask"][r].nonzero().max() for r in mb)) + 2
        pix = [prompt_of(i)[1] for i in batch["prompt"][mb].tolist()]
        pix = [p for p in pix if p is not None]
        yield dict(rows=mb, ids=batch["ids"][mb, :T].to(device), mask=batch["mask"][mb, :T].to(device),
                   pix=torch.cat(pix).to(device) if pix else None, adv=batch["adv"][mb].to(device),
                   **{k: v[mb, :T].to(device) for k, v in extra.items()})


def forward(net, mb, with_entropy=False):
    """(logp, entropy) (b, T) of a micro-batch's response tokens under net (lm_head only at those positions); the
    entropy (with its graph) only with_entropy, for the entropy bonus (else None)."""
    with autocast_ctx(device):
        return net(mb["ids"], mb["pix"], targets=torch.roll(mb["ids"], -1, 1), target_mask=mb["mask"],
                   dummy_vision=ddp, with_entropy=with_entropy)


@torch.no_grad()
def policy_logp(net, batch):
    """Log-probs of every batch row's response tokens under net (the off-policy pi_old, or the KL reference)."""
    out = torch.zeros_like(batch["mask"])
    for mb in micro_batches(batch, list(range(len(batch["prompt"])))):
        logp, _ = forward(net, mb)
        out[mb["rows"], :logp.shape[1]] = logp[:len(mb["rows"])].float().cpu()
    if hasattr(net, "reshard"):  # FSDP2 keeps the root gathered after a forward (for its backward): none follows
        net.reshard()
    return out


def optimizer_step(batch, rows, old_logp, ref_logp, ent_coef, train_logp):
    """One optimizer step on this rank's `rows` of the batch, all ranks together: each micro-batch's loss uses the
    normaliser of the whole mini-batch over all ranks, so micro-batches and ranks add up exactly. On-policy,
    pi_old is the forward's own log-probs, detached (ratio 1); they go into train_logp. Returns the step's stats."""
    n_tok, n_seq = all_reduce_sum(batch["mask"][rows].sum(), len(rows))
    denom = n_tok if loss_agg == "token_mean" else n_seq
    sums = dict(loss=0.0, clip=0.0, kl=0.0, tokens=0.0)
    extra = {} if on_policy else dict(old=old_logp)
    if kl_coef > 0:
        extra["ref"] = ref_logp
    for mb in micro_batches(batch, rows, **extra):
        logp, ent = forward(model, mb, with_entropy=ent_coef > 0)
        mask = mb["mask"]
        old = logp.detach() if on_policy else mb["old"]
        loss, st = ppo_clip_loss(logp, old, mb["adv"], mask, eps_low, eps_high, loss_agg, norm_const, denom,
                                 clip_ratio_c)
        if kl_coef > 0:  # k3 KL to the initial policy (GRPO, DeepSeekMath eq. 4)
            loss = loss + kl_coef * agg_loss(kl_k3(logp, mb["ref"]), mask, loss_agg, norm_const, denom)
        if ent_coef > 0:  # entropy bonus: minus, so the step raises the entropy
            loss = loss - ent_coef * agg_loss(ent, mask, loss_agg, norm_const, denom)
        # FSDP averages gradients over ranks; the loss is already the global mean: scale back by world_size
        (loss * world_size).backward()
        w = float(mask.sum())
        sums["loss"] += loss.item()
        sums["clip"] += st["clip_frac"].item() * w
        sums["kl"] += st["approx_kl"].item() * w
        sums["tokens"] += w
        if on_policy:
            train_logp[mb["rows"], :logp.shape[1]] = logp.detach()[:len(mb["rows"])].float().cpu()
    gnorm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
    tot = dict(zip(sums, all_reduce_sum(*sums.values())))
    skip = agree(not bool(torch.isfinite(torch.tensor([tot["loss"], gnorm])).all()))  # every rank skips, or none
    if skip:
        print0(f"step {step + 1}: non-finite loss {tot['loss']} or grad norm {gnorm}: update skipped")
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return dict(loss=tot["loss"], clip_frac=tot["clip"] / max(tot["tokens"], 1),
                approx_kl=tot["kl"] / max(tot["tokens"], 1), gnorm=gnorm, skipped=int(skip))


def ppo_update(batch, old_logp, ref_logp, ent_coef):
    """4. ppo_epochs passes x mini_batches optimizer steps over the batch (1 x 1 = on-policy). Returns the stats
    averaged over the steps (with the count of skipped ones) and the trainer's log-probs (N, T)."""
    n_rows = len(batch["prompt"])
    train_logp = torch.zeros_like(batch["mask"]) if on_policy else old_logp.clone()  # for the mismatch, the dumps
    stats = dict(loss=0.0, clip_frac=0.0, approx_kl=0.0, gnorm=0.0, skipped=0)
    if agree_max(n_rows) == 0:
        print0(f"step {step + 1}: no informative samples on any rank: update skipped")
        return dict(stats, skipped=1), train_logp
    n_steps = ppo_epochs * mini_batches
    for ppo_epoch in range(ppo_epochs):
        order = list(range(n_rows))
        if mini_batches > 1:
            order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed + step * 100 + ppo_epoch))
            order = order.tolist()
        for k in range(mini_batches):
            st = optimizer_step(batch, order[k::mini_batches], old_logp, ref_logp, ent_coef, train_logp)
            stats["skipped"] += st.pop("skipped")
            for key, v in st.items():
                stats[key] += v / n_steps
    return stats, train_logp


def step_metrics(seen, kept, n_groups, batch, stats, ent, diff, times):
    """The step's log record: rollout, reward and loss statistics over all ranks (every rank calls it)."""
    generated = torch.arange(seen["tokens"].shape[1])[None] < seen["length"][:, None]
    crit = torch.isin(seen["tokens"], critical_ids) & generated
    acc_g = seen["accuracy"].view(-1, group_size)
    sums = dict(n=len(seen["prompt"]), reward=seen["reward"].sum(), accuracy=seen["accuracy"].sum(),
                format=seen["format"].sum(), resp_len=seen["length"].sum(), truncated=seen["truncated"].sum(),
                timeouts=seen["timeout"].sum(), all_correct=(acc_g.min(1).values == 1).sum(),
                all_wrong=(acc_g.max(1).values == 0).sum(), kept=len(kept), trained=n_groups,
                train_rows=len(batch["prompt"]), buffer_rows=batch["from_buffer"].sum(),
                crit_sum=seen["ent"][crit].sum(), crit_n=crit.sum(), mis_sum=diff.sum(), mis_n=diff.numel())
    t = dict(zip(sums, all_reduce_sum(*sums.values())))  # over all ranks
    G = t["n"] / group_size
    critical_entropy = t["crit_sum"] / t["crit_n"] if t["crit_n"] else None
    mx = {"step": step, **{k: t[k] / t["n"] for k in ("reward", "accuracy", "format", "resp_len", "truncated")},
          "all_correct": t["all_correct"] / G, "all_wrong": t["all_wrong"] / G, "loss": stats["loss"],
          "lr": optimizer.param_groups[0]["lr"], "clip_frac": stats["clip_frac"], "approx_kl": stats["approx_kl"],
          "gnorm": stats["gnorm"], "entropy": ent["mean"], "high_entropy_share": ent["high_share"],
          "critical_entropy": critical_entropy, "critical_count": int(t["crit_n"]), "entropy_coef": ent["coef"],
          "verifier_timeouts": int(t["timeouts"]), "logp_mismatch": agree_max(float(diff.max()) if diff.numel() else 0.0),
          "logp_mismatch_mean": t["mis_sum"] / max(t["mis_n"], 1), "sample_rounds": times["rounds"],
          "groups_kept": t["trained"] / G, "groups_trained": int(t["trained"]), "train_rows": int(t["train_rows"]),
          "buffer_rows": int(t["buffer_rows"]), "skipped": stats["skipped"], "t_rollout": times["rollout"],
          "t_logp": times["logp"], "t_update": times["update"], "t_step": time.time() - times["start"],
          "rollout_tok_per_s": t["resp_len"] / max(times["rollout"], 1e-9), "informative_groups": int(t["kept"])}
    if device.type == "cuda":  # this step's peak, rollout and update together
        mx["mem_peak_gb"] = agree_max(torch.cuda.max_memory_allocated(device)) / 2**30  # GB = 2^30, as plan.py
    return mx


def print_step(mx):
    ce = "-" if mx["critical_entropy"] is None else f"{mx['critical_entropy']:.3f}"
    print0(f"step {mx['step']}/{max_steps} | reward {mx['reward']:.3f} acc {mx['accuracy']:.3f} fmt {mx['format']:.3f} "
           f"| loss {mx['loss']:.4f} lr {mx['lr']:.1e} | all-correct {mx['all_correct']:.2f} all-wrong "
           f"{mx['all_wrong']:.2f} | len {mx['resp_len']:.0f} trunc {mx['truncated']:.2f} | clip "
           f"{mx['clip_frac']:.3f} kl {mx['approx_kl']:.4f} gnorm {mx['gnorm']:.2f} | ent {mx['entropy']:.3f} "
           f"crit-ent {ce} | rollout {mx['t_rollout']:.1f}s ({mx['rollout_tok_per_s']:,.0f} tok/s) "
           f"logp {mx['t_logp']:.1f}s update {mx['t_update']:.1f}s")


def validation_accuracy():
    """Greedy accuracy on the first val_n validation items: each TP group (each rank at tp=1) takes a share; its
    ranks generate it together, and the group's first rank counts it."""
    from eval import evaluate
    share = val_items[rank // tp::world_size // tp]
    with rollout_policy() as policy:  # collective, even with no items
        budget = agree_min(memory_budget(device))
        rows = generating(lambda b: evaluate(
            policy, tok, share, 1, length_at(step), Sampling(temperature=0.0), think=think,
            system=system_prompt or None, progress=False, tokens=False, budget=b) if share else [], "validation",
            budget)
    rows = rows if rank % tp == 0 else []
    correct, total = all_reduce_sum(sum(r["correct"] for r in rows), len(rows))
    return correct / max(total, 1)


def validate():
    """Validation accuracy, printed and logged (log.jsonl, wandb)."""
    acc = validation_accuracy()
    print0(f"step {step}: val accuracy {acc:.4f}")
    log_jsonl(out_dir, {"step": step, "val_accuracy": acc})
    if wandb:
        wandb.log({"val_accuracy": acc}, step=step)


def dump(seen, train, train_logp, mask):
    """The first dump_groups groups of this step's rollouts, for viewer.py (the format: viewer.py's docstring), with
    the trainer's log-probs of the rows that were trained on."""
    at = {r: i for i, r in enumerate(train["row"].tolist()) if 0 <= r < dump_groups * group_size}
    with open(os.path.join(out_dir, "rollouts.jsonl"), "a") as f:
        for g in range(min(dump_groups, len(seen["prompt"]) // group_size)):
            it, samples = items[int(seen["prompt"][g * group_size])], []
            for r in group_rows(g):
                L = int(seen["length"][r])
                ids = seen["tokens"][r, :L].tolist()
                crit = torch.isin(seen["tokens"][r, :L], critical_ids).nonzero()[:, 0].tolist()
                trained = train_logp[at[r]][mask[at[r]].bool()].tolist() if r in at else None
                finish = "length" if seen["truncated"][r] else "eos"
                samples.append(dict(response=seen["text"][r], pieces=token_pieces(tok, ids), tokens=ids,
                                    logp=seen["logp"][r, :L].tolist(), entropy=seen["ent"][r, :L].tolist(),
                                    train_logp=trained, advantage=float(seen["adv"][r]),
                                    reward=float(seen["reward"][r]), accuracy=int(seen["accuracy"][r]),
                                    format=int(seen["format"][r]), pred=seen["pred"][r], n_tokens=L,
                                    finish_reason=finish, critical=crit))
            f.write(json.dumps(dict(step=step, prompt_index=int(seen["prompt"][g * group_size]), id=it["id"],
                                    question=it["question"], images=it["images"], answer=it["answer"],
                                    options=it.get("options"), domain=it.get("domain"),
                                    difficulty=it.get("difficulty"), samples=samples)) + "\n")


def save():
    state = {**cursor, "tokenizer": tok.name_or_path, "init_from": init_path,
             "entropy_control": ent_ctl.state_dict()}
    save_checkpoint(out_dir, step, model, optimizer, state, config, keep_last=keep_last or None,
                    rank_state={"buffer": buffer.state_dict()})  # each rank's own buffer


if step == 0 and val_items and eval_every > 0 and eval_at_start:
    validate()

while step < max_steps:
    t_start = time.time()
    for grp in optimizer.param_groups:
        grp["lr"] = get_lr(step, max_steps, lr, warmup_steps, lr * min_lr_frac)
    max_new = length_at(step)
    step_prompts.clear()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # 1-2. rollouts, rewards and advantages, on weights gathered once for the phase
    t0 = time.time()
    with rollout_policy() as policy:
        budget = agree_min(memory_budget(device))  # measured after the gather; the smallest rank's, for all
        rounds, kept, n_rounds = sample_step(policy, max_new, budget)
    seen = cat(rounds)  # every rollout of the step, for the logs and dumps
    t_rollout = time.time() - t0
    train, n_groups = training_rows(rounds, kept)
    batch = make_batch(train)

    # 3. pi_old: on-policy, the update's own forward (below); off-policy, a pass before any optimizer step (buffered
    # samples keep the log-probs of the policy that generated them). The KL reference: the initial policy's pass.
    t0 = time.time()
    old_logp = None
    if not on_policy:
        old_logp = torch.where(batch["from_buffer"][:, None], batch["sampler_logp"], policy_logp(model, batch))
    ref_logp = policy_logp(ref_model, batch) if kl_coef > 0 else None
    tokens_ent = seen["ent"][torch.arange(seen["ent"].shape[1])[None] < seen["length"][:, None]]
    ent_sum, ent_n, hi_n = all_reduce_sum(tokens_ent.sum(), tokens_ent.numel(), (tokens_ent > high_entropy).sum())
    ent = dict(mean=ent_sum / max(ent_n, 1), high_share=hi_n / max(ent_n, 1))
    ent["coef"] = ent_ctl.update(ent["mean"]) if entropy_target > 0 else entropy_coef  # OR1 adaptive, or constant
    t_logp = time.time() - t0

    # 4. the PPO update
    t0 = time.time()
    stats, train_logp = ppo_update(batch, old_logp, ref_logp, ent["coef"])
    t_update = time.time() - t0
    step += 1

    # 5. log, dump, validate, checkpoint
    fresh = batch["mask"].bool() & ~batch["from_buffer"][:, None]
    diff = (train_logp - batch["sampler_logp"]).abs()[fresh]  # trainer vs sampler log-probs, this step's rows
    mx = step_metrics(seen, kept, n_groups, batch, stats, ent, diff, dict(
        start=t_start, rollout=t_rollout, logp=t_logp, update=t_update, rounds=n_rounds))
    if dynamic_sampling and mx["informative_groups"] < prompts_per_step:
        print0(f"step {step}: only {mx['informative_groups']} of {prompts_per_step} informative groups after "
               f"{n_rounds} rounds")
    log_jsonl(out_dir, mx)
    if step % log_every == 0:
        print_step(mx)
    if wandb:
        wandb.log({k: v for k, v in mx.items() if v is not None}, step=step)
    if dump_every and step % dump_every == 0 and rank == 0:
        dump(seen, train, train_logp, batch["mask"])
    if val_items and eval_every > 0 and (step % eval_every == 0 or step == max_steps):
        validate()
    if save_every > 0 and (step % save_every == 0 or step == max_steps):
        save()

if export:
    export_hf(model, os.path.join(out_dir, "hf"), tok, dtype=torch.bfloat16 if device.type == "cuda" else None,
              system=system_prompt)
    if rank == 0:  # the next stage's system_prompt='auto' finds the system turn this run trained with
        save_system(os.path.join(out_dir, "hf"), system_prompt)
compute_cleanup()
