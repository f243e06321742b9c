"""
Cold-start SFT (Skywork-R1V3 section 2; RECIPE.md section 2), and any general SFT of the VLM.
Loss on the assistant's tokens only; ViT / connector / LLM each trainable or frozen.

CPU, the embedded default (tiny VLM from scratch on the synthetic task; renders the data first if missing):
    python sft.py
One GPU, a real local checkpoint:
    python sft.py --init_from=/models/InternVL3-1B --data=/data/cold_start.jsonl --lr=1e-5 --max_len=8192
One node, 8 GPUs, FSDP2 (see config/sft_r1v3_38b.py):
    torchrun --standalone --nproc_per_node=8 sft.py config/sft_r1v3_38b.py
Resume an interrupted run exactly where it stopped:
    python sft.py --init_from=resume --out_dir=out/sft   (same flags as the original run otherwise)

Writes out_dir/ckpt_XXXXXXX/ (sharded, resumable) every save_every steps and at the end, and out_dir/hf/
(transformers-native layout + tokenizer) at the end, which grpo.py / eval.py take as --init_from.
"""
import json
import os
import sys
import time

import torch

from common import (apply_activation_checkpointing, apply_fsdp, autocast_ctx, compute_cleanup, compute_init,
                    export_hf, get_lr, latest_checkpoint, load_checkpoint, print0, save_checkpoint, set_trainable,
                    build_model, load_tokenizer, ensure_synth_data, log_jsonl)
from configurator import configure
from data.common import collate, load_sft_data

# -----------------------------------------------------------------------------
# config: every global below can be set by a config file or --key=value
out_dir = "out/sft"
init_from = "scratch"  # 'scratch' (tiny VLM below), 'resume' (latest ckpt in out_dir), or a local HF model dir
data = "data/synth/sft.jsonl"  # JSONL (README "Data format"); needs 'solution'
val_data = "data/synth/val.jsonl"  # '' to skip validation
tokenizer = ""  # '' -> the init_from directory, or data/synth/tokenizer when training from scratch
skip_bad = False  # True: skip (and count) bad samples instead of stopping at the first
think = True  # R1V3: the assistant turn opens with "<think>\n"
system_prompt = ""
max_len = 400  # tokens per sample, prompt + response
# optimisation (RECIPE.md section 2 for real models: lr 1e-5, cosine, warmup 3%, global batch 64)
batch_size = 32  # samples per micro-batch per process
grad_accum = 1  # micro-batches per step; global batch = batch_size * grad_accum * world_size
epochs = 4.0
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
activation_checkpointing = False
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
save_every = 200
keep_last = 2
export = True  # write out_dir/hf at the end
seed = 1337
wandb_log = False
wandb_project = "nanor1v"
wandb_run_name = "sft"
config = configure(globals(), sys.argv[1:])
# -----------------------------------------------------------------------------

ddp, rank, local_rank, world_size, device = compute_init(seed)
print0(json.dumps(config, indent=1))
if data.startswith("data/synth/") or val_data.startswith("data/synth/"):
    ensure_synth_data()  # the embedded default renders itself on first use (rank 0; the others wait)

# resuming reads everything the run needs (model config, tokenizer, data position) from the checkpoint
resume_path = latest_checkpoint(out_dir) if init_from == "resume" else None
if init_from == "resume" and resume_path is None:
    raise FileNotFoundError(f"init_from='resume' but {out_dir} has no complete checkpoint (ckpt_*)")
tok = load_tokenizer(tokenizer, init_from, resume_path)
model = build_model(init_from, tok, device, resume_path=resume_path, scratch=dict(
    image_size=image_size, patch_size=patch_size, vit_hidden=vit_hidden, vit_layers=vit_layers, vit_heads=vit_heads,
    vit_mlp=4 * vit_hidden, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head,
    mlp_hidden=3 * n_embd, rope_theta=rope_theta, max_tiles=1, use_thumbnail=False))
cfg = model.cfg
n_train = set_trainable(model, train_vit, train_connector, train_llm)
print0(f"model: {sum(p.numel() for p in model.parameters()):,} params, {n_train:,} trainable "
       f"(vit={train_vit}, connector={train_connector}, llm={train_llm})")
if activation_checkpointing:
    apply_activation_checkpointing(model)
if ddp:  # FSDP2: bf16 params with fp32 gradient reduction on GPU; fp32 on CPU (gloo)
    apply_fsdp(model, param_dtype=torch.bfloat16 if device.type == "cuda" else None)

train_items = load_sft_data(data, tok, cfg, max_len, think, system_prompt or None, skip_bad)
val_items = load_sft_data(val_data, tok, cfg, max_len, think, system_prompt or None, skip_bad) if val_data else []
pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
global_batch = batch_size * grad_accum * world_size
steps_per_epoch = len(train_items) // global_batch
if steps_per_epoch == 0:
    raise ValueError(f"{data}: {len(train_items)} samples is less than one global batch of {global_batch}")
