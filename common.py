"""
The small runtime shared by sft.py, grpo.py and connector_tune.py: process setup that works with and
without torchrun, the LR schedule, freezing towers by name, FSDP2 + activation checkpointing, and
atomic, resumable, sharded checkpoints (torch.distributed.checkpoint, "DCP").

Typical use in a training script:
    ddp, rank, local_rank, world_size, device = compute_init(seed)
    model = VLM(cfg)                                   # or on meta, then load
    set_trainable(model, train_vit, train_connector, train_llm)   # before sharding: counts full params
    if activation_checkpointing: apply_activation_checkpointing(model)  # before fully_shard
    if ddp: apply_fsdp(model, param_dtype=torch.bfloat16 if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], ...)
    if init_from == "resume": step, state, _ = load_checkpoint(latest_checkpoint(out_dir), model, optimizer)
    ... save_checkpoint(out_dir, step, model, optimizer, state, config, keep_last=K) ...
    export_hf(model, out_dir + "/hf", tok); compute_cleanup()
Multi-node: out_dir must be on a filesystem every node sees (DCP writes one file per rank into it).
"""

import os
import re
import json
import math
import random
import shutil
import types
import warnings
import dataclasses
import functools
from contextlib import nullcontext
from datetime import timedelta

import numpy as np
import torch
import torch.nn as nn
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict)
from torch.utils.checkpoint import checkpoint

# single-process DCP (no_dist=True) is intended here; DCP warns about it on every save and load
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

# -----------------------------------------------------------------------------
# process setup

def _dist_env():
    """(ddp, rank, local_rank, world_size) from the torchrun environment; single process without it."""
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def compute_init(seed=1337, timeout_s=1800):
    """Init torch.distributed when launched by torchrun (NCCL on CUDA, gloo on CPU), pick the device, seed."""
    ddp, rank, local_rank, world_size = _dist_env()
    if torch.cuda.is_available():
        # one GPU per process; set it before the process group so NCCL binds the right device
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if ddp and not dist.is_initialized():
        # the timeout covers the longest gap between collectives (checkpoint writes, rollouts, HF export)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    # same seed on every rank: identical model init; callers shard the data by rank
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    return ddp, rank, local_rank, world_size, device


def compute_cleanup():
    """Tear down the process group if compute_init made one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def print0(*args, **kwargs):
    """print on rank 0 only."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **{"flush": True, **kwargs})  # flushed: logs piped to a file show up as they happen


def autocast_ctx(device):
    """bf16 autocast on CUDA; plain fp32 on CPU (bf16 is slow there)."""
    device = torch.device(device)
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def _rank():
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier():
    if dist.is_initialized():
        dist.barrier()

# -----------------------------------------------------------------------------
# schedule and freezing

