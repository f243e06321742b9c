"""
Peak memory of the log-prob pass (log p(target) + entropy, forward AND backward) for the GRPO update:
the naive full-logits computation vs model.token_logprobs (chunks over tokens, each under
torch.utils.checkpoint). Each measurement runs in its own fresh subprocess so peaks do not mix.

  CPU:  python tools/bench_logprob.py                       (4096 tokens x 32768 vocab, width 1024, fp32)
        peak = increase of resource.getrusage maxrss over the run (inputs are allocated before the baseline)
  GPU:  python tools/bench_logprob.py --device=cuda --vocab=152064 --width=5120 --dtype=bfloat16
        peak = torch.cuda.max_memory_allocated minus what was allocated before the run

Both modes also allocate the gradients of hidden (N x C) and weight (V x C); they are in both peaks.
Prints bytes per token = peak increase / tokens. The naive figure grows with the token count (it holds
several N x V fp32 tensors); the chunked one is a per-chunk constant plus the gradients.

Measured (2-core shared CPU, fp32, defaults): naive +2442 MiB (625 KB/token, ~4.8 fp32 N x V tensors);
chunk=1024 +686 MiB (176 KB/token); chunk=256 +284 MiB (73 KB/token, 144 MiB of it the two gradients);
fwd+bwd time 40 s naive vs 44 s chunked (backward recomputes each chunk's logits).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: python tools/bench_logprob.py

import model


def naive(h, w, tgt):
    logq = torch.log_softmax((h @ w.t()).float(), -1)  # (B,T,V) fp32: the full logits
    return logq.gather(-1, tgt[..., None]).squeeze(-1), -(logq.exp() * logq).sum(-1)


def run(a, h, w, tgt, g1, g2):
    if a.mode == "naive":
        logp, ent = naive(h, w, tgt)
    else:
        logp, ent = model.token_logprobs(h, w, tgt, chunk=a.chunk)
    ((logp * g1).sum() + (ent * g2).sum()).backward()


def child(a):
    # one measurement: build inputs, take the baseline, run forward + backward once, report the peak increase
    torch.manual_seed(0)
    dev, dt = torch.device(a.device), getattr(torch, a.dtype)
    # warm up on a tiny problem first: lazy imports (checkpoint pulls in more of torch) and library workspaces
    # would otherwise land after the baseline and count as peak (~100+ MiB on CPU)
    tiny = torch.randn(1, 8, a.width, device=dev, dtype=dt, requires_grad=True)
    run(a, tiny, torch.randn(64, a.width, device=dev, dtype=dt, requires_grad=True),
        torch.zeros(1, 8, dtype=torch.long, device=dev), torch.ones(1, 8, device=dev), torch.ones(1, 8, device=dev))
    h = torch.randn(1, a.tokens, a.width, device=dev, dtype=dt, requires_grad=True)
    w = (torch.randn(a.vocab, a.width, device=dev, dtype=dt) * a.width ** -0.5).requires_grad_(True)
    tgt = torch.randint(0, a.vocab, (1, a.tokens), device=dev)
    g1, g2 = torch.randn(1, a.tokens, device=dev), torch.randn(1, a.tokens, device=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    t0 = time.perf_counter()
    run(a, h, w, tgt, g1, g2)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    print(json.dumps(dict(peak=peak, seconds=time.perf_counter() - t0)))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--chunks", type=str, default="256,1024")
    p.add_argument("--device", type=str, default="cpu")
    p.add_argument("--dtype", type=str, default="float32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mode", type=str, default="")  # set for the child processes only
    p.add_argument("--chunk", type=int, default=1024)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.mode:
        child(a)
        sys.exit(0)
    N, V = a.tokens, a.vocab
    print(f"{N} tokens x {V} vocab, width {a.width}, {a.dtype} on {a.device}; "
          f"one fp32 (N x V) tensor = {N * V * 4 / 2**20:.0f} MiB = {V * 4} B/token; "
          f"grads of hidden+weight = {(N + V) * a.width * getattr(torch, a.dtype).itemsize / 2**20:.0f} MiB")
    runs = [("naive", 0)] + [("chunked", int(c)) for c in a.chunks.split(",")]
    for mode, chunk in runs:
        cmd = [sys.executable, __file__, f"--mode={mode}", f"--chunk={chunk or 1}"] + \
              [f"--{k}={getattr(a, k)}" for k in ("tokens", "vocab", "width", "device", "dtype", "threads")]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"bench_logprob.py: the {mode} run failed:\n{out.stderr}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        name = mode + (f" chunk={chunk}" if chunk else "")
        print(f"{name:>20}: peak +{r['peak'] / 2**20:8.1f} MiB = {r['peak'] / N:10.0f} B/token, "
              f"fwd+bwd {r['seconds']:.2f} s")
