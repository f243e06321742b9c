"""
The GPU check: one command for a lent GPU (an H100 or H200 with the machine's own torch 2.11, no internet, random
weights built from config/models/), within the device tool's 10-minute command limit, Triton compiles included. Run
it early whenever a GPU is lent; record its tables in BENCHMARKS.md (device, date, command) and fix what it shows.

    python tools/gpu_check.py                         # full: about 7-9 min (estimated; stops by budget_s=520)
    python tools/gpu_check.py --quick=True            # env, kernels, one GRPO step, one decode shape: 3-5 min
    python tools/gpu_check.py --rehearsal=True --configs=config/grpo_r1v3.py     # one step of a real run's configs
    TRITON_INTERPRET=1 python tools/gpu_check.py --smoke=True    # CPU: the same code at tiny shapes (the tests run it)

With the device tool, one call (PYTHONUNBUFFERED=1 so the output arrives as it is printed; results land in $OUT):
    PYTHONUNBUFFERED=1 python3 tools/gpu_check.py --quick=True       timeout_s=400  (it stops itself by 300 s)
    PYTHONUNBUFFERED=1 python3 tools/gpu_check.py                    timeout_s=600
    PYTHONUNBUFFERED=1 python3 tools/gpu_check.py --rehearsal=True --configs='config/grpo_r1v3.py;config/grpo_r1v3.py,config/grpo_r1v3_38b.py'   timeout_s=600

Results: gpu_check.json in out (default $OUT, else out/), rewritten after every configuration, and gpu_check.jsonl
beside it, one line appended per configuration. A failure, a timeout or a kill therefore loses nothing already
measured. Every section runs in its own try with its own time limit. The exit code is 1 when a section failed, timed
out or has a row with ok=false, else 0; a section skipped because budget_s ran out is listed but is not a failure.
The markdown tables are printed at the end.

Sections, in order (--quick: the same sections, with decode at one shape, and done by 300 s):
 env      the device, its memory and the versions; the copy bandwidth and the bf16 matmul rate (the roofline's inputs).
 kernels  every Triton kernel natively against its PyTorch reference, bf16, at the real GQA shapes (Qwen2.5-0.5B
          14/2 heads x 64, 7B 28/4 x 128, 32B 40/8 x 128 and its tp=8 shard 5/1), prefix attention with n=8 and
          n=32 samples a prompt. At n=32 the n x G query rows of a prompt exceed one tile (64 in bf16), so the prompt's
          K/V is read by kv_div > 1 programs (decode_kernels.prefix_attention).
 grpo     one step of grpo.py on one GPU (FSDP2, world 1) at InternVL3-1B's shape, random bf16 weights, a synthetic
          tokenizer at the real vocabulary. It records the rollout and update seconds, the sampler/trainer log-prob
          mismatch and clip fraction 0 / approx KL 0 on the on-policy step. It checks that no checkpoint and no export
          are written (save_every=0, export=False) and compares the step's torch.cuda.max_memory_allocated with
          tools/plan.py's tensor peak for the same command (ok unless it is over the plan by more than 10%).
 decode   sampler.generate tokens/s against transformers generate() on the same random weights and against the
          bandwidth roofline (docs/perf.md), at the Qwen2.5-7B / 0.5B / 1.5B shapes (InternVL3-8B/1B/2B), batch 1 to
          256, context 1k and 4k, n = 8 and 32 samples a prompt. transformers' batch is sized to the free memory
          (hf_batch), so a 7B x 64 x 4096 prefill is not run on an 80 GB card. Also checked: the CUDA-graph decode
          (same tokens), and a rollout with EOS ids whose rows end at different steps, so the batch is compacted and
          the CUDA-graph buckets shrink (the graphs against the same static path run eagerly, token for token).

Rehearsal (--rehearsal=True): run it on the real job's machine before the job, with the job's config files
(configs: comma-separated files of one run, ';' between runs) and its own flags (extra: e.g. the real init_from and
data). It runs the job's script for one step at short lengths (max_steps=1, max_new_tokens=rehearsal_tokens), with no
validation, no checkpoint and no export, under torchrun on nproc GPUs, and compares the step's peak memory with the
plan. Where the configs' init_from does not exist (a lent GPU) it runs them on the random InternVL3-1B and synthetic
data (tp lowered to 1 where it cannot divide the GPUs). Raise budget_s for a 38B job: loading alone takes minutes.
"""
import gc
import glob
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]
import torch  # noqa: E402

# -----------------------------------------------------------------------------
smoke = False  # tiny shapes on the CPU (Triton interpreter): checks this script, measures nothing
quick = False  # env, kernels, one GRPO step and one decode shape (under 5 minutes)
rehearsal = False  # instead of the checks: one short step of a real run's configs (configs=); run it before a job
configs = ""  # rehearsal: a run's config files in order, comma-separated; ';' between runs
script = ""  # rehearsal: grpo.py | sft.py | connector_tune.py ('' = from the first config file's name)
nproc = 0  # rehearsal: processes, under torchrun when > 1 (0 = every visible GPU, 1 on the CPU)
extra = ""  # rehearsal: the script's own --key=value flags, space-separated (the job's init_from, data, ...)
rehearsal_tokens = 64  # rehearsal: new tokens a rollout (grpo.py max_new_tokens)
out = os.environ.get("OUT") or os.path.join(ROOT, "out")  # gpu_check.json(l) and the logs (the device tool's $OUT)
budget_s = 520  # no section starts past this many seconds, and each stops by then (a device-tool call: 600)
QUICK_BUDGET_S = 300  # --quick stops by then whatever budget_s says
new_tokens = 128  # decode: tokens a row
seed = 0
# -----------------------------------------------------------------------------
DEFAULTS = {k: globals()[k] for k in ("smoke", "quick", "rehearsal", "configs", "script", "nproc", "extra",
                                      "rehearsal_tokens", "out", "budget_s", "new_tokens", "seed")}
