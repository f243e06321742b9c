"""
Cold-start SFT (Skywork-R1V3 section 2; docs/recipe.md, "Cold-start SFT"), and any general SFT of the VLM.
Loss on the assistant's tokens only; ViT / connector / LLM each trainable or frozen.

CPU, the embedded default (tiny VLM from scratch on the synthetic task; renders the data first if missing):
    python sft.py
One 80 GB GPU, a real local checkpoint (the plan: ~27 GB with activation checkpointing, which 'auto' turns on):
    python sft.py --init_from=/models/InternVL3-1B --data=/data/cold_start.jsonl --lr=1e-5 --max_len=8192 \
        --batch_size=4 --grad_accum=8
One node, 8 x 80 GB GPUs, FSDP2 (see config/sft_r1v3_38b.py):
    torchrun --standalone --nproc_per_node=8 sft.py config/sft_r1v3_38b.py
Resume an interrupted run exactly where it stopped:
    python sft.py --init_from=resume --out_dir=out/sft   (same flags as the original run otherwise)

Writes out_dir/ckpt_XXXXXXX/ (sharded, resumable) every save_every steps and at the end, and out_dir/hf/
(transformers-native layout + tokenizer) at the end, which grpo.py / eval.py take as --init_from.

connector_tune.py (R1V3 section 4) is this file run with connector_tune.py itself as the first config file (connector
only, early stopping); later config files and --key=value flags override it.
Early stopping (early_stop_patience > 0): val loss at step 0 and every eval_every steps; stop after `patience`
evaluations without a new best; out_dir/hf gets the BEST weights (a copy of the trainable params is kept in memory;
out_dir/best_XXXXXXX/ holds it beside checkpoint XXXXXXX when that checkpoint's own weights are not the best).
"""
import functools
import json
import multiprocessing as mp
import os
import shutil
import sys
import time

import torch
import torch.distributed.checkpoint as dcp

from plumbing import (all_reduce_sum, autocast_ctx, build_model, check_disk, checkpoint_bytes, compute_cleanup,
                    compute_init, ensure_synth_data, export_hf, get_lr, latest_checkpoint, list_checkpoints,
                    load_checkpoint, load_tokenizer, log_jsonl, print0, save_checkpoint, wandb_init, write_env)
from plumbing.configurator import configure
from tools.plan import startup_check
from plumbing import build_optimizer, master_torch_dtype
from data.common import RankBatches, check_chat_template, collate, load_sft_data, resolve_system, save_system

# -----------------------------------------------------------------------------
# config: every global below can be set by a config file or --key=value
out_dir = "out/sft"
init_from = "scratch"  # 'scratch' (tiny VLM below), 'resume' (latest ckpt in out_dir), or a local HF model dir
data = "data/synth/sft.jsonl"  # JSONL (README "Data format"); needs 'solution'
val_data = "data/synth/val.jsonl"  # '' to skip validation
tokenizer = ""  # '' -> the init_from directory, or data/synth/tokenizer when training from scratch
skip_bad = False  # True: skip (and count) bad samples instead of stopping at the first
domains = ""  # comma-separated values of the JSONL 'domain' field to train (and validate) on; '' = all
balance_domains = False  # True: repeat each domain's train samples up to the largest domain's count
think = True  # R1V3: the assistant turn opens with "<think>\n"
system_prompt = "auto"  # 'auto': the checkpoint's (data/common.py resolve_system); '': no system turn; or the text
check_template = True  # False: run even if the checkpoint's chat template renders other prompts than ours
max_len = 400  # tokens per sample, prompt + response
# data loading: every sample is checked at start-up (no pixels kept); images are decoded per micro-batch, for this
# process's samples only, by a torch DataLoader with this many worker processes (0: in the training process)
num_workers = -1  # -1: 2 on a GPU, 0 on the CPU
prefetch_factor = 2  # micro-batches each worker decodes ahead (host RAM: tools/plan.py's "host RAM" line)
# optimisation (docs/recipe.md, "Cold-start SFT", for real models: lr 1e-5, cosine, warmup 3%, global batch 64)
batch_size = 32  # samples per micro-batch per process
grad_accum = 1  # micro-batches per step; global batch = batch_size * grad_accum * world_size
epochs = 2.0  # the default: 2 x 8000 samples = 500 steps of 32
max_steps = 0  # > 0 overrides epochs
lr = 3e-3
min_lr_frac = 0.1
warmup_frac = 0.03
weight_decay = 0.0
beta2 = 0.95
grad_clip = 1.0
train_vit = True
train_connector = True
train_llm = True
activation_checkpointing = "auto"  # 'auto': on when the plan says the training step does not fit without it
offload = False  # FSDP2 CPU offload of the fp32 masters, gradients and AdamW state
master_dtype = "float32"  # "bfloat16": params, grads, AdamW state in bf16 (8 bytes a param, not 16; plumbing/optim.py)
# tiny VLM (init_from='scratch' only)
image_size = 64
patch_size = 8
vit_hidden = 64
vit_layers = 2
vit_heads = 4
n_embd = 128
n_layer = 4
n_head = 4
n_kv_head = 2
rope_theta = 1e4  # a short context: Qwen's 1e6 would leave almost no positional resolution at head_dim 32
# logging and checkpoints
log_every = 10
eval_every = 100
early_stop_patience = 0  # > 0: stop after this many evaluations without a new best val loss, export the best weights
save_every = 200  # 0: no checkpoint at all, not even at the end (tools/gpu_check.py's runs)
keep_last = 2
export = True  # write out_dir/hf at the end
seed = 1337
dist_timeout_s = 600  # a collective that waits longer than this stops the run (plumbing/dist.py compute_init)
heartbeat_timeout_s = 60  # a rank silent this long (killed, machine lost) stops every rank (0: no watchdog)
wandb_log = False
wandb_project = "nanor1v"
wandb_run_name = "sft"
force = False  # run even when the memory plan says it does not fit the GPU
if "--plan=true" in [a.lower() for a in sys.argv[1:]]:  # the memory plan of this command (tools/plan.py)
    os.execv(sys.executable, [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools",
                              "plan.py")] + sys.argv)
