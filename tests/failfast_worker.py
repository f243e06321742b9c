"""
Worker for tests/test_failfast.py: one process per "node", two torchrun launches on one machine, so torchrun's own
teardown of a node's workers does not reach the other launch (as on two real nodes).
    torchrun --nnodes=2 --nproc_per_node=1 --rdzv_backend=c10d --rdzv_endpoint=127.0.0.1:PORT \
        tests/failfast_worker.py MODE OUT_DIR HEARTBEAT_TIMEOUT_S
MODE:
  raise  rank 1 raises while rank 0 waits in an all_reduce
  kill   rank 1 is SIGKILLed (no hook runs) while rank 0 waits in a sleep, standing in for an NCCL collective
         (NCCL does not notice a dead peer; gloo would raise at once on the closed socket)
  hang   rank 0 SIGSTOPs its torchrun agent, which hosts the store: a machine gone without a TCP reset; both
         ranks sleep
  ok     agree/agree_min/agree_max where only rank 1 votes, then a normal end: exit 0, no thread left
  ckpt   FSDP2 tiny model; save_checkpoint at step 1, then rank 1 is SIGKILLed inside dcp.save of step 2
Every rank writes OUT_DIR/pid{rank} first (the test kills leftovers by pid) and prints timestamped markers.
"""
import ctypes
import os
import signal
import sys
import threading
import time

try:  # die with the torchrun agent that started us (the test SIGKILLs agents; no orphan may outlive it)
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
except OSError:
    pass

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import plumbing
import plumbing.checkpoint


def mark(what):
    print(f"MARK {what} {time.time():.3f}", flush=True)


def main():
    mode, out, hb = sys.argv[1], sys.argv[2], float(sys.argv[3])
    rank = int(os.environ["RANK"])
    with open(os.path.join(out, f"pid{rank}"), "w") as f:
        f.write(str(os.getpid()))
    print(f"WORKER rank {rank} start", flush=True)
    mark(f"start{rank}")
    ddp, rank, _, world, device = plumbing.compute_init(seed=0, timeout_s=120, heartbeat_timeout_s=hb)
    assert ddp and world == 2, (ddp, world)
    mark(f"init{rank}")
    dist.barrier()
    if mode == "raise":
        if rank == 1:
            time.sleep(1.0)
            mark("fail")
            raise ValueError("boom from rank 1")
        dist.all_reduce(torch.ones(1))
    elif mode == "kill":
        if rank == 1:
            time.sleep(1.0)
            mark("fail")
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(120)
    elif mode == "hang":
        if rank == 0:
            time.sleep(1.0)
            mark("fail")
            os.kill(os.getppid(), signal.SIGSTOP)  # our agent, which hosts the store
        time.sleep(120)
    elif mode == "ok":
        votes = [plumbing.agree(rank == 1), plumbing.agree(False), plumbing.agree(True),
                 plumbing.agree_min(10 - rank), plumbing.agree_max(rank), plumbing.agree_max(0.5 * rank)]
        print(f"AGREE rank {rank} {votes}", flush=True)
        time.sleep(0.5 if rank == 0 else 1.5 * hb)  # rank 0 finishes long before: its silence is no failure
        plumbing.compute_cleanup()
        print(f"THREADS rank {rank} {[t.name for t in threading.enumerate()]}", flush=True)
        mark("end")
    elif mode == "ckpt":
        ckpt(out, rank, world)
    print(f"WORKER rank {rank} returned", flush=True)


def ckpt(out, rank, world):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from dist_common_worker import make_batch, tiny_cfg, train_step
    from model import VLM
    torch.manual_seed(0)
    model = VLM(tiny_cfg())
    plumbing.apply_fsdp(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    run = os.path.join(out, "run")
    real_save = plumbing.checkpoint.dcp.save

    def dying_save(sd, checkpoint_id, **kw):
        if rank == 1 and checkpoint_id.endswith(".tmp_ckpt_0000002"):
            with open(os.path.join(checkpoint_id, "__1_0.distcp"), "wb") as f:
                f.write(b"half a shard")
            mark("fail")
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(sd, checkpoint_id=checkpoint_id, **kw)
    plumbing.checkpoint.dcp.save = dying_save
    for step in (1, 2):
        ids, px, tgt = (t[rank::world] for t in make_batch(model.cfg, 2 * world, seed=step))
        train_step(model, opt, ids, px, tgt)
        plumbing.save_checkpoint(run, step, model, opt, {"step": step}, {"run": "failfast"}, keep_last=2)
        if step == 1:  # what the step-1 checkpoint must hold
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if rank == 0:
                torch.save(full, os.path.join(out, "expected.pt"))
            dist.barrier()


if __name__ == "__main__":
    main()