SCRIPTS = ("grpo.py", "sft.py", "connector_tune.py")
GB = 2**30
C = {}  # this run: cfg, dev, dtype, report, bw, tmp (set by main)


def workdir(prefix):
    """A temporary directory, removed when the run ends."""
    d = tempfile.mkdtemp(prefix=prefix)
    C.setdefault("tmp", []).append(d)
    return d


def parse_args(argv):
    """The run's settings from --key=value flags (plumbing.configurator: typed, unknown keys are errors), checked."""
    from plumbing.configurator import configure
    g = dict(DEFAULTS, __file__=os.path.abspath(__file__), __doc__=__doc__)
    cfg = configure(g, argv, list(DEFAULTS))
    if cfg["quick"] and cfg["rehearsal"]:
        raise ValueError("gpu_check.py: --quick=True and --rehearsal=True are separate runs: pick one")
    if cfg["rehearsal"] and not rehearsal_runs(cfg):
        raise ValueError("gpu_check.py: --rehearsal=True needs --configs=... (the real run's config files, e.g. "
                         "config/grpo_r1v3.py)")
    if cfg["script"] and cfg["script"] not in SCRIPTS:
        raise ValueError(f"gpu_check.py: script={cfg['script']!r}: one of {', '.join(SCRIPTS)}")
    if cfg["budget_s"] <= 0 or cfg["new_tokens"] < 2 or cfg["rehearsal_tokens"] < 1:
        raise ValueError("gpu_check.py: budget_s > 0, new_tokens >= 2 and rehearsal_tokens >= 1")
    return cfg


def sections(cfg):
    """The sections of a run, in order: (name, function, its own time limit in seconds; None = what is left)."""
    if cfg["rehearsal"]:
        return [("env", check_env, 60), ("rehearsal", check_rehearsal, None)]
    return [("env", check_env, 60), ("kernels", check_kernels, 180), ("grpo", check_grpo, 240),
            ("decode", check_decode, 300)]

# -----------------------------------------------------------------------------
# the machinery: the report written after every configuration, sections in their own try and time limit


class Report:
    """gpu_check.json (the whole report: header, sections' status, every section's rows; rewritten atomically after
    each change) and gpu_check.jsonl (one line appended, flushed and synced per row and per section status)."""

    def __init__(self, out_dir, header):
        os.makedirs(out_dir, exist_ok=True)
        self.path, self.lines = os.path.join(out_dir, "gpu_check.json"), os.path.join(out_dir, "gpu_check.jsonl")
        self.data = {"header": header, "sections": {}, "errors": []}
        with open(self.lines, "w") as f:
            f.write(json.dumps({"header": header}, default=str) + "\n")
        self._dump()

    def add(self, section, row):
        self.data.setdefault(section, []).append(row)
        self._line({"section": section, **row})
        self._dump()

    def section(self, name, status, seconds, error=None):
        self.data["sections"][name] = dict(status=status, seconds=round(seconds, 1), error=error)
        if error:
            self.data["errors"].append(f"{name}: {error}")
        self._line({"section": name, "status": status, "seconds": round(seconds, 1), "error": error})
        self._dump()

    def bad_rows(self, name):
        return [r for r in self.data.get(name, []) if r.get("ok") is False]

    def _line(self, d):
        with open(self.lines, "a") as f:
            f.write(json.dumps(d, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _dump(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)


class SectionTimeout(BaseException):
    """A section ran past its time limit (a BaseException: a section's own `except Exception` must not swallow it)."""


class Terminated(BaseException):
    """SIGTERM (the device tool's limit, a kill): the section is recorded and the run stops."""


@contextmanager
def time_limit(seconds):
    """Raise SectionTimeout in the main thread after `seconds` (SIGALRM; between Python bytecodes, so after the CUDA
    call or the subprocess wait in progress returns or is interrupted)."""
    if seconds is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def alarm(signum, frame):
        raise SectionTimeout(f"past its {seconds:.0f} s limit")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_sections(report, secs, deadline, min_start=15):
    """Each (name, fn, limit) in order, in its own try and time limit (the smaller of its own and what is left before
    deadline); none starts with less than min_start seconds left. The status of each is recorded. Returns the exit
    code: 1 if a section failed, timed out, was killed or left a row with ok=false; else 0."""
    failed = False
    for name, fn, limit in secs:
        left = deadline - time.time()
        if left < min_start:
            report.section(name, "skipped", 0.0, f"budget: {max(left, 0):.0f} s left")
            print(f"== {name}: skipped (budget)", flush=True)
            continue
        lim = left if limit is None else min(limit, left)
        t = time.time()
        try:
            with time_limit(lim):
                fn()
            bad = report.bad_rows(name)
            status, err = ("failed", f"{len(bad)} row(s) with ok=false") if bad else ("ok", None)
        except SectionTimeout:
            status, err = "timeout", f"stopped at its {lim:.0f} s limit (its rows so far are kept)"
        except Terminated:
            report.section(name, "killed", time.time() - t, "SIGTERM: the run was stopped")
            return 1
        except Exception as e:  # one broken section must not hide the others' results
            status, err = "failed", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"
        free_memory()
        report.section(name, status, time.time() - t, err)
        print(f"== {name}: {status} ({time.time() - t:.0f} s)" + (f": {err.splitlines()[0]}" if err else ""),
              flush=True)
        failed |= status != "ok"
    return 1 if failed else 0


def run_cmd(cmd, log_path, timeout=None, env=None):
    """cmd in its own session, its output in log_path; on a timeout, or when the section's limit interrupts the wait,
    its whole process group is killed (torchrun's workers too). Returns (exit code, the log's last 3000 chars)."""
    with open(log_path, "w") as log:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        try:
            rc = p.wait(timeout=timeout)
        except BaseException:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
            raise
    with open(log_path, errors="replace") as f:
        return rc, f.read()[-3000:]


def last_record(log_dir, key):
    """The last line of log_dir/log.jsonl that has key (grpo.py's step metrics), or {}."""
    path = os.path.join(log_dir, "log.jsonl")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return next((r for r in reversed(recs) if key in r), {})


def written(out_dir):
    """Checkpoints (ckpt_*, a .tmp_ckpt_* in progress) and an HF export under out_dir."""
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(out_dir, "ckpt_*")) +
                  glob.glob(os.path.join(out_dir, ".tmp_ckpt_*")) + glob.glob(os.path.join(out_dir, "hf")))