total_steps = max_steps if max_steps > 0 else int(epochs * steps_per_epoch)
warmup_steps = int(warmup_frac * total_steps)
print0(f"data: {len(train_items)} train / {len(val_items)} val samples, global batch {global_batch}, "
       f"{total_steps} steps ({total_steps / steps_per_epoch:.2f} epochs)")

# AdamW; weight decay only on matrices (not on norms, biases, layer-scale, position/CLS vectors)
params = [p for p in model.parameters() if p.requires_grad]
groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
          {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, beta2), eps=1e-8)

# data order: one permutation per epoch from (seed, epoch), so the position (epoch, pos) is all resume needs
step, epoch, pos = 0, 0, 0
if resume_path:
    step, state, _ = load_checkpoint(resume_path, model, optimizer)
    epoch, pos = state["epoch"], state["pos"]
    print0(f"resumed from {resume_path} at step {step} (epoch {epoch}, position {pos})")


def epoch_order(e):
    g = torch.Generator().manual_seed(seed * 1000 + e)
    return torch.randperm(len(train_items), generator=g).tolist()


def next_global_batch():
    global epoch, pos
    if pos + global_batch > len(train_items):  # drop the remainder, start the next epoch
        epoch, pos = epoch + 1, 0
    idx = epoch_order(epoch)[pos:pos + global_batch]
    pos += global_batch
    return idx


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


def all_reduce_sum(*xs):
    t = torch.tensor([float(x) for x in xs], device=device)
    if ddp:
        torch.distributed.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate():
    model.eval()
    tot, n = 0.0, 0
    for i in range(rank * batch_size, len(val_items), world_size * batch_size):
        loss, cnt = sum_loss(collate(val_items[i:i + batch_size], pad_id))
        tot, n = tot + loss.item(), n + cnt.item()
    if ddp:  # every rank must run the same number of forwards under FSDP: pad with empty work
        n_batches = -(-len(val_items) // (world_size * batch_size))
        for _ in range(n_batches - len(range(rank * batch_size, len(val_items), world_size * batch_size))):
            sum_loss(collate(val_items[:1], pad_id))
    tot, n = all_reduce_sum(tot, n)
    model.train()
    return tot / max(n, 1)


if wandb_log and rank == 0:
    import wandb
    wandb.init(project=wandb_project, name=wandb_run_name, config=config)


def save():
    save_checkpoint(out_dir, step, model, optimizer, {"epoch": epoch, "pos": pos, "tokenizer": tok.name_or_path},
                    config, keep_last=keep_last)


model.train()
t_run = time.time()
while step < total_steps:
    t0 = time.time()
    lr_now = get_lr(step, total_steps, lr, warmup_steps, lr * min_lr_frac)
    for g in optimizer.param_groups:
        g["lr"] = lr_now
    idx = next_global_batch()
    mine = idx[rank::world_size]  # this process's share of the global batch
    micro = [collate([train_items[i] for i in mine[k::grad_accum]], pad_id) for k in range(grad_accum)]
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
        optimizer.zero_grad(set_to_none=True)
    step += 1
    dt = time.time() - t0
    n_seen = all_reduce_sum(sum(int((b["input_ids"] != pad_id).sum()) for b in micro))[0]
    log_jsonl(out_dir, {"step": step, "loss": loss_val, "lr": lr_now, "gnorm": gnorm, "tok_per_s": n_seen / dt})
    if step % log_every == 0 or step == 1 or step == total_steps:
        print0(f"step {step}/{total_steps} | loss {loss_val:.4f} | lr {lr_now:.2e} | gnorm {gnorm:.3f} | "
               f"{n_seen / dt:,.0f} tok/s | {dt * 1000:.0f} ms")
        if wandb_log and rank == 0:
            wandb.log({"loss": loss_val, "lr": lr_now, "gnorm": gnorm, "tok_per_s": n_seen / dt}, step=step)
    if val_items and (step % eval_every == 0 or step == total_steps):
        vl = evaluate()
        print0(f"step {step}: val loss {vl:.4f}")
        log_jsonl(out_dir, {"step": step, "val_loss": vl})
        if wandb_log and rank == 0:
            wandb.log({"val_loss": vl}, step=step)
    if step % save_every == 0 or step == total_steps:
        save()

print0(f"trained {step} steps in {time.time() - t_run:.1f} s")
if export:
    export_hf(model, os.path.join(out_dir, "hf"))
    if rank == 0:
        tok.save_pretrained(os.path.join(out_dir, "hf"))
        print0(f"exported {os.path.join(out_dir, 'hf')}")
compute_cleanup()
