"""
Benchmark evaluation (docs/recipe.md, "Evaluation"): generate with sampler.py, score with rewards.py (the same
code the RL reward uses: text after </think>, last \\boxed{}, Math-Verify / option letters).

    python eval.py --init_from=out/sft/hf --data=data/synth/test.jsonl             # greedy, think mode
    python eval.py --init_from=out/grpo --group_size=5 --temperature=1.0 --max_new_tokens=16384 --data=mmk12.jsonl
    python eval.py --init_from=out/grpo --think=False     # no forced "<think>\\n" (R1V3 Table 4)
    python eval.py --init_from=out/grpo --no_wait=True    # ban "Wait" / "Alternatively" / "Hmm" via logits
    python eval.py --responses=out/eval/responses.jsonl   # re-score saved responses, no model needed
    torchrun --nproc_per_node=8 eval.py --init_from=DIR --tp=8   # tensor-parallel over 8 GPUs (tp.py); rank 0 writes

--init_from takes an HF directory, a ckpt_XXXXXXX checkpoint, or a training out_dir. --data takes our JSONL (format in
data/common.py); MMMU / MathVista / MMK12 files convert to it with data/convert_bench.py. Writes to out_dir:
responses.jsonl (one line per sample and run: id, run, response, pred, answer, correct, ...), summary.json and
summary.md (accuracy avg@k with its spread over the k = group_size runs, pass@k, format rate, mean response length,
truncation rate, and the breakdown by whichever of domain / subject / difficulty the samples have). --responses
re-scores a responses file (ours, or any JSONL with id, response, answer [, options, run, n_tokens, truncated,
domain, ...]) and writes responses_rescored.jsonl + summary.json/.md beside it (or to out_dir). Bad input (a
missing, binary or malformed file, a missing image, an empty answer, a duplicate id) stops with "file:line: what is
wrong".
"""
import json
import math
import os
import sys
from collections import Counter

import torch

from tqdm import tqdm

from plumbing import load_inference_model, write_env
from plumbing.configurator import configure
from data.common import critical_token_ids, load_jsonl, token_pieces
from rewards import score_batch, to_letter
from rollout import rollout
from sampler import Sampling

# -----------------------------------------------------------------------------
init_from = "out/sft/hf"  # the model: an HF directory, a ckpt_XXXXXXX checkpoint or a training out_dir
data = "data/synth/test.jsonl"
tokenizer = ""  # default: the checkpoint's
out_dir = ""  # default: <init_from>/eval_<data file stem>_<think|nothink|nowait>
responses = ""  # score an existing responses.jsonl instead of generating
think = True  # the forced "<think>\n" prefix; False: R1V3 Table 4's no-think mode
no_wait = False  # ban the critical words' tokens ("Wait", "Alternatively", "Hmm"): R1V3 Table 4's no-wait mode
group_size = 1  # runs per item (avg@k, pass@k with k = group_size)
temperature = 0.0  # 0 = greedy; the paper uses 1.0 with group_size=5
top_p = 1.0
max_new_tokens = 320
batch_prompts = 64  # prompts per generate() call
limit = 0  # evaluate the first `limit` items only (0 = all)
system_prompt = ""
skip_bad = False
seed = 0
save_tokens = True  # responses.jsonl also holds each response's tokens, pieces and entropies (for viewer.py)
device = "cuda" if torch.cuda.is_available() else "cpu"
tp = 1  # > 1: under torchrun --nproc_per_node=tp, the ranks hold TP shards and generate together (tp.py)
# -----------------------------------------------------------------------------
# (the functions below are also used by grpo.py and entropy.py; the script itself runs under __main__)


_BREAKDOWN = ("domain", "subject", "difficulty")  # per-group accuracy for each of these a sample has


def summarize(rows, k):
    """rows: one dict per (item, run) with id, run, correct, format, n_tokens (None if unknown), truncated, and
    optionally the _BREAKDOWN keys."""
    by_item = {}
    for r in rows:
        by_item.setdefault(r["id"], []).append(r)
    runs = sorted({r["run"] for r in rows})
    acc_per_run = [sum(r["correct"] for r in rows if r["run"] == i) / len(by_item) for i in runs]
    mean = sum(acc_per_run) / len(acc_per_run)
    std = math.sqrt(sum((a - mean) ** 2 for a in acc_per_run) / len(acc_per_run))
    lens = [r["n_tokens"] for r in rows if r.get("n_tokens") is not None]
    s = {"n_items": len(by_item), "k": k, "accuracy": mean, "accuracy_std": std, "accuracy_per_run": acc_per_run,
         f"pass@{k}": sum(any(r["correct"] for r in rs) for rs in by_item.values()) / len(by_item),
         "format": sum(r["format"] for r in rows) / len(rows),
         "mean_tokens": sum(lens) / len(lens) if lens else None,
         "truncation_rate": sum(r.get("truncated", 0) for r in rows) / len(rows),
         "timeouts": sum(r.get("timeout", False) for r in rows)}
    for key in _BREAKDOWN:
        groups = {}
        for r in rows:
            groups.setdefault(str(r.get(key) or "-"), []).append(r["correct"])
        if len(groups) > 1 or "-" not in groups:
            s[f"by_{key}"] = {g: sum(v) / len(v) for g, v in sorted(groups.items())}
            s[f"n_by_{key}"] = {g: len(v) for g, v in sorted(groups.items())}  # (item, run) rows per group
    return s


