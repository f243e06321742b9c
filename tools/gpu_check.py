"""
The GPU check: one command, about 6-8 minutes on one H200 with the machine's own torch (2.11), no internet,
random weights built from config/models/. Run it early whenever a GPU is lent; record its table in BENCHMARKS.md
(device, date, command) and fix what it shows.

    python tools/gpu_check.py                              # GPU: prints markdown tables, writes out/gpu_check.json
    TRITON_INTERPRET=1 python tools/gpu_check.py --smoke=True   # CPU: the same code at tiny shapes (a test runs it)

What it checks (each section times itself and the whole run stops starting new work past budget_s):
 1. kernels: every Triton kernel natively against its PyTorch reference, bf16, at the real GQA shapes (Qwen2.5-0.5B
    14/2 heads x 64, 7B 28/4 x 128, 32B 40/8 x 128 and its tp=8 shard 5/1), with a shared prefix of n=8 samples.
 2. decode: sampler.generate tokens/s against transformers generate() on the same shapes of random weights, batch
    1/64/256 x context 1k/4k for the Qwen2.5-0.5B/1.5B/7B LLMs (InternVL3-1B/2B/8B), and the fraction of the
    bandwidth roofline (docs/perf.md, "Decode roofline": weights + KV bytes per step / measured copy bandwidth);
    once more with the CUDA-graph decode (cuda_graph=True), which must give the same tokens.
 3. grpo: one step of grpo.py on one GPU (FSDP2, world size 1) on the InternVL3-1B shape with random bf16 weights and
    a synthetic tokenizer at the real vocabulary: rollout and update seconds, the bf16 log-prob mismatch between
    sampler and trainer (max and mean), clip fraction 0 and approx KL 0 on the on-policy step, and the peak memory
    against plan.py's prediction for the same configuration.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch  # noqa: E402

import decode_kernels  # noqa: E402
from plumbing.configurator import configure  # noqa: E402
from model import VLM, VLMConfig  # noqa: E402
from plumbing.hf import load_config, save_pretrained  # noqa: E402
import sampler  # noqa: E402

# -----------------------------------------------------------------------------
smoke = False  # tiny shapes on the CPU (Triton interpreter): checks this script, measures nothing
out = os.environ.get("OUT") or os.path.join(ROOT, "out")  # gpu_check.json goes here (the device tool's $OUT)
budget_s = 450  # stop starting new measurements past this (the device tool gives a call 10 minutes)
new_tokens = 128  # decode: tokens per row
seed = 0
config = configure(globals(), sys.argv[1:])
# -----------------------------------------------------------------------------
dev = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
T0 = time.time()
report = {"config": config, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
          "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"), "kernels": [], "decode": [],
          "grpo": {}, "errors": []}


def left():
    return budget_s - (time.time() - T0)


def sync():
    if dev.type == "cuda":
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

# -----------------------------------------------------------------------------
# 1. kernels vs references


def check_kernels():
    shapes = [("qwen2.5-0.5b", 14, 2, 64), ("qwen2.5-7b", 28, 4, 128), ("qwen2.5-32b", 40, 8, 128),
              ("qwen2.5-32b tp=8", 5, 1, 128)]
    B, L, n = (4, 40, 2) if smoke else (64, 4096, 8)
    g = torch.Generator(device=dev).manual_seed(seed)
    for name, H, K, D in shapes[:2] if smoke else shapes:
        q = torch.randn(B, H, D, device=dev, generator=g).to(dtype)
        kc, vc = (torch.randn(B, K, L, D, device=dev, generator=g).to(dtype) for _ in range(2))
        lens = torch.randint(1, L + 1, (B,), device=dev, generator=g)
        ref = decode_kernels.decode_attention(q, kc, vc, lens, use_triton=False)
        err = (decode_kernels.decode_attention(q, kc, vc, lens, use_triton=True).float() - ref.float()).abs().max().item()
        P, Lg = B // n, 16
        plen = torch.randint(1, L + 1, (P,), device=dev, generator=g)
        glen = torch.randint(1, Lg + 1, (B,), device=dev, generator=g)
        gk, gv = kc[:, :, :Lg].contiguous(), vc[:, :, :Lg].contiguous()
        slot = torch.randperm(B, device=dev, generator=g)[:B - 1]  # compacted: one row finished
        args = (q[:B - 1], kc[:P], vc[:P], plen, gk[:B - 1], gv[:B - 1], glen[:B - 1], n, slot)
        ref2 = decode_kernels.prefix_attention(*args, use_triton=False)
        err2 = (decode_kernels.prefix_attention(*args, use_triton=True).float() - ref2.float()).abs().max().item()
        k, v = torch.randn(B, K, 1, D, device=dev, dtype=dtype), torch.randn(B, K, 1, D, device=dev, dtype=dtype)
        a, b = kc.clone(), kc.clone()
        decode_kernels.cache_append(a, vc.clone(), k, v, lens - 1, use_triton=False)
        decode_kernels.cache_append(b, vc.clone(), k, v, lens - 1, use_triton=True)
        ok = err < 2e-2 and err2 < 2e-2 and torch.equal(a, b)
        t_tr = timeit(lambda: decode_kernels.decode_attention(q, kc, vc, lens, len_bound=L), iters=3 if smoke else 20)
        t_ref = timeit(lambda: decode_kernels.decode_attention(q, kc, vc, lens, use_triton=False), iters=3 if smoke else 20)
        report["kernels"].append(dict(shape=name, heads=H, kv_heads=K, head_dim=D, batch=B, context=L,
                                      decode_err=err, prefix_err=err2, append_exact=torch.equal(a, b), ok=ok,
                                      triton_us=t_tr * 1e6, reference_us=t_ref * 1e6))
    table("kernels: Triton vs reference (bf16; max abs error; decode attention timed over full ragged rows)",
          ["shape", "heads/kv x dim", "decode err", "prefix err", "append exact", "Triton us", "reference us", "ok"],
          [[r["shape"], f"{r['heads']}/{r['kv_heads']} x {r['head_dim']}", f"{r['decode_err']:.1e}",
            f"{r['prefix_err']:.1e}", r["append_exact"], f"{r['triton_us']:.0f}", f"{r['reference_us']:.0f}",
            "OK" if r["ok"] else "FAIL"] for r in report["kernels"]])

# -----------------------------------------------------------------------------
# 2. decode speed vs transformers and the roofline


def bandwidth():
    n = (1 << 30) if dev.type == "cuda" else (1 << 22)
    x = torch.empty(n, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    return 2 * n / timeit(lambda: y.copy_(x), warmup=3, iters=10)


def llm_shape(name):
    """The LLM of a config/models directory, with a tiny ViT (decode speed does not depend on it)."""
    cfg, _ = load_config(os.path.join(ROOT, "config", "models", name))
    return VLMConfig(**{**cfg.__dict__, "image_size": 28, "patch_size": 14, "vit_hidden": 16, "vit_layers": 1,
                        "vit_heads": 1, "vit_mlp": 16, "max_tiles": 1})


def random_model(cfg):
    torch.manual_seed(seed)
    with torch.device(dev):
        m = VLM(cfg)  # init_weights: normal(0, 0.02)
    return m.to(dtype).eval()


def hf_twin(cfg):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    c = Qwen2Config(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_hidden,
                    num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
                    rms_norm_eps=cfg.rms_eps, tie_word_embeddings=cfg.tie_embeddings,
                    rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
    with torch.device(dev):
        return Qwen2ForCausalLM(c).to(dtype).eval()


def check_decode():
    bw = bandwidth()
    report["bandwidth_GBps"] = bw / 1e9
    names = [("tiny", None)] if smoke else [("qwen2.5-0.5b", "internvl3_1b"), ("qwen2.5-1.5b", "internvl3_2b"),
                                            ("qwen2.5-7b", "internvl3_8b")]
    Bs, Ls = ((1, 4), (32,)) if smoke else ((1, 64, 256), (1024, 4096))
    N = 4 if smoke else new_tokens
    rows = []
    for name, d in names:
        cfg = VLMConfig(vocab_size=128, image_token_id=127, image_size=16, patch_size=8) if d is None else llm_shape(d)
        model = random_model(cfg)
        hf = hf_twin(cfg)
        e = torch.empty(0, dtype=dtype).element_size()
        n_llm = sum(p.numel() for p in model.llm.parameters())
        kv_tok = 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * e
        for B in Bs:
            for L in Ls:
                if left() < 60:
                    report["errors"].append(f"decode {name} B={B} L={L}: skipped (budget)")
                    continue
                n = min(B, 8)  # GRPO-shaped: B // n prompts x n samples
                g = torch.Generator().manual_seed(seed)
                ids = torch.randint(0, cfg.vocab_size - 16, (B // n, L), generator=g)
                prompts = [(ids[p].tolist(), None) for p in range(B // n)]
                try:
                    sampler.generate(model, prompts, n=n, max_new_tokens=2, prefill_tokens=16384)  # warm-up
                    st = {}
                    sync()
                    t = time.perf_counter()
                    ours = sampler.generate(model, prompts, n=n, max_new_tokens=N, prefill_tokens=16384, stats=st,
                                            sampling=sampler.Sampling(temperature=0))
                    e2e = time.perf_counter() - t
                except (MemoryError, torch.OutOfMemoryError) as err:
                    report["errors"].append(f"decode {name} B={B} L={L}: {str(err)[:100]}")
                    continue
                step = st["decode_s"] / max(st["decode_steps"], 1)
                floor = (n_llm * e + (B // n * L + B * N / 2) * kv_tok) / bw  # shared prompt K/V read once
                row = dict(shape=name, batch=B, context=L, ours_tok_s=B * N / e2e, ours_decode_tok_s=B / step,
                           step_ms=step * 1e3, roofline_tok_s=B / floor, of_roofline=floor / step)
                if B <= 64 and left() > 90:  # transformers on the same shapes (dynamic cache, its own prefill)
                    x = ids.repeat_interleave(n, 0).to(dev)
                    with torch.no_grad():
                        hf.generate(input_ids=x[:, :8], attention_mask=torch.ones_like(x[:, :8]), max_new_tokens=2,
                                    do_sample=False)
                        sync()
                        t = time.perf_counter()
                        hf.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=N,
                                    min_new_tokens=N, do_sample=False)
                        sync()
                    row["hf_tok_s"] = B * N / (time.perf_counter() - t)
                if B == Bs[1] and L == Ls[0]:  # the CUDA-graph decode: same tokens, its speed
                    st2 = {}
                    graphed = sampler.generate(model, prompts, n=n, max_new_tokens=N, prefill_tokens=16384,
                                               stats=st2, sampling=sampler.Sampling(temperature=0), cuda_graph=True)
                    row["graph_same_tokens"] = bool(torch.equal(graphed.tokens, ours.tokens))
                    st2 = {}
                    sampler.generate(model, prompts, n=n, max_new_tokens=N, stats=st2,
                                     sampling=sampler.Sampling(temperature=0), cuda_graph=True)
                    row["graph_decode_tok_s"] = B / (st2["decode_s"] / max(st2["decode_steps"], 1))
                rows.append(row)
        del model, hf
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    report["decode"] = rows
    f = lambda r, k: f"{r[k]:,.0f}" if k in r else "-"  # noqa: E731
    table(f"decode ({new_tokens} new tokens a row, greedy, n=min(batch, 8) samples a prompt; copy bandwidth "
          f"{bw / 1e9:.0f} GB/s)", ["shape", "batch", "context", "ours tok/s", "ours decode tok/s", "of roofline",
                                    "transformers tok/s", "ours/transformers", "CUDA graph decode tok/s (same?)"],
          [[r["shape"], r["batch"], r["context"], f(r, "ours_tok_s"), f(r, "ours_decode_tok_s"),
            f"{r['of_roofline']:.0%}", f(r, "hf_tok_s"),
            f"{r['ours_tok_s'] / r['hf_tok_s']:.1f}x" if "hf_tok_s" in r else "-",
            f"{f(r, 'graph_decode_tok_s')} ({r['graph_same_tokens']})" if "graph_same_tokens" in r else "-"]
           for r in rows])

# -----------------------------------------------------------------------------
# 3. one GRPO step on the InternVL3-1B shape


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


def check_grpo():
    if left() < 90:
        report["errors"].append("grpo: skipped (budget)")
        return
    from data.prepare import prepare
    work = tempfile.mkdtemp()
    name = "internvl3_1b"
    cfg_dir = os.path.join(ROOT, "config", "models", name)
    cfg, _ = load_config(cfg_dir)
    hf = os.path.join(work, "hf")
    os.makedirs(hf)
    vocab, img_id = synthetic_tokenizer(hf, cfg_dir, first=1000 if smoke else None)
    if smoke:  # the same layout, tiny
        cfg = VLMConfig(**{**cfg.__dict__, "image_size": 28, "patch_size": 14, "vit_hidden": 16, "vit_layers": 1,
                            "vit_heads": 1, "vit_mlp": 16, "n_embd": 32, "n_layer": 1, "n_head": 2, "n_kv_head": 1,
                            "head_dim": 16, "mlp_hidden": 32, "max_tiles": 1, "vocab_size": vocab,
                            "image_token_id": img_id})
    assert (cfg.vocab_size, cfg.image_token_id) == (vocab, img_id), (cfg.vocab_size, cfg.image_token_id, vocab, img_id)
    torch.manual_seed(seed)
    with torch.device(dev):
        m = VLM(cfg)
    save_pretrained(m.to(torch.bfloat16 if dev.type == "cuda" else torch.float32), hf)
    del m
    prepare(os.path.join(work, "synth"), n_sft=8, n_rl=64, n_val=4, n_test=4)
    P, n, L = (2, 2, 8) if smoke else (8, 8, 512)
    args = [f"--init_from={hf}", f"--data={work}/synth/rl.jsonl", "--val_data=", f"--out_dir={work}/grpo",
            f"--prompts_per_step={P}", f"--group_size={n}", f"--max_new_tokens=[[0, {L}]]", "--max_steps=1",
            "--micro_batch=8", "--export=False", "--save_every=100", "--dump_every=0", "--lr=1e-6",
            "--activation_checkpointing=True"]
    t = time.time()
    p = subprocess.run([sys.executable, os.path.join(ROOT, "grpo.py")] + args, cwd=ROOT, capture_output=True,
                       text=True, timeout=max(60, int(left())))
    if p.returncode != 0:
        report["errors"].append(f"grpo: exit {p.returncode}: {p.stderr[-1500:]}")
        return
    with open(os.path.join(work, "grpo", "log.jsonl")) as f:
        m = [json.loads(line) for line in f][-1]
    gpu_gb = torch.cuda.get_device_properties(dev).total_memory / 2**30 if dev.type == "cuda" else 80
    pl = subprocess.run([sys.executable, os.path.join(ROOT, "grpo.py")] + args +
                        ["--plan=True", "--plan_gpus=1", "--plan_gpus_per_node=1", f"--plan_gpu_gb={gpu_gb}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
    last = (pl.stdout.strip().splitlines() or ["(no plan output)"])[-1]
    plan_gb = None
    if "peak" in last:
        plan_gb = float(last.split("peak")[1].split("GB")[0])
    report["grpo"] = dict(shape=name, prompts=P, group=n, max_new_tokens=L, wall_s=time.time() - t,
                          t_rollout=m["t_rollout"], t_update=m["t_update"], resp_len=m["resp_len"],
                          logp_mismatch_max=m["logp_mismatch"], logp_mismatch_mean=m["logp_mismatch_mean"],
                          clip_frac=m["clip_frac"], approx_kl=m["approx_kl"], mem_peak_gb=m.get("mem_peak_gb"),
                          plan_line=last, plan_peak_gb=plan_gb)
    g = report["grpo"]
    table("grpo.py, one step, one GPU (FSDP2 world 1), random weights", ["metric", "value"],
          [[k, f"{v:.4g}" if isinstance(v, float) else v] for k, v in g.items()])


if __name__ == "__main__":
    for section in (check_kernels, check_decode, check_grpo):
        try:
            section()
        except Exception as e:  # one broken section must not hide the others' results
            import traceback
            report["errors"].append(f"{section.__name__}: {type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}")
            print(f"\n{section.__name__} FAILED: {type(e).__name__}: {e}", file=sys.stderr)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "gpu_check.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\n{len(report['errors'])} errors; {time.time() - T0:.0f} s; wrote {path}")
    for e in report["errors"]:
        print("ERROR:", e[:400])
    sys.exit(1 if any(not r["ok"] for r in report["kernels"]) or any("FAILED" in e or "exit" in e
                                                                     for e in report["errors"]) else 0)
