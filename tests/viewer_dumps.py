"""Synthetic run directories in the dump formats of viewer.py's docstring, for tests/test_viewer.py and the README screenshots
until they are made from speedrun.sh's output:

    python tests/viewer_dumps.py out/viewer_demo   # -> out/viewer_demo/{grpo,eval_grpo,eval_sft,entropy}

Images, questions and reasoning traces come from the embedded task (data/synth.py); the numbers (entropies,
log-probs, rewards) are made up, seeded. For the tests some strings are hostile on purpose (HOSTILE; not in the
command's output): the page must show them as text. entropy.json is written by entropy.py's own write_outputs."""
import json
import math
import os
import random
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.synth import DOMAINS, make_sample  # noqa: E402

# were it run, it would leave a mark in the DOM (data-pwned), which the tests look for in the page's dumped DOM
PWN = "document.documentElement.dataset.pwned"
HOSTILE = f'</script><script>{PWN}=1</script><img src=x onerror="{PWN}=2"> & <b>bold</b>'
PIECE = re.compile(r"\s*[A-Za-z]+|\s*\d|\s*[^\sA-Za-z\d]|\s+")  # word-ish tokens; they concatenate to the text


def pieces_of(text):
    p = PIECE.findall(text)
    assert "".join(p) == text
    return p


def prompts(d, n, seed=0):
    """n embedded-task prompts with their images written under d/images -> list of dicts."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(d, "images"), exist_ok=True)
    out = []
    for i in range(n):
        s = make_sample(rng, DOMAINS[i % len(DOMAINS)], rng.choice(["normal", "hard"]), p_wait=0.9)
        path = os.path.join(os.path.abspath(d), "images", f"p{i:03d}.png")
        s["image"].save(path)
        out.append(dict(id=f"rl-{i:06d}", path=path, question=s["question"], answer=s["answer"],
                        options=s["options"], domain=s["domain"], difficulty=s["difficulty"],
                        response=s["solution"][len("<think>\n"):]))
    return out


def fake_sample(rng, p, correct, truncate=0, train=True, text=None):
    """One sample of the rollouts format for prompt p: the teacher's trace (answer changed when wrong)."""
    text = text or p["response"]
    if not correct:
        wrong = "B" if p["answer"] == "A" else "1" if p["answer"] == "0" else "0"
        text = re.sub(r"\\boxed\{[^}]*\}", lambda m: "\\boxed{" + wrong + "}", text)
    pieces = pieces_of(text) + [""]  # + the end-of-turn token, which decodes to nothing
    if truncate:
        pieces = pieces[:truncate]
    crit = [i for i, t in enumerate(pieces) if t.strip() in ("Wait", "Hmm", "Alternatively")]
    ent = [round(rng.uniform(2.0, 3.5) if i in crit else rng.expovariate(2.0), 4) for i in range(len(pieces))]
    logp = [round(-e * rng.uniform(0.2, 0.8) - 0.01, 5) for e in ent]
    m = re.search(r"\\boxed\{([^}]*)\}", "".join(pieces))
    fmt = int(m is not None and not truncate)
    acc = int(fmt and correct)
    return {"response": "".join(pieces), "pieces": pieces, "tokens": list(range(3, 3 + len(pieces))), "logp": logp,
            "entropy": ent, "train_logp": [x + rng.gauss(0, 2e-6) for x in logp] if train else None,
            "advantage": None, "reward": 0.8 * acc + 0.2 * fmt, "accuracy": acc, "format": fmt,
            "pred": m.group(1) if m and fmt else None, "n_tokens": len(pieces),
            "finish_reason": "length" if truncate else "eos", "critical": crit}


def group(step, i, p, samples):
    r = [s["reward"] for s in samples]
    mean = sum(r) / len(r)
    std = math.sqrt(sum((x - mean) ** 2 for x in r) / len(r))
    for s in samples:
        s["advantage"] = (s["reward"] - mean) / (std + 1e-6)
    return {"step": step, "prompt_index": i, "id": p["id"], "question": p["question"], "images": [p["path"]],
            "answer": p["answer"], "options": p["options"], "domain": p["domain"], "difficulty": p["difficulty"],
            "samples": samples}


def write_grpo(d, n_steps=12, seed=0, hostile=True):
    """d/log.jsonl (every step, validation records, step 3 logged twice: the second wins) and d/rollouts.jsonl:
    step 5 with 25 groups x 4 samples (two pages), step 10 with 4 groups x 4 samples: all correct (all equal),
    a hostile response (hostile=True), a truncated one, one without train_logp. Returns the groups written."""
    os.makedirs(d, exist_ok=True)
    rng = random.Random(seed)
    with open(os.path.join(d, "log.jsonl"), "w") as f:
        f.write(json.dumps({"step": 0, "val_accuracy": 0.40}) + "\n")
        for s in range(1, n_steps + 1):
            a = 0.4 + 0.3 * s / n_steps + rng.uniform(-0.03, 0.03)
            rec = {"step": s, "reward": 0.8 * a + 0.2 * 0.97, "accuracy": a, "format": 0.97, "resp_len": 90 - s,
                   "truncated": 0.02, "clip_frac": 0.01 * rng.random(), "approx_kl": 1e-3, "gnorm": rng.uniform(0.3, 1),
                   "loss": rng.uniform(-0.1, 0.1), "lr": 5e-5, "entropy": 0.6 - 0.02 * s,
                   "critical_entropy": None if s == 4 else 2.5 - 0.05 * s, "high_entropy_share": 0.05,
                   "all_correct": 0.2, "all_wrong": 0.1, "groups_kept": 0.7, "logp_mismatch": 2e-6,
                   "t_rollout": 1.5, "t_update": 0.5, "t_step": 2.1}
            if s == 3:
                f.write(json.dumps(dict(rec, reward=-5.0)) + "\n")  # a record the resumed run re-logs: replaced
            f.write(json.dumps(rec) + "\n")
            if s % 6 == 0:
                f.write(json.dumps({"step": s, "val_accuracy": 0.4 + 0.02 * s}) + "\n")
    ps = prompts(d, 25, seed)
    groups = []
    for i, p in enumerate(ps):  # step 5: 25 groups of 4
        groups.append(group(5, i, p, [fake_sample(rng, p, correct=rng.random() < 0.5) for _ in range(4)]))
    if hostile:
        ps[1] = dict(ps[1], question=ps[1]["question"] + " " + HOSTILE)
    groups += [group(10, 0, ps[0], [fake_sample(rng, ps[0], True) for _ in range(4)]),
               group(10, 1, ps[1], [fake_sample(rng, ps[1], True), fake_sample(rng, ps[1], False),
                                    fake_sample(rng, ps[1], False, text=HOSTILE + " \\boxed{1}" if hostile else None),
                                    fake_sample(rng, ps[1], True)]),
               group(10, 2, ps[2], [fake_sample(rng, ps[2], True), fake_sample(rng, ps[2], False, truncate=12),
                                    fake_sample(rng, ps[2], False), fake_sample(rng, ps[2], True)]),
               group(10, 3, ps[3], [fake_sample(rng, ps[3], c, train=False) for c in (True, False, False, True)])]
    with open(os.path.join(d, "rollouts.jsonl"), "w") as f:
        for g in groups:
            f.write(json.dumps(g) + "\n")
    return groups