def markdown(s, title):
    k = s["k"]
    tokens = "-" if s["mean_tokens"] is None else f"{s['mean_tokens']:.1f}"
    lines = [f"# {title}", "", "| metric | value |", "|---|---|"]
    lines += [f"| accuracy (avg@{k}) | {100 * s['accuracy']:.1f} ± {100 * s['accuracy_std']:.1f} |",
              f"| pass@{k} | {100 * s[f'pass@{k}']:.1f} |",
              f"| format | {100 * s['format']:.1f} |", f"| mean response tokens | {tokens} |",
              f"| truncated | {100 * s['truncation_rate']:.1f}% |", f"| items | {s['n_items']} |"]
    for key in _BREAKDOWN:
        if f"by_{key}" in s:
            n = s.get(f"n_by_{key}", {})
            lines += ["", f"| {key} | accuracy | n |", "|---|---|---|"]
            lines += [f"| {g} | {100 * a:.1f} | {n.get(g, '')} |" for g, a in s[f"by_{key}"].items()]
    return "\n".join(lines) + "\n"

# -----------------------------------------------------------------------------
# Reading inputs: a bad input stops the run with file:line and what is wrong; nothing is skipped silently


def _lines(path, what):
    """Yields (line number, text) of a UTF-8 file; a missing file, a folder or a binary file is a clear error."""
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a folder, expected a {what} JSONL file")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: {what} file not found")
    try:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    yield lineno, raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start}): a binary "
                                     f"file? expected a {what} JSONL file (benchmark parquet/JSON files convert "
                                     "with data/convert_bench.py)") from e
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e}") from e


def load_items(path, skip_bad=False, limit=0):
    """The benchmark JSONL -> samples (data/common.load_jsonl: fields, images, options checked per line), plus the
    checks scoring needs: a non-empty answer, unique ids (runs are grouped by id)."""
    for _ in _lines(path, "benchmark"):  # folder / missing / binary: named before load_jsonl trips on them
        pass
    items = load_jsonl(path, skip_bad=skip_bad)
    items = items[:limit] if limit else items
    seen = {}
    for s in items:
        if not s["answer"].strip():
            raise ValueError(f"{s['src']}: empty 'answer'")
        if s["id"] in seen:
            raise ValueError(f"{s['src']}: duplicate id {s['id']!r} (also at {seen[s['id']]})")
        seen[s["id"]] = s["src"]
    return items


def read_responses(path):
    """A responses JSONL -> rows for re-scoring. Needs id, response, answer per line; options, run, n_tokens,
    truncated and the _BREAKDOWN keys are kept if present (run defaults to the id's count so far, i.e. k lines
    of one id are k runs)."""
    rows, count = [], Counter()
    for lineno, line in _lines(path, "responses"):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: malformed JSON: {e}") from e
        if not isinstance(r, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(r).__name__}")
        missing = [key for key in ("id", "response", "answer") if key not in r]
        if missing:
            raise ValueError(f"{where}: missing field(s): {', '.join(missing)}")
        if not isinstance(r["response"], str):
            raise ValueError(f"{where}: 'response' must be a string, got {type(r['response']).__name__}")
        r["id"], r["answer"] = str(r["id"]), str(r["answer"] if r["answer"] is not None else "").strip()
        if not r["answer"]:
            raise ValueError(f"{where}: empty 'answer'")
        opts = r["options"] = r.get("options") or None  # [] and null both mean: not multiple choice
        if opts is not None and not (isinstance(opts, list) and len(opts) >= 2
                                     and all(isinstance(o, str) for o in opts)):
            raise ValueError(f"{where}: 'options' must be null or a list of at least 2 strings")
        if opts and to_letter(r["answer"], opts) is None:
            raise ValueError(f"{where}: answer {r['answer']!r} is neither an option letter nor an option text")
        if not isinstance(r.setdefault("run", count[r["id"]]), int) or r["run"] < 0:
            raise ValueError(f"{where}: 'run' must be a non-negative integer, got {r['run']!r}")
        count[r["id"]] += 1
        r.setdefault("n_tokens", None)
        r["truncated"] = int(bool(r.get("truncated", 0)))
        rows.append(r)
    if not rows:
        raise ValueError(f"{path}: no responses (empty file)")
    return rows


def rescore(rows, think=True):
    """Re-judges saved responses in place with rewards.py (the training reward's extraction and verification)."""
    scores = score_batch([r["response"] for r in rows], [r["answer"] for r in rows],
                         [r.get("options") for r in rows], think=think)
    for r, sc in zip(rows, scores):
        r.update(pred=sc["pred"], correct=int(sc["accuracy"]), format=int(sc["format"]), reward=sc["reward"],
                 timeout=bool(sc["timeout"]))
    return rows


