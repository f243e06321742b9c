"""
Tensor-parallel rollouts (issue #12): a group of K consecutive ranks shares one copy of the policy for generation,
so a 38B model's bf16 weights need not fit on every GPU. Only torch.distributed, in the style of gpt-fast's tp.py
(an all-reduce in forward hooks); model.py and sampler.py stay free of it.

Per rank of a TP group (the layout README "Real scale" describes), a plain model.VLM built from a narrowed VLMConfig
(n_head/K, n_kv_head/K, mlp_hidden/K, head_dim explicit) holding
  q/k/v (+ bias), gate/up   the rank's 1/K of the OUTPUT rows: whole heads (K divides n_kv_head, so the query heads
                            of a kv head sit on the same rank: GQA's j // G stays local) and 1/K of the MLP width
  o_proj, down_proj         the matching 1/K of the INPUT columns; their outputs are partial sums, all-reduced
                            (SUM over the group) by a forward hook: 2 all-reduces per layer
  everything else           full copies: wte, lm_head, the final and block norms, the connector, the ViT
                            (InternViT-6B's 25 heads do not split 8 ways; its 12 GB bf16 fit)
The logits are then bitwise the same on every rank of the group (the all-reduce gives every rank the same bits), and
the sampler seeds each prompt, so every rank draws the same tokens: sampler.generate runs unchanged on the TP model,
its DecodeCache (sized by cfg.n_kv_head) holding n_kv_head/K heads per rank, the decode kernels seeing fewer heads.

    grpo.py        with tp_rollout_model(model, group) as policy: ...   # from the FSDP2 shards, once per phase
    eval.py ...    group, rank, device = init_tp(tp); model, tok, path = load_tp_inference_model(init_from, group, ...)
    a group's prompts: idx, seeds, mine = tp_union(group, idx, seeds)    # generate the union, keep rows[mine]
"""
import hashlib
import os
from contextlib import contextmanager
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn as nn

from model import VLM

# the dim of an LLM block's parameter that TP splits (nn.Linear weights are (out, in)); anything else is replicated
SPLIT = {"attn.q_proj.weight": 0, "attn.q_proj.bias": 0, "attn.k_proj.weight": 0, "attn.k_proj.bias": 0,
         "attn.v_proj.weight": 0, "attn.v_proj.bias": 0, "attn.o_proj.weight": 1,
         "mlp.gate_proj.weight": 0, "mlp.up_proj.weight": 0, "mlp.down_proj.weight": 1}


def split_dim(name):
    """The dim TP splits parameter `name` (our names, llm.blocks.<i>.<...>) along, or None: replicated."""
    parts = name.split(".")
    return SPLIT.get(".".join(parts[3:])) if parts[:2] == ["llm", "blocks"] else None


def check_tp(cfg, K, world_size):
    """Clear errors for a TP degree that cannot work, before anything is allocated."""
    if K < 1 or world_size % K:
        raise ValueError(f"tp.py: tp={K} must divide the {world_size} processes (TP groups are K consecutive ranks)")
    for what in ("n_head", "n_kv_head", "mlp_hidden"):
        if getattr(cfg, what) % K:
            raise ValueError(f"tp.py: tp={K} must divide the model's {what}={getattr(cfg, what)} (each rank holds "
                             f"{what}/tp of every LLM block)")


def tp_config(cfg, K):
    """The VLMConfig of one rank's TP model: 1/K of the heads, kv heads and MLP width; everything else equal."""
    return replace(cfg, n_head=cfg.n_head // K, n_kv_head=cfg.n_kv_head // K, mlp_hidden=cfg.mlp_hidden // K,
                   head_dim=cfg.head_dim)


def tp_slice(name, t, K, r):
    """Rank r's part of the full tensor t of parameter `name` (a view): the r-th of K equal blocks along its split
    dim, or t itself when it is replicated."""
    d = split_dim(name)
    if d is None:
        return t
    n = t.shape[d] // K
    return t.narrow(d, r * n, n)

# -----------------------------------------------------------------------------
# process groups


_GROUPS = {}  # K -> this rank's TP group
WARM_NUMEL = (1, 1 << 22)  # the warm-up all-reduces: one tiny, one of 8 MB in bf16 (NCCL may pick another algorithm)


