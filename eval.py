"""
Benchmark evaluation (RECIPE.md section 6): generate with sampler.py, score with rewards.py (the same code the
RL reward uses: text after </think>, last \\boxed{}, Math-Verify / option letters).

    python eval.py --ckpt=out/sft/hf --data=data/synth/test.jsonl                  # greedy, think mode
    python eval.py --ckpt=out/grpo --k=5 --temperature=1.0 --max_new_tokens=16384 --data=/data/mmk12.jsonl
    python eval.py --ckpt=out/grpo --mode=nothink      # no forced "<think>\\n" (R1V3 Table 4)
    python eval.py --ckpt=out/grpo --mode=nowait       # ban "Wait" / "Alternatively" / "Hmm" via logits
    python eval.py --responses=out/eval/responses.jsonl   # re-score saved responses, no model needed

--ckpt takes an HF directory, a ckpt_XXXXXXX checkpoint, or a training out_dir. Writes to out_dir:
responses.jsonl (one line per sample and run: id, run, response, pred, answer, correct, ...), summary.json and
summary.md (accuracy avg@k with its spread over runs, pass@k, format rate, mean response length, truncation rate,
and the breakdown by domain and difficulty).
"""
import json
import math
import os
import sys
import time

import torch

from common import load_inference_model, print0
from configurator import configure
from data.common import critical_token_ids, encode_prompt, load_jsonl
from rewards import score_batch
from sampler import generate

# -----------------------------------------------------------------------------
ckpt = "out/sft/hf"
data = "data/synth/test.jsonl"
tokenizer = ""  # default: the checkpoint's
out_dir = ""  # default: <ckpt>/eval_<data file stem>_<mode>
responses = ""  # score an existing responses.jsonl instead of generating
mode = "think"  # 'think' | 'nothink' | 'nowait'
k = 1  # runs per item (avg@k, pass@k)
temperature = 0.0  # 0 = greedy; the paper uses 1.0 with k=5
top_p = 1.0
max_new_tokens = 320
batch_prompts = 64  # prompts per generate() call
limit = 0  # evaluate the first `limit` items only (0 = all)
system_prompt = ""
skip_bad = False
seed = 0
device = "cuda" if torch.cuda.is_available() else "cpu"
# -----------------------------------------------------------------------------
# (the functions below are also used by grpo.py and entropy.py; the script itself runs under __main__)


def summarize(rows, k):
    """rows: one dict per (item, run) with id, run, correct, format, n_tokens, truncated, domain, difficulty."""
    by_item = {}
    for r in rows:
        by_item.setdefault(r["id"], []).append(r)
    runs = sorted({r["run"] for r in rows})
    acc_per_run = [sum(r["correct"] for r in rows if r["run"] == i) / len(by_item) for i in runs]
    mean = sum(acc_per_run) / len(acc_per_run)
    std = math.sqrt(sum((a - mean) ** 2 for a in acc_per_run) / len(acc_per_run))
    s = {"n_items": len(by_item), "k": k, "accuracy": mean, "accuracy_std": std, "accuracy_per_run": acc_per_run,
         f"pass@{k}": sum(any(r["correct"] for r in rs) for rs in by_item.values()) / len(by_item),
         "format": sum(r["format"] for r in rows) / len(rows),
         "mean_tokens": sum(r["n_tokens"] for r in rows) / len(rows),
         "truncation_rate": sum(r["truncated"] for r in rows) / len(rows),
         "timeouts": sum(r.get("timeout", False) for r in rows)}
    for key in ("domain", "difficulty"):
        groups = {}
        for r in rows:
            groups.setdefault(r.get(key) or "-", []).append(r["correct"])
        if len(groups) > 1 or "-" not in groups:
            s[f"by_{key}"] = {g: sum(v) / len(v) for g, v in sorted(groups.items())}
    return s


