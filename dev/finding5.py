"""
Finding 5 over several GRPO runs: does critical-token entropy rank the checkpoints (Skywork-R1V3 section 5,
Fig. 5; docs/recipe.md, "Critical-token entropy")? One report from each run's entropy.py output (val split,
group_size samples at T=1) and the greedy test eval of each of its checkpoints (eval.py). `bash dev/experiments.sh
entropy` makes the inputs and runs this; the results are in dev/LOG.md (2026-12-01).

    python dev/finding5.py                                   # the layout dev/experiments.sh writes (out/exp/)
    python dev/finding5.py --entropy_dir='out/f5_entropy_s{seed}' --test_dir='out/f5_test_s{seed}/{ckpt}'
    python tools/viewer.py out/finding5                            # the page: rows by seed, correlations, selection

Writes out_dir/entropy.json in entropy.py's format (viewer.py's entropy page): rows (entropy.py's, plus seed,
accuracy_se, test_accuracy, test_accuracy_se), correlation, selection, config, and per_checkpoint (one line a
checkpoint); out_dir/finding5.md holds the same tables for dev/LOG.md.

Correlation of critical-token entropy with the val accuracy (and with the test accuracy), Pearson r with its 95%
Fisher-z interval (entropy.pearson_ci: the checkpoints taken as independent points) and Spearman rho:
  - per seed (the run's checkpoints);
  - pooled, plain: all checkpoints of all runs as one sample;
  - pooled, within-run centred: each run's mean subtracted from both quantities first (a run's level does not
    count; the interval spends one degree of freedom per extra run);
  - pooled, within-run centred and detrended: each run's linear trend in the step removed from both first (do they
    move together beyond both following the step? two degrees of freedom per run).
Selection, on the test split (greedy) of each run: the checkpoint with the highest critical-token entropy (with at
least min_critical occurrences, entropy.select_checkpoint), against the last checkpoint, a random one (its expected
accuracy: the mean over the run's checkpoints), the one with the best val accuracy, and the best on test (an
upper bound nothing can select without the test labels). Differences are paired over the test items: their SE is
the sd of the per-item differences / sqrt(n items); over seeds, the mean and sqrt(sum of SE^2) / n seeds.
"""
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from plumbing.configurator import configure  # noqa: E402
from entropy import accuracy_se, correlations, select_checkpoint  # noqa: E402

# -----------------------------------------------------------------------------
seeds = [1337, 2, 3]
entropy_dir = "out/exp/f5_entropy_s{seed}"  # entropy.py's out_dir of each seed's run
test_dir = "out/exp/f5_test_s{seed}/{ckpt}"  # eval.py's out_dir of each checkpoint (ckpt: its directory's name)
out_dir = "out/finding5"
min_critical = 0  # 0: the value each entropy.json was made with (entropy.py's min_critical)
key = "critical_entropy"  # or 'critical_entropy_per_response'
# -----------------------------------------------------------------------------


def _mean(x):
    return math.fsum(x) / len(x)


def _residuals(rows, field, groups, detrend):
    """rows[*][field] minus its group's mean (detrend: minus the group's least-squares line in the step)."""
    out = [None] * len(rows)
    for g in groups:
        idx = [i for i, r in enumerate(rows) if r["seed"] == g]
        y, s = [rows[i][field] for i in idx], [rows[i]["step"] for i in idx]
        my, ms = _mean(y), _mean(s)
        b = 0.0
        if detrend:
            sxx = math.fsum((a - ms) ** 2 for a in s)
            b = math.fsum((a - ms) * (c - my) for a, c in zip(s, y)) / sxx
        for i, a, c in zip(idx, s, y):
            out[i] = c - my - b * (a - ms)
    return out


def pooled(rows, x_key, y_key, groups, detrend=False):
    """Pearson / Spearman of x_key with y_key over all rows after removing each group's mean (and trend)."""
    ok = [r for r in rows if r.get(x_key) is not None and r.get(y_key) is not None]
    x, y = _residuals(ok, x_key, groups, detrend), _residuals(ok, y_key, groups, detrend)
    pts = [{"x": a, "y": b} for a, b in zip(x, y)]
    return correlations(pts, "x", "y", n_controlled=len(groups) * (2 if detrend else 1) - 1)


def read_test(path):
    """eval.py's out_dir -> (accuracy, {item id: correct}) of a greedy (k=1) eval."""
    with open(os.path.join(path, "summary.json")) as f:
        acc = json.load(f)["accuracy"]
    with open(os.path.join(path, "responses.jsonl")) as f:
        resp = [json.loads(line) for line in f if line.strip()]
    assert all(r["run"] == 0 for r in resp), f"{path}: expected a greedy eval with group_size=1"
    return acc, resp


