"""
Critical-token entropy across checkpoints, and checkpoint selection by it (Skywork-R1V3 section 5 and Fig. 5;
docs/recipe.md, "Critical-token entropy").

    python entropy.py --init_from='out/grpo/ckpt_*'                   # every GRPO checkpoint on data/synth/val.jsonl
    python entropy.py --init_from='out/grpo/ckpt_*' --limit=64 --group_size=2     # quicker: 64 items x 2 samples
    python entropy.py --init_from='["out/sft/hf", "out/grpo/hf"]' --select=accuracy
    python entropy.py --init_from='/ckpt/run1/ckpt_*' --data=/data/mmk12_val.jsonl --max_new_tokens=8192 \\
        --threshold=6.8
    torchrun --nproc_per_node=8 entropy.py --init_from='/ckpt/run1/ckpt_*' --tp=8   # tensor-parallel (tp.py)

--init_from: the checkpoints, several of them: a glob, a comma-separated list, or a Python list of globs/paths; each
entry an HF directory, a ckpt_XXXXXXX checkpoint or a training out_dir (plumbing.load_inference_model). An entry
that matches nothing is an error naming it. Checkpoints keep the order given; those of one glob are sorted by step.

For each checkpoint: decode group_size responses per validation item with sampler.py (temperature 1.0 by default,
seeded; the same seeds as eval.evaluate, so the decodes and the accuracy are the ones eval.py would get), score
them with rewards.py, find the critical words in the decoded text (critical_positions) and read the full-vocabulary
entropy of the distribution the occurrence's first token was sampled from (Rollouts.entropies).
Writes into out_dir: entropy.json (one row per checkpoint, the correlations, the selection), entropy.md (the
table), entropy.png (critical-token entropy and accuracy against step), selected.txt (the selected path) and, with
export_hf, selected_hf.txt (an HF directory of it: the path itself, or out_dir/hf exported from a ckpt_*), for
speedrun.sh: `python connector_tune.py --init_from=$(cat out/entropy/selected_hf.txt)`.

Choices the report leaves open (ours; docs/recipe.md, "Critical-token entropy"): the position is the first token of
each occurrence; the aggregate is the mean over all occurrences (the mean of per-response means is reported beside
it); words match case-insensitively as whole words, so "Waiting" and "Hmmm" do not count; "But wait" counts once,
as "But wait".
"""
import ast
import glob
import json
import math
import os
import re
import shutil
import sys
import time
from statistics import NormalDist

import torch
from torch.distributed.checkpoint import CheckpointException

from tqdm import tqdm

from plumbing import load_inference_model, print0, write_env
from plumbing.hf import save_pretrained
from plumbing.configurator import configure
from data.common import CRITICAL_WORDS, check_chat_template, load_jsonl, resolve_system, save_system
from eval import evaluate, summarize
from sampler import Sampling

# -----------------------------------------------------------------------------
init_from = "out/grpo/ckpt_*"  # the checkpoints to compare: glob | "a,b" | '["a", "dir/ckpt_*"]'
data = "data/synth/val.jsonl"
limit = 0  # the first `limit` items only (0 = all)
tokenizer = ""  # default: each checkpoint's own
out_dir = "out/entropy"
group_size = 4  # samples per item
temperature = 1.0  # the distribution the policy was trained to sample from; 0 = greedy (then group_size=1 will do)
top_p = 1.0
max_new_tokens = 320
batch_prompts = 64  # prompts per generate() call
think = True  # forced "<think>\n" prefix, as in training
system_prompt = "auto"  # 'auto': the checkpoint's (data/common.py resolve_system); '': no system turn; or the text
check_template = True  # False: run even if the checkpoint's chat template renders other prompts than ours
critical_words = list(CRITICAL_WORDS)  # "Wait", "Alternatively", "Hmm", "But wait"
threshold = 2.0  # "high-entropy token" in nats, as grpo.py's high_entropy (R1V3 uses 6.8 for Qwen's 152k vocab)
select = "critical_entropy"  # 'critical_entropy' (R1V3 section 5) | 'accuracy' | 'last'
min_critical = 5  # a checkpoint needs this many occurrences to be ranked by their entropy
export_hf = True  # a selected ckpt_* is also written as an HF directory, out_dir/hf (connector_tune.py's init_from)
skip_bad = False
seed = 0
device = "cuda" if torch.cuda.is_available() else "cpu"
tp = 1  # > 1: under torchrun --nproc_per_node=tp, the ranks hold TP shards and decode together (tp.py)
# -----------------------------------------------------------------------------
SELECT_RULES = ("critical_entropy", "accuracy", "last")
_STEP_RE = re.compile(r"^ckpt_(\d+)$")

