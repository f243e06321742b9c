"""
What an eval run learnt of the cold-start teacher's blind spot (README, "The embedded default"): per eval directory,
how often the response's grid line is the gold one, how often its key overlooks yellow (every yellow entry 0) on the
test questions where a yellow kind counts (the gold key has a yellow entry != 0), and the accuracy per family.

    python dev/blind_spot.py out/eval_sft out/eval_grpo [--test=data/synth/test.jsonl]
"""
import collections
import json
import re
import sys

args = [a for a in sys.argv[1:] if not a.startswith("--test=")]
test_path = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--test=")), "data/synth/test.jsonl")
test = {s["id"]: s for s in map(json.loads, open(test_path))}


def line(text, name):
    m = re.search(name + r":(.*)", text or "")
    return m.group(1).split() if m else None


def key(text):
    entries = line(text, "Key")
    return dict(e.split("=", 1) for e in entries if "=" in e) if entries is not None else None


yellow = [i for i, s in test.items() if (k := key(s["solution"])) and any(k.get("y" + t, "0") != "0" for t in "cst")]
print(f"{test_path}: {len(test)} items, {len(yellow)} where a yellow kind counts")
for d in args:
    rows = {r["id"]: r for r in map(json.loads, open(f"{d}/responses.jsonl")) if r.get("run", 0) == 0}
    missing = set(test) - set(rows)
    if missing:
        sys.exit(f"{d}/responses.jsonl: no response for {len(missing)} test items (e.g. {sorted(missing)[0]})")
    grid_ok = sum(line(rows[i]["response"], "Grid") == line(s["solution"], "Grid") for i, s in test.items())
    over = sum((k := key(rows[i]["response"])) is not None and all(k.get("y" + t, "0") == "0" for t in "cst")
               for i in yellow)
    acc = collections.defaultdict(list)
    for i, s in test.items():
        acc[s["domain"], s["difficulty"]].append(rows[i]["correct"])
    fam = ", ".join(f"{dom} {100 * sum(acc[dom, 'normal']) / len(acc[dom, 'normal']):.0f} / "
                    f"{100 * sum(acc[dom, 'hard']) / len(acc[dom, 'hard']):.0f}" for dom in sorted({k[0] for k in acc}))
    print(f"{d}: grid line exact {100 * grid_ok / len(test):.1f}%, key overlooks yellow {over}/{len(yellow)} = "
          f"{100 * over / max(len(yellow), 1):.1f}%; accuracy per family (normal / hard): {fam}")
