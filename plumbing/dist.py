"""
Process setup that works with and without torchrun, and the collectives every rank-local decision goes through.

    ddp, rank, local_rank, world_size, device = compute_init(seed, dist_timeout_s, heartbeat_timeout_s)
    ... if agree(not finite): skip ...           # every rank-local decision is agreed on by all ranks
    cfg = together(read_config, "loading")       # a failure on one rank raises on every rank
    compute_cleanup()
Under torchrun a watchdog (plumbing/watchdog.py) stops every rank within seconds when one fails, on every node.
"""
import os
import random
from contextlib import nullcontext
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from plumbing import watchdog

# -----------------------------------------------------------------------------
# process setup

def _dist_env():
    """(ddp, rank, local_rank, world_size) from the torchrun environment; single process without it."""
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def compute_init(seed=1337, timeout_s=600, heartbeat_timeout_s=60):
    """Init torch.distributed when launched by torchrun (NCCL on CUDA, gloo on CPU), pick the device, seed.
    timeout_s (scripts: dist_timeout_s): the process-group timeout, i.e. the longest one rank may wait inside one
      collective for the others before it fails. It only has to catch ranks that are alive but stuck (a deadlock, a
      collective called on some ranks only): dead or failed ranks are caught by the watchdog. 600 s is above the
      longest legitimate wait in these scripts: rank 0 alone writing an HF export or reading a safetensors unit of a
      38B model from a network filesystem (~76 GB bf16 at ~0.5-1 GB/s: 1.5-3 min), a checkpoint write, the spread
      of rollout times across ranks. Raise it if a rollout phase alone takes longer than ~10 minutes.
    heartbeat_timeout_s (scripts: heartbeat_timeout_s): multi-process runs start a watchdog (see _Watchdog): an
      uncaught exception or fail() on any rank stops every rank within ~2 s, on every node; a rank whose process
      has gone silent (killed, machine lost) stops them after heartbeat_timeout_s. 0 turns the watchdog off."""
    ddp, rank, local_rank, world_size = _dist_env()
    if torch.cuda.is_available():
        # one GPU per process; set it before the process group so NCCL binds the right device
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if ddp and not dist.is_initialized():
        # on a GPU, gloo beside NCCL for CPU tensors: with CPU offload the gradient shards live on the CPU and
        # clip_grad_norm_ reduces them there (an NCCL-only group refuses CPU tensors: pytorch#148532)
        dist.init_process_group("cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
        if world_size > 1 and heartbeat_timeout_s and watchdog._WATCHDOG is None:
            watchdog.start(rank, world_size, heartbeat_timeout_s, device)
    elif device.type == "cuda" and not dist.is_initialized():
        # one GPU without torchrun: a one-process group, so training runs FSDP2 all the same (bf16 compute, fp32
        # masters, bf16 weights gathered for rollouts): one path for one GPU and for many
        dist.init_process_group("cuda:nccl,cpu:gloo", store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timedelta(seconds=timeout_s), device_id=device)
    # same seed on every rank: identical model init; callers shard the data by rank
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    return ddp, rank, local_rank, world_size, device


def offload_threads(local_world_size=None, cores=None):
    """The intra-op threads one rank should give the optimizer step FSDP2's CPU offload runs on the host: the cores
    this process may run on, shared by the node's ranks (torchrun's LOCAL_WORLD_SIZE). torchrun sets
    OMP_NUM_THREADS=1 for every rank, which leaves the offloaded AdamW step (the whole optimizer of a 38B model) on one
    core per rank while the other cores idle; docs/perf.md, "Offload"."""
    local = int(local_world_size or os.environ.get("LOCAL_WORLD_SIZE", 1))
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(local, 1))


def set_offload_threads():
    """torch.set_num_threads(offload_threads()) for a run with offload=True (plumbing.apply_fsdp calls it), never
    fewer threads than the process has (an explicit larger OMP_NUM_THREADS stays). Returns the thread count."""
    n = max(torch.get_num_threads(), offload_threads())
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    return n


def compute_cleanup():
    """Mark this rank finished (so the watchdog of ranks still running does not take its silence for a failure),
    stop its watchdog, and tear down the process group if compute_init made one."""
    watchdog.stop()
    if dist.is_initialized():
        dist.destroy_process_group()


def print0(*args, **kwargs):
    """print on rank 0 only."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **{"flush": True, **kwargs})  # flushed: logs piped to a file show up as they happen



def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def autocast_ctx(device):
    """bf16 autocast on CUDA; plain fp32 on CPU (bf16 is slow there)."""
    device = torch.device(device)
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()



# -----------------------------------------------------------------------------
# Decisions. A rank that decides alone (skip this step, this cache does not fit, stop) leaves the others waiting in
# their next collective. Every rank-local decision goes through one of these instead: every rank calls it, and
# every rank gets the same answer.

def _reduce_device():
    """Where the decision collectives put their tensor: the current GPU when the default group has NCCL, else the
    CPU. dist.get_backend() names every backend of the group: 'cpu:gloo,cuda:nccl' for the group compute_init makes
    (a test for == 'nccl' never matched it), 'nccl' for an NCCL-only group, which refuses CPU tensors."""
    if "nccl" in str(dist.get_backend()).lower() and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce_scalar(x, op):
    if not dist.is_initialized():
        return x
    # float64 holds any int below 2**53 exactly
    t = torch.tensor([float(x)], dtype=torch.float64, device=_reduce_device())
    dist.all_reduce(t, op=op)
    v = t.item()
    return type(x)(v) if type(x) in (bool, int, float) else v


def all_reduce_sum(*xs):
    """Collective: the sums over the ranks of a few numbers (float64: token counts stay exact), as a list."""
    if not dist.is_initialized():
        return [float(x) for x in xs]
    t = torch.tensor([float(x) for x in xs], dtype=torch.float64, device=_reduce_device())
    dist.all_reduce(t)
    return t.tolist()


def agree(flag):
    """Collective: True on every rank if `flag` is true on any rank (all-reduce MAX); `flag` in one process."""
    return bool(_all_reduce_scalar(1 if flag else 0, dist.ReduceOp.MAX))


def agree_min(x):
    """Collective: the smallest `x` over the ranks, on every rank (an int stays an int)."""
    return _all_reduce_scalar(x, dist.ReduceOp.MIN)


def agree_max(x):
    """Collective: the largest `x` over the ranks, on every rank (an int stays an int)."""
    return _all_reduce_scalar(x, dist.ReduceOp.MAX)



def together(fn, what, catch=Exception):
    """Collective: fn() on every rank, its result returned. If it raised (an instance of `catch`) on any rank, every
    rank raises instead of the others waiting in their next collective for a rank that has stopped: the failing
    rank its own exception, the others one naming that rank and its message (of the `catch` class when that is
    narrower than Exception, e.g. MemoryError; else RuntimeError). Other exceptions are not caught (the watchdog
    stops the run)."""
    out = err = None
    try:
        out = fn()
    except catch as e:
        err = e
    if not dist.is_initialized():
        if err is not None:
            raise err
        return out
    msgs = [None] * dist.get_world_size()
    dist.all_gather_object(msgs, None if err is None else f"{type(err).__name__}: {err}")
    if err is not None:
        raise err
    failed = [(r, m) for r, m in enumerate(msgs) if m is not None]
    if failed:
        cls = catch if isinstance(catch, type) and catch is not Exception else RuntimeError
        raise cls(f"rank {rank()}: {what} failed on rank {failed[0][0]}: {failed[0][1]}")
    return out