def warm_group(group):
    """Collective over `group`: all-reduces that make its communicator allocate what it allocates on first use. NCCL
    sets a communicator up lazily (at the first collective; since NCCL 2.22 it also connects the peers of an
    algorithm only when a collective first needs it), and those buffers live outside PyTorch's caching allocator, so
    torch.cuda.mem_get_info drops by them at the first TP forward: after sampler.memory_budget measured the free
    memory the rollout then fills. Warming the group when it is made moves that allocation before any budget."""
    nccl = "nccl" in str(dist.get_backend(group)).lower() and torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    for n in WARM_NUMEL if nccl else WARM_NUMEL[:1]:  # (gloo allocates nothing on a GPU)
        dist.all_reduce(torch.zeros(n, dtype=torch.bfloat16 if nccl else torch.float32, device=device), group=group)
    if nccl:
        torch.cuda.synchronize(device)


def tp_group(K):
    """Collective: this rank's TP group, ranks [K * (rank // K), K * (rank // K) + K), its communicator warmed
    (warm_group) before anything measures free memory. dist.new_group must be called by every rank for every group,
    in the same order, so every rank creates all of them. Cached per K."""
    if K not in _GROUPS:
        W, rank = dist.get_world_size(), dist.get_rank()
        if W % K:
            raise ValueError(f"tp.py: tp={K} must divide the {W} processes")
        for g in range(W // K):
            ranks = list(range(g * K, (g + 1) * K))
            pg = dist.new_group(ranks)
            if rank in ranks:
                _GROUPS[K] = pg
        warm_group(_GROUPS[K])  # every group warms at once: each rank all-reduces on its own group only
    return _GROUPS[K]


def init_tp(tp, seed=0):
    """eval.py, entropy.py and sample.py under torchrun: init the process group (plumbing.compute_init) with
    the tp ranks as the whole world, one TP group. Returns (group, rank, device)."""
    from plumbing import compute_init
    _, rank, _, world, device = compute_init(seed)
    if world != tp:
        raise SystemExit(f"tp={tp} needs torchrun --nproc_per_node={tp} (one TP group of all the processes); "
                         f"this run has {world} process(es)")
    return tp_group(tp), rank, device


def tp_union(group, *lists):
    """Collective over the TP group: each list concatenated over the group's ranks (in rank order), and the slice of
    this rank's own entries in them. Only these small lists travel (item indices, seeds), never pixels: every rank
    encodes the union's images itself."""
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, [list(x) for x in lists], group=group)
    start = sum(len(p[0]) for p in parts[:dist.get_rank(group)])
    union = [sum((p[i] for p in parts), []) for i in range(len(lists))]
    return (*union, slice(start, start + len(lists[0])))


def check_same(group, *xs):
    """Collective over the TP group: raise unless xs (the sampled tokens, the texts) are the same on all its ranks.
    They are as long as the all-reduce gives every rank the same bits (NCCL's ring and tree do, gloo does); a
    violation would silently mix different sequences in the partial sums, so it is an error."""
    h = hashlib.sha1()
    for x in xs:
        h.update(x.detach().cpu().contiguous().numpy().tobytes() if torch.is_tensor(x) else repr(x).encode())
    seen = [None] * dist.get_world_size(group)
    dist.all_gather_object(seen, h.hexdigest(), group=group)
    if len(set(seen)) != 1:
        raise RuntimeError("tp.py: the ranks of a TP group sampled different tokens (the all-reduce did not give "
                           "every rank the same logits); the rollouts would be corrupt")

# -----------------------------------------------------------------------------
# the TP model


def _empty_tp_model(cfg, group):
    """The narrowed VLM on the meta device, with the all-reduce after o_proj and down_proj."""
    K = dist.get_world_size(group)
    with torch.device("meta"):
        m = VLM(tp_config(cfg, K))
    # a row-split Linear's output is a partial sum over its input columns: SUM it over the group, in place (the
    # rollouts run without gradients; gpt-fast does the same with a functional collective)
    def all_reduce(module, inputs, out):
        dist.all_reduce(out, group=group)
        return out

    for block in m.llm.blocks:
        assert block.attn.o_proj.bias is None and block.mlp.down_proj.bias is None  # a bias would be summed K times
        block.attn.o_proj.register_forward_hook(all_reduce)
        block.mlp.down_proj.register_forward_hook(all_reduce)
    return m


def _put(m, name, t, device, dtype):
    # a fresh, contiguous copy of t (often a strided view into a gathered unit) as parameter `name` of m
    out = torch.empty(t.shape, dtype=dtype or t.dtype, device=device or t.device)
    out.copy_(t)
    mod, _, attr = name.rpartition(".")
    setattr(m.get_submodule(mod), attr, nn.Parameter(out, requires_grad=False))