def summarize(rows):
    """eval.py's summary.json keys for k=1."""
    acc = sum(r["correct"] for r in rows) / len(rows)
    s = {"n_items": len(rows), "k": 1, "accuracy": acc, "accuracy_std": 0.0, "accuracy_per_run": [acc],
         "pass@1": acc, "format": sum(r["format"] for r in rows) / len(rows),
         "mean_tokens": sum(r["n_tokens"] for r in rows) / len(rows),
         "truncation_rate": sum(r["truncated"] for r in rows) / len(rows), "timeouts": 0}
    for key in ("domain", "difficulty"):
        g = {}
        for r in rows:
            g.setdefault(r[key], []).append(r["correct"])
        s[f"by_{key}"] = {k: sum(v) / len(v) for k, v in sorted(g.items())}
        s[f"n_by_{key}"] = {k: len(v) for k, v in sorted(g.items())}
    return s


def write_eval(d, ps, p_correct, seed, hostile=True):
    """d/responses.jsonl + d/summary.json for the prompts ps (k=1); item 0 has a hostile response (hostile=True)."""
    os.makedirs(d, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i, p in enumerate(ps):
        s = fake_sample(rng, p, rng.random() < p_correct, truncate=8 if i == 5 else 0,
                        text=HOSTILE + " \\boxed{2}" if i == 0 and hostile else None)
        rows.append({"id": p["id"].replace("rl", "test"), "run": 0, "question": p["question"], "images": [p["path"]],
                     "options": p["options"], "response": s["response"], "pieces": s["pieces"],
                     "entropies": s["entropy"], "pred": s["pred"], "answer": p["answer"], "correct": s["accuracy"],
                     "format": s["format"], "reward": s["reward"], "n_tokens": s["n_tokens"],
                     "truncated": int(s["finish_reason"] == "length"), "domain": p["domain"], "subject": None,
                     "difficulty": p["difficulty"], "mean_entropy": sum(s["entropy"]) / len(s["entropy"])})
    with open(os.path.join(d, "responses.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    with open(os.path.join(d, "summary.json"), "w") as f:
        json.dump(summarize(rows), f, indent=2)
    return rows


def write_entropy(d, seed=0):
    """entropy.json etc. through entropy.py's write_outputs, for 12 checkpoints every 5 steps."""
    import entropy
    rng = random.Random(seed)
    rows = []
    for k in range(1, 13):
        acc = 0.55 + 0.15 * (1 - math.exp(-k / 4)) + rng.uniform(-0.02, 0.02)
        rows.append({"ckpt": f"out/grpo/ckpt_{5 * k:07d}", "path": f"out/grpo/ckpt_{5 * k:07d}", "step": 5 * k,
                     "accuracy": acc, "accuracy_std": 0.015, "format": 0.99, "mean_tokens": 80.0,
                     "truncation_rate": 0.0, "critical_entropy": 2.2 + 0.3 * acc + rng.uniform(-0.05, 0.05),
                     "critical_entropy_per_response": 2.3, "critical_count": 40 + k, "responses_with_critical": 30,
                     "n_responses": 800, "critical_by_word": {"Wait": {"count": 40 + k, "entropy": 2.4}},
                     "mean_entropy": 0.5, "n_tokens": 64000, "high_entropy_share": 0.04, "seconds": 3.0})
    sel = entropy.select_checkpoint(rows, "critical_entropy", min_critical=5)
    return entropy.write_outputs(d, rows, sel, 2.0, {"data": "data/synth/val.jsonl", "k": 4, "temperature": 1.0})


def write_all(out, hostile=True):
    groups = write_grpo(os.path.join(out, "grpo"), hostile=hostile)
    ps = prompts(os.path.join(out, "eval_images"), 30, seed=1)
    a = write_eval(os.path.join(out, "eval_grpo"), ps, 0.75, seed=2, hostile=hostile)
    b = write_eval(os.path.join(out, "eval_sft"), ps, 0.5, seed=3, hostile=hostile)
    report = write_entropy(os.path.join(out, "entropy"))
    return groups, a, b, report


if __name__ == "__main__":
    write_all(sys.argv[1] if len(sys.argv) > 1 else "out/viewer_demo", hostile=False)
