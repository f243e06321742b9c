"""
Rollout speed: our sampler (sampler.generate) vs transformers' generate() on the same weights and prompts.
A script that prints tables, not a timed test (docs/perf.md, "How to measure").

CPU (default; 2 cores, fp32): the GRPO shape -- 8 prompts x 8 samples, one image tile each, 96-token prompts,
64 new tokens, temperature 1 -- on a small random InternVL built by transformers, saved with save_pretrained and
loaded with our VLM.from_pretrained. The two sides run in interleaved rounds (ours, transformers, ours, ...; the
machine is shared, so the load average is printed and the ratio is of the medians). Then the finished-rows policy
(compaction on/off) when rows stop early. --profile=True first prints where a decode step's time goes.
    python tools/bench.py [--profile=True] [--repeats=5]
Results, with the dates and load: BENCHMARKS.md.
GPU (bf16, random weights from the real configs; decode roofline of docs/perf.md with a measured bandwidth; the
attention kernel alone vs its bytes and vs F.scaled_dot_product_attention; transformers on the 0.5B shape):
    python tools/bench.py --device=cuda
    python tools/bench.py --device=cuda --shapes=qwen2.5-7b --batches=64 --contexts=4096
Smoke-test the GPU code path on CPU (tiny shape, Triton interpreter):
    TRITON_INTERPRET=1 python tools/bench.py --device=cpu --gpu_mode=True --shapes=tiny --batches=2 --contexts=64 \
        --gpu_new_tokens=4 --hf_batches=2
"""
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: python tools/bench.py

from plumbing.configurator import configure
from model import VLM, VLMConfig
from plumbing.hf import load_pretrained
import decode_kernels
import sampler

# ----------------------------------------------------------------------------- config
device = "cpu"
gpu_mode = False  # real-shape tables; on by default when device is cuda
# torch CPU threads. 1 by default: with 2 OpenMP threads on a shared 2-core machine every op waits at a barrier
# for a descheduled thread (measured: the same run 1.4 s with 1 thread, 38 s with 2 while another job held a core)
threads = 1
seed = 0
repeats = 5  # rounds per side, interleaved (ours, transformers, ours, ...); medians are reported
profile = False  # CPU: print where a decode step's time goes (torch.profiler) before the table
finished_rows = True  # CPU: the compaction on/off table after the main one
# CPU GRPO-shaped workload
n_prompts, n_samples, prompt_len, new_tokens = 8, 8, 96, 64
# the model: the repo's tiny VLM (VLMConfig defaults: LLM 256 wide x 4 layers, GQA 4/2, vocab 1024; ViT 128 wide x 2
# layers on 64 px tiles of 8 px patches -> 16 image tokens per tile). Bigger: --n_embd=384 --vocab_size=8192 ...
n_embd, n_layer, n_head, n_kv_head, mlp_hidden, vocab_size = 256, 4, 4, 2, 768, 1024
image_size, patch_size, vit_hidden, vit_layers = 64, 8, 128, 2
eos_every = 32  # finished-rows table: an EOS set with about 1/eos_every of the probability mass
# GPU workload
shapes = "qwen2.5-0.5b,internvl3-1b,internvl3-2b,qwen2.5-7b"
batches = "1,64,256"
contexts = "1024,4096"
gpu_new_tokens = 128
hf_batches = "1,64"  # transformers comparison on the first shape at these batch sizes, first context
attn_only = True
config = configure(globals(), sys.argv[1:])
print(config)

