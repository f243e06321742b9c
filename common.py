"""
The small runtime shared by sft.py, grpo.py and connector_tune.py: process setup that works with and
without torchrun, the LR schedule, freezing towers by name, FSDP2 + activation checkpointing, and
atomic, resumable, sharded checkpoints (torch.distributed.checkpoint, "DCP").

Typical use in a training script:
    ddp, rank, local_rank, world_size, device = compute_init(seed, dist_timeout_s, heartbeat_timeout_s)
    model, n_params, n_train = build_model(init_from, tok, device, fsdp=ddp or device.type == "cuda",
        train=(train_vit, train_connector, train_llm), activation_checkpointing=..., param_dtype=torch.bfloat16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], ...)
    if init_from == "resume": step, state, _ = load_checkpoint(latest_checkpoint(out_dir), model, optimizer)
    ... if agree(not finite): skip ...                    # every rank-local decision is agreed on by all ranks
    ... save_checkpoint(out_dir, step, model, optimizer, state, config, keep_last=K) ...
    export_hf(model, out_dir + "/hf", tok, dtype=torch.bfloat16); compute_cleanup()
Under torchrun a watchdog stops every rank within seconds when one fails, on every node (see _Watchdog).
Multi-node: out_dir must be on a filesystem every node sees (DCP writes one file per rank into it).
"""

import os
import re
import json
import math
import random
import atexit
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
import types
import warnings
import dataclasses
import functools
from contextlib import nullcontext
from datetime import timedelta

import numpy as np
import torch
from tqdm import tqdm
import torch.nn as nn
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict)
from torch.distributed.tensor import DTensor
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
        if world_size > 1 and heartbeat_timeout_s and _WATCHDOG is None:
            _start_watchdog(rank, world_size, heartbeat_timeout_s, device)
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


def compute_cleanup():
    """Mark this rank finished (so the watchdog of ranks still running does not take its silence for a failure),
    stop its watchdog, and tear down the process group if compute_init made one."""
    global _WATCHDOG
    if _WATCHDOG is not None:
        _WATCHDOG.close()
        _WATCHDOG = None
    if dist.is_initialized():
        dist.destroy_process_group()


