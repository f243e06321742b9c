"""
The model in a training run: built (from scratch, a checkpoint to resume, or a local Hugging Face directory),
frozen by tower, activation-checkpointed and sharded with FSDP2; atomic, resumable, sharded checkpoints
(torch.distributed.checkpoint, "DCP"); the Hugging Face export; the disk check. Collectives where they say so.

    model, n_params, n_train = build_model(init_from, tok, device, fsdp=ddp or device.type == "cuda",
        train=(train_vit, train_connector, train_llm), activation_checkpointing=..., param_dtype=torch.bfloat16)
    if init_from == "resume": step, state, _ = load_checkpoint(latest_checkpoint(out_dir), model, optimizer)
    ... save_checkpoint(out_dir, step, model, optimizer, state, config, keep_last=K) ...
    export_hf(model, out_dir + "/hf", tok, dtype=torch.bfloat16)
Multi-node: out_dir must be on a filesystem every node sees (DCP writes one file per rank into it).
"""
import dataclasses
import functools
import json
import os
import random
import re
import shutil
import types
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from model import VLM, VLMConfig, config_from_dict
from plumbing.dist import agree_min, barrier, print0, rank, set_offload_threads, together
from plumbing.hf import (checkpoint_plan, load_config, load_pretrained, read_checkpoint_tensors, write_hf_checkpoint,
                         write_hf_processor)
from plumbing.run import write_env

# single-process DCP (no_dist=True) is intended here; DCP warns about it on every save and load
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

# -----------------------------------------------------------------------------
# Disk. A run that fills the disk at its 5th checkpoint loses hours; say so before step 0.

def checkpoint_bytes(n_params, n_trainable, param_bytes=4, n_optim_states=2, state_bytes=4):
    """Bytes of one save_checkpoint directory (all shards together): every state-dict entry, frozen ones too, in
    the master dtype (fp32), plus AdamW's exp_avg and exp_avg_sq (fp32) for every trainable parameter. Count before
    sharding. n_params: sum(t.numel() for t in model.state_dict().values()) (works on meta; a tied lm_head counts
    twice, as DCP writes it under both names); n_trainable: set_trainable's count. Not counted: ~1.5 KB of framing
    per tensor, the DCP metadata, RNG and JSON files (KBs to a few MB for a real model)."""
    return n_params * param_bytes + n_trainable * n_optim_states * state_bytes


def check_disk(out_dir, bytes_per_checkpoint, n_checkpoints):
    """Collective, before training: compare n_checkpoints x bytes_per_checkpoint with the free space of out_dir's
    filesystem (the smallest over the ranks). Warns on rank 0 if they do not all fit; raises on every rank if not
    even one does. n_checkpoints: keep_last + 1 (a save writes the new checkpoint before it prunes the oldest), or
    every save of the run when nothing is pruned. Returns the free bytes."""
    path = os.path.abspath(out_dir)
    while not os.path.exists(path):  # out_dir may not exist yet: its filesystem is its nearest existing parent's
        path = os.path.dirname(path)
    free = agree_min(shutil.disk_usage(path).free)
    gb = lambda b: f"{b / 1e9:.1f} GB"
    need = bytes_per_checkpoint * n_checkpoints
    if bytes_per_checkpoint > free:  # the run's first save would fail: say so now, not after hours of training
        raise RuntimeError(f"check_disk: one checkpoint needs {gb(bytes_per_checkpoint)} but {out_dir} has only "
                           f"{gb(free)} free (a resumable checkpoint holds every weight in the master dtype and the "
                           f"AdamW state of the trainable ones: 12 bytes per trainable fp32 parameter, ~96 GB at 8B; "
                           f"a GPU run's HF export is bf16, 2 bytes per parameter): free space, or point out_dir at a "
                           f"larger filesystem")
    if need > free:
        print0(f"check_disk: WARNING {n_checkpoints} checkpoints x {gb(bytes_per_checkpoint)} = {gb(need)}, but "
               f"{out_dir} has {gb(free)} free: the run will stop at a save once the disk fills (lower keep_last, "
               f"save less often, or free space)")
    return free


# -----------------------------------------------------------------------------
# freezing, FSDP2 and activation checkpointing

