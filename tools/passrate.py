"""
Skywork-OR1's offline pass-rate filter (arXiv 2505.22312 sec. 3, data preparation; docs/recipe.md, "R1V2 and
Skywork-OR1"): sample group_size (n) answers per RL prompt with a checkpoint and keep only the prompts it solves
neither 0/n nor n/n times. A group that is all right or all wrong has zero advantage everywhere: it costs a rollout
and teaches nothing.

    python tools/passrate.py --init_from=out/sft/hf --data=data/synth/rl.jsonl --group_size=8
    python tools/passrate.py --init_from=/ckpt/r1v3_sft/hf --data=/data/mmk12_rl.jsonl --group_size=16 \\
        --max_new_tokens=4096

Writes out_file (default: <data>_passrate.jsonl beside the data, so relative image paths still resolve): the kept
prompts as their original JSON lines plus "pass_count" and "pass_n", and <out_file stem>_counts.json with every prompt's
count, the histogram of counts and how many were dropped as 0/n and n/n. Generation and scoring are rollout.py's,
the same as the RL reward (temperature 1 by default: the distribution GRPO samples from).
"""
import json
import os
import sys
from collections import Counter

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

from plumbing import environment, load_inference_model, print0
from plumbing.configurator import configure
from data.common import check_chat_template, load_jsonl, resolve_system
from eval import evaluate
from sampler import Sampling

# -----------------------------------------------------------------------------
init_from = "out/sft/hf"  # the model: an HF directory, a ckpt_XXXXXXX checkpoint or a training out_dir
data = "data/synth/rl.jsonl"
out_file = ""  # the kept prompts, a JSONL file; default: <data stem>_passrate.jsonl beside the data
group_size = 8  # samples per prompt (n of the pass rate)
temperature = 1.0
top_p = 1.0
max_new_tokens = 320
batch_prompts = 64
limit = 0  # the first `limit` prompts only (0 = all)
think = True
system_prompt = "auto"  # 'auto': the checkpoint's (data/common.py resolve_system); '': no system turn; or the text
check_template = True  # False: run even if the checkpoint's chat template renders other prompts than ours
tokenizer = ""
skip_bad = False
seed = 0
device = "cuda" if torch.cuda.is_available() else "cpu"
# -----------------------------------------------------------------------------

if __name__ == "__main__":
    config = configure(globals(), sys.argv[1:])
    n = group_size
    if n < 2:
        raise SystemExit(f"passrate.py: group_size={n}: need at least 2 samples per prompt for a pass rate to filter "
                         "on")
    items = load_jsonl(data, skip_bad=skip_bad)
    items = items[:limit] if limit else items
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model, tok, path = load_inference_model(init_from, device, dtype, tokenizer=tokenizer)
    system_prompt = resolve_system(system_prompt, path, tok)  # 'auto' -> the checkpoint's
    check_chat_template(tok, system_prompt, think, path, check_template)
    rows = evaluate(model, tok, items, n, max_new_tokens, Sampling(temperature=temperature, top_p=top_p), think=think,
                    seed=seed, batch_prompts=batch_prompts, system=system_prompt or None, tokens=False)
    solved = Counter()  # by the item's position (rows come k per item, in order): ids need not be unique
    for i, r in enumerate(rows):
        solved[i // n] += r["correct"]
    out_path = out_file or os.path.splitext(data)[0] + "_passrate.jsonl"
    same_dir = os.path.dirname(os.path.abspath(out_path)) == os.path.dirname(os.path.abspath(data))
    with open(data, encoding="utf-8") as f:
        lines = f.read().splitlines()
    kept = 0
    with open(out_path, "w") as f:
        for j, s in enumerate(items):
            c = solved[j]
            if 0 < c < n:  # informative: GRPO's group for it would have non-zero advantages
                rec = json.loads(lines[int(s["src"].rsplit(":", 1)[1]) - 1])
                if not same_dir and s["images"]:  # elsewhere, the relative image paths would not resolve
                    rec.pop("image", None)
                    rec["images"] = s["images"]  # absolute (load_jsonl made them so)
                f.write(json.dumps(dict(rec, pass_count=c, pass_n=n)) + "\n")
                kept += 1
    hist = Counter(solved[j] for j in range(len(items)))
    report = {"ckpt": path, "data": data, "n": n, "prompts": len(items), "kept": kept,
              "dropped_unsolved": hist[0], "dropped_always_solved": hist[n],
              "histogram": {str(k): hist[k] for k in range(n + 1)},
              "counts": {s["src"]: solved[j] for j, s in enumerate(items)}, "config": config,
              "env": environment()}
    counts_path = os.path.splitext(out_path)[0] + "_counts.json"
    with open(counts_path, "w") as f:
        json.dump(report, f, indent=1)
    print0(f"{len(items)} prompts, {n} samples each: kept {kept}, dropped {hist[0]} solved 0/{n} and {hist[n]} "
           f"solved {n}/{n}; histogram {dict(sorted(hist.items()))}")
    print0(f"wrote {out_path} and {counts_path}")
