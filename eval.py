"""
Benchmark evaluation (docs/recipe.md, "Evaluation"): generate with sampler.py, score with rewards.py (the same
code the RL reward uses: text after </think>, last \\boxed{}, Math-Verify / option letters).

    python eval.py --init_from=out/sft/hf --data=data/synth/test.jsonl             # greedy, think mode
    python eval.py --init_from=out/grpo --group_size=5 --temperature=1.0 --max_new_tokens=16384 --data=mmk12.jsonl
    python eval.py --init_from=out/grpo --think=False     # no forced "<think>\\n" (R1V3 Table 4)
    python eval.py --init_from=out/grpo --no_wait=True    # ban "Wait" / "Alternatively" / "Hmm" via logits
    python eval.py --responses=out/eval/responses.jsonl   # re-score saved responses, no model needed
    torchrun --nproc_per_node=8 eval.py --init_from=DIR --tp=8   # tensor-parallel over 8 GPUs (tp.py); rank 0 writes

Skywork's published settings are config files (the command line still overrides them):
    python eval.py config/eval_r1v3_bench.py --init_from=DIR --data=mmmu.jsonl   # their VLMEvalKit runs: greedy, 16,384
    python eval.py config/eval_r1v3_mmk12.py --init_from=DIR --data=mmk12.jsonl  # their MMK12 script: T=0.8, 16,384
    python eval.py config/eval_r1v3_paper.py --init_from=DIR --data=mmmu.jsonl   # the report: T=1.0, avg of 5 runs
Generation settings not given on the command line or in a config file come from the checkpoint's
generation_config.json where it has them (max_new_tokens; temperature, or greedy when do_sample is false; top_k;
top_p; repetition_penalty), else from the defaults below; the run prints where each value came from. The default
budget (320 new tokens) is the tiny task's: a real checkpoint evaluated with fewer than 4,096 gets a warning, since
its reasoning traces are truncated and scored wrong.

Think mode forces the assistant turn to open with "<think>\\n" and scores only the text after </think>: the format
the cold-start SFT teaches. A base InternVL3 (or any model not trained on it) never learned that format, so think
mode measures the format, not the model: evaluate it with --think=False (the plain ChatML prompt, ending in
"<|im_start|>assistant\\n", and the whole response scored), the baseline to compare an SFT / RL checkpoint against.

--init_from takes an HF directory, a ckpt_XXXXXXX checkpoint, or a training out_dir. --data takes our JSONL (format in
data/common.py); MMMU / MathVista / MMK12 files convert to it with data/convert_bench.py, other parquet / arrow
data sets (Geometry3K, ThinkLite-VL, MMK12's train split) with data/convert_parquet.py. Writes to out_dir:
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
from data.common import check_chat_template, critical_token_ids, load_jsonl, resolve_system, token_pieces
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
top_k = 0  # 0 = off
top_p = 1.0
repetition_penalty = 1.0  # 1 = off; Skywork-R1V3's own inference uses 1.05 (sampler.Sampling: transformers' rule)
max_new_tokens = 320  # the tiny task's budget; real checkpoints need thousands (config/eval_r1v3_*.py: 16384)
batch_prompts = 64  # prompts per generate() call
limit = 0  # evaluate the first `limit` items only (0 = all)
system_prompt = "auto"  # 'auto': the checkpoint's (data/common.py resolve_system); '': no system turn; or the text
check_template = True  # False: run even if the checkpoint's chat template renders other prompts than ours
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


# -----------------------------------------------------------------------------
# Generation settings: the command line and config files first, then the checkpoint's generation_config.json, then
# the defaults above. And a warning when a real checkpoint gets the tiny task's budget.

GEN_KEYS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty")  # what generation_config sets
MIN_REAL_TOKENS = 4096  # fewer new tokens than this truncates most reasoning traces of a real model
_REAL_NAMES = ("internvl_chat", "internvlchatmodel", "internvl3", "skywork")  # in a real config.json (lowercased)


def read_generation_config(*dirs):
    """The first generation_config.json in dirs (the checkpoint's folder, then its tokenizer's) -> (path, dict), or
    (None, {}) when there is none. A file that is not a JSON object is an error naming it."""
    for d in dirs:
        path = os.path.join(d, "generation_config.json") if d and os.path.isdir(d) else None
        if path and os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    gen = json.load(f)
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{path}: cannot read: {e}") from e
            if not isinstance(gen, dict):
                raise ValueError(f"{path}: expected a JSON object, got {type(gen).__name__}")
            return path, gen
    return None, {}


def generation_defaults(gen):
    """A generation_config.json dict -> {our key: value} for what it sets: max_new_tokens, temperature (0, i.e.
    greedy, when do_sample is false, as transformers' generate() would decode), top_k, top_p, repetition_penalty.
    Keys it does not set (most checkpoints set none: Skywork-R1V3-38B's file holds only the transformers version)
    and null values are left out; max_length (prompt + response) is not a new-token budget and is ignored."""
    out = {k: gen[k] for k in ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty")
           if gen.get(k) is not None}
    if gen.get("do_sample") is False:
        out["temperature"] = 0.0
    return out


def resolve_generation(config, sources, gen_path, gen):
    """Which value each generation setting of `config` (eval.py's settings, after configure) takes: a key a config
    file or the command line set (`sources`, filled by configure) keeps it; else generation_config.json's value
    (gen, read from gen_path) if it sets one; else the default. -> (updates {key: value}, where {key: source} for
    every GEN_KEYS key in config, notes: list of lines about values that could not be used)."""
    from plumbing.configurator import check_type
    updates, where, notes = {}, {}, []
    for k, v in generation_defaults(gen).items():
        if k not in config:
            notes.append(f"{gen_path}: {k}={v!r} ignored (this sampler has no {k})")
        elif k not in sources:
            try:
                updates[k] = check_type(k, v, config[k], gen_path)
            except ValueError as e:
                raise ValueError(f"{gen_path}: {k}={v!r}: expected {type(config[k]).__name__}") from e
    for k in GEN_KEYS:
        if k in config:
            where[k] = sources.get(k) or (gen_path if k in updates else "default")
    return updates, where, notes


def real_checkpoint(vocab_size, model_dir=""):
    """Why this looks like a real (pretrained) checkpoint, or None for the tiny default: a vocabulary over 100k
    (Qwen2.5's is 151,674), or a config.json naming the original InternVL / Skywork classes."""
    if vocab_size > 100_000:
        return f"vocabulary {vocab_size:,}"
    path = os.path.join(model_dir, "config.json") if model_dir else ""
    if path and os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                c = json.load(f)
        except (OSError, ValueError):
            return None
        names = [str(c.get("model_type", "")), *map(str, c.get("architectures") or []), str(c.get("_name_or_path", ""))]
        hit = next((n for n in names if any(r in n.lower() for r in _REAL_NAMES)), None)
        if hit:
            return f"config.json names {hit}"
    return None


def budget_warning(max_new_tokens, vocab_size, model_dir=""):
    """One line, or None: a real checkpoint evaluated with fewer than MIN_REAL_TOKENS new tokens."""
    why = real_checkpoint(vocab_size, model_dir)
    if why is None or max_new_tokens >= MIN_REAL_TOKENS:
        return None
    return (f"eval.py: WARNING: max_new_tokens={max_new_tokens} on a real checkpoint ({why}): its reasoning traces run "
            f"to thousands of tokens, so most responses will be truncated and scored wrong; use >= {MIN_REAL_TOKENS} "
            "(R1V3 evaluates with 16384: config/eval_r1v3_bench.py)")


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
    _sources, _gen_from = {}, {}  # the keys a config file / the command line set; where each generation value is from
    config = configure(globals(), sys.argv[1:], sources=_sources)
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
        try:  # 'auto' -> the checkpoint's system turn; its chat template must render our prompts
            system_prompt = resolve_system(system_prompt, path, tok)
            check_chat_template(tok, system_prompt, think, path, check_template)
        except ValueError as e:
            sys.exit(f"eval.py: error: {e}")
        try:  # unset generation settings from the checkpoint's generation_config.json (module docstring)
            _gen_path, _gen = read_generation_config(path, getattr(tok, "name_or_path", ""))
            _updates, _gen_from, _notes = resolve_generation(config, _sources, _gen_path, _gen)
        except ValueError as e:
            sys.exit(f"eval.py: error: {e}")
        globals().update(_updates)
        config.update(_updates)
        if int(os.environ.get("RANK", 0)) == 0:
            print("eval.py: generation: " + ", ".join(f"{k}={config[k]!r} ({w})" for k, w in _gen_from.items()))
            for line in _notes + [budget_warning(max_new_tokens, max(model.cfg.vocab_size, len(tok)), path)]:
                if line:
                    print(line)
        sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                            ban=critical_token_ids(tok) if no_wait else ())
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
    if _gen_from:
        s["generation_from"] = _gen_from  # where each generation setting came from (command line, file, default)
    with open(os.path.join(out, "responses_rescored.jsonl" if responses else "responses.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(s, f, indent=2)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(markdown(s, title))
    print(markdown(s, title))
    print(f"wrote {out}/summary.json")