def _finish(m):
    m.llm.tie_weights()  # a tied lm_head is wte's parameter (named_parameters lists it once)
    left = [n for n, p in m.named_parameters() if p.is_meta]
    assert not left, f"tp.py: TP model parameters never filled: {left[:5]}"
    return m.eval()


@torch.no_grad()
def tp_model_from(model, group, device=None, dtype=None):
    """One rank's TP model made from `model`: an FSDP2 model (plumbing.apply_fsdp), streamed unit by unit (each ViT
    block, the rest of the ViT, each LLM block, the root): unit.unshard(), copy this rank's slices (the full tensors
    for the replicated parts), unit.reshard(); peak = the TP model + one gathered unit. The gathered weights are in
    FSDP's param_dtype (bf16 on a GPU) and on the compute device, CPU-offloaded shards included (FSDP2 copies them to
    the device to gather).
    A plain model (full weights on every rank) is sliced directly. device / dtype: default the gathered weights'."""
    from torch.distributed.fsdp import FSDPModule
    K, r = dist.get_world_size(group), dist.get_rank(group)
    check_tp(model.cfg, K, dist.get_world_size())
    m = _empty_tp_model(model.cfg, group)
    units = [(prefix, u) for prefix, u in model.named_modules() if isinstance(u, FSDPModule)] or [("", None)]
    owned = {p: [] for p, _ in units}  # a unit owns its parameters except those of the units inside it
    for n, _ in model.named_parameters():  # a tied lm_head is wte's: listed once
        owned[max((p for p in owned if not p or n.startswith(p + ".")), key=len)].append(n)
    for prefix, unit in units:  # every rank, the same units in the same order (the all-gathers are collectives)
        if unit is not None:
            unit.unshard()  # this unit's parameters are now the gathered, plain tensors
        try:
            for n in owned[prefix]:
                _put(m, n, tp_slice(n, model.get_parameter(n), K, r), device, dtype)
        finally:
            if unit is not None:
                unit.reshard()
    return _finish(m)


@contextmanager
def tp_rollout_model(model, group, dtype=None):
    """Collective: for one rollout phase, this rank's TP model made from the FSDP2 model's shards (tp_model_from),
    freed on exit (its storage released even if the caller keeps a reference), before the update."""
    m = tp_model_from(model, group, dtype=dtype)
    try:
        yield m
    finally:
        m.to("meta")  # drops every weight's storage; the next phase builds a fresh one


@torch.no_grad()
def load_tp_model(path, group, device, dtype=torch.float32):
    """One rank's TP model read from an HF directory (either layout, through model.py's checked key map): one tensor
    at a time, as stored, sliced, then cast and copied to `device`; peak host memory = one full tensor (two for the
    embedding of a tied config that also stores lm_head: read_checkpoint_tensors checks they are equal)."""
    from plumbing.hf import checkpoint_plan, load_config, read_checkpoint_tensors
    cfg, layout = load_config(path)
    K, r = dist.get_world_size(group), dist.get_rank(group)
    check_tp(cfg, K, dist.get_world_size())
    plan = checkpoint_plan(path, cfg, layout)  # every name and shape checked before any tensor is read
    m = _empty_tp_model(cfg, group)
    for name in [n for n in plan if n != "__head__"]:
        t = read_checkpoint_tensors(plan, [name])[name]
        _put(m, name, tp_slice(name, t, K, r), device, dtype)
        del t
    return _finish(m)


def load_tp_inference_model(path, group, device, dtype=torch.float32, tokenizer=""):
    """plumbing.load_inference_model for a TP group -> (TP model, tokenizer, resolved path). An HF directory (or an
    out_dir's hf/ export) is read slice by slice (load_tp_model); a ckpt_* checkpoint (sharded DCP) or an out_dir
    holding only those is loaded whole on each rank's host (collective), then sliced."""
    from transformers import AutoTokenizer
    from plumbing import load_inference_model
    hf = next((d for d in (path, os.path.join(path, "hf")) if os.path.isfile(os.path.join(d, "config.json"))), None)
    if hf is None:
        full, tok, resolved = load_inference_model(path, "cpu", dtype, tokenizer)
        return tp_model_from(full, group, device, dtype), tok, resolved
    return load_tp_model(hf, group, device, dtype), AutoTokenizer.from_pretrained(tokenizer or hf), hf