def set_trainable(model, train_vit, train_connector, train_llm):
    """Freeze/unfreeze model.vit / model.connector / model.llm by name; returns the trainable param count.
    Call before apply_fsdp (after it, numel() counts only this rank's shard)."""
    switch = {"vit": train_vit, "connector": train_connector, "llm": train_llm}
    for name, p in model.named_parameters():  # shared (tied) params appear once
        top = name.split(".")[0]
        if top not in switch:
            raise ValueError(f"plumbing/checkpoint.py set_trainable: parameter '{name}' is under model.{top}, "
                             f"not vit/connector/llm; cannot decide whether to train it")
        p.requires_grad_(bool(switch[top]))
        if not p.requires_grad:
            p.grad = None  # a frozen param holds no gradient (and so no optimizer state)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _vit_blocks(model):
    """The ViT's list of transformer blocks: model.vit.blocks, else its only nn.ModuleList."""
    blocks = getattr(model.vit, "blocks", None)
    if isinstance(blocks, nn.ModuleList):
        return blocks
    lists = [m for m in model.vit.modules() if isinstance(m, nn.ModuleList)]
    if len(lists) != 1:
        raise ValueError(f"plumbing/checkpoint.py: cannot find the ViT blocks: model.vit has no 'blocks' ModuleList "
                         f"and {len(lists)} ModuleLists")
    return lists[0]


def _checkpointed_forward(self, *args, **kwargs):
    # the class's own forward, recomputed in backward; nothing to save when no grad is needed (sampling)
    forward = functools.partial(type(self).forward, self)
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(model):
    """Recompute each ViT and LLM block in backward. Call before apply_fsdp.
    Each block's forward is overridden on the instance (no wrapper module), so parameter names, state
    dicts and HF export are unchanged, and copy.deepcopy(model) keeps working."""
    for block in [*_vit_blocks(model), *model.llm.blocks]:
        block.forward = types.MethodType(_checkpointed_forward, block)  # idempotent
    return model


def apply_fsdp(model, param_dtype=None, reduce_dtype=torch.float32, reshard_after_forward=True, offload=False):
    """FSDP2 (torchtitan idiom): each ViT block as a unit, then model.vit (what is left of the ViT: patch
    embedding, cls, positions, final norm), each LLM block as a unit, then the root (connector, embeddings, final
    norm, lm_head; a tied lm_head.weight stays wte.weight).
    bf16 compute + fp32 gradient reduction when param_dtype=torch.bfloat16. Units may mix frozen and
    trainable params (FSDP2 reduce-scatters only gradients that exist). Works on a model built on the meta
    device (then to_empty() and fill it, as build_model does). offload=True: CPUOffloadPolicy, the fp32 shards,
    their gradients and the AdamW state live on the CPU (pinned on GPU machines); the GPU holds the unit being
    gathered plus activations."""
    if not dist.is_initialized():
        raise RuntimeError("plumbing/checkpoint.py apply_fsdp: torch.distributed is not initialised; "
                           "launch with torchrun and call compute_init() first")
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    kw = dict(mesh=mesh, reshard_after_forward=reshard_after_forward)
    if param_dtype is not None:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    if offload:  # pinned host memory only exists with CUDA
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
        set_offload_threads()  # the optimizer step runs on the host: not on torchrun's one thread per rank
    # a unit per ViT block too: as one unit, InternViT-6B (5.5B params) would hold its whole gathered bf16 weights,
    # bf16 grads and fp32 reduce-scatter input at once in backward (~31 GB per GPU, the peak of a 38B run)
    for block in _vit_blocks(model):
        fully_shard(block, **kw)
    fully_shard(model.vit, **kw)
    for block in model.llm.blocks:
        fully_shard(block, **kw)
    # the root (embeddings, lm_head, connector, final norm) stays gathered from forward to backward, as torchtitan
    # does: resharded after forward, it would be all-gathered again at once for every micro-batch's backward
    fully_shard(model, **dict(kw, reshard_after_forward=False))
    return model


# -----------------------------------------------------------------------------
# checkpoints: out_dir/ckpt_{step:07d}/ = DCP shards (model + optimizer) + state.json + model_config.json
# + rank{r}.pt (that rank's RNG state and rank-local training state), written under .tmp_ckpt_{step:07d}/ and renamed
# into place only when complete.

_CKPT_RE = re.compile(r"^ckpt_(\d{7,})$")


def _rng_state():
    s = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state()  # this process's current device
    return s