def markdown(s, title):
    k = s["k"]
    lines = [f"# {title}", "", "| metric | value |", "|---|---|"]
    lines += [f"| accuracy (avg@{k}) | {100 * s['accuracy']:.1f} ± {100 * s['accuracy_std']:.1f} |",
              f"| pass@{k} | {100 * s[f'pass@{k}']:.1f} |",
              f"| format | {100 * s['format']:.1f} |", f"| mean response tokens | {s['mean_tokens']:.1f} |",
              f"| truncated | {100 * s['truncation_rate']:.1f}% |", f"| items | {s['n_items']} |"]
    for key in ("by_domain", "by_difficulty"):
        if key in s:
            lines += ["", f"| {key[3:]} | accuracy |", "|---|---|"]
            lines += [f"| {g} | {100 * a:.1f} |" for g, a in s[key].items()]
    return "\n".join(lines) + "\n"


def evaluate(model, tok, items, k, temperature, max_new_tokens, mode, seed=0, batch_prompts=64, system=None,
             top_p=1.0, log=print0):
    """Generate k responses per item and score them. Returns the per-(item, run) rows."""
    think = mode != "nothink"
    ban = list(critical_token_ids(tok)) if mode == "nowait" else None
    eos = [i for i in {tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id} if i is not None]
    prompts = [encode_prompt(tok, s, model.cfg, think, system) for s in items]
    rows, t0 = [], time.time()
    for b in range(0, len(items), batch_prompts):
        chunk = prompts[b:b + batch_prompts]
        outs = generate(model, chunk, n=k, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                        eos_token_id=eos, seed=seed + b, ban_token_ids=ban)
        texts = [tok.decode(o.tokens, skip_special_tokens=True) for o in outs]
        its = [items[b + i // k] for i in range(len(outs))]
        scores = score_batch(texts, [s["answer"] for s in its], [s.get("options") for s in its], think=think)
        for i, (o, text, sc, s) in enumerate(zip(outs, texts, scores, its)):
            rows.append({"id": s["id"], "run": i % k, "response": text, "pred": sc["pred"], "answer": s["answer"],
                         "options": s.get("options"), "correct": int(sc["accuracy"]), "format": int(sc["format"]), "reward": sc["reward"],
                         "n_tokens": len(o.tokens), "truncated": int(o.finish_reason == "length"),
                         "timeout": bool(sc["timeout"]), "domain": s.get("domain"),
                         "difficulty": s.get("difficulty"), "mean_entropy": sum(o.entropies) / max(1, len(o.entropies))})
        log(f"eval: {min(b + batch_prompts, len(items))}/{len(items)} items, {time.time() - t0:.1f} s")
    return rows


if __name__ == "__main__":
    config = configure(globals(), sys.argv[1:])
    assert mode in ("think", "nothink", "nowait"), f"mode must be think, nothink or nowait, not {mode!r}"
    if responses:  # re-judge saved outputs (as VLMEvalKit users do): no model, no generation
        with open(responses) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        scores = score_batch([r["response"] for r in rows], [r["answer"] for r in rows],
                             [r.get("options") for r in rows], think=mode != "nothink")
        for r, sc in zip(rows, scores):
            r.update(pred=sc["pred"], correct=int(sc["accuracy"]), format=int(sc["format"]),
                     timeout=bool(sc["timeout"]))
        out = out_dir or os.path.dirname(os.path.abspath(responses))
        title = f"re-scored {responses}"
    else:
        items = load_jsonl(data, skip_bad=skip_bad)
        items = items[:limit] if limit else items
        model, tok, ckpt_path = load_inference_model(ckpt, device, tokenizer=tokenizer)
        rows = evaluate(model, tok, items, k, temperature, max_new_tokens, mode, seed, batch_prompts,
                        system_prompt or None, top_p)
        stem = os.path.splitext(os.path.basename(data))[0]
        out = out_dir or os.path.join(ckpt_path, f"eval_{stem}_{mode}")
        title = f"{ckpt_path} on {data} ({mode}, k={k}, T={temperature}, max_new_tokens={max_new_tokens})"
    os.makedirs(out, exist_ok=True)
    s = summarize(rows, max(r["run"] for r in rows) + 1)
    s["config"] = config
    if not responses:
        with open(os.path.join(out, "responses.jsonl"), "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(s, f, indent=2)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(markdown(s, title))
    print(markdown(s, title))
    print(f"wrote {out}/summary.json")
