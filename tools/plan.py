"""
Memory plan (and a step-time estimate) for sft.py, grpo.py and connector_tune.py, before anything is allocated:
issue #11 item 7 and issue #12 "Offload and memory". The model is built on the meta device (no weights, no GPU)
to count its parameters per FSDP unit, per tower and per tensor-parallel shard; everything else is arithmetic on
the run's config, in the layout README "Real scale" describes (FSDP units, mixed precision, gathered or TP
rollouts, the KV-cache formula, offload).

    import plan
    d = plan.plan_run("grpo", config, model_cfg, gpus=8, gpus_per_node=8, gpu_gb=80, tp=8, offload=True)
    print(plan.format_plan(d))   # a table per GPU and per phase; its LAST line is the verdict:
    #   plan: fits (peak 71.0 GB of 79.6 GB per GPU)   |   plan: does not fit: <phase, biggest term, what to change>
    plan.print_plan("grpo", config)   # what --plan=True prints: plan_gpus / plan_gpus_per_node / plan_gpu_gb / tp /
                                      # offload / plan_prompt_tokens read from config, the model from init_from
    plan.startup_check("grpo", config)  # what sft.py / grpo.py / connector_tune.py run before they load anything:
                                        # this machine's plan; a GPU run that does not fit stops (--force=True)
The stages import this file (`from tools.plan import startup_check`): the arithmetic stays in one place, and the
dependencies go one way, stages -> tools/plan.py -> model.py, sampler.py, plumbing/ (none of those imports tools/).

    python tools/plan.py grpo.py config/grpo_r1v3.py --init_from=config/models/skywork_r1v3_38b \
        --plan_gpus=8 --plan_gpus_per_node=8 --plan_gpu_gb=80 --tp=8 --offload=True

GB is 2^30 bytes. The capacity a plan compares against is what a GPU sold as plan_gpu_gb GB really holds (GPU_MIB:
an H100 "80 GB" holds 79.6 GB, an H200 "141 GB" 140.4 GB; plan_gpu_gb itself for a size not in the table). Every term
is per GPU, for the most loaded rank (rank 0 holds the largest FSDP dim-0 chunk of every parameter), and models named
code:
  fp32 master shard   plumbing.apply_fsdp: FSDP2 shards each parameter on dim 0 (storage padded to ceil(dim0/W) rows),
                      fp32; offload=True (CPUOffloadPolicy) keeps it, the grads and AdamW in host RAM instead.
  fp32 grad shard     the reduce-scattered fp32 gradient of each trainable parameter (same padded chunk).
  AdamW state         exp_avg + exp_avg_sq in fp32 per trainable shard + a 4-byte step per tensor; on a GPU the
                      foreach step adds one fp32 temporary per shard (the optimizer-step peak).
                      master_dtype='bfloat16' (plumbing/optim.py): the master shard, the grad shard and both AdamW
                      moments in bf16 (2 + 2 + 2 + 2 bytes a trainable parameter, the rows are named "bf16 ..."), the
                      step's temporaries fp32 copies of ONE tensor's shard (OPT_TMP bytes per element of the largest).
  gathered units      FSDP2 gathers a unit in the compute dtype (bf16 on a GPU). The units (plumbing.apply_fsdp): each
                      ViT block, the rest of the ViT, each LLM block, the root (wte, lm_head, final norm, connector;
                      gathered for all of forward and backward). In backward a block + the prefetched next one, the
                      block's bf16 grads, then its fp32 reduce-scatter input (reduce_dtype, kept until the next
                      unit's post-backward) and output shard.
  activations         what autograd saves in one micro-batch's forward, op by op (_act_per_token: model.py's RMSNorm,
                      Attention/SDPA, MLP, ViTBlock, Connector, rope_cos_sin, token_logprobs' checkpointed chunks and,
                      on the CPU, their fp32 copy of lm_head: lm_head_copy), with and without
                      plumbing.apply_activation_checkpointing.
  backward transient  the log-prob chunk recomputed in backward (LOGP_BUFS x 1024 tokens x vocab, fp32, + the
                      chunk's weight gradient) or the block being back-propagated (its recompute + its gradients).
  rollout weights     tp=1: sampler.unsharded gathers the whole model in the compute dtype; tp=K: 1/K of every LLM
                      block's attention/MLP weights + the replicated ViT, connector, wte, lm_head and norms; plus, on
                      the CPU, the fp32 lm_head copy sampler.generate decodes with (lm_head_copy; none on CUDA:
                      model.lm_head_logits multiplies bf16 x bf16 into fp32, torch.mm out_dtype).
  KV cache            sampler.cache_bytes: 2 * n_layer * n_kv_head/K * head_dim * elt * (P * prompt + P * n * max_new)
                      at the LARGEST max_new_tokens of the schedule; P = a rank's prompts (a TP group's at tp=K).
  decode buffers      sampler.sample_next over (rows, vocab), fp32 logits included: 28 bytes per row per vocab entry
                      when sampling at temperature 1 (16 greedy, 53 with top-p), + the outputs and uniforms
                      (sampler.decode, draw_uniforms): 20 bytes per row per new token.
  prefill transient   one sampler.prefill sub-batch (<= 16384 padded tokens): an LLM layer's MLP, or the ViT's; at
                      tp=K, if larger, the TP model's build (tp.tp_model_from, unit by unit): the last LLM block's
                      all-gather buffer + its gathered parameters, beside the TP model less that block's 1/K.
  CUDA graphs        with cuda_graph=True on CUDA: sampler.graph_bytes (CudaGraphStep's bucket outputs and pool), beside
                      the decode buffers, as sampler.fit_chunks charges it.
The rollout is split into the sampler's own chunks: sampler.fit_chunks on the budget the run will measure,
sampler.budget_from_free (90% less 1 GiB on CUDA) of the memory left after the weights are gathered (the capacity
less OVERHEAD_GB and the resident states and weights with FRAG), less generate()'s lm_head copy; the plan reports
how many.

Measured on the CPU (tests/test_plan.py, one process and 2 FSDP2 gloo processes, fp32 and bf16 mixed precision):
the states, the saved activations (checkpointing on/off, frozen towers, RMSNorm/QK-norm variants), the KV cache,
sampler.unsharded's gathered weights, the decode and log-prob buffers, the training-step peak (one process, and under
FSDP2 with its gathered units, their grads and reduce-scatter buffers, at each of the log-prob / LLM block / ViT block
moments) and the TP build's peak, all within a few % (the test bound is 15%). Not verified on a GPU (none was
available): CUDA autocast's fp32 LayerNorm, flash attention saving q, k, v, out and the log-sum-exp, FSDP2's
gather/reduce-scatter buffers on NCCL's separate streams (the CPU runs them in order; gloo's own copies are not
counted), allocator fragmentation (FRAG) and the CUDA/NCCL overhead (OVERHEAD_GB), and the step-time model.
"""
import dataclasses
import functools
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: python tools/plan.py

GB = 2**30

# step-time model (docs/perf.md, "Decode roofline"): decode is memory-bound, bytes per step = weights read + KV
# read, at a fraction of the measured copy bandwidth; the update is compute-bound, 6 x params x tokens at a stated MFU
HW = {  # measured device-to-device copy bandwidth (bytes/s), bf16 matmul peak (FLOP/s), docs/perf.md
    "H100": dict(bw=3.0e12, flops=800e12),
    "H200": dict(bw=4.3e12, flops=800e12),
}
BW_EFF = 0.6  # vLLM runs ~60% of the roofline end to end (docs/perf.md); gpt-fast ~82% at batch 1
MFU = 0.40  # of the bf16 peak, for prefill, the log-prob pass and the update
TP_ALLREDUCE_S = 15e-6  # one small all-reduce on NVLink (2 per layer per decode step under TP)
FP32_FLOPS = 30e12  # fp32 matmul without TF32 (the CPU path's fp32 lm_head; CUDA: bf16, mm out_dtype=fp32)
PCIE = 25e9  # host <-> GPU bytes/s per GPU (offload traffic)
HOST_ADAM = 50e9  # bytes/s of CPU AdamW per node (offload: the step runs on the host)

OVERHEAD_GB = 2.0  # CUDA context, NCCL buffers, cuBLAS workspaces: not tensors, always there

# What a GPU sold as N GB really holds: its total as nvidia-smi / NVML report it, in MiB. The nominal size is neither
# GB nor GiB (an H100 "80 GB" is 79.65 GiB, an H200 "141 GB" 140.4 GiB, an A100 80GB exactly 80 GiB). Totals reported
# by Modal across its fleet (modal-labs/modal-client#2797; thundergolfer.com/blog/nvidia-gpu-memory-capacity): H200
# 143771, H100 81559, A100 80GB 81920, A100 40GB 40960, L40S 46068, A10 23028, L4 23034, T4 15360; H100 NVL (94 GB):
# NVML's 99961274368 bytes (fastfetch-cli/fastfetch#1658). Where cards share a nominal size the smaller counts (80: the
# H100's, 24: the A10's). Another size (--plan_gpu_gb=100) is taken as GiB.
GPU_MIB = {16: 15360, 24: 23028, 40: 40960, 48: 46068, 80: 81559, 94: 99961274368 / 2**20, 141: 143771}
GPU_NAMES = {16: "T4", 24: "A10", 40: "A100 40GB", 48: "L40S", 80: "H100", 94: "H100 NVL", 141: "H200"}