def get_lr(step, max_steps, lr, warmup_steps, min_lr=0.0):
    """Linear warmup from lr/warmup_steps to lr over warmup_steps, then cosine decay to min_lr at max_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def set_trainable(model, train_vit, train_connector, train_llm):
    """Freeze/unfreeze model.vit / model.connector / model.llm by name; returns the trainable param count.
    Call before apply_fsdp (after it, numel() counts only this rank's shard)."""
    switch = {"vit": train_vit, "connector": train_connector, "llm": train_llm}
    for name, p in model.named_parameters():  # shared (tied) params appear once
        top = name.split(".")[0]
        if top not in switch:
            raise ValueError(f"common.py set_trainable: parameter '{name}' is under model.{top}, "
                             f"not vit/connector/llm; cannot decide whether to train it")
        p.requires_grad_(bool(switch[top]))
        if not p.requires_grad:
            p.grad = None  # a frozen param holds no gradient (and so no optimizer state)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

# -----------------------------------------------------------------------------
# FSDP2 and activation checkpointing

def _vit_blocks(model):
    """The ViT's list of transformer blocks: model.vit.blocks, else its only nn.ModuleList."""
    blocks = getattr(model.vit, "blocks", None)
    if isinstance(blocks, nn.ModuleList):
        return blocks
    lists = [m for m in model.vit.modules() if isinstance(m, nn.ModuleList)]
    if len(lists) != 1:
        raise ValueError(f"common.py: cannot find the ViT blocks: model.vit has no 'blocks' ModuleList "
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


def apply_fsdp(model, param_dtype=None, reduce_dtype=torch.float32, reshard_after_forward=True):
    """FSDP2 (torchtitan idiom): the ViT as one unit, each LLM block as a unit, then the root
    (connector, embeddings, final norm, lm_head; a tied lm_head.weight stays wte.weight).
    bf16 compute + fp32 gradient reduction when param_dtype=torch.bfloat16. Units may mix frozen and
    trainable params (FSDP2 reduce-scatters only gradients that exist)."""
    if not dist.is_initialized():
        raise RuntimeError("common.py apply_fsdp: torch.distributed is not initialised; "
                           "launch with torchrun and call compute_init() first")
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    kw = dict(mesh=mesh, reshard_after_forward=reshard_after_forward)
    if param_dtype is not None:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    # the ViT is small next to the LLM: one all-gather for the whole tower
    fully_shard(model.vit, **kw)
    for block in model.llm.blocks:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model

# -----------------------------------------------------------------------------
# checkpoints: out_dir/ckpt_{step:07d}/ = DCP shards (model + optimizer) + state.json + model_config.json
# + rng_rank{r}.pt, written under .tmp_ckpt_{step:07d}/ and renamed into place only when complete.

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


def _list_checkpoints(out_dir):
    """Complete checkpoints in out_dir, oldest first (temporary .tmp_* dirs are never listed)."""
    if not os.path.isdir(out_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(out_dir)
             if (m := _CKPT_RE.match(name)) and os.path.isdir(os.path.join(out_dir, name))]
    return [os.path.join(out_dir, name) for _, name in sorted(found)]


def latest_checkpoint(out_dir):
    """Path of the newest complete ckpt_* in out_dir, or None."""
    ckpts = _list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


def save_checkpoint(out_dir, step, model, optimizer, state, config, keep_last=None):
    """Collective: every rank writes its own shards (nothing is gathered). Returns the checkpoint path.
    state: JSON-serialisable training state (data position, ...); config: the run's config dict."""
    rank = _rank()
    final = os.path.join(out_dir, f"ckpt_{step:07d}")
    tmp = os.path.join(out_dir, f".tmp_ckpt_{step:07d}")
    # serialise first, on every rank, so bad input fails everywhere before any collective
    try:
        meta = json.dumps({"step": step, "state": state, "config": config}, indent=2)
    except TypeError as e:
        raise TypeError(f"common.py save_checkpoint: state/config must be JSON-serialisable: {e}") from e
    cfg = getattr(model, "cfg", None)
    if not dataclasses.is_dataclass(cfg):
        raise TypeError(f"common.py save_checkpoint: model.cfg must be the model's config dataclass, "
                        f"got {type(cfg).__name__}")
    model_cfg = json.dumps(dataclasses.asdict(cfg), indent=2)
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"common.py save_checkpoint: keep_last must be >= 1 or None, got {keep_last}")

    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save of this step
        os.makedirs(tmp)
    _barrier()
    # sharded state dicts: DTensor shards under FSDP2, plain tensors in a single process
    if optimizer is None:
        sd = {"model": get_model_state_dict(model)}
    else:
        msd, osd = get_state_dict(model, optimizer)
        sd = {"model": msd, "optim": osd}
    dcp.save(sd, checkpoint_id=tmp, no_dist=not dist.is_initialized())
    torch.save(_rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
    if rank == 0:
        _write_json(os.path.join(tmp, "state.json"), meta)
        _write_json(os.path.join(tmp, "model_config.json"), model_cfg)
    _barrier()  # every rank's files are in tmp

    if rank == 0:
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
            for path in _list_checkpoints(out_dir)[:-keep_last]:
                shutil.rmtree(path)
    _barrier()  # nobody reads or prunes before the checkpoint is in place
    return final


def load_checkpoint(path, model, optimizer=None):
    """Collective: restore model (and optimizer) from a checkpoint written by save_checkpoint, resharding
    to the current layout, and this rank's RNG. Returns (step, state, config)."""
    state_path = os.path.join(path, "state.json")
    if not os.path.isfile(state_path):
        raise FileNotFoundError(f"common.py load_checkpoint: {state_path} missing: '{path}' is not a complete "
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

    rng_path = os.path.join(path, f"rng_rank{_rank()}.pt")
    if os.path.isfile(rng_path):
        _set_rng_state(torch.load(rng_path, weights_only=False))  # our own file; numpy state needs pickle
    else:  # resumed on more ranks than saved: weights and optimizer reshard, RNG streams cannot
        print(f"common.py load_checkpoint: WARNING rank {_rank()}: {rng_path} missing "
              f"(checkpoint saved with fewer ranks); this rank keeps its current RNG state")
    return meta["step"], meta["state"], meta["config"]


def export_hf(model, out_dir, tok=None):
    """Collective: gather the full state dict to rank 0's CPU and write the HF layout there
    (model.save_pretrained(out_dir, state_dict=...)), plus the tokenizer if given."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if _rank() == 0:
        model.save_pretrained(out_dir, state_dict=full)
        if tok is not None:
            tok.save_pretrained(out_dir)
        print0(f"exported {out_dir}")
    _barrier()

# -----------------------------------------------------------------------------
# model, tokenizer and data set-up shared by the training scripts


def log_jsonl(out_dir, d):
    """Append one metrics record to out_dir/log.jsonl on rank 0: full precision, continued across resumes
    (a resumed run re-logs the steps after its checkpoint; readers keep the last record of a step)."""
    if _rank() == 0:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(d) + "\n")


def ensure_synth_data(out="data/synth"):
    """Render the embedded synthetic task (and its tokenizer) if it is not there yet: rank 0 renders, the others
    wait. prepare() is idempotent and deterministic."""
    if _rank() == 0:
        from data.prepare import prepare
        prepare(out)
    _barrier()


def load_tokenizer(tokenizer, init_from, resume_path=None):
    """The tokenizer directory: explicit > the one a resumed run used > the init_from HF directory > the tiny
    synthetic one (training from scratch)."""
    from transformers import AutoTokenizer
    path = tokenizer
    if not path and resume_path:
        with open(os.path.join(resume_path, "state.json")) as f:
            path = json.load(f)["state"].get("tokenizer", "")
    if not path:
        path = init_from if init_from not in ("scratch", "resume") else "data/synth/tokenizer"
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path!r} not found (set --tokenizer=DIR)")
    return AutoTokenizer.from_pretrained(path)


def build_model(init_from, tok, device, resume_path=None, scratch=None, dtype=torch.float32):
    """'scratch': a VLMConfig from `scratch` (+ the tokenizer's vocabulary and <IMG_CONTEXT> id), fresh init;
    'resume': the architecture saved beside the checkpoint (its weights are loaded by load_checkpoint);
    otherwise a local HF directory. Under torchrun every process reads the HF checkpoint once (one copy in
    `dtype` on its CPU, sharded right after by apply_fsdp)."""
    from model import VLM, VLMConfig, config_from_dict
    if init_from == "resume":
        with open(os.path.join(resume_path, "model_config.json")) as f:
            cfg = config_from_dict(json.load(f))
        return VLM(cfg).to(device=device, dtype=dtype)
    if init_from == "scratch":
        img_id = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
        if img_id is None or img_id == tok.unk_token_id:
            raise ValueError(f"tokenizer {tok.name_or_path} has no <IMG_CONTEXT> token")
        cfg = VLMConfig(vocab_size=len(tok), image_token_id=img_id, **(scratch or {}))
        return VLM(cfg).to(device=device, dtype=dtype)
    if not os.path.isdir(init_from):
        raise FileNotFoundError(f"init_from={init_from!r}: not 'scratch', 'resume' or a local model directory")
    return VLM.from_pretrained(init_from, dtype=dtype, device=device)


def load_inference_model(path, device, dtype=torch.float32, tokenizer=""):
    """A model + tokenizer for generation from any of: a local HF directory (config.json), a project checkpoint
    ckpt_XXXXXXX/ (sharded DCP, model weights only), or a training out_dir (its hf/ export if present, else its
    latest checkpoint). Single process."""
    from transformers import AutoTokenizer
    from model import VLM, config_from_dict
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
        model = VLM.from_pretrained(path, dtype=dtype, device=device)
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
    return model.eval(), AutoTokenizer.from_pretrained(tok_path), path
