"""Fail fast (issue #11, item 5): the watchdog stops every rank, across nodes, when one rank raises or is killed,
or when the store's host hangs; a normal end is not a failure; a rank dying inside save_checkpoint leaves the
last checkpoint intact; agree()/agree_min()/agree_max(); the disk check and the checkpoint size estimate.
The multi-process tests run tests/failfast_worker.py as two single-process torchrun launches ("nodes") on one
machine, so torchrun's agent tears down only its own launch, as on two real nodes."""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import plumbing

import plumbing.checkpoint
from plumbing import agree, agree_max, agree_min, check_disk, checkpoint_bytes, fail, latest_checkpoint, set_trainable
from dist_common_worker import make_batch, tiny_cfg, train_step
from model import VLM

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "failfast_worker.py")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gone(pid):
    """The process has exited (a zombie its agent has not reaped yet counts)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _kill(pid, pgid=False):
    try:
        (os.killpg if pgid else os.kill)(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class TwoNodes:
    """The worker as torchrun 'node' 0 and 1 (one process each) on this machine."""

    def __init__(self, out, mode, hb, env=None, wait_agents=True):
        """env: extra environment. Node 0's agent hosts the rendezvous store, as on real nodes. wait_agents=False:
        done once both workers have exited (an agent may hang on a frozen rendezvous store)."""
        self.out, self.wait_agents = out, wait_agents
        self.procs, self.logs, self.ended, self.worker_ended = [], [], {}, {}  # launches, their logs, exit times
        env = {**{k: v for k, v in os.environ.items() if k not in (
            "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE")}, "OMP_NUM_THREADS": "1", **(env or {})}
        port = _free_port()
        for node in (0, 1):
            self.logs.append(out / f"node{node}.log")
            # (no --node_rank: the c10d rendezvous ignores it and assigns ranks itself; the worker goes by RANK)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                   "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                   f"--rdzv_conf=is_host={int(node == 0)}", "--max_restarts=0",
                   "--monitor_interval=0.5", WORKER, mode, str(out), str(hb)]
            with open(self.logs[-1], "w") as log:
                self.procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                   start_new_session=True))

    def poll(self):
        """True once both workers and (wait_agents) both launches have exited."""
        for i, p in enumerate(self.procs):
            if i not in self.ended and p.poll() is not None:
                self.ended[i] = time.time()
        for r in (0, 1):
            pid = self.out / f"pid{r}"
            if r not in self.worker_ended and pid.exists() and pid.read_text() and _gone(int(pid.read_text())):
                self.worker_ended[r] = time.time()
        return len(self.worker_ended) == 2 and (len(self.ended) == 2 or not self.wait_agents)

    def kill(self):
        """SIGKILL whatever is left: both agents' sessions, and every worker by the pid it wrote (torchrun starts
        workers in sessions of their own; a worker that had not written it yet dies with its agent: PDEATHSIG)."""
        for p in self.procs:
            _kill(p.pid, pgid=True)
        for name in os.listdir(self.out):
            if re.fullmatch(r"pid\d+", name):
                _kill(int((self.out / name).read_text()))
        for p in self.procs:
            p.wait(timeout=30)

    def result(self):
        """{rank: (its launch's returncode or None if still running when killed, its worker's exit time, log)},
        {MARK name: time}."""
        res = {}
        for i, p in enumerate(self.procs):
            text = self.logs[i].read_text()
            rank = 0 if "WORKER rank 0 start" in text else 1
            res[rank] = (p.returncode if i in self.ended else None, self.worker_ended.get(rank), text)
        if len(res) < 2:  # a launch failed before its worker started: by node
            res = {i: (p.returncode, None, self.logs[i].read_text()) for i, p in enumerate(self.procs)}
        marks = {m[0]: float(m[1]) for m in re.findall(r"MARK (\w+) ([\d.]+)", res[0][2] + res[1][2])}
        return res, marks


# mode: heartbeat_timeout_s and TwoNodes options. The store the watchdog uses is hosted by torchrun's agent on
# node 0 (the default), or by rank 0 itself (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1). All run at once: most of each
# run is torch imports and waiting, so together they take about as long as the slowest one.
RANK0_STORE = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
SCENARIOS = {"raise": (60, {}), "kill": (5, dict(env=RANK0_STORE)), "hang": (5, dict(wait_agents=False)),
             "ok": (4, dict(env=RANK0_STORE)), "ckpt": (5, {})}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    launched = {}
    try:
        for mode, (hb, kw) in SCENARIOS.items():
            launched[mode] = TwoNodes(tmp_path_factory.mktemp(mode), mode, hb, **kw)
        deadline = time.time() + 120
        while time.time() < deadline and not all([run.poll() for run in launched.values()]):
            time.sleep(0.1)
    finally:
        for run in launched.values():
            run.kill()
    return {mode: (*run.result(), run.out) for mode, run in launched.items()}


def _stopped(res, marks, rank=0, launch_exited=True):
    """(seconds from the failure to the exit of `rank`'s worker, its log) after checking that it exited and its
    launch (torchrun) failed."""
    code, t_end, log = res[rank]
    assert t_end is not None, f"rank {rank} did not exit:\n{log[-3000:]}"
    if launch_exited:
        assert code is not None and code != 0, (code, log[-3000:])
    return t_end - marks["fail"], log


def test_raise_on_one_node_stops_the_other(runs):
    res, marks, _ = runs["raise"]  # default heartbeat timeout (60 s): this is the abort path
    dt, log = _stopped(res, marks)
    print(f"raise: rank 0 exited {dt:.1f} s after rank 1 raised")
    assert re.search(r"rank 0: stopping: rank 1 failed: ValueError: boom from rank 1 \(failfast_worker.py:\d+\)",
                     log), log[-3000:]
    assert dt < 20, dt
    # bad input (a ValueError) is said once for the job: by rank 0, the line above; rank 1 prints no traceback
    assert res[1][0] != 0 and "failfast_worker.py\", line" not in res[1][2], res[1][2][-3000:]  # (torchrun's own aside)


def test_killed_rank_stops_the_other(runs):
    # SIGKILL: no hook runs, only the heartbeat timeout can tell. Rank 0 sleeps, as in an NCCL collective (gloo would
    # raise at once on the closed socket); rank 0 hosts the store here (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1)
    res, marks, _ = runs["kill"]
    hb = SCENARIOS["kill"][0]
    dt, log = _stopped(res, marks)
    print(f"kill: rank 0 exited {dt:.1f} s after rank 1 got SIGKILL (heartbeat_timeout_s={hb})")
    assert re.search(r"rank 0: stopping: rank 1 stopped sending heartbeats \d+ s ago", log), log[-3000:]
    assert hb - 1 < dt < hb + 15, dt
    assert res[1][0] != 0


def test_store_host_hangs(runs):
    # rank 0's agent, which hosts the store, is frozen: connections stay open, nothing answers, as when a machine is
    # gone without a TCP reset. TCPStore calls then block whatever their timeout says; the judge thread stops both
    # ranks. (Had that agent exited instead, and hosted the c10d rendezvous too, the other agent would lose its
    # rendezvous store and stop its workers itself, within a second.)
    res, marks, _ = runs["hang"]
    hb = SCENARIOS["hang"][0]
    dt, log = _stopped(res, marks, rank=1, launch_exited=False)  # its agent waits on the frozen rendezvous store
    print(f"hang: rank 1 exited {dt:.1f} s after rank 0's agent (the store's host) froze")
    assert re.search(r"rank 1: stopping: lost the watchdog store \S+ \d+ s ago \(no answer\)", log), log[-3000:]
    assert hb - 1 < dt < hb + 15, dt
    assert re.search(r"rank 0: stopping: lost the watchdog store", res[0][2]), res[0][2][-3000:]  # rank 0 too


def test_normal_end_and_agree(runs):
    # rank 0 hosts the store and finishes first; rank 1 runs on for 1.5 x heartbeat_timeout_s: a finished rank's
    # silence, and the store going with it, are no failure
    res, marks, _ = runs["ok"]
    for rank in (0, 1):
        code, t_end, log = res[rank]
        assert code == 0, log[-3000:]
        assert "stopping" not in log, log[-3000:]
        # only rank 1 voted True -> True everywhere; nobody -> False; min/max over ranks, types kept
        assert f"AGREE rank {rank} [True, False, True, 9, 1, 0.5]" in log, log[-3000:]
        assert f"THREADS rank {rank} ['MainThread']" in log, log[-3000:]  # the watchdog thread is gone
    t_last = max(t for _, t, _ in res.values())
    print(f"ok: the last worker exited {t_last - marks['end']:.1f} s after its compute_cleanup")
    assert t_last - marks["end"] < 10


def test_rank_dies_inside_save_checkpoint(runs):
    res, marks, out = runs["ckpt"]
    dt, log = _stopped(res, marks)
    print(f"ckpt: rank 0 exited {dt:.1f} s after rank 1 died inside dcp.save")
    run = str(out / "run")
    assert sorted(os.listdir(run)) == [".tmp_ckpt_0000002", "ckpt_0000001"]  # step 2 never committed
    path = latest_checkpoint(run)
    assert path == os.path.join(run, "ckpt_0000001")
    # the step-1 checkpoint is complete: it loads (model + AdamW state, resharded to one process) and holds
    # exactly the step-1 weights
    m = VLM(tiny_cfg())
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    step, state, config = plumbing.load_checkpoint(path, m, opt)
    assert (step, state, config) == (1, {"step": 1}, {"run": "failfast"})
    want = torch.load(out / "expected.pt")
    for k, v in m.state_dict().items():
        assert torch.equal(v, want[k]), k
    assert all(s["step"].item() == 1 for s in opt.state_dict()["state"].values())


def test_single_process_decisions_and_fail(monkeypatch):
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert agree(True) is True and agree(0) is False
    assert agree_min(3) == 3 and agree_max(2.5) == 2.5
    with pytest.raises(SystemExit, match="rank 0: error: out of luck"):
        fail("out of luck")


def test_check_disk(tmp_path, monkeypatch, capsys):
    GB = 10**9
    monkeypatch.setattr(plumbing.checkpoint.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(100 * GB, 90 * GB, 10 * GB))
    out = str(tmp_path / "not" / "yet")  # checked on the nearest existing parent
    assert check_disk(out, 3 * GB, 3) == 10 * GB
    assert capsys.readouterr().out == ""
    check_disk(out, 3 * GB, 4)
    warning = capsys.readouterr().out
    assert "WARNING 4 checkpoints x 3.0 GB = 12.0 GB" in warning and "10.0 GB free" in warning, warning
    with pytest.raises(RuntimeError, match="one checkpoint needs 11.0 GB .* only 10.0 GB free"):
        check_disk(out, 11 * GB, 1)


def test_checkpoint_bytes_matches_a_real_checkpoint(tmp_path):
    torch.manual_seed(0)
    m = VLM(tiny_cfg())
    n_params = sum(t.numel() for t in m.state_dict().values())  # the tied lm_head twice, as DCP writes it
    n_trainable = set_trainable(m, False, True, True)  # frozen ViT: saved, but no AdamW state
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    train_step(m, opt, *make_batch(m.cfg, 2, seed=0))
    path = plumbing.save_checkpoint(str(tmp_path), 1, m, opt, {}, {})
    shards = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".distcp"))
    est = checkpoint_bytes(n_params, n_trainable)
    assert n_trainable < n_params and est == 4 * n_params + 8 * n_trainable
    # + ~1.5 KB of framing per tensor (model entries; exp_avg, exp_avg_sq, step per trainable parameter): most
    # of this tiny model's file, negligible at real sizes
    n_tensors = len(m.state_dict()) + 3 * sum(p.requires_grad for p in m.parameters())
    assert est <= shards <= est + 2048 * n_tensors, (est, shards, n_tensors)


def test_excepthook_under_torchs_rank_prefix_wrapper_prints_once(capsys):
    """torch's init_process_group wraps the sys.excepthook it finds (ours, installed by configure()) to prefix each
    line with "[rankN]"; watchdog.start() then installs ours again on top of that wrapper. A crash (not bad input)
    must print its traceback once, through the wrapper, not recurse until RecursionError (seen at real shapes:
    dev/rehearsal.sh's grpo stage)."""
    import sys
    from plumbing import watchdog
    saved = sys.excepthook, list(watchdog._PREV_HOOKS)
    try:
        sys.excepthook = sys.__excepthook__
        watchdog.install_hooks()  # configure()
        inner = sys.excepthook

        def torch_wrapper(*args):  # what distributed_c10d.init_process_group installs (stderr captured, prefixed)
            inner(*args)
            print("[rank0]: wrapped", file=sys.stderr)
        sys.excepthook = torch_wrapper
        watchdog.install_hooks()  # watchdog.start()
        try:
            raise MemoryError("one prompt does not fit")
        except MemoryError as e:
            sys.excepthook(type(e), e, e.__traceback__)
    finally:
        sys.excepthook, watchdog._PREV_HOOKS[:] = saved[0], saved[1]
    err = capsys.readouterr().err
    assert "RecursionError" not in err
    assert err.count("MemoryError: one prompt does not fit") == 1 and "[rank0]: wrapped" in err, err