def gpu_capacity(gpu_gb):
    """(GB = 2^30 bytes, how it was found) the plan compares against for a GPU sold as gpu_gb GB (GPU_MIB), else
    gpu_gb itself as GiB."""
    n = round(gpu_gb)
    if abs(gpu_gb - n) < 1e-6 and n in GPU_MIB:
        return GPU_MIB[n] / 1024, f"{n} GB ({GPU_NAMES[n]}): {GPU_MIB[n]:.0f} MiB as nvidia-smi reports it"
    return float(gpu_gb), f"{gpu_gb:g} GB taken as {gpu_gb:g} GiB (not a nominal size in plan.GPU_MIB)"
FRAG = 0.05  # caching-allocator fragmentation on top of the live tensors
OPT_TMP = 16  # plumbing.optim.AdamW's step: fp32 exp_avg, exp_avg_sq, denominator, param (+ int32 noise after one)
LOGP_CHUNK = 1024  # model.token_logprobs: tokens per chunk
LOGP_BUFS = 5  # (chunk x vocab) fp32 buffers alive at once in a chunk's backward (measured, tests/test_plan.py)

# -----------------------------------------------------------------------------
# parameters: the model on meta, per FSDP unit, per tower, per TP shard

def _cfg_key(cfg):
    return tuple(sorted(dataclasses.asdict(cfg).items()))


@functools.lru_cache(maxsize=32)
def _params(key):
    from model import VLM, VLMConfig
    from plumbing.checkpoint import _vit_blocks
    from plumbing.tp import split_dim  # the tensor-parallel split of an LLM block, as tp.py cuts it
    cfg = VLMConfig(**dict(key))
    with torch.device("meta"):
        m = VLM(cfg)
    # plumbing.apply_fsdp's units: each ViT block, model.vit (the rest of the ViT: patch embedding, cls, positions,
    # final norm), each LLM block, the root (everything else). A parameter belongs to the innermost unit holding it.
    vit_blocks, llm_blocks = {id(b) for b in _vit_blocks(m)}, {id(b) for b in m.llm.blocks}
    owners = [prefix for prefix, mod in m.named_modules() if id(mod) in vit_blocks or id(mod) in llm_blocks]
    owners.append("vit")
    rows = []
    for name, p in m.named_parameters():  # a tied lm_head is wte's parameter: listed once
        parts = name.split(".")
        unit = max((o for o in owners if name.startswith(o + ".")), key=len, default="root")
        tp_dim = split_dim(name)
        rows.append((name, tuple(p.shape), unit, parts[0], tp_dim))
    return rows


def unit_kind(unit):
    """'vit block' | 'vit' (the rest of the ViT) | 'llm block' | 'root' for a unit name of param_info's units."""
    if unit in ("vit", "root"):
        return unit
    return "llm block" if unit.startswith("llm.blocks.") else "vit block"


def param_info(cfg, towers=None):
    """Parameter counts of the model `cfg` (built on meta): total, per tower, per FSDP unit (units: {unit: numel},
    in module order; units_trainable: the same restricted to the parameters of `towers`, default all)."""
    rows = _params(_cfg_key(cfg))
    n = lambda sel: sum(math.prod(s) for _, s, u, t, _ in rows if sel(u, t))  # noqa: E731
    units, units_tr = {}, {}
    for _, s, u, t, _ in rows:
        units[u] = units.get(u, 0) + math.prod(s)
        units_tr[u] = units_tr.get(u, 0) + (math.prod(s) if towers is None or t in towers else 0)
    return dict(total=n(lambda u, t: True), vit=n(lambda u, t: t == "vit"), connector=n(lambda u, t: t == "connector"),
                llm=n(lambda u, t: t == "llm"), units=units, units_trainable=units_tr)