def _set_rng_state(s):
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def _write_json(path, obj):
    with open(path, "w") as f:
        f.write(obj)
        f.flush()
        os.fsync(f.fileno())


def list_checkpoints(out_dir):
    """Complete checkpoints in out_dir, oldest first (temporary .tmp_* dirs are never listed)."""
    if not os.path.isdir(out_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(out_dir)
             if (m := _CKPT_RE.match(name)) and os.path.isdir(os.path.join(out_dir, name))]
    return [os.path.join(out_dir, name) for _, name in sorted(found)]


def latest_checkpoint(out_dir):
    """Path of the newest complete ckpt_* in out_dir, or None."""
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


def save_checkpoint(out_dir, step, model, optimizer, state, config, keep_last=None, rank_state=None):
    """Collective: every rank writes its own shards (nothing is gathered). Returns the checkpoint path.
    state: JSON-serialisable training state (data position, ...); config: the run's config dict; rank_state:
    this rank's own state (e.g. grpo.py's sample buffer), saved beside its RNG and read back as state["rank"]."""
    me = rank()
    final = os.path.join(out_dir, f"ckpt_{step:07d}")
    tmp = os.path.join(out_dir, f".tmp_ckpt_{step:07d}")
    # serialise first, on every rank, so bad input fails everywhere before any collective
    try:
        meta = json.dumps({"step": step, "state": state, "config": config}, indent=2)
    except TypeError as e:
        raise TypeError(f"plumbing/checkpoint.py save_checkpoint: state/config must be JSON-serialisable: {e}") from e
    cfg = getattr(model, "cfg", None)
    if not dataclasses.is_dataclass(cfg):
        raise TypeError(f"plumbing/checkpoint.py save_checkpoint: model.cfg must be the model's config dataclass, "
                        f"got {type(cfg).__name__}")
    model_cfg = json.dumps(dataclasses.asdict(cfg), indent=2)
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"plumbing/checkpoint.py save_checkpoint: keep_last must be >= 1 or None, got {keep_last}")

    if me == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save of this step
        os.makedirs(tmp)
    barrier()
    # sharded state dicts: DTensor shards under FSDP2, plain tensors in a single process
    if optimizer is None:
        sd = {"model": get_model_state_dict(model)}
    else:
        msd, osd = get_state_dict(model, optimizer)
        sd = {"model": msd, "optim": osd}
    dcp.save(sd, checkpoint_id=tmp, no_dist=not dist.is_initialized())
    torch.save({"rng": _rng_state(), "state": rank_state}, os.path.join(tmp, f"rank{me}.pt"))
    if me == 0:
        _write_json(os.path.join(tmp, "state.json"), meta)
        _write_json(os.path.join(tmp, "model_config.json"), model_cfg)
        write_env(tmp)
    barrier()  # every rank's files are in tmp

    if me == 0:
        # the rename is the commit point: a crash before it leaves only .tmp_*, which is ignored
        if os.path.exists(final):  # re-saving a step (e.g. after a resume): swap, then drop the old one
            old = os.path.join(out_dir, f".tmp_old_ckpt_{step:07d}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        if keep_last is not None:
            for path in list_checkpoints(out_dir)[:-keep_last]:
                shutil.rmtree(path)
    barrier()  # nobody reads or prunes before the checkpoint is in place
    return final


def load_checkpoint(path, model, optimizer=None):
    """Collective: restore model (and optimizer) from a checkpoint written by save_checkpoint, resharding
    to the current layout, and this rank's RNG. Returns (step, state, config); state["rank"] is the rank_state this
    rank saved, if it saved one."""
    state_path = os.path.join(path, "state.json")
    if not os.path.isfile(state_path):
        raise FileNotFoundError(f"plumbing/checkpoint.py load_checkpoint: {state_path} missing: '{path}' is not a complete "
                                f"checkpoint written by save_checkpoint")
    with open(state_path) as f:
        meta = json.load(f)
    if optimizer is None:
        sd = {"model": get_model_state_dict(model)}
    else:
        msd, osd = get_state_dict(model, optimizer)  # the layout to load into (initialises Adam state)
        sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=path, no_dist=not dist.is_initialized())
    if optimizer is None:
        set_model_state_dict(model, sd["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])

    rng_path = os.path.join(path, f"rank{rank()}.pt")
    if not os.path.isfile(rng_path) and os.path.isfile(os.path.join(path, f"rng_rank{rank()}.pt")):
        rng_path = os.path.join(path, f"rng_rank{rank()}.pt")  # written before session 4: the RNG state alone
    if os.path.isfile(rng_path):
        saved = torch.load(rng_path, weights_only=False)  # our own file; numpy state needs pickle
        saved = saved if "rng" in saved else {"rng": saved, "state": None}
        _set_rng_state(saved["rng"])
        if saved["state"] is not None:
            meta["state"]["rank"] = saved["state"]
    else:  # resumed on more ranks than saved: weights and optimizer reshard, RNG streams cannot
        print(f"plumbing/checkpoint.py load_checkpoint: WARNING rank {rank()}: {rng_path} missing "
              f"(checkpoint saved with fewer ranks); this rank keeps its current RNG state")
    return meta["step"], meta["state"], meta["config"]


def _full_tensor(p):
    """A parameter's full value, on every rank: all-gathered when it is an FSDP2 shard (a DTensor)."""
    if not isinstance(p, DTensor):
        return p.detach()
    local = p.to_local()
    if local.device.type != p.device_mesh.device_type:  # a CPU-offloaded shard: gather on the mesh's device
        p = DTensor.from_local(local.to(p.device_mesh.device_type), p.device_mesh, p.placements, shape=p.shape,
                               stride=p.stride())
    return p.full_tensor().detach()


@torch.no_grad()
def export_hf(model, out_dir, tok=None, dtype=None, system=""):
    """Collective: write the transformers-native HF layout into out_dir on rank 0 (it loads in VLM.from_pretrained
    and transformers' InternVLForConditionalGeneration), plus, given the tokenizer, its files and the processor's
    (plumbing/hf.py write_hf_processor: AutoProcessor.from_pretrained(out_dir) works). Parameters are gathered one
    at a time, never the whole model on one host, and cast to `dtype` (torch.bfloat16 for GPU runs; None: as
    stored, i.e. the fp32 masters); rank 0 writes <= 5 GB safetensors shards as they fill. Peak memory: one shard
    + one tensor on rank 0's host, the local shard + one full tensor on every device. A failure on rank 0 (disk
    full, ...) still lets the other ranks finish the gathers, then raises on every rank. system: the system message the
    run trained with, written into the chat template as its default system turn ('': none)."""
    me = rank()

    def gathered():  # the same collectives in the same order on every rank
        params = list(model.named_parameters())  # a tied lm_head is wte's parameter: listed once
        for name, p in tqdm(params, desc=f"export {out_dir}", unit="tensor", disable=me != 0, leave=False):
            t = _full_tensor(p)
            yield name, (t.to("cpu", dtype or t.dtype) if me == 0 else None)

    stream = gathered()

    def write():
        try:
            if me == 0:
                write_hf_checkpoint(out_dir, model.cfg, stream)
                if tok is not None:
                    write_hf_processor(out_dir, model.cfg, tok, system)
                write_env(out_dir)
        finally:  # a failed write still finishes the gathers, so no rank is left waiting; then all raise
            for _ in stream:
                pass

    together(write, f"export_hf({out_dir!r})")
    print0(f"exported {out_dir}")
    barrier()


# -----------------------------------------------------------------------------
# building the model, and loading one for inference

def open_tokenizer(path):
    """AutoTokenizer.from_pretrained(path) for this project's tokenizers (Qwen2's BPE, the synthetic one):
    trust_remote_code=False: an original-layout directory's config.json names remote code for the MODEL
    (InternVLChatModel / SkyworkChatModel), never needed for the tokenizer, and without the flag transformers asks
    on stdin whether to run it; fix_mistral_regex=False: transformers 5.17 (not 5.25) takes a tokenizer of > 100k
    tokens beside a config.json without transformers_version (InternVL3's and R1V3's original configs) for a broken
    Mistral one and warns "incorrect regex pattern ... incorrect tokenization"; Qwen's regex is the right one.
    An original-layout directory (model_type internvl_chat / skywork_chat, unknown to transformers) gets an empty
    config passed in: AutoTokenizer would otherwise read its config.json and warn "You are using a model of type
    `internvl_chat` to instantiate a model of type ``" on every load (its tokenizer_config.json names the class)."""
    from transformers import AutoTokenizer, PretrainedConfig
    kw = {}
    cfg = os.path.join(path, "config.json")
    if os.path.isfile(cfg):
        with open(cfg) as f:
            if json.load(f).get("model_type") in ("internvl_chat", "skywork_chat"):
                kw["config"] = PretrainedConfig()
    return AutoTokenizer.from_pretrained(path, trust_remote_code=False, fix_mistral_regex=False, **kw)


def load_tokenizer(tokenizer, init_from, resume_path=None):
    """The tokenizer directory: explicit > the one a resumed run used > the init_from HF directory > the tiny
    synthetic one (training from scratch)."""
    path = tokenizer
    if not path and resume_path:
        with open(os.path.join(resume_path, "state.json")) as f:
            path = json.load(f)["state"].get("tokenizer", "")
    if not path:
        path = init_from if init_from not in ("scratch", "resume") else "data/synth/tokenizer"
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path!r} not found (set --tokenizer=DIR)")
    return open_tokenizer(path)


def build_model(init_from, tok, device, *, resume_path=None, scratch=None, fsdp=False, train=(True, True, True),
                activation_checkpointing=False, param_dtype=None, offload=False, master_dtype=torch.float32):
    """The policy, frozen/unfrozen (train = (vit, connector, llm)), activation-checkpointed and, with fsdp=True,
    sharded. Returns (model, n_params, n_trainable), both counted on the full model before sharding.
    init_from: 'scratch' (a VLMConfig from `scratch` + the tokenizer's vocabulary and <IMG_CONTEXT> id, fresh
    init), 'resume' (the architecture saved beside resume_path; its weights come from load_checkpoint, which the
    caller runs next) or a local HF directory (either layout; InternVL3 / Skywork-R1V3 / our own exports).
    Without FSDP (one process): the model in fp32 on `device`, as VLM.from_pretrained loads it.
    With FSDP, an HF directory is never held whole by any rank: the model is built on the meta device, frozen,
    activation-checkpointed, sharded (apply_fsdp: param_dtype for compute, offload -> CPUOffloadPolicy) and
    allocated (to_empty: fp32 masters, only this rank's shard); then rank 0 reads one FSDP unit at a time (each
    ViT block, the rest of the ViT, each LLM block, the root) through the checked key map and set_model_state_dict
    broadcasts it into every rank's shard. Peak host memory: rank 0 one unit in the checkpoint's dtype, every rank
    its shard; device: shard + one tensor. A bad checkpoint (missing / unexpected / mis-shaped tensor) is found on
    rank 0 before anything is read and raises on every rank, naming the tensor.
    master_dtype: the dtype the parameters are stored (and trained) in: fp32 masters by default; torch.bfloat16
    (plumbing/optim.py, issue 20) stores them, and so their FSDP2 gradient shards, in bf16, with a bf16 compute
    dtype under FSDP2 whatever param_dtype says and the gradients still reduce-scattered in fp32 (reduce_dtype)."""
    device = torch.device(device)
    if offload and not fsdp:
        raise ValueError("plumbing/checkpoint.py build_model: offload=True needs fsdp=True (FSDP2's CPUOffloadPolicy)")

    def config():
        if init_from == "resume":
            with open(os.path.join(resume_path, "model_config.json")) as f:
                return config_from_dict(json.load(f)), None
        if init_from == "scratch":
            img_id = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
            if img_id is None or img_id == tok.unk_token_id:
                raise ValueError(f"tokenizer {tok.name_or_path} has no <IMG_CONTEXT> token")
            return VLMConfig(vocab_size=len(tok), image_token_id=img_id, **(scratch or {})), None
        if not os.path.isdir(init_from):
            raise FileNotFoundError(f"init_from={init_from!r}: not 'scratch', 'resume' or a local model directory")
        return load_config(init_from)

    # every rank reads the config; one that cannot (a node without the directory) stops them all
    cfg, layout = together(config, "build_model")
    hf = init_from not in ("scratch", "resume")
    on_meta = fsdp and init_from != "scratch"
    if on_meta and hf:  # rank 0 matches the checkpoint against the config before anything is allocated or read
        plan = together(lambda: checkpoint_plan(init_from, cfg, layout) if rank() == 0 else None,
                        f"loading {init_from}")

    if not on_meta:  # one process, or a tiny from-scratch model: built whole, then sharded
        if hf:
            model = load_pretrained(init_from, device=device)
        else:  # every rank draws the same init (same seed); a resumed one is overwritten by load_checkpoint
            model = VLM(cfg).to(device)
    else:
        with torch.device("meta"):  # shapes only
            model = VLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())  # a tied lm_head counts once
    if master_dtype != torch.float32:  # before sharding: FSDP2 shards (and to_empty allocates) in the params' dtype
        model.to(master_dtype)
        param_dtype = master_dtype  # FSDP2: no cast to gather (param_dtype == the params'), reduce in fp32
    n_trainable = set_trainable(model, *train)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if not fsdp:
        return model, n_params, n_trainable
    apply_fsdp(model, param_dtype=param_dtype, offload=offload)
    if on_meta:
        model.to_empty(device="cpu" if offload else device)  # this rank's fp32 shards, uninitialised
        model.llm.tie_weights()
        if hf:
            _load_hf_sharded(model, init_from, plan)
        else:  # resume: defined values until load_checkpoint overwrites them
            with torch.no_grad():
                for p in model.parameters():
                    p.zero_()
    return model, n_params, n_trainable