config = configure(globals(), sys.argv[1:])
startup_check("sft", config)  # the memory plan: a GPU run that does not fit stops here, before anything loads
activation_checkpointing = config["activation_checkpointing"]  # 'auto' decided by the plan
# -----------------------------------------------------------------------------

ddp, rank, local_rank, world_size, device = compute_init(seed, dist_timeout_s, heartbeat_timeout_s)
print0(json.dumps(config, indent=1))
write_env(out_dir)  # what this run ran on (also written into every checkpoint and the export)
wandb = wandb_init(wandb_log, wandb_project, wandb_run_name, config, out_dir, resume=init_from == "resume")
if data.startswith("data/synth/") or val_data.startswith("data/synth/"):
    ensure_synth_data()  # the embedded default renders itself on first use (rank 0; the others wait)

# resuming reads everything the run needs (model config, tokenizer, data position) from the checkpoint
resume_path = latest_checkpoint(out_dir) if init_from == "resume" else None
if init_from == "resume" and resume_path is None:
    raise FileNotFoundError(f"init_from='resume' but {out_dir} has no complete checkpoint (ckpt_*)")
if init_from not in ("scratch", "resume") and not os.path.isdir(init_from):
    raise FileNotFoundError(f"init_from={init_from!r}: no such directory (expected 'scratch', 'resume' or a local "
                            f"HF model directory)")
if early_stop_patience > 0 and not val_data:
    raise ValueError("early_stop_patience > 0 needs a validation set (val_data)")
tok = load_tokenizer(tokenizer, init_from, resume_path)
system_prompt = resolve_system(system_prompt, resume_path or init_from, tok)  # 'auto' -> the checkpoint's
check_chat_template(tok, system_prompt, think, resume_path or init_from, check_template)
# FSDP2 on several processes (and on any GPU): bf16 compute with fp32 masters and gradient reduction; fp32 on CPU
model, n_params, n_train = build_model(init_from, tok, device, resume_path=resume_path, scratch=dict(
    image_size=image_size, patch_size=patch_size, vit_hidden=vit_hidden, vit_layers=vit_layers, vit_heads=vit_heads,
    vit_mlp=4 * vit_hidden, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head,
    mlp_hidden=3 * n_embd, rope_theta=rope_theta, max_tiles=1, use_thumbnail=False),
    fsdp=ddp or device.type == "cuda", train=(train_vit, train_connector, train_llm),
    activation_checkpointing=activation_checkpointing,
    param_dtype=torch.bfloat16 if device.type == "cuda" else None, offload=offload,
    master_dtype=master_torch_dtype(master_dtype))
cfg = model.cfg
print0(f"model: {n_params:,} params, {n_train:,} trainable "
       f"(vit={train_vit}, connector={train_connector}, llm={train_llm})")