# -----------------------------------------------------------------------------
# measuring


def sync():
    if C["dev"].type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, warmup=2, iters=10):
    for _ in range(warmup):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t) / iters


def table(title, header, rows):
    print(f"\n### {title}\n\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")


def fmt(x, spec=",.0f"):
    return "-" if x is None else format(x, spec) if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)

# -----------------------------------------------------------------------------
# env


def bandwidth():
    """Device-to-device copy, bytes read + written per second."""
    n = (1 << 30) if C["dev"].type == "cuda" else (1 << 22)
    x = torch.empty(n, dtype=torch.uint8, device=C["dev"])
    y = torch.empty_like(x)
    return 2 * n / timeit(lambda: y.copy_(x), warmup=3, iters=10)


def matmul_rate():
    """FLOP/s of a square matmul on random data (bf16 8192^3 on a GPU)."""
    n = 8192 if C["dev"].type == "cuda" else 256
    a, b = (torch.randn(n, n, device=C["dev"]).to(C["dtype"]) for _ in range(2))
    return 2 * n ** 3 / timeit(lambda: a @ b, warmup=3, iters=10)


def check_env():
    import triton
    import transformers
    dev = C["dev"]
    row = dict(device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", torch=torch.__version__,
               triton=triton.__version__, transformers=transformers.__version__, cuda=torch.version.cuda,
               python=sys.version.split()[0], cpus=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else os.cpu_count(), torch_threads=torch.get_num_threads())
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        free, total = torch.cuda.mem_get_info(dev)
        row.update(gpu_total_gb=total / GB, gpu_free_gb=free / GB, sms=p.multi_processor_count,
                   capability=f"{p.major}.{p.minor}")
    C["bw"] = bandwidth()
    row.update(copy_GBps=C["bw"] / 1e9, matmul_TFLOPs=matmul_rate() / 1e12, ok=True)
    C["report"].add("env", row)

# -----------------------------------------------------------------------------
# kernels vs references

KERNEL_SHAPES = [("qwen2.5-0.5b", 14, 2, 64), ("qwen2.5-7b", 28, 4, 128), ("qwen2.5-32b", 40, 8, 128),
                 ("qwen2.5-32b tp=8", 5, 1, 128)]


def kv_div(G, n, elt):
    """The programs that read one prompt's K/V in prefix attention: n // per, per = the most samples whose n x G
    query rows fit one tile (64 rows in 16-bit, 32 in fp32), as decode_kernels.prefix_attention picks them."""
    max_rows = 64 if elt <= 2 else 32
    per = max(d for d in range(1, n + 1) if n % d == 0 and (d * G <= max_rows or d == 1))
    return n // per