# LLM shapes of the real checkpoints (config.json of Qwen/Qwen2.5-* and OpenGVLab/InternVL3-*-hf); the ViT is
# irrelevant to decode speed, so the text-only shapes carry a tiny one
LLM_SHAPES = {
    "qwen2.5-0.5b": dict(n_embd=896, n_layer=24, n_head=14, n_kv_head=2, mlp_hidden=4864, vocab_size=151936,
                         tie_embeddings=True),
    "internvl3-1b": dict(n_embd=896, n_layer=24, n_head=14, n_kv_head=2, mlp_hidden=4864, vocab_size=151674,
                         tie_embeddings=False, vit_hidden=1024, vit_layers=24, vit_heads=16, vit_mlp=4096,
                         image_size=448, patch_size=14),
    "internvl3-2b": dict(n_embd=1536, n_layer=28, n_head=12, n_kv_head=2, mlp_hidden=8960, vocab_size=151674,
                         tie_embeddings=False, vit_hidden=1024, vit_layers=24, vit_heads=16, vit_mlp=4096,
                         image_size=448, patch_size=14),
    "qwen2.5-7b": dict(n_embd=3584, n_layer=28, n_head=28, n_kv_head=4, mlp_hidden=18944, vocab_size=152064,
                       tie_embeddings=False),
    "tiny": dict(n_embd=64, n_layer=2, n_head=4, n_kv_head=1, mlp_hidden=128, vocab_size=512),  # smoke test
}
if threads:
    torch.set_num_threads(threads)
dev = torch.device(device)


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timeit(fn, warmup=2, iters=10):
    # median seconds per call (CUDA events on GPU)
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def print_table(header, rows):
    w = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for i, r in enumerate([header] + rows):
        print("| " + " | ".join(str(x).ljust(n) for x, n in zip(r, w)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (n + 2) for n in w) + "|")