def paired(a, b):
    """Mean and SE of the per-item difference between two dicts {id: score} over the same items."""
    assert a.keys() == b.keys(), "paired: the evals cover different items"
    d = [a[i] - b[i] for i in a]
    m = _mean(d)
    return m, math.sqrt(math.fsum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d))


def _pct(x, se=None, sign=False):
    s = f"{100 * x:+.1f}" if sign else f"{100 * x:.1f}"
    return s if se is None else f"{s} ± {100 * se:.1f}"


def _ci(c):
    return "-" if c["pearson_ci"] is None else "[{:+.2f}, {:+.2f}]".format(*c["pearson_ci"])


def _r(c):
    f = lambda v: "-" if v is None else f"{v:+.2f}"
    return f"{f(c['pearson'])} {_ci(c)}", f(c["spearman"])


if __name__ == "__main__":
    config = configure(globals(), sys.argv[1:])
    rows, per_seed_sel, inputs = [], {}, {}
    for seed in seeds:
        path = os.path.join(entropy_dir.format(seed=seed), "entropy.json")
        with open(path) as f:
            rep = json.load(f)
        inputs[str(seed)] = {"entropy": path, "entropy_config": {k: rep.get("config", {}).get(k) for k in
                             ("data", "group_size", "temperature", "max_new_tokens", "min_critical", "critical_words")}}
        run = []
        for r in rep["rows"]:
            acc, resp = read_test(test_dir.format(seed=seed, ckpt=os.path.basename(os.path.normpath(r["ckpt"]))))
            run.append(dict(r, seed=seed, test_accuracy=acc, test_accuracy_se=accuracy_se(resp),
                            test_correct={x["id"]: x["correct"] for x in resp}))
        rows += run
        mc = min_critical or rep.get("config", {}).get("min_critical", 5)
        sel = {"critical_entropy": select_checkpoint(run, "critical_entropy", mc)["index"],
               "last": len(run) - 1, "val_accuracy": select_checkpoint(run, "accuracy")["index"],
               "best_test": max(range(len(run)), key=lambda i: (run[i]["test_accuracy"], i))}
        mean_item = {i: _mean([r["test_correct"][i] for r in run]) for i in run[0]["test_correct"]}
        ce = run[sel["critical_entropy"]]
        d = {"step": {k: run[i]["step"] for k, i in sel.items()},
             "test_accuracy": {k: run[i]["test_accuracy"] for k, i in sel.items()}}
        d["test_accuracy"]["random"] = _mean([r["test_accuracy"] for r in run])
        d["random_sd"] = math.sqrt(_mean([(r["test_accuracy"] - d["test_accuracy"]["random"]) ** 2 for r in run]))
        vs = {"last": paired(ce["test_correct"], run[-1]["test_correct"]),
              "random": paired(ce["test_correct"], mean_item),
              "val_accuracy": paired(ce["test_correct"], run[sel["val_accuracy"]]["test_correct"])}
        d["critical_entropy_minus"] = {k: v[0] for k, v in vs.items()}
        d["critical_entropy_minus_se"] = {k: v[1] for k, v in vs.items()}
        d["min_critical"] = mc
        per_seed_sel[str(seed)] = d
    for r in rows:
        del r["test_correct"]  # per-item results stay in the eval directories
    groups = list(seeds)

    # correlations: critical-token entropy vs val accuracy (the decodes it was measured on) and vs test accuracy
    corr = {}
    for y_key, name in (("accuracy", "val"), ("test_accuracy", "test")):
        c = {f"seed {s}": correlations([r for r in rows if r["seed"] == s], key, y_key) for s in seeds}
        c["pooled plain"] = correlations(rows, key, y_key)
        c["pooled within-run centred"] = pooled(rows, key, y_key, groups)
        c["pooled centred + step trend removed"] = pooled(rows, key, y_key, groups, detrend=True)
        corr[f"{key} vs {name} accuracy"] = c
    corr["step vs critical_entropy, pooled centred"] = pooled(rows, "step", key, groups)
    corr["step vs val accuracy, pooled centred"] = pooled(rows, "step", "accuracy", groups)
    corr["val vs test accuracy, pooled centred"] = pooled(rows, "accuracy", "test_accuracy", groups)

    rules = ("critical_entropy", "last", "random", "val_accuracy", "best_test")
    mean = {"test_accuracy": {k: _mean([d["test_accuracy"][k] for d in per_seed_sel.values()]) for k in rules}}
    for k in ("last", "random", "val_accuracy"):
        ds = [d["critical_entropy_minus"][k] for d in per_seed_sel.values()]
        ses = [d["critical_entropy_minus_se"][k] for d in per_seed_sel.values()]
        mean.setdefault("critical_entropy_minus", {})[k] = _mean(ds)
        mean.setdefault("critical_entropy_minus_se", {})[k] = math.sqrt(math.fsum(s * s for s in ses)) / len(ses)
    selection = {"rule": f"highest {key} (entropy.select_checkpoint), vs last / random (expected: the mean over the "
                         f"run's checkpoints) / best val accuracy / best test (upper bound); greedy test accuracy; "
                         f"differences paired over the test items, +- SE",
                 **{f"seed {s}": per_seed_sel[str(s)] for s in seeds}, "mean over seeds": mean}

    # the tables (finding5.md, dev/LOG.md)
    L = ["# Finding 5: critical-token entropy vs accuracy over GRPO checkpoints", ""]
    for s in seeds:
        ps = per_seed_sel[str(s)]
        L += [f"## seed {s}", "", "| step | critical entropy | occurrences | val accuracy ± SE | test accuracy ± SE |",
              "|---|---|---|---|---|"]
        for r in (r for r in rows if r["seed"] == s):
            mark = " (selected)" if r["step"] == ps["step"]["critical_entropy"] else ""
            ent = "-" if r[key] is None else f"{r[key]:.4f}"
            L.append(f"| {r['step']}{mark} | {ent} | {r['critical_count']} | {_pct(r['accuracy'], r['accuracy_se'])} "
                     f"| {_pct(r['test_accuracy'], r['test_accuracy_se'])} |")
        L.append("")
    L += ["## correlations (Pearson r [95% Fisher-z interval], Spearman rho)", "",
          "| | n | r vs val accuracy | rho | r vs test accuracy | rho |", "|---|---|---|---|---|---|"]
    cv, ct = corr[f"{key} vs val accuracy"], corr[f"{key} vs test accuracy"]
    for name in cv:
        L.append(f"| {name} | {cv[name]['n']} | {' | '.join(_r(cv[name]))} | {' | '.join(_r(ct[name]))} |")
    for name in list(corr)[2:]:
        L.append(f"| {name} | {corr[name]['n']} | {' | '.join(_r(corr[name]))} | | |")
    L += ["", "## selection: greedy test accuracy of the checkpoint each rule picks", "",
          "| seed | critical entropy (step) | last (step) | random (mean ± sd) | best val (step) | best test (step) "
          "| CE - last | CE - random | CE - best val |", "|---|---|---|---|---|---|---|---|---|"]
    for s in seeds:
        d = per_seed_sel[str(s)]
        t, st, dm, ds = d["test_accuracy"], d["step"], d["critical_entropy_minus"], d["critical_entropy_minus_se"]
        L.append(f"| {s} | {_pct(t['critical_entropy'])} ({st['critical_entropy']}) | {_pct(t['last'])} "
                 f"({st['last']}) | {_pct(t['random'], d['random_sd'])} | {_pct(t['val_accuracy'])} "
                 f"({st['val_accuracy']}) | {_pct(t['best_test'])} ({st['best_test']}) | "
                 + " | ".join(_pct(dm[k], ds[k], sign=True) for k in ("last", "random", "val_accuracy")) + " |")
    t, dm, ds = mean["test_accuracy"], mean["critical_entropy_minus"], mean["critical_entropy_minus_se"]
    L.append(f"| mean | {_pct(t['critical_entropy'])} | {_pct(t['last'])} | {_pct(t['random'])} | "
             f"{_pct(t['val_accuracy'])} | {_pct(t['best_test'])} | "
             + " | ".join(_pct(dm[k], ds[k], sign=True) for k in ("last", "random", "val_accuracy")) + " |")
    md = "\n".join(L) + "\n"

    per_ckpt = [f"seed {r['seed']} step {r['step']}: {key} {r[key] if r[key] is None else round(r[key], 4)} over "
                f"{r['critical_count']}, val {_pct(r['accuracy'], r['accuracy_se'])}%, test "
                f"{_pct(r['test_accuracy'], r['test_accuracy_se'])}%" for r in rows]
    report = {"rows": rows, "correlation": corr, "selection": selection, "per_checkpoint": per_ckpt,
              "config": {**config, "inputs": inputs, **inputs[str(seeds[0])]["entropy_config"]}}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "entropy.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out_dir, "finding5.md"), "w") as f:
        f.write(md)
    print(md)
    print(f"wrote {out_dir}/entropy.json and finding5.md (python tools/viewer.py {out_dir})")