def print0(*args, **kwargs):
    """print on rank 0 only."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **{"flush": True, **kwargs})  # flushed: logs piped to a file show up as they happen


# Decisions. A rank that decides alone (skip this step, this cache does not fit, stop) leaves the others waiting in
# their next collective. Every rank-local decision goes through one of these instead: every rank calls it, and
# every rank gets the same answer.

def _all_reduce_scalar(x, op):
    if not dist.is_initialized():
        return x
    # NCCL reduces only CUDA tensors; float64 holds any int below 2**53 exactly
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(x)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    v = t.item()
    return type(x)(v) if type(x) in (bool, int, float) else v


def all_reduce_sum(*xs):
    """Collective: the sums over the ranks of a few numbers (float64: token counts stay exact), as a list."""
    if not dist.is_initialized():
        return [float(x) for x in xs]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(x) for x in xs], dtype=torch.float64, device=device)
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


def fail(msg):
    """Stop the whole run from this rank with a clear message (no traceback): every rank stops within ~2 s, on
    every node. Does not return. Under the watchdog this rank exits at once (os._exit(1): no finally blocks,
    which could wait in a collective); the last complete checkpoint is on disk, a half-written .tmp_ckpt_* is
    ignored. In one process (or without a watchdog): raises SystemExit(msg)."""
    wd = _WATCHDOG
    if wd is None or os.getpid() != wd.pid:
        raise SystemExit(f"rank {_dist_env()[1]}: error: {msg}")
    print(f"rank {wd.rank}: error: {msg}", file=sys.stderr, flush=True)
    wd.report(msg)
    _exit_now(1)


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
    if bytes_per_checkpoint > free:
        raise RuntimeError(f"check_disk: one checkpoint needs {gb(bytes_per_checkpoint)} but {out_dir} has only "
                           f"{gb(free)} free: free space, or point out_dir at a larger filesystem")
    if need > free:
        print0(f"check_disk: WARNING {n_checkpoints} checkpoints x {gb(bytes_per_checkpoint)} = {gb(need)}, but "
               f"{out_dir} has {gb(free)} free: the run will stop at a save once the disk fills (lower keep_last, "
               f"save less often, or free space)")
    return free


# The watchdog. torchrun's agent stops only its own node's workers when one fails; a worker on another node waits in
# its collective until the process-group timeout (NCCL does not notice a dead peer; gloo notices a closed socket
# but not a frozen machine). So every rank of a multi-process run has two daemon threads (_Watchdog: a pinger with
# its own client of the TCPStore at MASTER_ADDR:MASTER_PORT, and a judge that never calls the store); every worker
# already reaches that store (torchrun's agent on the first node hosts it; rank 0 does when
# TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 or without torchrun). Its keys live under a prefix that
# rank 0 draws at random for this process group, so the keys of an earlier run or restart, in a store that
# outlives them, cannot trip it:
#   hb/<rank>  a counter the rank bumps every beat_s, "done" once compute_cleanup ran
#   abort      {"by": rank, "why": text} of the first failure (compare_set: the first writer wins, so the root
#              cause is kept)
#   acks       how many ranks have seen abort (the failing rank waits for them briefly, so its own exit, which may
#              take the store down with it, does not hide the message)
# A rank stops (os._exit: its main thread may be blocked inside a collective) when abort is set by another rank,
# when another rank's counter has not moved for heartbeat_timeout_s, or when the store has not answered it for
# heartbeat_timeout_s. A heartbeat shows the process is alive, not that it progresses: a rank that is alive but
# stuck is the process-group timeout's job.

_WATCHDOG = None  # this process's watchdog, or None


def _exit_now(code):
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _where(tb):
    """'file.py:123' of the innermost frame of a traceback, or ''."""
    frames = traceback.extract_tb(tb) if tb is not None else []
    return f" ({os.path.basename(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""


def _excepthook(tp, value, tb):
    _PREV_HOOKS[0](tp, value, tb)  # the usual traceback first
    wd = _WATCHDOG
    if wd is not None and os.getpid() == wd.pid:  # not in a forked child (DataLoader worker)
        wd.report(f"{tp.__name__}: {value}{_where(tb)}")
        # then Python exits as usual (exit code 1, atexit handlers run); should its teardown hang (a communicator
        # whose peers are gone), the kernel ends the process in 60 s (SIGALRM's default action)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(60)


def _thread_excepthook(args):
    _PREV_HOOKS[1](args)
    wd = _WATCHDOG
    name = args.thread.name if args.thread is not None else "?"
    if wd is not None and os.getpid() == wd.pid and args.exc_type is not SystemExit and name.startswith("nanor1v"):
        # one of ours (the main thread may wait forever on what it was to deliver): the whole run stops. A library's
        # thread (wandb, a progress bar) failing is reported above and leaves the run alone
        wd.report(f"{args.exc_type.__name__} in thread {name}: {args.exc_value}{_where(args.exc_traceback)}")
        _exit_now(1)


_PREV_HOOKS = [sys.excepthook, threading.excepthook]  # the hooks ours chain to (set when ours are installed)


class _Watchdog:
    def __init__(self, rank, world_size, timeout_s, prefix):
        self.rank, self.world, self.timeout, self.prefix = rank, world_size, float(timeout_s), prefix
        self.beat_s = min(5.0, self.timeout / 10)  # bump our counter, read everybody's
        self.poll_s = min(1.0, self.beat_s)  # look for abort
        self.store_timeout = timedelta(seconds=max(5.0, 2 * self.beat_s))
        self.addr, self.port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        self.pid = os.getpid()
        self.stop = threading.Event()
        self.done = set()  # ranks that finished normally
        self.keys = [f"hb/{r}" for r in range(world_size)]
        self.store = self._connect()
        self.store.set(self.keys[rank], "0")
        self.t_ok, self.error = time.monotonic(), None  # when the store last answered a whole round; why not since
        # the pinger does all the store traffic; the judge, which never calls the store, stops this rank if the
        # pinger gets no answer for timeout_s: a store call whose host hangs (or whose machine is gone without a
        # TCP reset) may never return, whatever the TCPStore timeout says (measured: get, add, multi_get,
        # compare_set and connecting all block while the host is SIGSTOPped)
        self.threads = [threading.Thread(target=f, name=f"nanor1v-watchdog-{f.__name__[1:]}", daemon=True)
                        for f in (self._pinger, self._judge)]
        for t in self.threads:
            t.start()

    def _connect(self):
        # a plain socket first: TCPStore's client retries a refused connection until its timeout runs out
        socket.create_connection((self.addr, self.port), timeout=self.store_timeout.total_seconds()).close()
        # an extra client of the rendezvous store: no server started, no wait for other clients
        s = dist.TCPStore(self.addr, self.port, is_master=False, timeout=self.store_timeout, wait_for_workers=False)
        return dist.PrefixStore(self.prefix, s)

    def _read_beats(self, store=None):
        store = store or self.store
        if store.check(self.keys):
            return store.multi_get(self.keys)
        return [store.get(k) if store.check([k]) else None for k in self.keys]  # still starting up

    def _pinger(self):
        now = time.monotonic()
        last, seen = [None] * self.world, [now] * self.world  # a counter's value, when it last moved
        beat, t_beat = 0, now  # our counter, when we last bumped it
        while not self.stop.wait(self.poll_s):
            now = time.monotonic()
            try:
                if self.store is None:
                    self.store = self._connect()
                if self.store.check(["abort"]):
                    a = json.loads(self.store.get("abort"))
                    if a["by"] != self.rank:  # our own failure: report() is handling it
                        self.store.add("acks", 1)
                        self._stop(a["why"])
                if now - t_beat >= self.beat_s:
                    if now - t_beat > 3 * self.beat_s + self.poll_s:  # this thread was stalled (process stopped,
                        seen = [now] * self.world  # starved, slow store): our clock says nothing about the others
                    beat, t_beat = beat + 1, now
                    self.store.set(self.keys[self.rank], str(beat))
                    for r, v in enumerate(self._read_beats()):
                        if v == b"done":
                            if r not in self.done:
                                self.done.add(r)
                                self.store.set(f"seen_done/{r}/{self.rank}", "1")  # for a store host's close()
                        elif v != last[r]:
                            last[r], seen[r] = v, now
                    silent = [(now - seen[r], r) for r in range(self.world)
                              if r != self.rank and r not in self.done and now - seen[r] > self.timeout]
                    if silent:
                        age, r = max(silent)
                        why = (f"rank {r} stopped sending heartbeats {age:.0f} s ago "
                               f"(heartbeat_timeout_s={self.timeout:g})")
                        self.store.compare_set("abort", "", json.dumps({"by": self.rank, "why": why}))
                        self._stop(why)
                self.t_ok, self.error = time.monotonic(), None
            except Exception as e:  # the store's host is gone (refused, reset) or timed out: retry, the judge decides
                if self.stop.is_set() or self.done:  # the run is ending: a store hosted by a finished rank goes
                    return  # away with it
                self.store, self.error = None, e

    def _judge(self):
        t_last = time.monotonic()
        while not self.stop.wait(self.poll_s):
            now = time.monotonic()
            if now - t_last > 3 * self.poll_s + 1:  # stalled ourselves: give the pinger a fresh chance
                self.t_ok = now
            t_last = now
            if self.done:  # the run is ending (see _pinger)
                return
            if now - self.t_ok > self.timeout:
                err = f"{type(self.error).__name__}: {str(self.error)[:200]}" if self.error else "no answer"
                self._stop(f"lost the watchdog store {self.addr}:{self.port} {now - self.t_ok:.0f} s ago ({err}); "
                           f"its host (torchrun's agent on the first node, or rank 0) is gone or hangs")

    def _stop(self, why):
        if self.stop.is_set():  # compute_cleanup is under way: this rank has finished
            return
        print(f"rank {self.rank}: stopping: {why}", file=sys.stderr, flush=True)
        _exit_now(1)

    def _bounded(self, fn, timeout):
        """fn() on a helper thread, given up after `timeout` s (a store call may never return, see __init__)."""
        t = threading.Thread(target=fn, name="nanor1v-watchdog-call", daemon=True)
        t.start()
        t.join(timeout)

    def report(self, msg):
        """Publish this rank's failure (unless another rank's came first) and give the others a moment to see it.
        Uses its own connection (the pinger's may be blocked in a call) and gives up after a few seconds."""
        def publish():
            try:
                s = self._connect()
                why = f"rank {self.rank} failed: {msg[:2000]}"
                s.compare_set("abort", "", json.dumps({"by": self.rank, "why": why}))
                deadline = time.monotonic() + 2 * self.poll_s + 1
                while time.monotonic() < deadline and s.add("acks", 0) < self.world - 1 - len(self.done):
                    time.sleep(0.05)
            except Exception as e:  # the store is gone too: the others stop when their own timeouts run out
                print(f"rank {self.rank}: watchdog: could not publish the failure ({type(e).__name__}: {e})",
                      file=sys.stderr, flush=True)
        self._bounded(publish, 2 * self.poll_s + 2 + self.store_timeout.total_seconds())

    def halt(self):
        """Stop both threads (the pinger may be inside a store call: wait a little for it)."""
        self.stop.set()
        for t in self.threads:
            t.join(timeout=self.poll_s + 1)

    def close(self):
        """This rank finished normally: stop the threads, then mark it done. If this process hosts the store (rank 0
        without torchrun's agent store), its exit takes the store down: first let the ranks still running see
        'done' (at most one beat), or they would take the lost store for a failure."""
        self.halt()

        def mark_done():
            try:
                s = self._connect()
                s.set(self.keys[self.rank], "done")
                if self.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
                    deadline, waiting = time.monotonic() + self.beat_s + self.poll_s + 1, set(range(1, self.world))
                    while waiting and time.monotonic() < deadline:
                        time.sleep(0.1)
                        beats = self._read_beats(s)
                        waiting = {r for r in waiting if beats[r] != b"done" and not s.check([f"seen_done/0/{r}"])}
            except Exception:
                pass  # the store's host has already exited: nobody is left to misread our silence
        self._bounded(mark_done, self.beat_s + self.poll_s + 2 + self.store_timeout.total_seconds())


def _start_watchdog(rank, world_size, heartbeat_timeout_s, device):
    """Collective (one broadcast): start this rank's watchdog and install the exception hooks."""
    global _WATCHDOG
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        print(f"rank {rank}: compute_init: no MASTER_ADDR/MASTER_PORT: running without the watchdog", flush=True)
        return
    token = torch.zeros(1, dtype=torch.int64, device=device)
    if rank == 0:
        token.fill_(int.from_bytes(os.urandom(7), "little"))
    dist.broadcast(token, src=0)
    prefix = f"nanor1v/watchdog/{os.environ.get('TORCHELASTIC_RUN_ID', 'none')}/{int(token.item()):x}/"
    _WATCHDOG = _Watchdog(rank, world_size, heartbeat_timeout_s, prefix)
    atexit.register(_WATCHDOG.halt)  # no store call may be in flight when the interpreter finalises (abort)
    if sys.excepthook is not _excepthook:
        _PREV_HOOKS[:] = [sys.excepthook, threading.excepthook]
        sys.excepthook, threading.excepthook = _excepthook, _thread_excepthook


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
        raise RuntimeError("common.py apply_fsdp: torch.distributed is not initialised; "
                           "launch with torchrun and call compute_init() first")
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    kw = dict(mesh=mesh, reshard_after_forward=reshard_after_forward)
    if param_dtype is not None:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    if offload:  # pinned host memory only exists with CUDA
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    # a unit per ViT block too: as one unit, InternViT-6B (5.5B params) would hold its whole gathered bf16 weights,
    # bf16 grads and fp32 reduce-scatter input at once in backward (~31 GB per GPU, the peak of a 38B run)
    for block in _vit_blocks(model):
        fully_shard(block, **kw)
    fully_shard(model.vit, **kw)
    for block in model.llm.blocks:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
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
    torch.save({"rng": _rng_state(), "state": rank_state}, os.path.join(tmp, f"rank{rank}.pt"))
    if rank == 0:
        _write_json(os.path.join(tmp, "state.json"), meta)
        _write_json(os.path.join(tmp, "model_config.json"), model_cfg)
        write_env(tmp)
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
            for path in list_checkpoints(out_dir)[:-keep_last]:
                shutil.rmtree(path)
    _barrier()  # nobody reads or prunes before the checkpoint is in place
    return final


def load_checkpoint(path, model, optimizer=None):
    """Collective: restore model (and optimizer) from a checkpoint written by save_checkpoint, resharding
    to the current layout, and this rank's RNG. Returns (step, state, config); state["rank"] is the rank_state this
    rank saved, if it saved one."""
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

    rng_path = os.path.join(path, f"rank{_rank()}.pt")
    if not os.path.isfile(rng_path) and os.path.isfile(os.path.join(path, f"rng_rank{_rank()}.pt")):
        rng_path = os.path.join(path, f"rng_rank{_rank()}.pt")  # written before session 4: the RNG state alone
    if os.path.isfile(rng_path):
        saved = torch.load(rng_path, weights_only=False)  # our own file; numpy state needs pickle
        saved = saved if "rng" in saved else {"rng": saved, "state": None}
        _set_rng_state(saved["rng"])
        if saved["state"] is not None:
            meta["state"]["rank"] = saved["state"]
    else:  # resumed on more ranks than saved: weights and optimizer reshard, RNG streams cannot
        print(f"common.py load_checkpoint: WARNING rank {_rank()}: {rng_path} missing "
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
def export_hf(model, out_dir, tok=None, dtype=None):
    """Collective: write the transformers-native HF layout into out_dir on rank 0 (it loads in VLM.from_pretrained
    and transformers' InternVLForConditionalGeneration), plus the tokenizer if given. Parameters are gathered one
    at a time, never the whole model on one host, and cast to `dtype` (torch.bfloat16 for GPU runs; None: as
    stored, i.e. the fp32 masters); rank 0 writes <= 5 GB safetensors shards as they fill. Peak memory: one shard
    + one tensor on rank 0's host, the local shard + one full tensor on every device. A failure on rank 0 (disk
    full, ...) still lets the other ranks finish the gathers, then raises on every rank."""
    from model import write_hf_checkpoint
    rank = _rank()

    def gathered():  # the same collectives in the same order on every rank
        params = list(model.named_parameters())  # a tied lm_head is wte's parameter: listed once
        for name, p in tqdm(params, desc=f"export {out_dir}", unit="tensor", disable=rank != 0, leave=False):
            t = _full_tensor(p)
            yield name, (t.to("cpu", dtype or t.dtype) if rank == 0 else None)

    stream, err = gathered(), None
    if rank == 0:
        try:
            write_hf_checkpoint(out_dir, model.cfg, stream)
            if tok is not None:
                tok.save_pretrained(out_dir)
            write_env(out_dir)
        except Exception as e:  # finish the collectives so no rank is left waiting, then fail everywhere
            err = e
    for _ in stream:
        pass
    _raise_if_any_failed(err, f"export_hf({out_dir!r})")
    print0(f"exported {out_dir}")
    _barrier()


def _raise_if_any_failed(err, what):
    """Collective when distributed: every rank's exception (or None) is all-gathered, so all ranks raise together
    (with the failing rank's message) instead of the others waiting in the next collective for a rank that has
    stopped."""
    if not dist.is_initialized():
        if err is not None:
            raise err
        return
    msgs = [None] * dist.get_world_size()
    dist.all_gather_object(msgs, None if err is None else f"{type(err).__name__}: {err}")
    if err is not None:
        raise err
    failed = [(r, m) for r, m in enumerate(msgs) if m is not None]
    if failed:
        raise RuntimeError(f"rank {_rank()}: {what} failed on rank {failed[0][0]}: {failed[0][1]}")

# -----------------------------------------------------------------------------
# what a run ran on: env.json in every run directory, checkpoint and export

_PACKAGES = ("torch", "transformers", "triton", "tokenizers", "safetensors", "numpy", "pillow", "math-verify", "tqdm")
_ENV = None


def _cmd(args):
    import subprocess
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment():
    """What this process runs on, for env.json: Python, the packages that decide the numbers, GPUs and driver, the
    code (git commit, dirty or not) and the command line. Computed once per process."""
    global _ENV
    if _ENV is None:
        import importlib.metadata
        import platform

        def version(name):
            try:
                return importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                return None
        here = os.path.dirname(os.path.abspath(__file__))
        commit = _cmd(["git", "-C", here, "rev-parse", "HEAD"])
        dirty = _cmd(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"])
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
            if torch.cuda.is_available() else []
        driver = _cmd(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) if gpus else None
        _ENV = {"python": platform.python_version(), "platform": platform.platform(),
                "packages": dict({n: version(n) for n in _PACKAGES}, torch=torch.__version__),  # with its +cpu/+cuXXX
                "torch_cuda": torch.version.cuda,
                "gpus": gpus, "gpu_count": len(gpus), "driver": driver.splitlines()[0] if driver else None,
                "cpu_count": os.cpu_count(), "git_commit": commit, "git_dirty": None if dirty is None else bool(dirty),
                "command": [sys.executable] + sys.argv, "world_size": int(os.environ.get("WORLD_SIZE", 1)),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return _ENV


def write_env(directory):
    """Rank 0: directory/env.json (the run's environment(), see above). Written atomically."""
    if _rank() != 0:
        return
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, ".env.json.tmp")
    _write_json(tmp, json.dumps(environment(), indent=2))
    os.replace(tmp, os.path.join(directory, "env.json"))


def wandb_init(enabled, project, name, config, out_dir, resume):
    """Rank 0 with enabled: import wandb and start the run, or, when resuming, continue the run this out_dir started
    (its id is kept in out_dir/wandb_run_id.txt). Call it before any heavy work: a missing wandb stops the job at
    once, on every rank. Returns the wandb module (rank 0, enabled) or None."""
    if not enabled:
        return None
    try:
        import wandb
    except ImportError as e:
        raise ImportError("wandb_log=True needs wandb: pip install -r requirements-extras.txt") from e
    if _rank() != 0:
        return None
    id_path = os.path.join(out_dir, "wandb_run_id.txt")
    run_id = open(id_path).read().strip() if resume and os.path.isfile(id_path) else None
    if resume and run_id is None:
        print0(f"wandb: {id_path} missing: starting a new wandb run rather than continuing the old one")
    run = wandb.init(project=project, name=name, config=config, id=run_id, resume="must" if run_id else None)
    os.makedirs(out_dir, exist_ok=True)
    with open(id_path, "w") as f:
        f.write(run.id + "\n")
    return wandb

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


def build_model(init_from, tok, device, *, resume_path=None, scratch=None, fsdp=False, train=(True, True, True),
                activation_checkpointing=False, param_dtype=None, offload=False):
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
    rank 0 before anything is read and raises on every rank, naming the tensor."""
    from model import VLM, VLMConfig, config_from_dict, load_config
    device = torch.device(device)
    if offload and not fsdp:
        raise ValueError("common.py build_model: offload=True needs fsdp=True (FSDP2's CPUOffloadPolicy)")

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

    if fsdp:  # every rank reads the config; one that cannot (a node without the directory) stops them all
        cfg = layout = err = None
        try:
            cfg, layout = config()
        except Exception as e:
            err = e
        _raise_if_any_failed(err, "build_model")
    else:
        cfg, layout = config()
    hf = init_from not in ("scratch", "resume")
    on_meta = fsdp and init_from != "scratch"
    if on_meta and hf:  # rank 0 matches the checkpoint against the config before anything is allocated or read
        from model import checkpoint_plan
        plan = _on_rank0(lambda: checkpoint_plan(init_from, cfg, layout), f"loading {init_from}")

    if not on_meta:  # one process, or a tiny from-scratch model: built whole, then sharded
        if hf:
            model = VLM.from_pretrained(init_from, device=device)
        else:  # every rank draws the same init (same seed); a resumed one is overwritten by load_checkpoint
            model = VLM(cfg).to(device)
    else:
        with torch.device("meta"):  # shapes only
            model = VLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())  # a tied lm_head counts once
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


def _on_rank0(fn, what):
    """Collective: fn() on rank 0 only (its result there, None elsewhere); if it raises, every rank raises."""
    out, err = None, None
    if _rank() == 0:
        try:
            out = fn()
        except Exception as e:
            err = e
    _raise_if_any_failed(err, what)
    return out


def _load_hf_sharded(model, path, plan):
    """Collective: fill the FSDP shards of `model` (allocated, not initialised) from the HF checkpoint `path`,
    whose checkpoint_plan rank 0 holds (already checked: names and shapes). Rank 0 reads one unit at a time and
    set_model_state_dict(full_state_dict, broadcast_from_rank0, strict=False) broadcasts it tensor by tensor; each
    rank copies its slice into its shard, casting to the shard's dtype (fp32). The other ranks pass {}; strict=False
    leaves the parameters outside the unit as they are. Any failure on rank 0 raises on every rank."""
    from model import read_checkpoint_tensors
    units = _fsdp_units(model)
    assert sorted(n for u in units for n in u) == sorted(n for n, _ in model.named_parameters())
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    for names in units:  # read as stored (bf16 for real checkpoints): half the host memory and traffic of fp32
        part = _on_rank0(lambda names=names: read_checkpoint_tensors(plan, names), f"loading {path}") or {}
        set_model_state_dict(model, part, options=opts)
        del part


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