def hf_internvl(cfg_kw, dtype, path):
    """A random transformers InternVLForConditionalGeneration with our shape, saved to path; returns it."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration
    c = VLMConfig(**cfg_kw)
    vision = dict(hidden_size=c.vit_hidden, num_hidden_layers=c.vit_layers, num_attention_heads=c.vit_heads,
                  intermediate_size=c.vit_mlp, image_size=c.image_size, patch_size=c.patch_size,
                  attention_bias=True, use_mean_pooling=True)
    text = dict(model_type="qwen2", vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.mlp_hidden,
                num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
                max_position_embeddings=32768, tie_word_embeddings=c.tie_embeddings,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    hcfg = InternVLConfig(vision_config=vision, text_config=text, image_token_id=c.image_token_id,
                          image_seq_length=c.tokens_per_tile, downsample_ratio=0.5,
                          tie_word_embeddings=c.tie_embeddings)
    torch.manual_seed(seed)
    with torch.device(dev):
        hf = InternVLForConditionalGeneration(hcfg).to(dtype).eval()
    hf.save_pretrained(path)
    return hf


def hf_generate(hf, ids, pixel_values, n, max_new_tokens):
    # ids (P, T) equal-length prompts (no padding); transformers repeats each prompt n times and prefills all
    kw = dict(pixel_values=pixel_values) if pixel_values is not None else {}
    with torch.no_grad():
        out = hf.generate(input_ids=ids, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                          max_new_tokens=max_new_tokens, num_return_sequences=n, pad_token_id=0, **kw)
    assert out.shape == (ids.shape[0] * n, ids.shape[1] + max_new_tokens), out.shape  # no early stop
    return out


def make_prompts(P, T, n_tiles, cfg, g):
    """P prompts of exactly T tokens: random text with one <img> span of n_tiles tiles after the first token."""
    tpt = cfg.tokens_per_tile
    V = min(cfg.vocab_size, 30000) - 2
    ids = torch.randint(2, V, (P, T), generator=g)
    ids[ids == cfg.image_token_id] = 2
    if n_tiles:
        ids[:, 2:2 + tpt * n_tiles] = cfg.image_token_id
    pv = torch.randn(P * n_tiles, 3, cfg.image_size, cfg.image_size, generator=g) if n_tiles else None
    return ids, pv

# ----------------------------------------------------------------------------- CPU: vs transformers


def cpu_bench():
    dtype = torch.float32
    cfg_kw = dict(n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head, mlp_hidden=mlp_hidden,
                  vocab_size=vocab_size, image_size=image_size, patch_size=patch_size, vit_hidden=vit_hidden,
                  vit_layers=vit_layers, vit_heads=4, vit_mlp=4 * vit_hidden, image_token_id=vocab_size - 1)
    with tempfile.TemporaryDirectory() as d:
        hf = hf_internvl(cfg_kw, dtype, d)
        model = load_pretrained(d, dtype=dtype, device=dev).eval()
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    ids, pv = make_prompts(n_prompts, prompt_len, 1, cfg, g)
    prompts = [(ids[p].tolist(), pv[p:p + 1]) for p in range(n_prompts)]
    n_tok = n_prompts * n_samples * new_tokens
    n_par = sum(p.numel() for p in model.parameters())
    print(f"\nCPU bench {time.strftime('%Y-%m-%d %H:%M')}: {n_par / 1e6:.1f}M params fp32, {n_prompts} prompts x "
          f"{n_samples} samples, {prompt_len}-token prompts ({cfg.tokens_per_tile} image tokens, 1 tile), "
          f"{new_tokens} new tokens, temperature 1, {torch.get_num_threads()} threads (both sides)")
    print(f"load average at start (1/5/15 min): {load_avg()}  -- the machine is shared; see the per-round ratios")
    # same weights? one greedy continuation must agree token for token (also the warm-up of both sides)
    ours = sampler.generate(model, prompts[:1], max_new_tokens=8, sampling=sampler.Sampling(temperature=0)).response(0)
    with torch.no_grad():
        theirs = hf.generate(input_ids=ids[:1], pixel_values=pv[:1], do_sample=False, max_new_tokens=8,
                             pad_token_id=0)[0, prompt_len:].tolist()
    print(f"greedy parity check (8 tokens): {'OK' if ours == theirs else 'MISMATCH'}")
    if profile:
        profile_decode(model, prompts)
    # interleaved rounds (ours, transformers, ours, ...): a burst of load from other jobs hits both sides alike,
    # and the ratio of the medians is robust to a few noisy rounds. Besides wall time, the process CPU time: with
    # one torch thread it counts the work done, not the time spent descheduled while other jobs ran
    t_hf, t_us, c_hf, c_us, splits = [], [], [], [], []
    for r in range(repeats):
        st = {}
        t, c = time.perf_counter(), time.process_time()
        res = sampler.generate(model, prompts, n=n_samples, max_new_tokens=new_tokens,
                               sampling=sampler.Sampling(temperature=1.0), seed=r, stats=st)
        t_us.append(time.perf_counter() - t)
        c_us.append(time.process_time() - c)
        splits.append(st)
        assert int(res.lengths.sum()) == n_tok
        t, c = time.perf_counter(), time.process_time()
        hf_generate(hf, ids, pv, n_samples, new_tokens)
        t_hf.append(time.perf_counter() - t)
        c_hf.append(time.process_time() - c)
    t = time.perf_counter()
    hf_generate(hf, ids, pv, n_samples, 1)  # transformers' prefill (ViT + LLM for every copy) and one token
    hf_pre = time.perf_counter() - t
    hf_s, us_s = statistics.median(t_hf), statistics.median(t_us)
    st = {k: statistics.median(s[k] for s in splits) for k in ("prefill_s", "decode_s")}
    print_table(["sampler", "time (s, median)", "tokens/s", "ratio"], [
        [f"transformers generate() (prefill ~{hf_pre:.2f} s, decode ~{hf_s - hf_pre:.2f} s)", f"{hf_s:.2f}",
         f"{n_tok / hf_s:.0f}", "1.00x"],
        [f"sampler.generate() (prefill {st['prefill_s']:.2f} s, decode {st['decode_s']:.2f} s)", f"{us_s:.2f}",
         f"{n_tok / us_s:.0f}", f"{hf_s / us_s:.2f}x"]])
    print(f"all rounds (wall s): ours {[round(x, 2) for x in t_us]}, transformers {[round(x, 2) for x in t_hf]}; "
          f"per-round ratio {[round(a / b, 2) for a, b in zip(t_hf, t_us)]}")
    print(f"process CPU time (s, medians): ours {statistics.median(c_us):.2f}, transformers "
          f"{statistics.median(c_hf):.2f}, ratio {statistics.median(c_hf) / statistics.median(c_us):.2f}x "
          f"(a less noisy cross-check of the wall-time ratio)")
    print(f"load average at end: {load_avg()}")

    # finished rows: an EOS set holding ~1/eos_every of the mass ends rows at random lengths
    if not finished_rows:
        return
    with torch.no_grad():
        h = model(ids[:1], pv[:1], return_hidden=True)[0, -1]
        probs = model.llm.lm_head(h).softmax(-1)
    order = probs.argsort()
    cum = probs[order].cumsum(0)
    eos = order[:int((cum < 1.0 / eos_every).sum()) + 1].tolist()
    ts, toks = {False: [], True: []}, []
    for r in range(repeats):  # interleaved too; seed r gives the same tokens under both policies (tested)
        for compact in (False, True):
            t = time.perf_counter()
            res = sampler.generate(model, prompts, n=n_samples, max_new_tokens=new_tokens,
                                   sampling=sampler.Sampling(temperature=1.0), seed=r, eos_token_id=eos,
                                   compact=compact, sync_every=8)
            ts[compact].append(time.perf_counter() - t)
        toks.append(int(res.lengths.sum()))
    rows = [[f"compact={c}", f"{statistics.median(ts[c]):.2f}",
             f"{statistics.median(k / s for k, s in zip(toks, ts[c])):.0f}"] for c in (False, True)]
    print(f"\nfinished rows ({len(eos)} EOS ids, ~1/{eos_every} of the mass; mean length "
          f"{sum(toks) / len(toks) / len(res.lengths):.1f} of {new_tokens} over {repeats} seeds; sync_every=8):")
    print_table(["policy", "time (s, median)", "tokens/s (median)"], rows)
    print(f"load average at end: {load_avg()}")


def load_avg():
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def profile_decode(model, prompts):
    """Where one decode step's time goes, CPU: the functions of each part are wrapped in wall-clock timers for one
    generate() call (a timer costs ~0.3 us, against torch.profiler's per-op overhead that inflates op-dense parts
    such as the attention); the rest = the step minus the timed parts. Repeated `repeats` times, medians."""
    import torch.nn.functional as F
    acc = {}

    def timed(name, fn):
        def f(*a, **kw):
            t = time.perf_counter()
            out = fn(*a, **kw)
            acc[name] = acc.get(name, 0.0) + time.perf_counter() - t
            return out
        return f
    saved = dict(linear=F.linear, sample=sampler.sample_next, attn=sampler.prefix_attention,
                 attend=sampler.DecodeCache.attend)
    runs = []
    try:
        F.linear = timed("linear", saved["linear"])  # nn.Linear.forward calls F.linear
        sampler.sample_next = timed("sampling", saved["sample"])
        sampler.prefix_attention = timed("attention", saved["attn"])
        sampler.DecodeCache.attend = timed("attend", saved["attend"])  # a plain function: binds as a method
        for _ in range(repeats):
            acc.clear()
            st = {}
            sampler.generate(model, prompts, n=n_samples, max_new_tokens=new_tokens, stats=st)
            n = st["decode_steps"]
            a = {k: v / n * 1e3 for k, v in acc.items()}  # ms per step
            wall = st["decode_s"] / n * 1e3  # the decode loop: steps + sampling + bookkeeping
            runs.append({"linear layers (q/k/v/o, MLP: F.linear)": a["linear"],
                         "attention (prompt K/V shared + own tokens)": a["attention"],
                         "cache write (k, v of the new token)": a["attend"] - a["attention"],
                         "sampling (log-softmax, entropy, inverse-cdf draw)": a["sampling"],
                         "the rest: fp32 lm_head, embedding, norms, RoPE, residuals, loop bookkeeping":
                             wall - a["linear"] - a["attend"] - a["sampling"],
                         "total": wall})
    finally:
        F.linear, sampler.sample_next = saved["linear"], saved["sample"]
        sampler.prefix_attention, sampler.DecodeCache.attend = saved["attn"], saved["attend"]
    m = {k: statistics.median(r[k] for r in runs) for k in runs[0]}  # per part (medians need not add up)
    print(f"\ndecode step profile: {m['total']:.2f} ms per step of {n_prompts * n_samples} rows (median of {repeats} "
          f"calls, {n} steps each; timers around the parts):")
    print_table(["part", "ms / step", "share"], [[k, f"{v:.2f}", f"{v / m['total']:.0%}"] for k, v in m.items()])


# ----------------------------------------------------------------------------- GPU: real shapes


def measure_bandwidth():
    # device-to-device copy of 1 GiB: reads + writes
    n = (1 << 30) if dev.type == "cuda" else (1 << 24)
    x = torch.empty(n, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    return 2 * n / timeit(lambda: y.copy_(x), warmup=3, iters=20)


def random_vlm(cfg_kw, dtype):
    cfg = VLMConfig(**cfg_kw, image_token_id=cfg_kw["vocab_size"] - 1)
    with torch.device("meta"):
        model = VLM(cfg)
    model = model.to(dtype).to_empty(device=dev)
    if cfg.tie_embeddings:
        model.llm.lm_head.weight = model.llm.wte.weight
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.02) if p.ndim > 1 else p.fill_(1.0 if "norm" in name or ".ls" in name else 0.0)
    return model.eval()


def gpu_bench():
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    esize = torch.empty(0, dtype=dtype).element_size()
    bw = measure_bandwidth()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"\nGPU bench on {name}, {dtype}, measured copy bandwidth {bw / 1e9:.0f} GB/s, "
          f"{gpu_new_tokens} new tokens per row, {time.strftime('%Y-%m-%d')}")
    Bs, Ls = [int(x) for x in batches.split(",")], [int(x) for x in contexts.split(",")]
    g = torch.Generator().manual_seed(seed)
    rows, attn_rows = [], []
    for si, shape in enumerate(shapes.split(",")):
        kw = LLM_SHAPES[shape]
        model = random_vlm(kw, dtype)
        cfg = model.cfg
        n_llm = sum(p.numel() for p in model.llm.parameters())  # tied weights counted once
        kv_tok = 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * esize
        hf_model, hf_dir = None, None
        if si == 0 and hf_batches:  # transformers on the same weights (saved, then loaded into ours)
            hf_dir = tempfile.mkdtemp()
            hf_model = hf_internvl(kw, dtype, hf_dir)
            model = load_pretrained(hf_dir, dtype=dtype, device=dev).eval()
        for B in Bs:
            for L in Ls:
                n = min(B, 8)  # GRPO-shaped: B // n prompts x n samples
                ids, _ = make_prompts(B // n, L, 0, cfg, g)
                prompts = [(ids[p].tolist(), None) for p in range(B // n)]
                try:
                    sampler.generate(model, prompts, n=n, max_new_tokens=4, prefill_tokens=8192)  # warm-up / JIT
                    st = {}
                    sync()
                    t = time.perf_counter()
                    sampler.generate(model, prompts, n=n, max_new_tokens=gpu_new_tokens, prefill_tokens=8192,
                                     stats=st)
                    e2e = time.perf_counter() - t
                except (MemoryError, torch.OutOfMemoryError) as e:
                    rows.append([shape, B, L, "OOM", "", "", "", "", "", str(e)[:60]])
                    torch.cuda.empty_cache() if dev.type == "cuda" else None
                    continue
                step = st["decode_s"] / max(st["decode_steps"], 1)
                floor = (n_llm * esize + B * (L + gpu_new_tokens / 2) * kv_tok) / bw  # docs/perf.md's roofline
                # our cache holds each prompt once (B // n copies, not B): the bytes a step must read are fewer
                floor_sh = (n_llm * esize + (B // n * L + B * gpu_new_tokens / 2) * kv_tok) / bw
                hf_cell = ""
                if hf_model is not None and str(B) in hf_batches.split(",") and L == Ls[0]:
                    dids = ids.to(dev)
                    hf_generate(hf_model, dids, None, n, 4)
                    sync()
                    t = time.perf_counter()
                    hf_generate(hf_model, dids, None, n, gpu_new_tokens)
                    sync()
                    hf_e2e = time.perf_counter() - t
                    hf_cell = f"{B * gpu_new_tokens / hf_e2e:.0f} ({hf_e2e / e2e:.1f}x)"
                rows.append([shape, B, L, f"{B * gpu_new_tokens / e2e:.0f}", f"{B / step:.0f}", f"{B / floor:.0f}",
                             f"{step * 1e3:.2f}", f"{step / floor:.2f}", f"{step / floor_sh:.2f}", hf_cell])
        if attn_only:
            H, K, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
            for B in Bs:
                for L in Ls:
                    try:
                        q = torch.randn(B, H, D, device=dev, dtype=dtype)
                        kc = torch.randn(B, K, L, D, device=dev, dtype=dtype)
                        vc = torch.randn(B, K, L, D, device=dev, dtype=dtype)
                    except torch.OutOfMemoryError:
                        continue
                    lens = torch.full((B,), L, device=dev)
                    t_tr = timeit(lambda: decode_kernels.decode_attention(q, kc, vc, lens, len_bound=L))
                    t_sd = timeit(lambda: torch.nn.functional.scaled_dot_product_attention(
                        q[:, :, None], kc, vc, enable_gqa=True))
                    nbytes = 2 * B * K * L * D * esize
                    # shared prefix: B // n prompts of L tokens, n = 8 rows each with 64 tokens of their own
                    n = min(B, 8)
                    pk, pv, gk, gv = kc[:B // n], vc[:B // n], kc[:, :, :64], vc[:, :, :64]
                    plen, glen = torch.full((B // n,), L, device=dev), torch.full((B,), min(64, L), device=dev)
                    t_sh = timeit(lambda: decode_kernels.prefix_attention(q, pk, pv, plen, gk, gv, glen, n,
                                                                   torch.arange(B, device=dev), gen_bound=64))
                    sh_bytes = 2 * (B // n * L + B * min(64, L)) * K * D * esize
                    attn_rows.append([shape, B, L, f"{t_tr * 1e6:.1f}", f"{nbytes / t_tr / 1e9:.0f}",
                                      f"{nbytes / t_tr / bw:.0%}", f"{t_sd * 1e6:.1f}", f"{t_sd / t_tr:.2f}x",
                                      f"{t_sh * 1e6:.1f}", f"{sh_bytes / t_sh / bw:.0%}"])
                    del q, kc, vc, pk, pv, gk, gv
        del model, hf_model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    print("\ndecode (tokens/s; step = one decode step of the whole batch; floor = docs/perf.md bytes / bandwidth, "
          "each row's prompt counted; 'shared': each prompt counted once, as our cache stores it; n = min(batch, 8))")
    print_table(["shape", "batch", "context", "tokens/s e2e", "tokens/s decode", "ceiling", "step ms",
                 "step/floor", "step/floor shared", "transformers tokens/s (ours/theirs)"], rows)
    if attn_rows:
        print("\ndecode attention alone (Triton split-K kernel, full context every row; shared: prefix_attention, "
              "batch // 8 prompts of `context` tokens + 64 own tokens per row, of bandwidth = its bytes / time)")
        print_table(["shape", "batch", "context", "us", "GB/s", "of bandwidth", "SDPA us", "SDPA/ours",
                     "shared us", "shared of bandwidth"], attn_rows)


if __name__ == "__main__":
    if gpu_mode or dev.type == "cuda":
        gpu_bench()
    else:
        cpu_bench()