tied = cfg.vocab_size * cfg.n_embd if cfg.tie_embeddings else 0  # DCP writes a tied lm_head under both names
master_bytes = master_torch_dtype(master_dtype).itemsize  # params and AdamW moments as the checkpoint holds them
if save_every > 0:
    check_disk(out_dir, checkpoint_bytes(n_params + tied, n_train, param_bytes=master_bytes, state_bytes=master_bytes),
               keep_last + 1)


def pick_domains(items, path, balance, train=True):
    """R1V3 section 4 tunes on 20 domains: keep the samples of `domains` ('' = all) and, with balance, repeat each
    domain's samples (in file order, cycling) up to the largest domain's count. The domain is the JSONL 'domain'.
    items: an SFTData (data.common); returns its subset."""
    if not domains and not balance:
        return items
    by = {}
    for i, d in enumerate(items.domains):
        by.setdefault(d, []).append(i)
    keep = [d.strip() for d in domains.split(",") if d.strip()] or sorted(by)
    missing = [d for d in keep if d not in by]
    if missing and (train or len(missing) == len(keep)):  # a small val set may lack a domain, not all of them
        raise ValueError(f"{path}: no samples of domain(s) {missing}; the domains there are {sorted(by)}")
    keep = [d for d in keep if d in by]
    n = max(len(by[d]) for d in keep)
    picked = {d: (by[d] * (-(-n // len(by[d]))))[:n] if balance else by[d] for d in keep}
    print0(f"{path}: domains " + ", ".join(f"{d or '(none)'} {len(by[d])}->{len(v)}" for d, v in picked.items()))
    return items.subset([i for d in keep for i in picked[d]])


train_items = load_sft_data(data, tok, cfg, max_len, think, system_prompt or None, skip_bad)
train_items = pick_domains(train_items, data, balance_domains)
val_items = load_sft_data(val_data, tok, cfg, max_len, think, system_prompt or None, skip_bad) if val_data else []
val_items = pick_domains(val_items, val_data, False, train=False) if val_data else []
pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
global_batch = batch_size * grad_accum * world_size
workers = num_workers if num_workers >= 0 else (2 if device.type == "cuda" else 0)
if workers > 0:  # the workers fork after the tokenizer has run: its thread pool must stay off (and quiet) there
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
steps_per_epoch = len(train_items) // global_batch
if steps_per_epoch == 0:
    raise ValueError(f"{data}: {len(train_items)} samples is less than one global batch of {global_batch}")
total_steps = max_steps if max_steps > 0 else int(epochs * steps_per_epoch)
warmup_steps = int(warmup_frac * total_steps)
print0(f"data: {len(train_items)} train / {len(val_items)} val samples, global batch {global_batch}, "
       f"{total_steps} steps ({total_steps / steps_per_epoch:.2f} epochs); longest {int(train_items.lengths.max())} "
       f"tokens, {int(train_items.tiles.max())} tiles; {workers} data worker(s) per process")

# AdamW; weight decay only on matrices (not on norms, biases, layer-scale, position/CLS vectors)
params = [p for p in model.parameters() if p.requires_grad]
groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
          {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
optimizer = build_optimizer(groups, master_dtype, lr=lr, betas=(0.9, beta2), eps=1e-8, seed=seed)

# early stopping (R1V3 section 4): the best val loss so far, its step, and evaluations since; the best trainable
# weights are kept in memory (the frozen ones never change), cheap when only the connector trains
best = {"val": None, "step": 0, "bad": 0}
best_weights = {}  # name -> tensor, filled by keep_best()


def keep_best():
    best_weights.clear()
    best_weights.update({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})


def best_path(s):  # the best weights as of checkpoint s, when that checkpoint's own weights are not the best
    return os.path.join(out_dir, f"best_{s:07d}")


# data order: one permutation per epoch from (seed, epoch), so the position (epoch, pos) is all resume needs
step, cursor = 0, dict(epoch=0, pos=0)  # the data position: epoch, and the next sample in its permutation
if resume_path:
    step, state, _ = load_checkpoint(resume_path, model, optimizer)
    cursor.update(epoch=state["epoch"], pos=state["pos"])
    print0(f"resumed from {resume_path} at step {step} (epoch {cursor['epoch']}, position {cursor['pos']})")
    if early_stop_patience > 0 and "best" in state:
        best.update(state["best"])
        keep_best()
        if best["step"] != step:  # sharded like the model (DCP), loaded in place
            if not os.path.isdir(best_path(step)):
                raise FileNotFoundError(f"{best_path(step)} missing: {resume_path} says the best weights are "
                                        f"step {best['step']}'s, which were saved there")
            dcp.load(best_weights, checkpoint_id=best_path(step), no_dist=not ddp)
        print0(f"early stopping: best val loss {best['val']:.4f} at step {best['step']}, {best['bad']} evaluations since")


def loader(dataset, batch_sampler):
    """Collated micro-batches of `dataset` in the order of batch_sampler's index lists: each sample read and its
    images decoded now, by `workers` forked processes (each prefetch_factor micro-batches ahead) or, with 0, here."""
    kw = dict(num_workers=workers, collate_fn=functools.partial(collate, pad_id=pad_id))
    if workers > 0:  # fork: the workers share the data set's metadata and the tokenizer, nothing is pickled
        kw.update(prefetch_factor=prefetch_factor,
                  multiprocessing_context="fork" if "fork" in mp.get_all_start_methods() else None)
    return iter(torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, **kw))


# this rank's micro-batches from the data position on; the loop advances `cursor` itself (the loader runs ahead)
batches = RankBatches(len(train_items), global_batch, rank, world_size, grad_accum, seed, **cursor)
train_loader = loader(train_items, batches)


def next_micro_batches():
    """This step's micro-batches: the next global batch of the epoch's order (cursor), this rank's share."""
    epoch, pos, idx = batches.step(cursor["epoch"], cursor["pos"])
    cursor.update(epoch=epoch, pos=pos)
    micro = [next(train_loader) for _ in range(grad_accum)]
    want = batches.micro(idx)
    if [b["index"] for b in micro] != want:  # the loader and the position must agree, or resume would not be exact
        raise RuntimeError(f"data loader out of step: got samples {[b['index'] for b in micro]}, expected {want}")
    return micro


def sum_loss(batch):
    """Summed next-token NLL over the batch's response tokens (targets are input_ids shifted left)."""
    ids, mask = batch["input_ids"].to(device), batch["loss_mask"].to(device)
    pix = batch["pixel_values"].to(device) if batch["pixel_values"] is not None else None
    targets = torch.roll(ids, -1, dims=1)  # position t predicts token t+1; the wrapped last one is masked
    tmask = torch.roll(mask, -1, dims=1)
    tmask[:, -1] = 0
    with autocast_ctx(device):
        logp, _ = model(ids, pix, targets=targets, dummy_vision=ddp)
    return -(logp * tmask).sum(), tmask.sum()


@torch.no_grad()
def val_loss():
    model.eval()
    tot, n = 0.0, 0
    mine = [list(range(i, min(i + batch_size, len(val_items))))
            for i in range(rank * batch_size, len(val_items), world_size * batch_size)]
    for b in loader(val_items, mine):
        loss, cnt = sum_loss(b)
        tot, n = tot + loss.item(), n + cnt.item()
    if ddp:  # every rank must run the same number of forwards under FSDP: pad with empty work
        n_batches = -(-len(val_items) // (world_size * batch_size))
        for _ in range(n_batches - len(mine)):
            sum_loss(collate(val_items[:1], pad_id))
    tot, n = all_reduce_sum(tot, n)
    model.train()
    return tot / max(n, 1)


def save():
    state = {**cursor, "tokenizer": tok.name_or_path}
    if early_stop_patience > 0:
        state["best"] = best
        if best_weights and best["step"] != step:  # written before the checkpoint commits
            tmp = os.path.join(out_dir, f".tmp_best_{step:07d}")
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            if ddp:
                torch.distributed.barrier()
            dcp.save(best_weights, checkpoint_id=tmp, no_dist=not ddp)
            if ddp:
                torch.distributed.barrier()
            if rank == 0:
                shutil.rmtree(best_path(step), ignore_errors=True)
                os.replace(tmp, best_path(step))
    save_checkpoint(out_dir, step, model, optimizer, state, config, keep_last=keep_last)
    if rank == 0 and early_stop_patience > 0:  # drop best_* whose checkpoint keep_last pruned
        kept = {os.path.basename(c)[len("ckpt_"):] for c in list_checkpoints(out_dir)}
        for d in os.listdir(out_dir):
            if d.startswith("best_") and d[len("best_"):] not in kept:
                shutil.rmtree(os.path.join(out_dir, d))


def validate_and_track_best():
    """The validation loss, logged, and the early-stopping state updated; True when training should stop."""
    vl = val_loss()
    print0(f"step {step}: val loss {vl:.4f}")
    rec = {"step": step, "val_loss": vl}
    if early_stop_patience > 0:
        if best["val"] is None or vl < best["val"]:
            best.update(val=vl, step=step, bad=0)
            keep_best()
        else:
            best["bad"] += 1
        rec.update(best_val_loss=best["val"], best_step=best["step"])
    log_jsonl(out_dir, rec)
    if wandb:
        wandb.log({"val_loss": vl}, step=step)
    return early_stop_patience > 0 and best["bad"] >= early_stop_patience


def local_bytes(t):  # this rank's share of a (possibly sharded) tensor
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


model.train()
t_run = time.time()
stop = early_stop_patience > 0 and best["bad"] >= early_stop_patience  # resuming a run that had stopped early
if early_stop_patience > 0 and step == 0:
    stop = validate_and_track_best()  # the starting weights are a candidate too: tuning after RL may only make things worse
mem = None
while step < total_steps and not stop:
    t0 = time.time()
    lr_now = get_lr(step, total_steps, lr, warmup_steps, lr * min_lr_frac)
    for g in optimizer.param_groups:
        g["lr"] = lr_now
    micro = next_micro_batches()  # this process's share of the global batch
    # normalise by the GLOBAL number of response tokens, so micro-batches and ranks add up to a token mean
    (n_tok_global,) = all_reduce_sum(sum(int(b["loss_mask"][:, 1:].sum()) for b in micro))
    loss_sum = 0.0
    for b in micro:
        loss, _ = sum_loss(b)
        # FSDP averages gradients over ranks: scale by world_size so the result is the global token mean
        (loss * world_size / n_tok_global).backward()
        loss_sum += loss.item()
    gnorm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
    (loss_global,) = all_reduce_sum(loss_sum)
    loss_val = loss_global / n_tok_global
    if not (torch.isfinite(torch.tensor(loss_val)) and torch.isfinite(torch.tensor(gnorm))):
        print0(f"step {step}: non-finite loss {loss_val} or grad norm {gnorm}: step skipped")
        optimizer.zero_grad(set_to_none=True)
    else:
        optimizer.step()
        if mem is None:  # once, after the first step: what training holds beyond the weights (R1V3 section 4:
            # with only the connector trainable, gradients and AdamW state exist for the connector alone)
            mem = [int(x) for x in all_reduce_sum(
                sum(local_bytes(p.grad) for p in params if p.grad is not None),
                sum(local_bytes(t) for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)))]
            log_jsonl(out_dir, {"step": step + 1, "trainable_params": n_train, "grad_bytes": mem[0],
                                "optim_state_bytes": mem[1]})
            print0(f"memory: {n_train:,} trainable params of {n_params:,}; gradients {mem[0] / 2**20:.2f} MiB, "
                   f"AdamW state {mem[1] / 2**20:.2f} MiB ({mem[1] / max(n_train, 1):.1f} bytes per trainable param)")
        optimizer.zero_grad(set_to_none=True)
    step += 1
    dt = time.time() - t0
    n_seen = all_reduce_sum(sum(int((b["input_ids"] != pad_id).sum()) for b in micro))[0]
    log_jsonl(out_dir, {"step": step, "loss": loss_val, "lr": lr_now, "gnorm": gnorm, "tok_per_s": n_seen / dt})
    if step % log_every == 0 or step == 1 or step == total_steps:
        print0(f"step {step}/{total_steps} | loss {loss_val:.4f} | lr {lr_now:.2e} | gnorm {gnorm:.3f} | "
               f"{n_seen / dt:,.0f} tok/s | {dt * 1000:.0f} ms")
        if wandb:
            wandb.log({"loss": loss_val, "lr": lr_now, "gnorm": gnorm, "tok_per_s": n_seen / dt}, step=step)
    if val_items and (step % eval_every == 0 or step == total_steps):
        stop = validate_and_track_best()
    if save_every > 0 and (step % save_every == 0 or step == total_steps or stop):
        save()

del train_loader  # its workers stop now (they would keep prefetching past the last step)
print0(f"trained {step} steps in {time.time() - t_run:.1f} s")
if early_stop_patience > 0 and best_weights:
    if stop:
        print0(f"early stopping at step {step}: no better val loss in {early_stop_patience} evaluations")
    print0(f"best val loss {best['val']:.4f} at step {best['step']}: exporting those weights")
    log_jsonl(out_dir, {"step": step, "early_stopped": stop, "best_step": best["step"], "best_val_loss": best["val"]})
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in best_weights:
                p.copy_(best_weights[n])
if export:
    export_hf(model, os.path.join(out_dir, "hf"), tok, dtype=torch.bfloat16 if device.type == "cuda" else None,
              system=system_prompt)
    if rank == 0:  # the next stage's system_prompt='auto' finds the system turn this run trained with
        save_system(os.path.join(out_dir, "hf"), system_prompt)
compute_cleanup()