def _fsdp_units(model):
    """Parameter names grouped by FSDP unit, in module order: every fully_shard-ed module owns its parameters
    except those of the units inside it (apply_fsdp: each ViT block, the rest of the ViT, each LLM block, the root)."""
    owners = [prefix for prefix, m in model.named_modules() if isinstance(m, FSDPModule)] or [""]
    units = {}
    for name, _ in model.named_parameters():  # a tied lm_head is wte's parameter: listed once
        owner = max((o for o in owners if not o or name.startswith(o + ".")), key=len)
        units.setdefault(owner, []).append(name)
    return list(units.values())


def _load_hf_sharded(model, path, plan):
    """Collective: fill the FSDP shards of `model` (allocated, not initialised) from the HF checkpoint `path`,
    whose checkpoint_plan rank 0 holds (already checked: names and shapes). Rank 0 reads one unit at a time and
    set_model_state_dict(full_state_dict, broadcast_from_rank0, strict=False) broadcasts it tensor by tensor; each
    rank copies its slice into its shard, casting to the shard's dtype (fp32). The other ranks pass {}; strict=False
    leaves the parameters outside the unit as they are. Any failure on rank 0 raises on every rank."""
    units = _fsdp_units(model)
    assert sorted(n for u in units for n in u) == sorted(n for n, _ in model.named_parameters())
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    for names in units:  # read as stored (bf16 for real checkpoints): half the host memory and traffic of fp32
        part = together(lambda: read_checkpoint_tensors(plan, names) if rank() == 0 else {}, f"loading {path}")
        set_model_state_dict(model, part, options=opts)
        del part