def _shard_numel(shape, world):
    # FSDP2 dim-0 chunk of rank 0 (the largest): ceil(dim0 / world) rows; the storage is padded to that on every rank
    return -(-shape[0] // world) * math.prod(shape[1:]) if shape else 1


def shard_numel(cfg, world, towers=("vit", "connector", "llm")):
    """Elements of rank 0's FSDP2 shard of the parameters of `towers`."""
    return sum(_shard_numel(s, world) for _, s, _, t, _ in _params(_cfg_key(cfg)) if t in towers)


def pinned_bytes(cfg, world, towers, elt):
    """Host bytes of rank 0's offloaded shards of `towers` (elt bytes an element) in pinned memory: FSDP2 pins each
    parameter's shard on its own (tensor.pin_memory() in torch's _fsdp_param.py; a gradient shard by its non_blocking
    copy to the CPU) and the CUDA caching host allocator rounds every block up to a power of two
    (ATen/core/CachingHostAllocator.h, PowerOf2Ceil): each shard costs next_pow2(its bytes). docs/perf.md, "Offload"."""
    return sum(1 << (_shard_numel(s, world) * elt - 1).bit_length()
               for _, s, _, t, _ in _params(_cfg_key(cfg)) if t in towers)


def n_tensors(cfg, towers):
    return sum(1 for _, _, _, t, _ in _params(_cfg_key(cfg)) if t in towers)


def tp_numel(cfg, tp):
    """Elements one rank holds for a tp=K rollout: 1/K of each LLM block's attention and MLP weights (ceil), the
    rest (block norms, ViT, connector, wte, lm_head, final norm) replicated."""
    tot = 0
    for _, s, _, _, d in _params(_cfg_key(cfg)):
        tot += math.prod(s) if d is None else -(-s[d] // tp) * math.prod(s) // s[d]
    return tot

# -----------------------------------------------------------------------------
# activations: what autograd saves per token, op by op (model.py). e = bytes of the compute dtype (4 on CPU, 2 on a
# GPU), f = 4 (fp32 statistics). A tensor saved by two ops counts once (the storage is the same).


def _act_per_token(cfg, e, train, cuda):
    """Saved bytes per token of one forward, without activation checkpointing. train = (vit, connector, llm)
    trainable. Returns {region: bytes per token of that region} with the token each region counts:
    llm_block (per LLM token, per block), vit_block (per ViT token = tile patch + CLS, per block), connector (per
    image token), llm_other (per LLM token, once), pixels (per tile)."""
    wv, wc, wl = (bool(x) for x in train)
    C, M, H, Hkv, hd = cfg.n_embd, cfg.mlp_hidden, cfg.n_head, cfg.n_kv_head, cfg.head_dim
    Cv, Mv, Hv = cfg.vit_hidden, cfg.vit_mlp, cfg.vit_heads
    f = 4
    out = dict(llm_block=0, vit_block=0, connector=0, llm_other=0, pixels=0)
    if not (wv or wc or wl):
        return out

    def rms(width, w_train):
        # RMSNorm.forward: x.float() (saved by pow and mul; in fp32 it is the input itself), rsqrt (B,T,1);
        # x.to(dtype) is saved by `weight * x` only for the weight's gradient; the output by the next Linear
        return width * 4 + f + (2 * width * e if w_train else 0)

    # LLM Block.forward (grad always flows through the LLM: the loss is at its end)
    blk = 2 * rms(C, wl)  # attn_norm, mlp_norm (each output saved by q/k/v resp. gate/up when they train)
    if cfg.llm_qk_norm:  # Attention: per-head q_norm / k_norm (Qwen3); their outputs go into RoPE (saves cos/sin)
        blk += (H + Hkv) * hd * 4 + (H + Hkv) * f + ((H + Hkv) * hd * e if wl else 0)
    # apply_rope saves cos/sin only (shared, below); SDPA saves q, k (after RoPE), v (a view of v_proj's output),
    # its output (o_proj's input is a view of it) and the log-sum-exp (fp32, per head)
    blk += (2 * H + 2 * Hkv) * hd * e + H * f
    # MLP: silu saves gate's output, the product saves silu(gate) and up, down_proj its input (when it trains)
    blk += (3 + wl) * M * e
    out["llm_block"] = blk
    # once per LLM token: embedding indices (int64, wte trains), masked_scatter's mask (bool), RoPE cos/sin
    # (rope_cos_sin, (B,1,T,hd) each, in the compute dtype, shared by every layer), the final RMSNorm, and
    # token_logprobs' checkpointed chunks: their inputs = the final norm's output and the targets (int64)
    out["llm_other"] = (8 if wl else 0) + 1 + 2 * hd * e + (C * 4 + f + (C * e if wl else 0)) + C * e + 8
    if wv or wc:  # Connector.forward: LayerNorm over the pixel-shuffled 4*Cv features, fc1 -> GELU -> fc2
        ln_in = 4 * Cv * (4 if cuda else e)  # CUDA autocast runs layer_norm in fp32 (its input is cast first)
        out["connector"] = ln_in + 2 * f + (4 * Cv * e if wc else 0) + C * e + (C * e if wc else 0)
    if wv:  # ViTBlock.forward (the ViT only saves anything when it trains: its input needs no gradient)
        if cfg.vit_norm == "layer_norm":  # input (fp32 under CUDA autocast), mean, rstd; output saved by the Linear
            norm = Cv * (4 if cuda else e) + 2 * f + Cv * e
        else:
            norm = rms(Cv, True)
        blk = 2 * norm + 3 * Cv * e  # qkv's output: q, k, v are views of it
        if cfg.vit_qk_norm:  # RMSNorm over the full width on q and k (in fp32 the input is a view of qkv)
            blk += 2 * ((Cv * 4 if e != 4 else 0) + f + 2 * Cv * e)
        blk += Cv * e + Hv * f  # SDPA output (proj's input is a view of it) and log-sum-exp
        blk += Cv * e  # proj's output, saved by `ls1 *` for ls1's gradient
        blk += 2 * Mv * e + Cv * e  # fc1's output (GELU), GELU's output (fc2), fc2's output (`ls2 *`)
        out["vit_block"] = blk
        out["pixels"] = 3 * cfg.image_size**2 * e  # the patch Conv2d saves its input
    return out


def lm_head_copy(cfg, e, cuda):
    """Bytes of model.lm_head_weight's copy of the (vocab, n_embd) lm_head that model.lm_head_logits computes with
    (the sampler's log-probs, sampler.generate's w_head, and the trainer's, model.token_logprobs): on CUDA the weight
    in bf16 (torch.mm(bf16, bf16, out_dtype=torch.float32), no copy of a bf16 weight; a bf16 copy of an fp32 one),
    elsewhere in fp32 (a copy of a bf16 weight, none of an fp32 one)."""
    if cuda:
        return cfg.vocab_size * cfg.n_embd * 2 if e != 2 else 0
    return cfg.vocab_size * cfg.n_embd * 4 if e != 4 else 0


def activation_bytes(cfg, B, T, tiles, e, train, ac, cuda):
    """Saved activations of one micro-batch: B sequences of T tokens with `tiles` image tiles in all, as
    {llm: the LLM blocks, vit: the ViT blocks, other: embedding, masks, RoPE, connector, final norm, the log-prob
    chunks' inputs, pixels: the patch embedding's input} (their sum is what autograd holds).
    ac: activation checkpointing (plumbing.apply_activation_checkpointing: every ViT and LLM block recomputed in
    backward; a checkpointed block saves only its inputs, x and the shared cos/sin)."""
    pt = _act_per_token(cfg, e, train, cuda)
    n_llm, n_vit, n_img = B * T, tiles * (cfg.grid**2 + 1), tiles * cfg.tokens_per_tile
    if not any(train):
        return dict(llm=0, vit=0, other=0, pixels=0)
    if ac:
        llm = cfg.n_layer * n_llm * cfg.n_embd * e
        # a frozen ViT's checkpointed blocks keep nothing: no gradient flows back through them, so the graph
        # holding their saved inputs is freed as soon as the forward moves on
        vit = cfg.vit_layers * n_vit * cfg.vit_hidden * e if train[0] else 0
    else:
        llm = cfg.n_layer * n_llm * pt["llm_block"]
        vit = cfg.vit_layers * n_vit * pt["vit_block"]
    # + model.lm_head_weight's copy of lm_head, made once by token_logprobs and saved by every checkpointed chunk
    # (fp32 on the CPU, none on CUDA with bf16 compute: lm_head_copy)
    other = n_llm * pt["llm_other"] + n_img * pt["connector"] + lm_head_copy(cfg, e, cuda)
    return dict(llm=llm, vit=vit, other=other, pixels=tiles * pt["pixels"])


def backward_transient(cfg, B, T, tiles, e, train, ac, cuda):
    """What backward allocates beyond the saved activations and the parameter gradients, per stage (bytes):
    logp: one chunk of model.token_logprobs recomputed in fp32 (LOGP_BUFS x chunk x vocab) + that chunk's (V x C)
      fp32 weight gradient (+ its fp32 accumulation with a bf16 model, whose lm_head is cast to fp32 once, on the
      CPU; on CUDA with bf16 compute the same 8 bytes a weight element: _MMBF16F32's fp32 product (4), its bf16 cast
      (2) and the bf16 accumulation across chunks (2); not verified on a GPU);
    llm / vit: the block being back-propagated: with checkpointing its recomputed activations plus the gradients
      flowing through it (~ 2 x mlp + 2 x width per token), without only those gradients."""
    out = dict(logp=0, llm=0, vit=0)
    if not any(train):
        return out
    rows = min(LOGP_CHUNK, B * T)
    out["logp"] = LOGP_BUFS * rows * cfg.vocab_size * 4 + cfg.vocab_size * cfg.n_embd * 4 * (2 if e != 4 else 1)
    # a frozen LLM block saves less for its recompute (no Linear inputs) but its backward holds as many gradients:
    # measured, the trainable block's recompute set is the better estimate for both
    pt = _act_per_token(cfg, e, (train[0], train[1], True), cuda)
    n_llm, n_vit = B * T, tiles * (cfg.grid**2 + 1)
    out["llm"] = n_llm * ((pt["llm_block"] if ac else 0) + (2 * cfg.mlp_hidden + 2 * cfg.n_embd) * e)
    if train[0]:
        out["vit"] = n_vit * ((pt["vit_block"] if ac else 0) + (2 * cfg.vit_mlp + 2 * cfg.vit_hidden) * e)
    return out


# -----------------------------------------------------------------------------
# rollouts


def kv_bytes(cfg, P, n, prompt, max_new, e, tp=1):
    """sampler.cache_bytes for one rank's TP model (tp.tp_config: n_kv_head/K heads)."""
    import sampler
    from plumbing.tp import tp_config
    return sampler.cache_bytes(tp_config(cfg, tp), P, n, prompt, max_new, {2: torch.bfloat16, 4: torch.float32}[e])


def decode_bytes(cfg, rows, max_new, mode="sample", ban=True, rep=False):
    """sampler.decode's buffers for `rows` rows: sample_next over (rows, vocab) (mode: a sampler.Sampling's mode,
    'sample' at temperature 1, 'greedy', 'shaped' with temperature / top-p / top-k; ban / rep: banned ids, a
    repetition penalty), the outputs (out_tok int64, out_logp, out_ent fp32) and the uniforms (draw_uniforms, fp32),
    per row per new token."""
    import sampler
    return sampler.decode_bytes(cfg, rows, max_new, mode, ban, rep)


def prefill_transient(cfg, P, prompt, tiles_per_prompt, e, tp, prefill_tokens=16384):
    """Activations of one prefill sub-batch (no grad; sampler.prefill: at most prefill_tokens padded tokens, >= 1
    prompt): an LLM layer's widest moment is its MLP (silu(gate), up and their product, 3 x mlp_hidden/K) plus the
    residual, the norm's fp32 temporaries and q/k/v; the ViT runs on the sub-batch's tiles (fc1 + GELU outputs)."""
    k = max(1, min(P, prefill_tokens // max(prompt, 1)))
    T = k * prompt
    llm = T * (3 * cfg.mlp_hidden // tp * e + cfg.n_embd * (3 * e + 8) + (cfg.n_head + 2 * cfg.n_kv_head) // tp
               * cfg.head_dim * e)
    vit = k * tiles_per_prompt * (cfg.grid**2 + 1) * (2 * cfg.vit_mlp + 6 * cfg.vit_hidden) * e
    return max(llm, vit) + T * 8

# -----------------------------------------------------------------------------
# the plan


def _hw(gpu_gb):
    return HW["H200"] if gpu_gb > 100 else HW["H100"]


def _max_new(x):
    # grpo.py's schedule [[from_step, length], ...] or one int
    if isinstance(x, (list, tuple)):
        return max(length for _, length in x)
    return int(x)


def default_prompt_tokens(cfg, images=1, text=512):
    """plan_prompt_tokens default: `images` images of (max_tiles + thumbnail) tiles x tokens_per_tile + `text`."""
    return images * image_tiles(cfg) * cfg.tokens_per_tile + text


DATA_META = 40  # host bytes per SFT sample of data.common.SFTData's metadata (numpy columns: measured 33; ~140 while
# the start-up check builds them, before any batch exists)


def _lines(path):
    """The number of lines of a data file (0 if it is not there): the samples whose metadata a rank keeps."""
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except (OSError, TypeError):
        return 0


def image_tiles(cfg):
    return cfg.max_tiles + (1 if cfg.use_thumbnail and cfg.max_tiles > 1 else 0)


def plan_run(script, config, model_cfg, gpus=1, gpus_per_node=None, gpu_gb=80.0, tp=1, offload=False,
             prompt_tokens=None, images=1, device="cuda", chunked=True, overhead_gb=OVERHEAD_GB, frag=FRAG,
             mfu=MFU, bw_eff=BW_EFF, compute_bytes=None, _search=True):
    """The memory plan of one run, per GPU and per phase, as a dict (format_plan prints it).
    script: 'sft' | 'connector_tune' | 'grpo' (a path like 'grpo.py' works too); config: the script's config dict
    (its globals after configure()); model_cfg: the VLMConfig; gpus / gpus_per_node / gpu_gb: the machine; tp,
    offload: the run's --tp / --offload; prompt_tokens: GRPO prompt length (None: images x (max_tiles + 1) x
    tokens_per_tile + 512 text), images: images per sample (also SFT's); device: 'cuda' (bf16 compute, fp32
    masters) or 'cpu' (fp32 everywhere, as the CPU tests run); chunked: the sampler splits a rank's rollout into
    chunks that fit (sampler.fit_chunks); False: the whole rollout at once must fit. compute_bytes: override the
    compute dtype's size (2 = bf16 on the CPU, as the tests emulate a GPU run with FSDP2 mixed precision on gloo).
    Returns a dict: params (per tower / unit), phases {phase: {term: bytes}}, peaks, peak_gb, fits, verdict (the
    last line format_plan prints), activations (the saved-activation split of one micro-batch), chunks, time ..."""
    script = os.path.splitext(os.path.basename(script))[0]
    assert script in ("sft", "connector_tune", "grpo"), f"plan.py: unknown script {script!r}"
    cfg, c = model_cfg, config
    W, gpn = int(gpus), int(gpus_per_node or gpus)
    nodes = -(-W // gpn)
    cuda = device == "cuda"
    from plumbing.optim import master_torch_dtype
    mbytes = master_torch_dtype(str(c.get("master_dtype", "float32"))).itemsize  # masters, grads, AdamW moments
    mname = {4: "fp32", 2: "bf16"}[mbytes]
    # compute dtype: bf16 on a GPU (FSDP2 param_dtype + autocast) or with bf16 masters, else fp32
    e = compute_bytes or (2 if cuda or mbytes == 2 else 4)
    fsdp = cuda or W > 1  # on a GPU even one process runs FSDP2 (plumbing.compute_init); on the CPU one process is plain
    train = (c.get("train_vit", True), c.get("train_connector", True), c.get("train_llm", True))
    towers = [t for t, on in zip(("vit", "connector", "llm"), train) if on]
    ac = c.get("activation_checkpointing", False)
    ac = None if ac == "auto" else bool(ac)  # 'auto' (sft.py, grpo.py): decided below, by the training step's peak
    pi = param_info(cfg)
    N, Nt = pi["total"], sum(pi[t] for t in towers)
    notes = []
    if tp > 1:
        assert script == "grpo", "plan.py: tp > 1 is for rollouts (grpo.py)"
        if W % tp or tp > gpn:
            raise ValueError(f"plan.py: tp={tp} must divide the {W} GPUs and fit in a node of {gpn}")
        bad = [w for w in ("n_head", "n_kv_head", "mlp_hidden") if getattr(cfg, w) % tp]
        if bad:  # tp.check_tp: each rank holds 1/K of the heads, kv heads and MLP width
            raise ValueError(f"plan.py: tp={tp} must divide the model's {', '.join(bad)}")

    # --- persistent states (per GPU unless offloaded; host RAM per node when offloaded)
    sh_all = shard_numel(cfg, W) * mbytes if fsdp else N * mbytes
    sh_train = shard_numel(cfg, W, towers) * mbytes if fsdp else Nt * mbytes
    adam = 2 * sh_train + 4 * n_tensors(cfg, towers)
    ref = (shard_numel(cfg, W) * mbytes if fsdp else N * mbytes) if script == "grpo" and c.get("kl_coef", 0) > 0 else 0
    on_gpu = 0 if offload else 1
    pi_tr = param_info(cfg, tuple(towers))
    units, units_tr = pi["units"], pi_tr["units_trainable"]

    def biggest(kind, d=units):  # the largest unit of a kind (param_info's units), 0 if none
        return max((n for u, n in d.items() if unit_kind(u) == kind), default=0)

    root, root_train = units["root"], units_tr["root"]
    block, block_train = biggest("llm block"), biggest("llm block", units_tr)
    vblock, vblock_train = biggest("vit block"), biggest("vit block", units_tr)
    vrest, vrest_train = units.get("vit", 0), units_tr.get("vit", 0)

    def biggest_param(kind, trainable):  # the largest single parameter of a unit of that kind (0 if none trains)
        return max((math.prod(s) for _, s, u, t, _ in _params(_cfg_key(cfg))
                    if unit_kind(u) == kind and (t in towers or not trainable)), default=0)

    # FSDP2 units (plumbing.apply_fsdp: each ViT block, the rest of the ViT, each LLM block, the root) in the compute
    # dtype (e); measured on the CPU (tests/test_plan.py, 2 gloo processes), each moment within a few %:
    # - the root (wte, lm_head, final norm, connector) stays gathered through forward and backward (FSDP2 never
    #   reshards the root after forward); its gradients appear in backward order: lm_head's and the final norm's
    #   first (inside the log-prob transient while its chunks run), the connector's after the LLM blocks, an untied
    #   wte's at the very end (the embedding's backward runs after the ViT's: autograd takes later nodes first);
    # - a block back-propagating: it gathered + the next one's prefetched all-gather buffer (reverse forward order);
    #   the peak is at the start of its backward (its recomputed activations and the gradient flowing through its
    #   MLP all alive: backward_transient), when only its first weight gradient (the MLP's down projection, its
    #   largest) is being formed; the previous unit's fp32 reduce-scatter input is alive (FSDP2 keeps one in flight
    #   until the NEXT unit's post-backward; none at the first LLM block: dropped at the end of every backward);
    # - its post-backward: it is resharded, its grads (e) copied into its fp32 reduce-scatter input (reduce_dtype),
    #   the output shard (fp32) added to the gradient shard; the next block gathered, this block's activations freed;
    # - the rest of the ViT (model.vit's own unit) is gathered for the whole ViT backward.
    rows = [(name, math.prod(s)) for name, s, u, t, _ in _params(_cfg_key(cfg)) if u == "root" and t in towers]
    late = sum(n for name, n in rows if name.startswith("llm.wte.") and not cfg.tie_embeddings)
    conn = sum(n for name, n in rows if name.startswith("connector."))
    copy_in = (lambda b: b * mbytes // W) if offload else (lambda b: 0)  # offload: the shard copied in to gather
    base_llm = root * e + (root_train - late - conn) * e
    base_vit = root * e + (root_train - late) * e + vrest * e + vrest_train * e
    # (tower, first / second block in backward, moment) -> gathered units + their grads (bytes)
    g = {}
    if fsdp:
        g_logp = root * e  # the log-prob chunks' backward, before any block is gathered (lm_head's grad: in bt["logp"])
        g_fwd = root * e + (vrest + 2 * max(vblock, block)) * e
        for tower, base, b, b_train, big, prevs in (
                ("llm", base_llm, block, block_train, biggest_param("llm block", True), (0, block_train)),
                ("vit", base_vit, vblock, vblock_train, biggest_param("vit block", True), (block_train, vblock_train))):
            for k, prev in enumerate(prevs):
                g[tower, k, "run"] = base + 2 * b * e + big * e + prev * 4 + copy_in(b)
            g[tower, 0, "rs"] = int(base + b * e + b_train * (e + 4 + 4 / W))
    else:  # one CPU process: the modules compute with their own parameters; the gradients are the grad terms
        g_fwd = g_logp = 0
        g = {(t, k, m): 0 for t in ("llm", "vit") for k in (0, 1) for m in ("run", "rs")}

    phases = {}
    # --- load (plumbing.build_model with FSDP: meta -> fully_shard -> to_empty -> rank 0 reads one unit at a time,
    # set_model_state_dict broadcasts it tensor by tensor: device = shard + one full tensor in the checkpoint dtype)
    biggest_tensor = max(math.prod(s) for _, s, _, _, _ in _params(_cfg_key(cfg)))
    if fsdp:
        load = {f"{mname} master shard": sh_all * on_gpu, "one full tensor (bf16, broadcast)": biggest_tensor * 2}
        if ref:
            load["KL reference shard"] = ref
        host0 = max(units.values()) * 2  # rank 0 reads one unit as stored (bf16): the root, with untied embeddings
    else:  # one CPU process: VLM.from_pretrained in fp32
        load = {"fp32 model": N * 4}
        host0 = N * 4
    phases["load"] = load

    # --- training step (one micro-batch's forward/backward at the longest sequence, then the optimizer step)
    if script == "grpo":
        max_new = _max_new(c["max_new_tokens"])
        prompt = prompt_tokens or default_prompt_tokens(cfg, images)
        T = prompt + max_new
        # grpo.micro_batches (data.common.token_batches): at most micro_batch rows and micro_batch_tokens padded
        # tokens (0: no budget). B: the rows of a micro-batch of the longest sequences; shorter responses pack more
        # rows, up to budget / prompt: the plan's micro-batch holds the most tokens (B_tok sequences of T) and the
        # most rows' images (rows_max) at once, the worst case of both
        mb, mbt = int(c.get("micro_batch", 1)), int(c.get("micro_batch_tokens", 0) or 0)
        B = min(mb, max(1, mbt // T)) if mbt else mb
        B_tok = min(mb * T, max(mbt, T)) / T if mbt else mb
        rows_max = min(mb, max(1, mbt // prompt)) if mbt else mb
        samples_rank = int(c["prompts_per_step"]) * int(c["group_size"]) / W
        n_micro = math.ceil(samples_rank / B)
    else:
        T = int(c["max_len"])
        B = B_tok = rows_max = int(c.get("batch_size", 1))
        n_micro = int(c.get("grad_accum", 1))
        prompt = max_new = None
    tiles = rows_max * images * image_tiles(cfg)
    foreach_tmp = sh_train if cuda and not offload else 0  # torch AdamW foreach on CUDA: one fp32 temp per shard
    if mbytes == 2:  # plumbing.optim.AdamW: one tensor at a time, fp32 copies of its shard
        foreach_tmp = OPT_TMP * max((_shard_numel(s, W) if fsdp else math.prod(s) for _, s, _, t, _ in
                                     _params(_cfg_key(cfg)) if t in towers), default=0)
    states = {f"{mname} master shard": sh_all * on_gpu, f"{mname} grad shard": sh_train * on_gpu,
              f"AdamW state (2 x {mname})": adam * on_gpu}
    if ref:
        states["KL reference shard"] = ref

    def train_step(ac):
        # the step's peak is in backward, when the gradients of earlier micro-batches exist (gradient accumulation:
        # every micro-batch after the first), at one of three moments: its start (every activation saved, lm_head's
        # log-prob chunks recomputed, only the root gathered), the first LLM blocks (the log-prob chunks' inputs, the
        # final norm's and the lm_head copy freed: lm_head_copy, fp32 on the CPU, none on CUDA) or, when the ViT
        # trains, the ViT's first block (the LLM's activations freed, the ViT's all alive)
        act = activation_bytes(cfg, B_tok, T, tiles, e, train, ac, cuda)
        bt = backward_transient(cfg, B_tok, T, tiles, e, train, ac, cuda)
        C = cfg.n_embd
        head = B_tok * T * (C * 4 + 4 + (C * e if train[2] else 0) + C * e + 8) + \
            lm_head_copy(cfg, e, cuda) if any(train) else 0
        other = "activations, other (embed, connector, norm, log-prob)"
        trans = "backward transient (log-prob chunk / block recompute)"
        stages = [("log-prob backward", {"gathered units + their grads": g_logp, "activations, LLM blocks": act["llm"],
                                         "activations, ViT blocks": act["vit"], other: act["other"] + act["pixels"],
                                         trans: bt["logp"]})]
        # a tower's first / second block in backward, running (k blocks' activations freed) or at its
        # post-backward (k + 1 freed, no transient)
        for k, m in ((0, "run"), (1, "run"), (0, "rs")):
            freed = k + (m == "rs")
            stages.append(("LLM backward", {
                "gathered units + their grads": g["llm", k, m],
                "activations, LLM blocks": act["llm"] * max(cfg.n_layer - freed, 0) // cfg.n_layer,
                "activations, ViT blocks": act["vit"], other: act["other"] - head + act["pixels"],
                trans: bt["llm"] if m == "run" else 0}))
            if "vit" in towers:
                stages.append(("ViT backward", {
                    "gathered units + their grads": g["vit", k, m],
                    "activations, ViT blocks": act["vit"] * max(cfg.vit_layers - freed, 0) // cfg.vit_layers,
                    other: act["pixels"], trans: bt["vit"] if m == "run" else 0}))
        stage, terms = max(stages, key=lambda st: sum(st[1].values()))
        return stage, dict(states, **terms)

    step_peak = sum(states.values()) + foreach_tmp
    cap, cap_note = gpu_capacity(gpu_gb)
    ac_auto = ac is None
    if ac_auto:  # activation checkpointing 'auto': on when the training step does not fit without it
        ac = (max(sum(train_step(False)[1].values()), step_peak) * (1 + frag)) / GB + overhead_gb > cap
    stage, tr = train_step(ac)
    act_now = activation_bytes(cfg, B_tok, T, tiles, e, train, ac, cuda)
    _, tr_alt = train_step(not ac)
    phases["train"] = tr
    train_peak, train_alt = sum(tr.values()), sum(tr_alt.values())

    # --- rollout (grpo) and eval
    res = dict(script=script, gpus=W, gpus_per_node=gpn, nodes=nodes, gpu_gb=gpu_gb, tp=tp, offload=offload,
               device=device, elt=e, fsdp=fsdp, ac=ac, ac_auto=ac_auto, train=train, params=pi, n_trainable=Nt, T=T,
               B=B, B_tok=B_tok, rows_max=rows_max, n_micro=n_micro, tiles=tiles, prompt=prompt, max_new=max_new,
               images=images, notes=notes, optimizer_step_peak=step_peak, train_peak_other_ac=train_alt,
               chunked=chunked, train_stage=stage, states=sum(states.values()), activations=act_now)
    res["gpu_capacity_gb"], res["gpu_capacity_note"] = cap, cap_note
    res["master_bytes"], res["master_dtype"] = mbytes, str(c.get("master_dtype", "float32"))
    states_resident = (sh_all + adam) * on_gpu + ref  # between updates the grads are None (zero_grad(set_to_none))
    if script == "grpo":
        n = int(c["group_size"])
        P_rank = int(c["prompts_per_step"]) / W
        P = int(math.ceil(P_rank * tp))  # a TP group generates the union of its K ranks' prompts
        if tp == 1:
            w_roll = N * e if fsdp else 0  # sampler.unsharded: every unit gathered (on one CPU process: the params)
            w_build = 0
        else:
            w_roll = tp_numel(cfg, tp) * e
            # tp.tp_model_from fills the TP model unit by unit, in module order (the root, the ViT, the LLM blocks):
            # at its largest, the last LLM block's all-gather: FSDP2's flat all-gather buffer and the gathered
            # parameters it is copied out to, beside the TP model less that block's 1/K (measured, tests/test_plan.py)
            w_build = int(max(block * (2 - 1 / tp), 2 * vblock, 2 * vrest) * e)
        # sampler.generate's lm_head for the log-probs (model.lm_head_weight): an fp32 copy on the CPU, none on CUDA
        w32 = lm_head_copy(cfg, e, cuda)
        tiles_prompt = images * image_tiles(cfg)
        fixed = states_resident + w_roll + w32
        # the sampler's budget, as the run computes it (grpo.py: sampler.memory_budget after the gather, then
        # generate() takes the lm_head copy off it): sampler.budget_from_free of the free memory, i.e. the capacity
        # less the CUDA/NCCL overhead and the resident states and weights (with the allocator's fragmentation)
        import sampler
        from plumbing.tp import tp_config
        dev = "cuda" if cuda else "cpu"
        free = int((cap - overhead_gb) * GB - (states_resident + w_roll) * (1 + frag))
        res["rollout_free"] = free
        res["rollout_budget"] = sampler.budget_from_free(free, dev) - w32
        res["tp_build_transient"] = w_build
        dtype = {2: torch.bfloat16, 4: torch.float32}[e]
        graphs = bool(c.get("cuda_graph", False)) and cuda  # grpo.py's rollouts (generate(cuda_graph=...)) on CUDA

        def gen_phase(P, n, sampling, graphs):
            """One generate() call of P prompts x n samples: its terms (the largest chunk) and its chunking."""
            mode, ban, rp = sampling.mode, bool(sampling.ban), sampling.penalizes

            def terms(k):
                t = {"KV cache": kv_bytes(cfg, k, n, prompt, max_new, e, tp),
                     "decode buffers (logits, cdf, outputs)": decode_bytes(cfg, k * n, max_new, mode, ban, rp)}
                if graphs:  # CudaGraphStep's graphs: captured in decode, kept beside the decode buffers
                    t["CUDA graphs (sampler.graph_bytes)"] = sampler.graph_bytes(tp_config(cfg, tp), k * n, dtype)
                t["prefill / TP-build transient"] = max(prefill_transient(cfg, k, prompt, tiles_prompt, e, tp),
                                                        w_build)
                return t

            def need(k):  # the prefill and the decode buffers (+ graphs) do not overlap: the larger counts
                t = terms(k)
                return t["KV cache"] + max(t["decode buffers (logits, cdf, outputs)"] +
                                           t.get("CUDA graphs (sampler.graph_bytes)", 0),
                                           t["prefill / TP-build transient"])
            per, short = P, False
            if chunked:  # the run's chunks: sampler.fit_chunks on the run's budget (the TP model's config)
                try:
                    a, b = sampler.fit_chunks(tp_config(cfg, tp), [prompt] * P, n, max_new, dtype,
                                              res["rollout_budget"], sampling, cuda_graph=graphs)[0]
                    per = b - a
                except MemoryError:
                    per, short = 1, True
            ph = {f"{mname} master shard": sh_all * on_gpu, f"AdamW state (2 x {mname})": adam * on_gpu}
            if ref:
                ph["KL reference shard"] = ref
            ph[("gathered weights (full model)" if tp == 1 else f"TP shard + replicated (tp={tp})")] = w_roll
            ph["fp32 lm_head (sampler log-probs)" if not cuda else "bf16 lm_head copy (sampler log-probs)"] = w32
            ph.update(terms(per))
            return ph, fixed + need(per), -(-P // per), per, short

        roll = sampler.Sampling(temperature=float(c.get("temperature", 1.0)), top_p=float(c.get("top_p", 1.0)),
                                repetition_penalty=float(c.get("repetition_penalty", 1.0)))
        ro, ro_peak, ch, per, short = gen_phase(P, n, roll, graphs)
        if short:
            notes.append("rollout: even one prompt's KV cache and decode buffers do not fit the sampler's budget "
                         "(sampler.fit_chunks would stop: MemoryError)")
        phases["rollout"] = ro
        res.update(rollout_prompts=P, rollout_rows=P * n, chunks=ch, prompts_per_chunk=per,
                   kv_full=kv_bytes(cfg, P, n, prompt, max_new, e, tp))
        # validation (grpo.validate -> eval.evaluate): greedy, n=1, up to 64 prompts per generate() call, the rank's
        # share of val_n (a TP group: the union of its ranks' shares)
        val_n = int(c.get("val_n", 0)) if c.get("val_data") and c.get("eval_every", 1) else 0
        P_ev = int(min(64, math.ceil(val_n / W) * tp)) if val_n else 0
        if P_ev:
            ev, ev_peak, ev_ch, _, _ = gen_phase(P_ev, 1, sampler.Sampling(temperature=0.0), False)
            phases["eval"] = ev
            res.update(eval_prompts=P_ev, eval_chunks=ev_ch)
    else:  # sft validation: the loss forward under no_grad on batch_size samples
        if c.get("val_data"):
            fwd = B * T * (3 * cfg.mlp_hidden * e + cfg.n_embd * (3 * e + 8)) + \
                min(LOGP_CHUNK, B * T) * cfg.vocab_size * 4 * 4
            phases["eval"] = {f"{mname} master shard": sh_all * on_gpu, f"AdamW state (2 x {mname})": adam * on_gpu,
                              "gathered units (fwd)": g_fwd, "forward transient (no grad)": fwd}
    peaks = {"load": sum(phases["load"].values()),
             "train": max(train_peak, step_peak)}
    if "rollout" in phases:
        peaks["rollout"] = ro_peak
    if "eval" in phases:
        peaks["eval"] = ev_peak if script == "grpo" else sum(phases["eval"].values())
    res["phases"], res["peaks"] = phases, peaks
    res["peak"] = max(peaks.values())
    res["peak_gb"] = (res["peak"] * (1 + frag)) / GB + overhead_gb  # what nvidia-smi would show
    res["fits"] = res["peak_gb"] <= cap

    # --- host RAM per node: rank 0's node reads one unit of the checkpoint at a time; offload keeps the fp32
    # shards, their grads and the AdamW state of the node's ranks in host memory; on a GPU the shards and grad shards
    # are pinned, each rounded up to a power of two (pinned_bytes: +76% at 38B on 8 GPUs), the AdamW moments are not
    pinned = offload and cuda and fsdp  # plumbing.apply_fsdp: CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    host_sh = pinned_bytes(cfg, W, ("vit", "connector", "llm"), mbytes) if pinned else sh_all
    host_tr = pinned_bytes(cfg, W, towers, mbytes) if pinned else sh_train
    off = (host_sh + host_tr + adam) * min(gpn, W) if offload else 0
    # the data (sft.py / connector_tune.py; data.common.SFTData decodes images per micro-batch): each rank holds its
    # step's grad_accum micro-batches and its DataLoader workers num_workers x prefetch_factor more, fp32 tiles,
    # plus the light metadata of every sample (DATA_META bytes a line of the JSONL)
    data_rank = 0
    if script != "grpo":
        nw = int(c.get("num_workers", -1))
        nw = nw if nw >= 0 else (2 if cuda else 0)  # sft.py's -1: 2 on a GPU, 0 on the CPU
        ahead = nw * int(c.get("prefetch_factor", 2)) + n_micro
        data_rank = ahead * B * images * image_tiles(cfg) * 3 * cfg.image_size ** 2 * 4 + DATA_META * _lines(c.get("data"))
    res["host_data_gb"] = data_rank * min(gpn, W) / GB
    res["host_gb_node0"] = (host0 + off + ref * 0) / GB + res["host_data_gb"]
    res["host_gb_node"] = off / GB + res["host_data_gb"]
    res["time"] = _step_time(res, cfg, c, mfu, bw_eff, _hw(gpu_gb)) if _search else {}
    kw = dict(gpus=W, gpus_per_node=gpn, gpu_gb=gpu_gb, tp=tp, offload=offload, prompt_tokens=prompt_tokens,
              images=images, device=device, chunked=chunked, overhead_gb=overhead_gb, frag=frag, mfu=mfu,
              bw_eff=bw_eff, compute_bytes=compute_bytes)
    res["verdict"] = _verdict(res, script, dict(config, activation_checkpointing=ac), cfg, kw, _search)
    return res


# -----------------------------------------------------------------------------
# step time (estimate; not verified on a GPU)


def _step_time(res, cfg, c, mfu, bw_eff, hw):
    pi, W, e, tp = res["params"], res["gpus"], res["elt"], res["tp"]
    flops = hw["flops"] * mfu
    N_llm_blocks = pi["llm"] - 2 * cfg.vocab_size * cfg.n_embd + (cfg.vocab_size * cfg.n_embd if cfg.tie_embeddings
                                                                   else 0)
    head = cfg.vocab_size * cfg.n_embd
    vit_tok = (cfg.grid**2 + 1)
    t = {}
    T, B = res["T"], res["B"]
    seqs = res["n_micro"] * B  # sequences per rank per step
    tiles_seq = res["images"] * image_tiles(cfg)
    # training FLOPs per sequence: 2 (forward) + 4 (backward) per trainable parameter and token, 2 + 2 for a frozen
    # tower the gradient flows through (the LLM), 2 for one it does not (a frozen ViT); +2 with checkpointing
    wv, wc, wl = res["train"]
    llm_fb = (6 if wl else 4) + (2 if res["ac"] else 0)
    vit_fb = (6 + (2 if res["ac"] else 0)) if wv else 2
    attn = 2 * 2 * T * T * cfg.n_head * cfg.head_dim / 2 * cfg.n_layer  # causal QK^T + PV, forward, per sequence
    mm = N_llm_blocks + head  # the LLM's matmul parameters (the embedding is a lookup)
    fwd_seq = 2 * (mm + pi["connector"]) * T + attn + 2 * pi["vit"] * tiles_seq * vit_tok
    upd_seq = llm_fb / 2 * (2 * mm * T + attn) + vit_fb / 2 * 2 * pi["vit"] * tiles_seq * vit_tok + \
        (6 if wc else 4) * pi["connector"] * T
    t["update"] = seqs * upd_seq / flops
    if res["script"] == "grpo":
        # a separate no-grad pass: pi_old off-policy (grpo.policy_logp), the KL reference's; on-policy, none
        passes = int(not (int(c.get("ppo_epochs", 1)) == 1 and int(c.get("mini_batches", 1)) == 1
                          and float(c.get("buffer_frac", 0)) == 0)) + int(float(c.get("kl_coef", 0)) > 0)
        if passes:
            t["logp"] = passes * seqs * fwd_seq / flops
        # rollout: the TP group's chunks run one after another; per decode step a rank reads its weights (its TP
        # shard of the blocks + the replicated lm_head) and the KV cache (prompts once + each row's own tokens)
        P, n, per, ch = res["rollout_prompts"], int(c["group_size"]), res["prompts_per_chunk"], res["chunks"]
        prompt, max_new = res["prompt"], res["max_new"]
        kvt = kv_bytes(cfg, 1, 0, 1, 0, e, tp)  # KV bytes per token per rank (sampler.cache_bytes: one prompt token)
        bw = hw["bw"] * bw_eff
        dec = 0.0
        for k in range(ch):
            Pk = min(per, P - k * per)
            R = Pk * n
            steps = max(1, max_new // 64)
            for i in range(steps):  # worst case: every row runs to max_new tokens
                tok = (i + 0.5) * max_new / steps
                # the blocks: weights + KV cache read (memory) or their matmuls (compute), whichever is longer
                blocks = max((N_llm_blocks / tp * e + kvt * (Pk * prompt + R * tok)) / bw,
                             2 * N_llm_blocks / tp * R / flops)
                # lm_head (model.lm_head_logits), replicated on every TP rank: on a GPU bf16 x bf16 with fp32
                # output (torch.mm out_dtype), at the bf16 rate; fp32 FLOPs only for a plan of the CPU's fp32 path
                fp32 = res["device"] != "cuda" and e != 4
                lm = max(head * (4 if fp32 else e) / bw, 2 * head * R / (FP32_FLOPS if fp32 else flops))
                dec += (blocks + lm + (2 * cfg.n_layer * TP_ALLREDUCE_S if tp > 1 else 0)) * max_new / steps
        pre = P * (2 * N_llm_blocks / tp * prompt + 2 * pi["vit"] * tiles_seq * vit_tok) / flops
        t["rollout"] = dec + pre
    if res["offload"]:
        # FSDP2 CPUOffloadPolicy: every all-gather first copies the unit's fp32 shard host -> GPU (forward and
        # backward of each micro-batch, the log-prob forward, once for the rollout gather), every backward copies
        # the fp32 gradient shard back; the AdamW step runs on the host
        shard = res["params"]["total"] * res["master_bytes"] / W
        passes = res["n_micro"] * 2 + (res["n_micro"] * ("logp" in t) + 1 if res["script"] == "grpo" else 0)
        t["offload copies"] = (passes * shard + res["n_micro"] * res["n_trainable"] * res["master_bytes"] / W) / PCIE
        # AdamW reads param, grad, 2 moments and writes param, 2 moments: 7 x 4 bytes (fp32), 7 x 2 (bf16 masters)
        t["optimizer (host)"] = 7 * res["master_bytes"] * res["n_trainable"] * min(res["gpus_per_node"], W) / W / \
            HOST_ADAM
    else:
        t["optimizer"] = 7 * res["master_bytes"] * res["n_trainable"] / W / (hw["bw"] * bw_eff)
    t["total"] = sum(t.values())
    return t

# -----------------------------------------------------------------------------
# verdict: fits, or what to change


def _verdict(res, script, config, cfg, kw, search):
    cap = res["gpu_capacity_gb"]
    if res["fits"]:
        return f"plan: fits (peak {res['peak_gb']:.1f} GB of {cap:.1f} GB per GPU)"
    phase = max(res["peaks"], key=res["peaks"].get)
    terms = res["phases"][phase]
    big = max(terms, key=terms.get)
    what = {"load": "load", "train": "the training step", "rollout": "the rollout", "eval": "eval"}[phase]
    msg = (f"plan: does not fit: {what} needs {(res['peaks'][phase] * (1 + kw['frag'])) / GB + kw['overhead_gb']:.1f}"
           f" GB of {cap:.1f} GB per GPU (biggest term: {big} {terms[big] / GB:.1f} GB")
    if res["states"] > 0.4 * cap * GB:
        msg += f"; the {'fp32' if res['master_bytes'] == 4 else 'bf16'} masters + grads + AdamW state alone are " \
            f"{res['states'] / GB:.1f} GB"
    msg += ")"
    if not search:
        return msg
    # the smallest set of changes that fits: offload, tp, activation checkpointing, a smaller micro-batch (SFT:
    # batch_size, with grad_accum raised to keep the global batch), more GPUs
    c = dict(config)
    mb_key = "micro_batch" if script == "grpo" else "batch_size"
    mb0 = int(c.get(mb_key, 1))
    mbs = [(mb_key, v) for v in sorted({mb0, max(1, mb0 // 2), max(1, mb0 // 4), 1}, reverse=True)]
    mbt0 = int(c.get("micro_batch_tokens", 0) or 0) if script == "grpo" else 0
    if mbt0 and mbt0 // res["T"] < mb0:  # grpo.py's token budget binds: a half or a quarter of it, or one sequence
        mbs = [("micro_batch_tokens", v) for v in sorted({mbt0, mbt0 // 2, mbt0 // 4}, reverse=True)]
        mbs += [(mb_key, 1)] if mb0 > 1 else []
    tps = [kw["tp"]] + ([k for k in (2, 4, 8) if k > kw["tp"] and kw["gpus_per_node"] % k == 0 and
                         not (cfg.n_head % k or cfg.n_kv_head % k or cfg.mlp_hidden % k)] if script == "grpo" else [])
    md0 = str(c.get("master_dtype", "float32"))  # the memory modes: as configured, offload, bf16 masters (optim.py)
    offs = [(kw["offload"], md0)] + ([(True, md0)] if not kw["offload"] and res["fsdp"] else []) + \
        ([(kw["offload"], "bfloat16")] if md0 == "float32" else [])
    acs = [bool(c.get("activation_checkpointing"))] + ([True] if not c.get("activation_checkpointing") else [])
    found = []
    for g in (1, 2, 4):
        for off, md in offs:
            for k in tps:
                for ac in acs:
                    for size, (key, mb) in enumerate(mbs):
                        change = []
                        if g > 1:
                            change.append(f"{kw['gpus'] * g} GPUs")
                        if off != kw["offload"]:
                            change.append("--offload=True")
                        if md != md0:
                            change.append(f"--master_dtype={md}")
                        if k != kw["tp"]:
                            change.append(f"--tp={k}")
                        if ac != bool(c.get("activation_checkpointing")):
                            change.append("--activation_checkpointing=True")
                        cc = dict(c, activation_checkpointing=ac, master_dtype=md, **{key: mb})
                        if size:
                            change.append(f"--{key}={mb}")
                            if script != "grpo":
                                cc["grad_accum"] = int(c.get("grad_accum", 1)) * mb0 // mb
                                change[-1] += f" --grad_accum={cc['grad_accum']}"
                        if not change:
                            continue
                        try:
                            r = plan_run(script, cc, cfg, **dict(kw, gpus=kw["gpus"] * g, offload=off, tp=k),
                                         _search=False)
                        except (ValueError, AssertionError):
                            continue
                        if r["fits"]:  # fewest changes, then fewest GPUs, then the largest micro-batch
                            found.append((len(change), g, size, " ".join(change), r["peak_gb"]))
    found.sort()
    fixes = [f"{ch} (peak {pk:.1f} GB)" for _, _, _, ch, pk in found[:3]]
    if fixes:
        return msg + "; fits with " + " or ".join(fixes)
    more = " or fewer prompts_per_step / a shorter max_new_tokens" if script == "grpo" else \
        " or a shorter max_len"
    return msg + "; no combination of offload, tp, checkpointing, micro-batch and up to 4x the GPUs fits: use more" \
        f" GPUs{more}"

# -----------------------------------------------------------------------------
# printing


def _fmt_b(x):
    return "-" if x is None else (f"{x / GB:.2f}" if x < 10 * GB else f"{x / GB:.1f}")


def format_plan(d):
    """The plan as text: a header, one markdown table (terms x phases, GB per GPU), rollout chunks, host RAM, step
    time; the LAST line is the verdict (`plan: fits (...)` / `plan: does not fit: ...`)."""
    pi = d["params"]
    lines = []
    mode = "bf16 compute, fp32 masters" if d["elt"] == 2 else "fp32"
    if d["master_bytes"] == 2:
        mode = "bf16 masters, grads and AdamW state (master_dtype=bfloat16, stochastic rounding)"
    lines.append(f"plan: {d['script']}.py, {pi['total'] / 1e9:.2f}B params (vit {pi['vit'] / 1e9:.2f}B, connector "
                 f"{pi['connector'] / 1e9:.3f}B, llm {pi['llm'] / 1e9:.2f}B), {d['n_trainable'] / 1e9:.2f}B trainable; "
                 f"{d['gpus']} GPUs ({d['nodes']} node(s) x {d['gpus_per_node']}) x {d['gpu_gb']:g} GB, tp={d['tp']}, "
                 f"offload={d['offload']}, {mode}")
    lines.append(f"GPU capacity: {d['gpu_capacity_gb']:.1f} GB = {d['gpu_capacity_note']} (GB = 2^30 bytes "
                 f"throughout)")
    if d["script"] == "grpo":
        lines.append(f"sequence: prompt {d['prompt']} tokens ({d['images']} image(s) x "
                     f"{d['tiles'] // max(d['rows_max'], 1)} tiles + text; plan_prompt_tokens) + {d['max_new']} new "
                     f"(the largest of max_new_tokens) = {d['T']}; micro-batches of {d['B']} such sequence(s) x "
                     f"{d['n_micro']} per rank; planned as {d['B_tok'] * d['T']:.0f} tokens and {d['rows_max']} "
                     f"rows' images at once (micro_batch, micro_batch_tokens)")
    else:
        lines.append(f"sequence: max_len {d['T']}, batch_size {d['B']} x grad_accum {d['n_micro']}")
    phases = list(d["phases"])
    terms = []
    for p in phases:
        for t in d["phases"][p]:
            if t not in terms:
                terms.append(t)
    lines.append("")
    lines.append("| GB per GPU | " + " | ".join(phases) + " |")
    lines.append("|---|" + "---|" * len(phases))
    for t in terms:
        vals = [d["phases"][p].get(t) for p in phases]
        if all(v in (None, 0) for v in vals):
            continue
        lines.append(f"| {t} | " + " | ".join(_fmt_b(v) for v in vals) + " |")
    lines.append("| **peak (tensors)** | " + " | ".join(f"**{_fmt_b(d['peaks'][p])}**" for p in phases) + " |")
    lines.append("")
    lines.append(f"train: peak at the {d['train_stage']} of a micro-batch after the first (gradients accumulated), "
                 f"activation checkpointing {'on' if d['ac'] else 'off'}{' (auto)' if d['ac_auto'] else ''}; "
                 f"with it {'off' if d['ac'] else 'on'} it would be "
                 f"{_fmt_b(d['train_peak_other_ac'])} GB; the optimizer step " + (
                     "runs on the host (offload)" if d["offload"] else
                     f"{_fmt_b(d['optimizer_step_peak'])} GB (states + " + (
                         "AdamW's foreach temporary)" if d["master_bytes"] == 4 else
                         "plumbing.optim.AdamW's fp32 copies of the largest tensor's shard)")))
    if d["script"] == "grpo":
        full = d["kv_full"]
        lines.append(f"rollout: {d['rollout_prompts']} prompts x {d['rollout_rows'] // d['rollout_prompts']} samples "
                     f"per {'TP group' if d['tp'] > 1 else 'rank'}; KV cache for all at once {_fmt_b(full)} GB, "
                     f"budget after the weights {_fmt_b(max(d['rollout_budget'], 0))} GB -> {d['chunks']} chunk(s) "
                     f"of {d['prompts_per_chunk']} prompt(s)")
    others = f", {d['host_gb_node']:.1f} GB on each other node" if d["nodes"] > 1 else ""
    off = f"; + the offloaded {'fp32' if d['master_bytes'] == 4 else 'bf16'} shards, grads and AdamW state of its " \
        "ranks" if d["offload"] else ""
    if d.get("host_data_gb"):
        off += f"; + {d['host_data_gb']:.1f} GB of data: each rank's decoded micro-batches and DataLoader prefetch"
    lines.append(f"host RAM per node: {d['host_gb_node0']:.1f} GB on node 0 (rank 0 reads the checkpoint one unit at a "
                 f"time, as stored{off}){others}")
    t = d["time"]
    hw = "H200" if d["gpu_gb"] > 100 else "H100"
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in t.items() if k != "total")
    if t:
        worst = "every response at max_new_tokens" if d["script"] == "grpo" else "every sample at max_len"
        lines.append(f"est. step time {t['total']:.1f} s ({parts}; {hw} {HW[hw]['bw'] / 1e12:.1f} TB/s x "
                     f"{BW_EFF:.0%} for decode, {MFU:.0%} of {HW[hw]['flops'] / 1e12:.0f} TFLOP/s for prefill/"
                     f"log-probs/update; worst case: {worst}; not verified on a GPU)")
    for n in d["notes"]:
        lines.append(f"note: {n}")
    lines.append(f"peak incl. {OVERHEAD_GB:g} GB CUDA/NCCL overhead and {FRAG:.0%} fragmentation: "
                 f"{d['peak_gb']:.1f} GB")
    lines.append(d["verdict"])
    return "\n".join(lines)

def model_config(config):
    """The VLMConfig a run would build, without weights: init_from's config.json (an HF directory, e.g.
    config/models/NAME), a resumed run's model_config.json, or sft.py's tiny from-scratch config."""
    from model import VLMConfig, config_from_dict
    from plumbing.hf import load_config
    init = config.get("init_from", "scratch")
    if init == "resume":
        from plumbing import latest_checkpoint
        ck = latest_checkpoint(config["out_dir"])
        if ck is None:
            raise FileNotFoundError(f"plan.py: init_from='resume' but {config['out_dir']} has no checkpoint")
        with open(os.path.join(ck, "model_config.json")) as f:
            import json
            return config_from_dict(json.load(f))
    if init == "scratch":  # sft.py's tiny default (the vocabulary of data/synth's tokenizer when it is there)
        keys = ("image_size", "patch_size", "vit_hidden", "vit_layers", "vit_heads", "n_embd", "n_layer", "n_head",
                "n_kv_head", "rope_theta")
        kw = {k: config[k] for k in keys if k in config}
        kw.update(vit_mlp=4 * kw.get("vit_hidden", 64), mlp_hidden=3 * kw.get("n_embd", 128), max_tiles=1,
                  use_thumbnail=False)
        vocab = 1024
        tok = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "synth", "tokenizer",
                           "tokenizer.json")
        if os.path.isfile(tok):
            import json
            with open(tok) as f:
                t = json.load(f)
            vocab = len(t["model"]["vocab"]) + len(t.get("added_tokens", []))
        return VLMConfig(vocab_size=vocab, **kw)
    if not os.path.isfile(os.path.join(init, "config.json")):
        raise FileNotFoundError(f"plan.py: init_from={init!r} has no config.json; plan a real model with "
                                f"--init_from=config/models/NAME (config only, no weights)")
    try:
        return load_config(init)[0]
    except ValueError as err:  # no <IMG_CONTEXT> id: it does not change any byte of the plan
        if "IMG_CONTEXT" not in str(err):
            raise
        return load_config(init, image_token_id=0)[0]


def print_plan(script, config, file=None):
    """What `--plan=True` prints for sft.py / grpo.py / connector_tune.py: the plan of `config` (the script's
    config dict: init_from, plan_gpus, plan_gpus_per_node, plan_gpu_gb, tp, offload, plan_prompt_tokens) on
    plan_gpus GPUs. Returns the plan dict."""
    gpus = int(config.get("plan_gpus", 1))
    d = plan_run(script, config, model_config(config), gpus=gpus,
                 gpus_per_node=int(config.get("plan_gpus_per_node") or gpus), gpu_gb=float(config.get("plan_gpu_gb",
                                                                                                       80.0)),
                 tp=int(config.get("tp", 1)), offload=bool(config.get("offload", False)),
                 prompt_tokens=int(config.get("plan_prompt_tokens", 0)) or None,
                 images=int(config.get("plan_images", 1)))
    print(format_plan(d), file=file, flush=True)
    return d

# -----------------------------------------------------------------------------
# start-up: sft.py, grpo.py and connector_tune.py refuse what will not fit before they load anything


def device_memory():
    """('cuda', this process's GPU's total memory) or ('cpu', the host RAM per local process), in GB = 2^30 bytes.
    (tests/grpo_patch.py replaces it to fake a GPU of a given size on the CPU.)"""
    if torch.cuda.is_available():
        return "cuda", torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", 0))).total_memory / GB
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return "cpu", ram / GB / int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def startup_check(script, config):
    """The plan's verdict for the run about to start, before anything is loaded: the scripts call it right after
    configure(). The model is built on meta from its config alone (model_config: init_from's config.json, a resumed
    run's model_config.json, sft.py's tiny config), on this machine: WORLD_SIZE processes, LOCAL_WORLD_SIZE per node,
    each with device_memory()'s GB; prompts of plan_prompt_tokens' default length (images x tiles + 512 text tokens).
    activation_checkpointing='auto' is decided here (on when the training step does not fit without it) and written
    into config. Rank 0 prints the verdict, one line. On a GPU a run that does not fit stops here (SystemExit, one
    line: the phase, its biggest term, the changes that fit) unless config['force']; on the CPU the verdict, against
    the host RAM, is only printed. Returns the plan dict, or None when there is nothing to plan from (an init_from
    without config.json, a resume without a checkpoint: the script's own check says so next)."""
    script = os.path.splitext(os.path.basename(script))[0]
    if script == "sft" and not (config.get("train_vit", True) or config.get("train_llm", True)):
        script = "connector_tune"
    kind, gb = device_memory()
    cuda = kind == "cuda"
    world = int(os.environ.get("WORLD_SIZE", 1))
    say = (lambda m: print(m, flush=True)) if int(os.environ.get("RANK", 0)) == 0 else (lambda m: None)
    try:
        cfg = model_config(config)
    except (FileNotFoundError, OSError):
        if config.get("activation_checkpointing") == "auto":
            config["activation_checkpointing"] = False
        return None
    d = plan_run(script, config, cfg, gpus=world, gpus_per_node=int(os.environ.get("LOCAL_WORLD_SIZE", world)),
                 gpu_gb=gb, tp=int(config.get("tp", 1)), offload=bool(config.get("offload", False)),
                 device=kind, overhead_gb=OVERHEAD_GB if cuda else 0.0, frag=FRAG if cuda else 0.0)
    if config.get("activation_checkpointing") == "auto":
        config["activation_checkpointing"] = bool(d["ac"])
    auto = f"; activation_checkpointing=auto -> {d['ac']}" if d["ac_auto"] else ""
    where = f"{world} x {gb:.1f} GB GPU" if cuda else f"the CPU, {gb:.1f} GB of host RAM per process (not enforced)"
    verdict = d["verdict"][len("plan: "):] if cuda else d["verdict"][len("plan: "):].replace(" per GPU", "")
    if d["fits"] or not cuda or config.get("force"):
        force = " (--force=True: running anyway)" if not d["fits"] and cuda else ""
        say(f"{script}.py memory plan on {where}: {verdict}{auto}{force}")
        return d
    raise SystemExit(f"{script}.py on {where}: {verdict}. Stopped before loading anything "
                     f"(the plan: --plan=True; --force=True runs it anyway)" if int(os.environ.get("RANK", 0)) == 0
                     else 1)  # one line, from rank 0


# -----------------------------------------------------------------------------
# CLI: python tools/plan.py grpo.py [config files] [--key=value ...] --plan_gpus=8 --plan_gpus_per_node=8 --plan_gpu_gb=80


def script_config(script, argv):
    """A script's config without running it: its module-level literal assignments (the config globals; for
    connector_tune.py, sft.py's with connector_tune's defaults on top), then config files and --key=value flags."""
    import ast
    from plumbing.configurator import configure
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def literals(path):
        out = {}
        for node in ast.parse(open(path).read()).body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                try:
                    out[node.targets[0].id] = ast.literal_eval(node.value)
                except ValueError:
                    pass
        return {k: v for k, v in out.items() if not k.startswith("_")}

    name = os.path.splitext(os.path.basename(script))[0]
    g = literals(os.path.join(root, "sft.py" if name == "connector_tune" else f"{name}.py"))
    if name == "connector_tune":
        g.update(literals(os.path.join(root, "connector_tune.py")))
    keys = [k for k in g]
    return configure(g, argv, keys)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    script, rest = argv[0], [a for a in argv[1:] if a.lower() != "--plan=true"]  # also: sft.py / grpo.py --plan=True
    # the plan's own knobs; a script that has them as config keys (grpo.py: tp, offload, plan_gpus, ...) takes
    # them as usual, otherwise they are read here
    knobs = dict(plan_gpus=8, plan_gpus_per_node=8, plan_gpu_gb=80.0, tp=1, offload=False, plan_prompt_tokens=0,
                 plan_images=1)
    base = script_config(script, [])
    own = [a for a in rest if a.startswith("--") and a[2:].split("=")[0] in knobs and a[2:].split("=")[0] not in base]
    from plumbing.configurator import configure
    extra = configure(dict(knobs), own)
    config = script_config(script, [a for a in rest if a not in own])
    for k, v in extra.items():
        config.setdefault(k, v)
        if any(a.startswith(f"--{k}=") for a in own):
            config[k] = v
    stage = os.path.splitext(os.path.basename(script))[0]
    if stage == "sft" and not (config.get("train_vit", True) or config.get("train_llm", True)):
        stage = "connector_tune"  # connector_tune.py runs as sft.py with itself as the first config file
    print_plan(stage, config)


if __name__ == "__main__":
    main()