# -----------------------------------------------------------------------------
# finding critical tokens


def critical_regex(words):
    """-> (compiled regex, the words in group order). Case-insensitive whole words ((?<!\\w)...(?!\\w): "Waiting"
    is not "Wait"), the words of a phrase separated by any whitespace; entries equal up to case and spacing are
    kept once. finditer scans left to right without overlaps, so "But wait" consumes its "wait"; longest entries
    first, so that where two entries start at the same place ("Wait a minute", "Wait") the longer one wins."""
    canon, seen = [], set()
    for w in sorted(words, key=lambda w: len(" ".join(w.split())), reverse=True):  # stable: ties keep the order
        key = " ".join(w.lower().split())
        if not key:
            raise ValueError(f"entropy.py: empty entry in critical_words {list(words)!r}")
        if key not in seen:
            seen.add(key)
            canon.append(w)
    alts = "|".join("(" + r"\s+".join(map(re.escape, w.split())) + ")" for w in canon)
    return re.compile(rf"(?<!\w)(?:{alts})(?!\w)", re.IGNORECASE), canon


def _covered(tok, ids, text, n):
    # how many leading characters of text the first n tokens spell out. A prefix ending inside a multi-byte
    # character decodes to U+FFFD, which does not match the text: that character belongs to the token completing it
    return len(os.path.commonprefix([tok.decode(ids[:n], skip_special_tokens=False), text]))


def critical_positions(tok, token_ids, words=CRITICAL_WORDS):
    """Occurrences of the critical words in a generated sequence -> [(token_index, word)], in order.
    Matching is on the decoded text, so it does not depend on how the tokenizer cut the word (leading space or
    newline inside the token or not, capitalisation, one token or several, a multi-word phrase). Each occurrence
    maps to the token that produced its first character: the last token of the shortest prefix whose decode
    spells the text up to and including that character. tok: anything with decode(ids, skip_special_tokens=)."""
    ids = [int(t) for t in token_ids]
    text = tok.decode(ids, skip_special_tokens=False)
    pattern, canon = critical_regex(words)
    out, lo = [], 0
    for m in pattern.finditer(text):
        # binary search for the shortest such prefix (a longer prefix spells at least as much): O(log T) decodes
        # per occurrence, not one per token
        a, b = lo + 1, len(ids)
        while a < b:
            mid = (a + b) // 2
            if _covered(tok, ids, text, mid) > m.start():
                b = mid
            else:
                a = mid + 1
        lo = a - 1
        out.append((lo, canon[m.lastindex - 1]))
    return out

# -----------------------------------------------------------------------------
# decoding and per-checkpoint statistics


def decode(model, tok, items, group_size, max_new_tokens, sampling, seed=0, batch_prompts=64, think=True, system=None,
           budget=None):
    """eval.evaluate's generation and scoring (the same prompts, stop rule and seeds, so the accuracy is the one
    eval.py would get); its rows carry each response's tokens and per-token entropies."""
    return evaluate(model, tok, items, group_size, max_new_tokens, sampling, think=think, seed=seed,
                    batch_prompts=batch_prompts, system=system, progress=False, budget=budget)


def _mean(x):
    return math.fsum(x) / len(x) if x else None