def load_inference_model(path, device, dtype=torch.float32, tokenizer=""):
    """A model + tokenizer for generation from any of: a local HF directory (config.json), a project checkpoint
    ckpt_XXXXXXX/ (sharded DCP, model weights only), or a training out_dir (its hf/ export if present, else its
    latest checkpoint). Single process."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {path!r} not found")
    if not os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(os.path.join(path, "state.json")):
        if os.path.isfile(os.path.join(path, "hf", "config.json")):
            path = os.path.join(path, "hf")
        elif latest_checkpoint(path):
            path = latest_checkpoint(path)
        else:
            raise FileNotFoundError(f"{path}: neither an HF model directory, a ckpt_* checkpoint, nor an out_dir "
                                    "holding one")
    if os.path.isfile(os.path.join(path, "config.json")):
        model = load_pretrained(path, dtype=dtype, device=device)
        tok_path = tokenizer or path
    else:
        with open(os.path.join(path, "model_config.json")) as f:
            model = VLM(config_from_dict(json.load(f))).to(device=device, dtype=dtype)
        sd = {"model": get_model_state_dict(model)}
        dcp.load(sd, checkpoint_id=path, no_dist=not dist.is_initialized())
        set_model_state_dict(model, sd["model"])
        with open(os.path.join(path, "state.json")) as f:
            tok_path = tokenizer or json.load(f)["state"].get("tokenizer", "")
    if not tok_path or not os.path.isdir(tok_path):
        raise FileNotFoundError(f"{path}: no tokenizer found (pass tokenizer=DIR)")
    return model.eval(), open_tokenizer(tok_path), path