def check_kernels():
    import decode_kernels
    dev, dtype, smoke_ = C["dev"], C["dtype"], C["cfg"]["smoke"]
    B, L = (32, 24) if smoke_ else (64, 4096)  # smoke: the interpreter runs each program in Python (slow)
    tm = dict(warmup=0, iters=1) if smoke_ else dict(warmup=2, iters=20)
    g = torch.Generator(device=dev).manual_seed(C["cfg"]["seed"])
    for name, H, K, D in KERNEL_SHAPES[:1] if smoke_ else KERNEL_SHAPES:
        q = torch.randn(B, H, D, device=dev, generator=g).to(dtype)
        kc, vc = (torch.randn(B, K, L, D, device=dev, generator=g).to(dtype) for _ in range(2))
        lens = torch.randint(1, L + 1, (B,), device=dev, generator=g)
        ref = decode_kernels.decode_attention(q, kc, vc, lens, use_triton=False)
        err = (decode_kernels.decode_attention(q, kc, vc, lens, use_triton=True).float() - ref.float()).abs().max().item()
        k, v = torch.randn(B, K, 1, D, device=dev, dtype=dtype), torch.randn(B, K, 1, D, device=dev, dtype=dtype)
        a, b = kc.clone(), kc.clone()
        decode_kernels.cache_append(a, vc.clone(), k, v, lens - 1, use_triton=False)
        decode_kernels.cache_append(b, vc.clone(), k, v, lens - 1, use_triton=True)
        exact = bool(torch.equal(a, b))
        del a, b
        t_tr = timeit(lambda: decode_kernels.decode_attention(q, kc, vc, lens, len_bound=L), **tm)
        t_ref = timeit(lambda: decode_kernels.decode_attention(q, kc, vc, lens, use_triton=False), **tm)
        for n in (8, 32):  # n = 32: kv_div > 1 (a prompt's K/V read by several programs)
            P, Lg = B // n, 16
            plen = torch.randint(1, L + 1, (P,), device=dev, generator=g)
            glen = torch.randint(1, Lg + 1, (B,), device=dev, generator=g)
            gk, gv = kc[:, :, :Lg].contiguous(), vc[:, :, :Lg].contiguous()
            slot = torch.randperm(B, device=dev, generator=g)[:B - 1]  # compacted: one row finished
            args = (q[:B - 1], kc[:P], vc[:P], plen, gk[:B - 1], gv[:B - 1], glen[:B - 1], n, slot)
            ref2 = decode_kernels.prefix_attention(*args, use_triton=False)
            err2 = (decode_kernels.prefix_attention(*args, use_triton=True).float() - ref2.float()).abs().max().item()
            t_px = None if smoke_ else timeit(lambda: decode_kernels.prefix_attention(*args, use_triton=True), **tm)
            C["report"].add("kernels", dict(
                shape=name, heads=H, kv_heads=K, head_dim=D, batch=B, context=L, n=n,
                kv_div=kv_div(H // K, n, q.element_size()), decode_err=err, prefix_err=err2, append_exact=exact,
                triton_us=t_tr * 1e6, reference_us=t_ref * 1e6, prefix_triton_us=t_px and t_px * 1e6,
                ok=err < 2e-2 and err2 < 2e-2 and exact))

# -----------------------------------------------------------------------------
# decode speed vs transformers and the roofline; the CUDA graphs; EOS compaction


def decode_configs(cfg):
    """(model, batch, context, samples a prompt, extras) in run order. model: a config/models directory ('tiny' in
    smoke); extras: 'hf' transformers' generate() on the same shape, 'graph' the CUDA-graph decode (same tokens),
    'eos' a rollout with EOS ids (compaction, shrinking CUDA-graph buckets)."""
    if cfg["smoke"]:
        return [("tiny", 32, 16, 8, ("hf", "graph", "eos")), ("tiny", 32, 16, 32, ()), ("tiny", 1, 32, 1, ("hf",))]
    if cfg["quick"]:
        return [("internvl3_8b", 64, 1024, 8, ("hf", "graph", "eos"))]
    out = []
    for d in ("internvl3_8b", "internvl3_1b", "internvl3_2b"):  # 7B first: the shape of docs/perf.md's ceilings
        out += [(d, 64, 1024, 8, ("hf", "graph", "eos")), (d, 256, 1024, 32, ()), (d, 1, 1024, 1, ("hf",)),
                (d, 64, 4096, 8, ("hf",)), (d, 256, 4096, 32, ()), (d, 256, 1024, 8, ())]
    return out


def hf_bytes(b, L, N, cfg, elt=2):
    """What transformers' generate() allocates beyond its weights for b rows of L prompt + N new tokens (an estimate):
    the KV cache; one layer's prefill activations over all b * L tokens (the MLP's act(gate), up and their product,
    the residual stream, norms, attention output); a (b, 1, L, L) bool causal mask, if it builds one; fp32 last-token
    logits and their processed copies."""
    kv = b * (L + N) * 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * elt
    act = b * L * (3 * cfg.mlp_hidden + 4 * cfg.n_embd) * elt
    return kv + act + b * L * L + 3 * b * cfg.vocab_size * 4


def hf_batch(B, L, N, cfg, free_bytes, elt=2, margin=0.75):
    """The batch transformers' baseline runs at: B, halved until hf_bytes fits margin x free_bytes (the free memory
    with both models loaded: torch.cuda.mem_get_info); 0 if not even one row fits."""
    b = B
    while b >= 1 and hf_bytes(b, L, N, cfg, elt) > margin * free_bytes:
        b //= 2
    return b


def llm_shape(name):
    """The LLM of a config/models directory, with a tiny ViT (decode speed does not depend on it)."""
    from model import VLMConfig
    from plumbing.hf import load_config
    if name == "tiny":
        return VLMConfig(vocab_size=128, image_token_id=127, image_size=16, patch_size=8)
    cfg, _ = load_config(os.path.join(ROOT, "config", "models", name))
    return VLMConfig(**{**cfg.__dict__, "image_size": 28, "patch_size": 14, "vit_hidden": 16, "vit_layers": 1,
                        "vit_heads": 1, "vit_mlp": 16, "max_tiles": 1})


def random_model(cfg):
    from model import VLM
    torch.manual_seed(C["cfg"]["seed"])
    with torch.device(C["dev"]):
        m = VLM(cfg)  # init_weights: normal(0, 0.02)
    return m.to(C["dtype"]).eval()


def hf_twin(cfg):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    c = Qwen2Config(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_hidden,
                    num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
                    rms_norm_eps=cfg.rms_eps, tie_word_embeddings=cfg.tie_embeddings,
                    rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
    with torch.device(C["dev"]):
        return Qwen2ForCausalLM(c).to(C["dtype"]).eval()


@contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def eos_rollout(model, prompts, n, N):
    """A sampled rollout (temperature 1) with ~2/N of the ids as EOS, so rows end at spread-out steps (on random
    weights ~e^-2 of them run to N): the dynamic
    path, the static path with its decode step run eagerly, and the static path with CUDA graphs (on the CPU the
    static path runs without graphs). The graphs must give the eager static path's tokens exactly; the static
    path's compactions (DecodeCache.keep_rows) and, on a GPU, the graph buckets captured are recorded."""
    import sampler
    V = model.cfg.vocab_size - 16
    g = torch.Generator().manual_seed(C["cfg"]["seed"] + 1)
    eos = torch.randperm(V, generator=g)[:max(1, V * 2 // N)].tolist()
    kw = dict(n=n, max_new_tokens=N, eos_token_id=eos, seed=C["cfg"]["seed"], prefill_tokens=16384,
              sampling=sampler.Sampling(temperature=1.0), sync_every=2 if C["cfg"]["smoke"] else 4)
    dynamic = sampler.generate(model, prompts, **kw)

    class EagerStep:  # CudaGraphStep's step, not captured
        def __init__(self, model, cache, w32):
            self.model, self.cache, self.w32 = model, cache, w32

        def __call__(self, tok):
            B = tok.numel()
            h = self.model(tok[:, None], cache=self.cache, pos=self.cache.pos[:B, None], return_hidden=True)
            return sampler.lm_head_logits(h[:, -1], self.w32)  # the sampler's head (bf16 in, fp32 out on CUDA)

    with patched(sampler, "CudaGraphStep", EagerStep):
        eager = sampler.generate(model, prompts, cuda_graph=True, **kw)
    kept, buckets = [], []
    keep_rows, call = sampler.DecodeCache.keep_rows, sampler.CudaGraphStep.__call__

    def spy_keep(self, idx):
        kept.append(int(idx.numel()))
        return keep_rows(self, idx)

    def spy_call(self, tok):
        if tok.numel() not in self.graphs:
            buckets.append(int(tok.numel()))
        return call(self, tok)

    with patched(sampler.DecodeCache, "keep_rows", spy_keep), patched(sampler.CudaGraphStep, "__call__", spy_call):
        graphed = sampler.generate(model, prompts, cuda_graph=True, **kw)
    lengths = graphed.lengths.tolist()
    same_rows = (graphed.tokens == dynamic.tokens).all(1).float().mean().item()
    res = dict(eos_ids=len(eos), eos_rows_ended=int((~graphed.truncated).sum()), eos_rows=len(lengths),
               eos_lengths=f"{min(lengths)}..{max(lengths)}", eos_compactions=kept, eos_graph_buckets=buckets,
               eos_graph_same_as_eager=bool(torch.equal(graphed.tokens, eager.tokens) and
                                            torch.equal(graphed.lengths, eager.lengths)),
               eos_static_rows_same_as_dynamic=same_rows)
    ok = (res["eos_graph_same_as_eager"] and 0 < res["eos_rows_ended"] < len(lengths) and len(set(lengths)) > 2
          and len(kept) >= 1 and all(a > b for a, b in zip(kept, kept[1:])))
    if C["dev"].type == "cuda":
        ok = ok and len(buckets) >= 2 and all(a > b for a, b in zip(buckets, buckets[1:]))
    return res, ok


def decode_row(model, hf, cfg, B, L, n, extras):
    import sampler
    dev, N = C["dev"], (4 if C["cfg"]["smoke"] else C["cfg"]["new_tokens"])
    e = torch.empty(0, dtype=C["dtype"]).element_size()
    g = torch.Generator().manual_seed(C["cfg"]["seed"])
    ids = torch.randint(0, cfg.vocab_size - 16, (B // n, L), generator=g)
    prompts = [(ids[p].tolist(), None) for p in range(B // n)]
    greedy = sampler.Sampling(temperature=0)
    sampler.generate(model, prompts, n=n, max_new_tokens=2, prefill_tokens=16384)  # warm-up: kernels compiled
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    st = {}
    sync()
    t = time.perf_counter()
    ours = sampler.generate(model, prompts, n=n, max_new_tokens=N, prefill_tokens=16384, stats=st, sampling=greedy)
    e2e = time.perf_counter() - t
    step = st["decode_s"] / max(st["decode_steps"], 1)
    n_llm = sum(p.numel() for p in model.llm.parameters())
    kv_tok = 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * e
    floor = (n_llm * e + (B // n * L + B * N / 2) * kv_tok) / C["bw"]  # a prompt's K/V read once for its n rows
    row = dict(batch=B, context=L, n=n, new_tokens=N, kv_div=kv_div(cfg.n_head // cfg.n_kv_head, n, e),
               ours_tok_s=B * N / e2e, ours_decode_tok_s=B / step, step_ms=step * 1e3, roofline_tok_s=B / floor,
               of_roofline=floor / step, ok=True)
    if dev.type == "cuda":
        row["peak_gb"] = torch.cuda.max_memory_allocated(dev) / GB
    if "hf" in extras:  # transformers on the same shape (dynamic cache, its own prefill), at a batch that fits
        free_memory()
        free = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else 64 * GB
        hb = hf_batch(B, L, N, cfg, free, e)
        row.update(hf_batch=hb, hf_need_gb=hf_bytes(B, L, N, cfg, e) / GB, hf_free_gb=free / GB)
        if hb:
            x = ids.repeat_interleave(n, 0)[:hb].to(dev)
            try:
                with torch.no_grad():
                    hf.generate(input_ids=x[:, :8], attention_mask=torch.ones_like(x[:, :8]), max_new_tokens=2,
                                do_sample=False)
                    sync()
                    t = time.perf_counter()
                    hf.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=N, min_new_tokens=N,
                                do_sample=False)
                    sync()
                row["hf_tok_s"] = hb * N / (time.perf_counter() - t)
            except torch.OutOfMemoryError as err:  # the sizing is wrong: say so (row not ok), keep going
                row.update(hf_error=f"out of memory at batch {hb}: {str(err)[:200]}", ok=False)
            finally:
                del x
                free_memory()
    if "graph" in extras:  # the CUDA-graph decode: the same greedy tokens, its speed
        st2 = {}
        graphed = sampler.generate(model, prompts, n=n, max_new_tokens=N, prefill_tokens=16384, stats=st2,
                                   sampling=greedy, cuda_graph=True)
        row["graph_same_tokens"] = bool(torch.equal(graphed.tokens, ours.tokens))
        st2 = {}
        sampler.generate(model, prompts, n=n, max_new_tokens=N, prefill_tokens=16384, stats=st2, sampling=greedy,
                         cuda_graph=True)
        row["graph_decode_tok_s"] = B / (st2["decode_s"] / max(st2["decode_steps"], 1))
        row["ok"] = row["ok"] and row["graph_same_tokens"]
    if "eos" in extras:
        res, ok = eos_rollout(model, prompts, n, 12 if C["cfg"]["smoke"] else N)
        row.update(res)
        row["ok"] = row["ok"] and ok
    return row


def check_decode():
    if "bw" not in C:
        C["bw"] = bandwidth()
    configs = decode_configs(C["cfg"])
    for name in dict.fromkeys(c[0] for c in configs):  # one model at a time, in order
        cfg, model, hf = llm_shape(name), None, None
        try:
            model = random_model(cfg)
            hf = hf_twin(cfg) if any("hf" in c[4] for c in configs if c[0] == name) else None
            for _, B, L, n, extras in (c for c in configs if c[0] == name):
                head = dict(shape=name, batch=B, context=L, n=n)
                try:
                    row = decode_row(model, hf, cfg, B, L, n, extras)
                except torch.OutOfMemoryError as err:
                    row = dict(head, error=f"out of memory: {str(err)[:200]}", ok=False)
                C["report"].add("decode", {**head, **row})
                free_memory()
        finally:
            del model, hf
            free_memory()

# -----------------------------------------------------------------------------
# one GRPO step; the plan against the measured peak


def synthetic_tokenizer(d, cfg_dir, first=None):
    """A WordLevel tokenizer with the real vocabulary size and InternVL3's added tokens at their real ids (read from
    config/models/*/tokenizer_config.json), saved as the checkpoint's tokenizer; first: put the added tokens from
    this id on instead (a small vocabulary for the smoke run). Returns (vocab size, <IMG_CONTEXT> id)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    with open(os.path.join(cfg_dir, "tokenizer_config.json")) as f:
        added = {int(k): v["content"] for k, v in json.load(f)["added_tokens_decoder"].items()}
    if first is not None:
        added = {first + i - min(added): t for i, t in added.items()}
    first = min(added)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(first)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(added[i], special=True, normalized=False) for i in sorted(added)])
    tok.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
                   "pad_token": "<|endoftext|>"}, f)
    return max(added) + 1, next(i for i, t in added.items() if t == "<IMG_CONTEXT>")


def random_checkpoint(work, name="internvl3_1b"):
    """A random-weight HF checkpoint at config/models/<name>'s shapes (the same layout, tiny, in smoke) with a
    synthetic tokenizer at the real vocabulary, and the synthetic data. Made once per run. Returns (hf dir, data dir)."""
    if "checkpoint" in C:
        return C["checkpoint"]
    from data.prepare import prepare
    from model import VLM, VLMConfig
    from plumbing.hf import load_config, save_pretrained
    cfg_dir = os.path.join(ROOT, "config", "models", name)
    cfg, _ = load_config(cfg_dir)
    hf = os.path.join(work, "hf")
    os.makedirs(hf, exist_ok=True)
    vocab, img_id = synthetic_tokenizer(hf, cfg_dir, first=1000 if C["cfg"]["smoke"] else None)
    if C["cfg"]["smoke"]:
        cfg = VLMConfig(**{**cfg.__dict__, "image_size": 28, "patch_size": 14, "vit_hidden": 16, "vit_layers": 1,
                            "vit_heads": 1, "vit_mlp": 16, "n_embd": 32, "n_layer": 1, "n_head": 2, "n_kv_head": 1,
                            "head_dim": 16, "mlp_hidden": 32, "max_tiles": 1, "vocab_size": vocab,
                            "image_token_id": img_id})
    assert (cfg.vocab_size, cfg.image_token_id) == (vocab, img_id), (cfg.vocab_size, cfg.image_token_id, vocab, img_id)
    torch.manual_seed(C["cfg"]["seed"])
    with torch.device(C["dev"]):
        m = VLM(cfg)
    save_pretrained(m.to(torch.bfloat16 if C["dev"].type == "cuda" else torch.float32), hf)
    del m
    free_memory()
    synth = os.path.join(work, "synth")
    prepare(synth, n_sft=64, n_rl=64, n_val=4, n_test=4)
    C["checkpoint"] = hf, synth
    return hf, synth


def plan_check(script_name, argv, gpus, measured_gb):
    """tools/plan.py's prediction for the command `script_name argv` on `gpus` GPUs of this machine: the tensor peak
    of the step (the larger of its training and rollout phases: what torch.cuda.max_memory_allocated measures), per
    phase, and what nvidia-smi would show; with the measured peak, their ratio and whether the plan held (measured
    at most 10% over it). GRPO prompts: the longest prompt of the run's data."""
    import plan
    c = plan.script_config(script_name, argv)
    mcfg = plan.model_config(c)
    stage = os.path.splitext(os.path.basename(script_name))[0]
    if stage == "sft" and not (c.get("train_vit", True) or c.get("train_llm", True)):
        stage = "connector_tune"
    prompt = None
    if stage == "grpo":
        from transformers import AutoTokenizer
        from data.common import load_jsonl, prompt_length, resolve_system
        tok = AutoTokenizer.from_pretrained(c.get("tokenizer") or c["init_from"])
        system = resolve_system(c.get("system_prompt", ""), c["init_from"], tok)  # 'auto' -> the checkpoint's
        prompt = max(prompt_length(tok, s, mcfg, c.get("think", True), system or None)
                     for s in load_jsonl(c["data"]))
    kind, gpu_gb = plan.device_memory()
    d = plan.plan_run(stage, c, mcfg, gpus=gpus, gpus_per_node=gpus, gpu_gb=gpu_gb, tp=int(c.get("tp", 1)),
                      offload=bool(c.get("offload", False)), prompt_tokens=prompt, device=kind)
    step = max(v for k, v in d["peaks"].items() if k in ("train", "rollout")) / GB
    res = dict(plan_step_gb=step, plan_phases_gb={k: round(v / GB, 3) for k, v in d["peaks"].items()},
               plan_nvidia_smi_gb=d["peak_gb"], plan_prompt_tokens=prompt, plan_verdict=d["verdict"],
               plan_host_gb_node=d.get("host_gb_node0"))
    if measured_gb is not None:
        res.update(measured_over_plan=measured_gb / step, plan_held=measured_gb <= 1.10 * step)
    return res


def check_grpo():
    smoke_ = C["cfg"]["smoke"]
    work = workdir("gpu_check_")
    hf, synth = random_checkpoint(work)
    P, n, L = (2, 2, 8) if smoke_ else (8, 8, 512)
    out_dir = os.path.join(work, "grpo")
    args = [f"--init_from={hf}", f"--data={synth}/rl.jsonl", "--val_data=", f"--out_dir={out_dir}",
            f"--prompts_per_step={P}", f"--group_size={n}", f"--max_new_tokens={L}", "--max_steps=1",
            "--micro_batch=8", "--save_every=0", "--export=False", "--dump_every=0", "--eval_every=0", "--lr=1e-6",
            "--activation_checkpointing=True", "--wandb_log=False"]
    t = time.time()
    rc, tail = run_cmd([sys.executable, "grpo.py"] + args, os.path.join(C["cfg"]["out"], "gpu_check_grpo.log"))
    row = dict(shape="internvl3_1b", prompts=P, group=n, max_new_tokens=L, wall_s=time.time() - t, returncode=rc,
               written=written(out_dir))
    m = last_record(out_dir, "t_rollout")
    if rc != 0 or not m:
        C["report"].add("grpo", dict(row, error=tail, ok=False))
        return
    row.update(t_rollout=m["t_rollout"], t_update=m["t_update"], resp_len=m["resp_len"],
               logp_mismatch_max=m["logp_mismatch"], logp_mismatch_mean=m["logp_mismatch_mean"],
               clip_frac=m["clip_frac"], approx_kl=m["approx_kl"], mem_peak_gb=m.get("mem_peak_gb"))
    row.update(plan_check("grpo.py", args, 1, row["mem_peak_gb"]))
    row["ok"] = (row["clip_frac"] == 0 and abs(row["approx_kl"]) < 1e-6 and not row["written"]
                 and row.get("plan_held", True))
    C["report"].add("grpo", row)

# -----------------------------------------------------------------------------
# rehearsal: one short step of a real run's configs


def rehearsal_runs(cfg):
    """configs -> [[config files of one run], ...] (',' between a run's files, ';' between runs)."""
    return [[f.strip() for f in run.split(",") if f.strip()] for run in cfg["configs"].split(";") if run.strip()]


def script_of(files, script=""):
    """The script a run's config files belong to: script if given, else from the first file's name
    (grpo_* -> grpo.py, sft_* -> sft.py, connector_tune_* -> connector_tune.py)."""
    if script:
        return script
    base = os.path.basename(files[0])
    for s in ("connector_tune", "grpo", "sft"):
        if base.startswith(s):
            return s + ".py"
    raise ValueError(f"gpu_check.py: cannot tell the script of {files[0]} from its name: give --script=")


def rehearsal_command(files, script_name, procs, out_dir, tokens, extra_flags, fallback=()):
    """The command of one rehearsal: the script with the run's config files, then what makes it one short step that
    writes nothing (max_steps=1, short rollouts, no validation, no checkpoint, no export), then `fallback` (the random
    model's flags, when the job's weights are not here), then the job's own flags (extra: last, so they win);
    under torchrun when procs > 1."""
    flags = ["--max_steps=1", "--val_data=", "--save_every=0", "--export=False", f"--out_dir={out_dir}",
             "--wandb_log=False"]
    flags += ([f"--max_new_tokens={tokens}", "--dump_every=0", "--eval_every=0"] if script_name == "grpo.py" else
              ["--early_stop_patience=0"])
    launch = [sys.executable] if procs <= 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  f"--nproc_per_node={procs}"]
    return launch + [script_name] + list(files) + flags + list(fallback) + list(extra_flags)


def check_rehearsal():
    import plan
    cfg = C["cfg"]
    procs = cfg["nproc"] or max(1, torch.cuda.device_count() if C["dev"].type == "cuda" else 1)
    tokens = min(cfg["rehearsal_tokens"], 8) if cfg["smoke"] else cfg["rehearsal_tokens"]
    extra_flags = shlex.split(cfg["extra"])
    for files in rehearsal_runs(cfg):
        t = time.time()
        script_name = script_of(files, cfg["script"])
        work = workdir("gpu_check_rehearsal_")
        out_dir = os.path.join(work, "run")
        row = dict(configs=files, script=script_name, processes=procs)
        try:
            cmd = rehearsal_command(files, script_name, procs, out_dir, tokens, extra_flags)
            resolved = plan.script_config(script_name, cmd[cmd.index(script_name) + 1:])
            init = resolved.get("init_from", "")
            if init not in ("scratch", "resume") and not os.path.isdir(init):
                if any(f.startswith("--init_from=") for f in extra_flags):
                    raise FileNotFoundError(f"init_from={init!r} (from extra) not found")
                hf, synth = random_checkpoint(workdir("gpu_check_model_"))
                fb = [f"--init_from={hf}", "--tokenizer=",
                      f"--data={synth}/{'rl' if script_name == 'grpo.py' else 'sft'}.jsonl"]
                tp = int(resolved.get("tp", 1))
                n_kv = plan.model_config(dict(resolved, init_from=hf)).n_kv_head
                if tp > 1 and (procs % tp or n_kv % tp):
                    fb.append("--tp=1")
                if resolved.get("offload") and C["dev"].type == "cpu" and procs == 1:
                    fb.append("--offload=False")  # one CPU process runs without FSDP2, so without its offload
                row["fallback"] = (f"init_from {init!r} not here: the configs ran on the random InternVL3-1B and "
                                   f"synthetic data" + "".join(f" ({f[2:]})" for f in fb[3:]))
                cmd = rehearsal_command(files, script_name, procs, out_dir, tokens, extra_flags, fb)
            row["command"] = shlex.join(cmd)
            print(f"rehearsal: {row['command']}", flush=True)
            rc, tail = run_cmd(cmd, os.path.join(cfg["out"], "gpu_check_rehearsal.log"))
            row.update(returncode=rc, wall_s=time.time() - t, written=written(out_dir))
            if rc != 0:
                row.update(error=tail, ok=False)
            else:
                m = last_record(out_dir, "t_update" if script_name == "grpo.py" else "loss")
                row.update({k: m[k] for k in ("t_rollout", "t_update", "t_step", "loss", "mem_peak_gb") if k in m})
                try:
                    row.update(plan_check(script_name, cmd[cmd.index(script_name) + 1:], procs, m.get("mem_peak_gb")))
                except Exception as e:  # the plan is a check of its own: say why it could not run
                    row["plan_error"] = f"{type(e).__name__}: {e}"
                row["ok"] = bool(m) and not row["written"] and row.get("plan_held", True)
        except Exception as e:
            row.update(error=f"{type(e).__name__}: {e}", ok=False)
        C["report"].add("rehearsal", row)

# -----------------------------------------------------------------------------


def last_line(text):
    lines = [x for x in str(text).splitlines() if x.strip()]
    return (lines[-1] if lines else "")[:300] + " (the whole log: the JSON, gpu_check_*.log)"


def print_tables(r):
    for row in r.get("env", []):
        table("env", ["key", "value"], [[k, fmt(v, ".4g")] for k, v in row.items()])
    if r.get("kernels"):
        table("kernels: Triton vs reference (bf16 on a GPU; max abs error; decode attention timed over ragged rows)",
              ["shape", "heads/kv x dim", "n", "kv_div", "decode err", "prefix err", "append exact", "Triton us",
               "reference us", "prefix us", "ok"],
              [[k["shape"], f"{k['heads']}/{k['kv_heads']} x {k['head_dim']}", k["n"], k["kv_div"],
                f"{k['decode_err']:.1e}", f"{k['prefix_err']:.1e}", k["append_exact"], fmt(k["triton_us"]),
                fmt(k["reference_us"]), fmt(k["prefix_triton_us"]), "OK" if k["ok"] else "FAIL"] for k in r["kernels"]])
    for g in r.get("grpo", []) + r.get("rehearsal", []):
        table("grpo.py, one step" if "shape" in g else "rehearsal", ["metric", "value"],
              [[k, fmt(v, ".4g")] for k, v in g.items() if k != "error"] + ([["error", last_line(g["error"])]]
                                                                           if "error" in g else []))
    if r.get("decode"):
        table("decode (greedy; n samples a prompt; ours vs transformers at the batch it ran: hf batch)",
              ["shape", "batch", "context", "n", "ours tok/s", "decode tok/s", "of roofline", "hf batch",
               "transformers tok/s", "graph tok/s (same?)", "EOS: compactions / graph buckets (same as eager?)", "ok"],
              [[d["shape"], d["batch"], d["context"], d["n"], fmt(d.get("ours_tok_s")), fmt(d.get("ours_decode_tok_s")),
                fmt(d.get("of_roofline"), ".0%"), fmt(d.get("hf_batch")), fmt(d.get("hf_tok_s")),
                f"{fmt(d.get('graph_decode_tok_s'))} ({d['graph_same_tokens']})" if "graph_same_tokens" in d else "-",
                f"{d['eos_compactions']} / {d['eos_graph_buckets']} ({d['eos_graph_same_as_eager']})"
                if "eos_compactions" in d else "-", "OK" if d.get("ok") else "FAIL"] for d in r["decode"]])
    table("sections", ["section", "status", "seconds"],
          [[k, v["status"], v["seconds"]] for k, v in r["sections"].items()])


def main(argv):
    cfg = parse_args(argv)
    t0 = time.time()
    dev = torch.device("cuda" if torch.cuda.is_available() and not cfg["smoke"] else "cpu")
    mode = "rehearsal" if cfg["rehearsal"] else "quick" if cfg["quick"] else "full"
    header = dict(config=cfg, mode=mode + (" (smoke)" if cfg["smoke"] else ""), date=time.strftime("%Y-%m-%d %H:%M"),
                  device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", torch=torch.__version__)
    C.clear()
    C.update(cfg=cfg, dev=dev, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32,
             report=Report(cfg["out"], header))

    def term(signum, frame):
        raise Terminated()

    old = signal.signal(signal.SIGTERM, term)
    try:
        budget = min(cfg["budget_s"], QUICK_BUDGET_S) if cfg["quick"] else cfg["budget_s"]
        rc = run_sections(C["report"], sections(cfg), t0 + budget)
    finally:
        signal.signal(signal.SIGTERM, old)
        for d in C.get("tmp", []):
            shutil.rmtree(d, ignore_errors=True)
    r = C["report"].data
    print_tables(r)
    print(f"\n{mode}: {time.time() - t0:.0f} s; exit {rc}; wrote {C['report'].path} (+ .jsonl)")
    for e in r["errors"]:
        print("ERROR:", e[:600])
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