def response_stats(rows, tok, words, threshold):
    """Entropy statistics of decoded responses (rows with 'tokens' and 'entropies', entropies[i] = entropy of the
    distribution token i was sampled from). Critical entropy: mean over all occurrences, and the mean of the
    per-response means (responses without an occurrence do not enter it)."""
    occ, per_resp, by_word, all_ent = [], [], {}, []
    for r in rows:
        e = []
        for i, w in critical_positions(tok, r["tokens"], words):
            e.append(r["entropies"][i])
            by_word.setdefault(w, []).append(r["entropies"][i])
        occ += e
        if e:
            per_resp.append(_mean(e))
        all_ent += r["entropies"]
    return {"critical_entropy": _mean(occ), "critical_entropy_per_response": _mean(per_resp),
            "critical_count": len(occ), "responses_with_critical": len(per_resp), "n_responses": len(rows),
            "critical_by_word": {w: {"count": len(v), "entropy": _mean(v)} for w, v in by_word.items()},
            "mean_entropy": _mean(all_ent), "n_tokens": len(all_ent),
            "high_entropy_share": sum(x > threshold for x in all_ent) / len(all_ent) if all_ent else None}

# -----------------------------------------------------------------------------
# across checkpoints: correlation (R1V3 Fig. 5 shows one, without a coefficient) and selection


def pearson(x, y):
    """Pearson r of two equal-length sequences; None with fewer than 3 points or a constant sequence."""
    if len(x) != len(y):
        raise ValueError(f"entropy.py pearson: {len(x)} x values but {len(y)} y values")
    if len(x) < 3 or len(set(x)) == 1 or len(set(y)) == 1:
        return None
    mx, my = math.fsum(x) / len(x), math.fsum(y) / len(y)
    sxy = math.fsum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = math.fsum((a - mx) ** 2 for a in x), math.fsum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy)


