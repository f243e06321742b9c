"""
The fail-fast watchdog of a multi-process run (started by plumbing.dist.compute_init), and fail().
"""
import atexit
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

def fail(msg):
    """Stop the whole run from this rank with a clear message (no traceback): every rank stops within ~2 s, on
    every node. Does not return. Under the watchdog this rank exits at once (os._exit(1): no finally blocks,
    which could wait in a collective); the last complete checkpoint is on disk, a half-written .tmp_ckpt_* is
    ignored. In one process (or without a watchdog): raises SystemExit(msg)."""
    wd = _WATCHDOG
    if wd is None or os.getpid() != wd.pid:
        raise SystemExit(f"rank {os.environ.get('RANK', 0)}: error: {msg}")
    print(f"rank {wd.rank}: error: {msg}", file=sys.stderr, flush=True)
    wd.report(msg)
    _exit_now(1)



_WATCHDOG = None  # this process's watchdog, or None


def _exit_now(code):
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _where(tb):
    """'file.py:123' of the innermost frame of a traceback, or ''."""
    frames = traceback.extract_tb(tb) if tb is not None else []
    return f" ({os.path.basename(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""


# Bad input (a setting, a missing file, a bad data line: ValueError and FileNotFoundError, whose messages name the
# file, line or key) stops the job with ONE line, from rank 0 only: every rank usually finds the same problem, and one
# found by another rank alone reaches rank 0 through the watchdog ("rank 0: stopping: rank 1 failed: ..."). Any other
# exception prints its traceback as usual. NANOR1V_TRACEBACK=1 shows the traceback of bad input too.
INPUT_ERRORS = (ValueError, FileNotFoundError)


def _excepthook(tp, value, tb):
    if _IN_HOOK[0]:
        # called back by the hook ours chains to: torch's init_process_group wraps the sys.excepthook it finds (ours,
        # from configure()) to prefix "[rankN]", and start() installs ours again on top of that wrapper; print the
        # traceback here, once, instead of recursing
        return sys.__excepthook__(tp, value, tb)
    _IN_HOOK[0] = True
    try:
        _report(tp, value, tb)
    finally:
        _IN_HOOK[0] = False


_IN_HOOK = [False]


def _report(tp, value, tb):
    wd = _WATCHDOG
    if wd is not None and os.getpid() != wd.pid:  # a forked child (DataLoader worker): not ours to report
        wd = None
    msg = f"{tp.__name__}: {value}{_where(tb)}"
    if issubclass(tp, INPUT_ERRORS) and not os.environ.get("NANOR1V_TRACEBACK"):
        published = wd is not None and wd.report(msg)
        # rank 0 says it; another rank only when its failure could not reach rank 0 through the watchdog (before
        # compute_init every rank reads the same settings, and rank 0 says it)
        alone = not published and (wd is not None or dist.is_initialized())  # nobody carries it to rank 0
        if int(os.environ.get("RANK", 0)) == 0 or alone:
            print(f"{os.path.basename(sys.argv[0])}: error: {value}{_where(tb)}", file=sys.stderr, flush=True)
    else:
        _PREV_HOOKS[0](tp, value, tb)  # the usual traceback first
        if wd is not None:
            wd.report(msg)
    if wd is not None:
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
                        self._stop(a["why"], say=self.rank == 0)  # another rank's failure: rank 0 tells it, once
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

    def _stop(self, why, say=True):
        if self.stop.is_set():  # compute_cleanup is under way: this rank has finished
            return
        if say:
            print(f"rank {self.rank}: stopping: {why}", file=sys.stderr, flush=True)
        _exit_now(1)

    def _bounded(self, fn, timeout):
        """fn() on a helper thread, given up after `timeout` s (a store call may never return, see __init__)."""
        t = threading.Thread(target=fn, name="nanor1v-watchdog-call", daemon=True)
        t.start()
        t.join(timeout)

    def report(self, msg):
        """Publish this rank's failure (unless another rank's came first) and give the others a moment to see it.
        Uses its own connection (the pinger's may be blocked in a call) and gives up after a few seconds. Returns
        whether it reached the store."""
        done = []

        def publish():
            try:
                s = self._connect()
                why = f"rank {self.rank} failed: {msg[:2000]}"
                s.compare_set("abort", "", json.dumps({"by": self.rank, "why": why}))
                done.append(True)
                deadline = time.monotonic() + 2 * self.poll_s + 1
                while time.monotonic() < deadline and s.add("acks", 0) < self.world - 1 - len(self.done):
                    time.sleep(0.05)
            except Exception as e:  # the store is gone too: the others stop when their own timeouts run out
                print(f"rank {self.rank}: watchdog: could not publish the failure ({type(e).__name__}: {e})",
                      file=sys.stderr, flush=True)
        self._bounded(publish, 2 * self.poll_s + 2 + self.store_timeout.total_seconds())
        return bool(done)

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


def start(rank, world_size, heartbeat_timeout_s, device):
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
    install_hooks()


def install_hooks():
    """Our exception hooks (bad input in one line, failures reported to the watchdog); idempotent. Every script
    gets them from configure()."""
    if sys.excepthook is not _excepthook:
        _PREV_HOOKS[:] = [sys.excepthook, threading.excepthook]
        sys.excepthook, threading.excepthook = _excepthook, _thread_excepthook



def stop():
    """This rank finished: mark it done (so the watchdog of ranks still running does not take its silence for a
    failure) and stop its threads."""
    global _WATCHDOG
    if _WATCHDOG is not None:
        _WATCHDOG.close()
        _WATCHDOG = None