def evaluate(model, tok, items, group_size, max_new_tokens, sampling=Sampling(temperature=0.0), *, think=True, seed=0,
             batch_prompts=64, system=None, progress=True, tokens=True, budget=None):
    """Generate group_size responses per item as sampling says (default greedy; its bans, e.g. the no-wait ones, are
    kept) and score them (rollout.py: the same path as the RL reward). Returns one row per (item, run); with
    tokens=True each row also holds the response's token pieces and their entropies (for viewer.py and entropy.py).
    Item i's samples are seeded by (seed, i), whatever the batching. think: the forced "<think>\n" prefix, and
    scoring that expects it. budget: the sampler's memory budget (None: measured per call; a TP group passes one
    agreed value, so its ranks chunk alike). progress: a progress bar on rank 0."""
    rows = []
    bar = tqdm(total=len(items), desc="eval", unit="item", disable=not progress or int(os.environ.get("RANK", 0)) != 0)
    for b in range(0, len(items), batch_prompts):
        # a chunk at a time: a benchmark's images as tiles (up to 13 x 3 x 448 x 448 fp32 each) do not fit at once
        chunk = items[b:b + batch_prompts]
        seeds = [seed * 1_000_003 + b + i for i in range(len(chunk))]
        out, texts, scores, _ = rollout(model, tok, chunk, group_size, max_new_tokens, seeds, sampling=sampling,
                                        think=think, system=system, budget=budget)
        for r, (text, sc) in enumerate(zip(texts, scores)):
            s, L = chunk[r // group_size], int(out.lengths[r])
            row = {"id": s["id"], "run": r % group_size, "question": s["question"], "images": s.get("images", []),
                   "options": s.get("options"), "response": text, "pred": sc["pred"], "answer": s["answer"],
                   "correct": int(sc["accuracy"]), "format": int(sc["format"]), "reward": sc["reward"],
                   "n_tokens": L, "truncated": int(out.truncated[r]), "timeout": bool(sc["timeout"]),
                   "mean_entropy": float(out.entropies[r, :L].mean()), **{key: s.get(key) for key in _BREAKDOWN}}
            if tokens:
                row.update(tokens=out.response(r), pieces=token_pieces(tok, out.response(r)),
                           entropies=out.entropies[r, :L].tolist())
            rows.append(row)
        bar.update(len(chunk))
    bar.close()
    return rows


if __name__ == "__main__":
    config = configure(globals(), sys.argv[1:])
    mode = ("nowait" if think else "nothink_nowait") if no_wait else ("think" if think else "nothink")
    if responses:  # re-judge saved outputs (as VLMEvalKit users do): no model, no generation
        try:
            rows = read_responses(responses)
        except ValueError as e:
            sys.exit(f"eval.py: error: {e}")
        rescore(rows, think=think)
        out = out_dir or os.path.dirname(os.path.abspath(responses))
        title = f"re-scored {responses} ({mode})"
    else:
        try:
            items = load_items(data, skip_bad, limit)
        except ValueError as e:
            sys.exit(f"eval.py: error: {e}")
        budget = None
        if tp > 1:  # every rank loads its TP shard and generates every item with the others; rank 0 writes
            from plumbing import agree_min, compute_cleanup
            from sampler import memory_budget
            from plumbing.tp import check_same, init_tp, load_tp_inference_model
            group, rank, dev = init_tp(tp, seed)
            dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
            model, tok, path = load_tp_inference_model(init_from, group, dev, dtype, tokenizer)
            budget = agree_min(memory_budget(dev))  # one value for the group: the same chunks on every rank
        else:
            dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32  # bf16 weights and cache on a GPU
            model, tok, path = load_inference_model(init_from, device, dtype, tokenizer=tokenizer)
        sampling = Sampling(temperature=temperature, top_p=top_p, ban=critical_token_ids(tok) if no_wait else ())
        rows = evaluate(model, tok, items, group_size, max_new_tokens, sampling, think=think, seed=seed,
                        batch_prompts=batch_prompts, system=system_prompt or None, tokens=save_tokens, budget=budget)
        if tp > 1:
            check_same(group, [r["response"] for r in rows])
            compute_cleanup()
            if rank:
                sys.exit(0)
        stem = os.path.splitext(os.path.basename(data))[0]
        out = out_dir or os.path.join(path, f"eval_{stem}_{mode}")
        title = f"{path} on {data} ({mode}, k={group_size}, T={temperature}, max_new_tokens={max_new_tokens})"
    os.makedirs(out, exist_ok=True)
    write_env(out)
    s = summarize(rows, max(r["run"] for r in rows) + 1)
    s["config"] = config
    with open(os.path.join(out, "responses_rescored.jsonl" if responses else "responses.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(s, f, indent=2)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(markdown(s, title))
    print(markdown(s, title))
    print(f"wrote {out}/summary.json")