def ranks(x):
    """1-based ranks; tied values share the average of the ranks they span."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    r = [0.0] * len(x)
    a = 0
    while a < len(order):
        b = a
        while b + 1 < len(order) and x[order[b + 1]] == x[order[a]]:
            b += 1
        for j in range(a, b + 1):
            r[order[j]] = (a + b) / 2 + 1
        a = b + 1
    return r


def pearson_ci(r, n, level=0.95, n_controlled=0):
    """Fisher-z confidence interval of a Pearson r from n independent points -> [lo, hi], or None (r None, or too
    few points). z = atanh(r) is about normal with sd 1 / sqrt(n - 3 - n_controlled) (n_controlled: variables
    partialled out first, e.g. g - 1 for a correlation pooled over g groups after centring each group)."""
    if r is None or n - 3 - n_controlled < 1:
        return None
    if abs(r) >= 1:
        return [float(r), float(r)]
    q = NormalDist().inv_cdf(0.5 + level / 2)
    z, se = math.atanh(r), 1 / math.sqrt(n - 3 - n_controlled)
    return [math.tanh(z - q * se), math.tanh(z + q * se)]


def spearman(x, y):
    """Spearman rho: Pearson r of the average ranks; None where pearson() gives None."""
    if len(x) != len(y):
        raise ValueError(f"entropy.py spearman: {len(x)} x values but {len(y)} y values")
    return pearson(ranks(x), ranks(y))


def correlations(rows, key="critical_entropy", y_key="accuracy", level=0.95, n_controlled=0):
    """Correlation of rows[*][key] with rows[*][y_key] over the checkpoints that have both; pearson_ci: its
    Fisher-z interval (the checkpoints taken as independent points, which a run's successive ones are not quite)."""
    pts = [(r[key], r[y_key]) for r in rows if r.get(key) is not None and r.get(y_key) is not None]
    x, y = [p[0] for p in pts], [p[1] for p in pts]
    r = pearson(x, y)
    return {"n": len(pts), "pearson": r, "pearson_ci": pearson_ci(r, len(pts), level, n_controlled),
            "ci": f"{level:.0%} Fisher z", "spearman": spearman(x, y)}


def accuracy_se(rows):
    """Standard error of an accuracy estimate from one row per (item, run) with 'id' and 'correct': the items are
    the sample (each item's mean over its runs, their sd / sqrt(n items)); with one run, the binomial SE (n - 1)."""
    by_item = {}
    for r in rows:
        by_item.setdefault(r["id"], []).append(r["correct"])
    p = [_mean(v) for v in by_item.values()]
    if len(p) < 2:
        return None
    m = _mean(p)
    return math.sqrt(math.fsum((x - m) ** 2 for x in p) / (len(p) - 1) / len(p))


def _name(r):
    return r["ckpt"] if r.get("step") is None else f"{r['ckpt']} (step {r['step']})"


def select_checkpoint(rows, rule="critical_entropy", min_critical=1):
    """The checkpoint to keep -> {'index', 'ckpt', 'step', 'rule', 'applied', 'reason'}.
    critical_entropy (R1V3 section 5): the highest mean critical-token entropy among the checkpoints with at least
      min_critical occurrences (ties: the more accurate, then the later one); if none has that many, 'last'.
    accuracy: the highest accuracy on the same decodes (ties: the later one). last: the last checkpoint."""
    if rule not in SELECT_RULES:
        raise ValueError(f"entropy.py: select={rule!r}; choose one of {', '.join(SELECT_RULES)}")
    if not rows:
        raise ValueError("entropy.py: no checkpoints to select from")
    applied, note = rule, ""
    if rule == "critical_entropy":
        ok = [i for i, r in enumerate(rows)
              if r["critical_entropy"] is not None and r["critical_count"] >= min_critical]
        if ok:
            i = max(ok, key=lambda i: (rows[i]["critical_entropy"], rows[i]["accuracy"], i))
            reason = (f"highest mean critical-token entropy, {rows[i]['critical_entropy']:.4f} nats over "
                      f"{rows[i]['critical_count']} occurrences, among {len(ok)} of {len(rows)} checkpoints with "
                      f">= {min_critical} occurrences (R1V3 section 5: high where the model reasons, low where it "
                      f"only imitates the style)")
        else:
            applied = "last"
            note = (f"no checkpoint has >= {min_critical} critical-token occurrences (most: "
                    f"{max(r['critical_count'] for r in rows)}), so their entropy cannot rank them; fell back to ")
    if applied == "accuracy":
        i = max(range(len(rows)), key=lambda i: (rows[i]["accuracy"], i))
        reason = f"highest accuracy on the same decodes, {rows[i]['accuracy']:.4f}"
    if applied == "last":
        i = len(rows) - 1
        reason = note + "the last checkpoint in the order given"
    return {"index": i, "ckpt": rows[i]["ckpt"], "step": rows[i].get("step"), "rule": rule, "applied": applied,
            "reason": reason}

# -----------------------------------------------------------------------------
# checkpoints


def parse_step(path):
    """The step of a .../ckpt_XXXXXXX path; None for anything else (an HF directory)."""
    m = _STEP_RE.match(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else None


def _check_ckpt(path):
    # fail before hours of decoding, not at the tenth checkpoint: the layouts plumbing.load_inference_model reads
    if not os.path.isdir(path):
        raise FileNotFoundError(f"entropy.py: checkpoint {path!r} not found (not a directory)")
    if not os.access(path, os.R_OK | os.X_OK):
        raise PermissionError(f"entropy.py: checkpoint {path!r} is not readable")
    markers = ("config.json", "state.json", os.path.join("hf", "config.json"))
    if not any(os.path.isfile(os.path.join(path, f)) for f in markers) \
            and not any(parse_step(d) is not None for d in os.listdir(path)):
        raise FileNotFoundError(f"entropy.py: checkpoint {path!r} holds no model: neither config.json (HF), "
                                f"state.json (ckpt_*), hf/ nor ckpt_* inside")


def resolve_ckpts(spec):
    """--init_from -> list of checkpoint paths. spec: a list, or a string: a Python list literal, or entries separated
    by commas. Each entry is a path or a glob; a glob's directories are sorted by step (then name); entries keep
    their order; duplicates are dropped. An entry matching nothing raises ValueError naming it."""
    if isinstance(spec, str):
        s = spec.strip()
        try:
            spec = ast.literal_eval(s) if s.startswith("[") else [p for p in s.split(",") if p.strip()]
        except (ValueError, SyntaxError) as e:
            raise ValueError(f"entropy.py: --init_from={spec!r} is not a Python list of paths: {e}") from None
    if not all(isinstance(p, str) for p in spec):
        raise ValueError(f"entropy.py: --init_from={spec!r}: every entry must be a path or glob string")
    if not spec:
        raise ValueError("entropy.py: --init_from is empty; give a glob like 'out/grpo/ckpt_*' or a list of paths")
    out = []
    for pat in spec:
        pat = pat.strip()
        if glob.has_magic(pat):
            found = [p for p in glob.glob(pat) if os.path.isdir(p)]
            if not found:
                raise ValueError(f"entropy.py: --init_from pattern {pat!r} matches no directory")
            found.sort(key=lambda p: (parse_step(p) is None, parse_step(p) or 0, p))
        else:
            found = [pat]
        for p in found:
            _check_ckpt(p)
            if p not in out:
                out.append(p)
    return out


def measure(path, items, **kw):
    """Load one checkpoint, decode, score -> the checkpoint's row. kw: device, tokenizer, group_size, sampling (a
    sampler.Sampling), max_new_tokens, seed, batch_prompts, think, system ('auto' follows each checkpoint),
    check_template, words, threshold; group: a TP group
    (tp.py) whose ranks load their shards of the checkpoint and decode together."""
    t0 = time.time()
    group, budget = kw.get("group"), None
    try:
        dtype = torch.bfloat16 if kw["device"].startswith("cuda") else torch.float32
        if group is not None:
            from plumbing import agree_min
            from sampler import memory_budget
            from plumbing.tp import load_tp_inference_model
            model, tok, resolved = load_tp_inference_model(path, group, torch.device(kw["device"]), dtype,
                                                           kw["tokenizer"])
            budget = agree_min(memory_budget(torch.device(kw["device"])))  # the same chunks on every rank
        else:
            model, tok, resolved = load_inference_model(path, kw["device"], dtype, tokenizer=kw["tokenizer"])
    except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
        raise RuntimeError(f"entropy.py: cannot load checkpoint {path!r}: {type(e).__name__}: {e}") from e
    system = resolve_system(kw["system"] or "", resolved, tok)  # 'auto' -> this checkpoint's system turn
    check_chat_template(tok, system, kw["think"], resolved, kw.get("check_template", True))
    rows = decode(model, tok, items, kw["group_size"], kw["max_new_tokens"], kw["sampling"], kw["seed"],
                  kw["batch_prompts"], kw["think"], system or None, budget)
    s = summarize(rows, kw["group_size"])
    row = {"ckpt": path, "path": resolved, "step": parse_step(resolved), "accuracy": s["accuracy"],
           "accuracy_std": s["accuracy_std"], "accuracy_se": accuracy_se(rows), "n_items": s["n_items"],
           "format": s["format"],
           "mean_tokens": s["mean_tokens"], "truncation_rate": s["truncation_rate"]}
    row.update(response_stats(rows, tok, kw["words"], kw["threshold"]))
    row["seconds"] = round(time.time() - t0, 1)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row

# -----------------------------------------------------------------------------
# outputs


def _f(x, fmt="{:.3f}"):
    return "-" if x is None else fmt.format(x)


def markdown(rows, corr, sel, threshold, title):
    lines = [f"# {title}", "", f"| checkpoint | step | accuracy ± sd over runs | SE | critical entropy | per response "
             f"| occurrences | mean entropy | entropy > {threshold:g} |", "|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        name = f"**{r['ckpt']}** (selected)" if i == sel["index"] else r["ckpt"]
        se = r.get("accuracy_se")
        lines.append(f"| {name} | {_f(r['step'], '{}')} | {100 * r['accuracy']:.1f} ± {100 * r['accuracy_std']:.1f} "
                     f"| {_f(None if se is None else 100 * se, '{:.1f}')} | {_f(r['critical_entropy'])} "
                     f"| {_f(r['critical_entropy_per_response'])} "
                     f"| {r['critical_count']} | {_f(r['mean_entropy'])} | {_f(r['high_entropy_share'], '{:.1%}')} |")
    c = corr["critical_entropy"]
    ci = "-" if c.get("pearson_ci") is None else "[{:.3f}, {:.3f}]".format(*c["pearson_ci"])
    lines += ["", f"critical-token entropy vs accuracy over {c['n']} checkpoints: Pearson r = {_f(c['pearson'])} "
              f"({c.get('ci', '95% Fisher z')} interval {ci}), Spearman rho = {_f(c['spearman'])} (None below 3 "
              f"checkpoints or with a constant column; the interval needs 4)", "",
              f"selected ({sel['applied']}): {sel['ckpt']} — {sel['reason']}"]
    return "\n".join(lines) + "\n"


def plot(rows, corr, sel, path):
    """Critical-token entropy (left axis) and accuracy (right axis) against step (or checkpoint order)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    by_step = all(r["step"] is not None for r in rows)
    x = [r["step"] if by_step else i for i, r in enumerate(rows)]
    fig, ax = plt.subplots(figsize=(7, 4))
    ce = [math.nan if r["critical_entropy"] is None else r["critical_entropy"] for r in rows]
    ax.plot(x, ce, "o-", color="tab:blue", label="critical-token entropy")
    ax.set_xlabel("step" if by_step else "checkpoint")
    ax.set_ylabel("critical-token entropy (nats)", color="tab:blue")
    ax.ticklabel_format(axis="y", useOffset=False)  # plain values, not "+6.052" and offsets
    if not by_step:
        ax.set_xticks(x, [os.path.basename(os.path.normpath(r["ckpt"])) for r in rows], rotation=30, ha="right")
    ax2 = ax.twinx()
    ax2.plot(x, [r["accuracy"] for r in rows], "s--", color="tab:red", label="accuracy")
    ax2.set_ylabel("accuracy", color="tab:red")
    ax.axvline(x[sel["index"]], color="gray", linestyle=":", label=f"selected ({sel['applied']})")
    c = corr["critical_entropy"]
    r, rho = ("n/a" if v is None else f"{v:.2f}" for v in (c["pearson"], c["spearman"]))
    ax.set_title(f"critical-token entropy vs accuracy: Pearson r = {r}, Spearman rho = {rho}", fontsize=10)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def export_selected(path, out, tokenizer=""):
    """The selected checkpoint as an HF directory (model + tokenizer) for the next stage (connector_tune.py and
    eval.py take one): path itself if it is one, else its weights written to out. Loads on the CPU, in fp32."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    model, tok, _ = load_inference_model(path, "cpu", tokenizer=tokenizer)
    shutil.rmtree(out, ignore_errors=True)  # a previous run's export
    system = resolve_system(system_prompt, path, tok)
    save_pretrained(model, out, tok=tok, system=system)  # + the tokenizer and processor files (AutoProcessor loads it)
    save_system(out, system)  # the next stage's 'auto' finds it
    return out


def write_outputs(out_dir, rows, sel, threshold=2.0, config=None, title=""):
    """Correlations and the files: entropy.json, entropy.md, entropy.png, selected.txt (+ selected_hf.txt when
    sel has an 'hf' export). sel: select_checkpoint's dict. Returns the report written to entropy.json."""
    corr = {key: correlations(rows, key) for key in ("critical_entropy", "critical_entropy_per_response")}
    os.makedirs(out_dir, exist_ok=True)
    write_env(out_dir)
    report = {"rows": rows, "correlation": corr, "selection": sel, "config": config or {}}
    with open(os.path.join(out_dir, "entropy.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out_dir, "entropy.md"), "w") as f:
        f.write(markdown(rows, corr, sel, threshold, title or "Critical-token entropy by checkpoint"))
    try:  # the plot is the one thing here that needs matplotlib (requirements-dev.txt), so it alone is optional
        import matplotlib  # noqa: F401
    except ImportError:
        print0("entropy.py: entropy.png not drawn: matplotlib is not installed (pip install -r requirements-dev.txt)")
    else:
        plot(rows, corr, sel, os.path.join(out_dir, "entropy.png"))
    with open(os.path.join(out_dir, "selected.txt"), "w") as f:
        f.write(sel["ckpt"] + "\n")
    hf_txt = os.path.join(out_dir, "selected_hf.txt")
    if sel.get("hf"):
        with open(hf_txt, "w") as f:
            f.write(sel["hf"] + "\n")
    elif os.path.exists(hf_txt):
        os.remove(hf_txt)  # a previous run's: it would name a checkpoint this run did not select
    return report


if __name__ == "__main__":
    config = configure(globals(), sys.argv[1:])
    assert select in SELECT_RULES, f"select must be one of {SELECT_RULES}, not {select!r}"
    paths = resolve_ckpts(init_from)  # bad globs and missing checkpoints fail here, before any decoding
    items = load_jsonl(data, skip_bad=skip_bad)
    items = items[:limit] if limit else items
    print0(f"entropy: {len(paths)} checkpoints, {len(items)} items x {group_size} samples, T={temperature}, "
           f"words {critical_words}")
    group = None
    if tp > 1:  # every rank decodes every checkpoint on its TP shard, together; then rank 0 alone goes on
        from plumbing import compute_cleanup
        from plumbing.tp import init_tp
        group, rank, dev = init_tp(tp, seed)
        device = str(dev)
    sampling = Sampling(temperature=temperature, top_p=top_p)
    rows = []
    for path in tqdm(paths, desc="checkpoints", unit="ckpt", disable=int(os.environ.get("RANK", 0)) != 0):
        row = measure(path, items, device=device, tokenizer=tokenizer, group_size=group_size, sampling=sampling,
                      max_new_tokens=max_new_tokens, seed=seed, batch_prompts=batch_prompts, think=think,
                      system=system_prompt or None, words=critical_words, threshold=threshold, group=group,
                      check_template=check_template)
        rows.append(row)
        print0(f"{_name(row)}: accuracy {row['accuracy']:.3f} | critical entropy {_f(row['critical_entropy'])} "
               f"over {row['critical_count']} | mean entropy {_f(row['mean_entropy'])} | "
               f"> {threshold:g}: {_f(row['high_entropy_share'], '{:.1%}')} | {row['seconds']} s")
    if tp > 1:  # the selection, its export (one process, no collectives) and the files: rank 0
        compute_cleanup()
        if rank:
            sys.exit(0)
    sel = select_checkpoint(rows, select, min_critical)
    if export_hf:
        sel["hf"] = export_selected(rows[sel["index"]]["path"], os.path.join(out_dir, "hf"), tokenizer)
    title = (f"Critical-token entropy: {data} ({len(items)} items, k={group_size}, T={temperature}, "
             f"max_new_tokens={max_new_tokens})")
    report = write_outputs(out_dir, rows, sel, threshold, config, title)
    print(markdown(rows, report["correlation"], sel, threshold, title))
    print(f"selected: {sel['ckpt']} ({sel['applied']}: {sel['reason']})")
    if export_hf:
        print(f"as an HF directory: {sel['hf']} (also in {out_dir}/selected_hf.txt)")
    print(f"wrote {out_dir}/entropy.json, entropy.md, entropy.png, selected.txt")
