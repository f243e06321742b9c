"""
Converts training data in the formats the open RL code bases use (Hugging Face `datasets` parquet files, or the
Arrow files `datasets` writes) to our JSONL (format in data/common.py), with a column mapping.

    python data/convert_parquet.py /data/geometry3k/data out/geo3k/train.jsonl         # EasyR1: images, problem, answer
    python data/convert_parquet.py /data/MMK12/data out/mmk12/train.jsonl             # image, question, answer, subject
    python data/convert_parquet.py ~/data/geo3k/train.parquet out/geo3k_verl/train.jsonl \\
        --question_key=extra_info.question --answer_key=reward_model.ground_truth    # verl's preprocessed geo3k
    python data/convert_parquet.py /data/thinklite_hard_11k out/thinklite/train.jsonl     # a save_to_disk folder
    python data/convert_parquet.py /data/cold_start out/cold_start.jsonl --solution_key=response   # SFT targets

Inputs: .parquet files; .arrow files (the IPC stream format of save_to_disk's data-*.arrow and of the datasets cache,
or the IPC file format); .jsonl / .json files given by name; folders, searched recursively for the parquet / arrow
files of one split (--split, default train: a file named "<split>-*" or "<split>.*", a cache file "<name>-<split>..."
or any file in a folder named <split>; a save_to_disk folder of one split, holding state.json, is taken whole).

Columns (--<role>_key; "a.b" reads field b of a struct column a, e.g. reward_model.ground_truth). Left unset, a role
takes the first of its usual names the file has (the run prints what it used):
    image     images, image        a list of images, or one: {"bytes", "path"} cells (as `datasets` stores an Image),
                                   raw bytes, or paths relative to the file's folder (--image_root); null = no image
    question  problem, question, extra_info.question, prompt      a string, or a chat list ([{"role", "content"}]:
                                   the last user turn; content parts of type "image" become "<image>")
    answer    answer, reward_model.ground_truth, extra_info.answer, ground_truth     a string or a number: numbers
                                   become strings (3.0 -> "3", 0.25 -> "0.25"); a list of one value is that value
    domain    domain, subject      optional: eval.py and grpo.py report accuracy per domain
    id        id                   optional; else "<file stem>-<row>"
    solution, options              only when given: the SFT target (R1V3's cold-start format: "<think>\\n...\\n
                                   </think>\\n\\n" then the answer with \\boxed{}), and a list of option texts
                                   (the answer may be a letter or an option's text; it becomes the letter)
"<image>" placeholders in the question (EasyR1's geometry3k has them) are kept: the prompt builder puts the images
there, in order, so their count must equal the row's images. Images stored in the file are decoded once to check
them and written as they are to <output stem>_images/ beside the output; images given as paths are checked and
referenced, not copied. A bad row stops the conversion with "file: row N: what is wrong"; --skip_bad skips such rows
and reports how many and why. --limit=N keeps the first N samples.
"""
import argparse
import decimal
import json
import math
import os
import sys
from collections import Counter

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.convert_bench import LETTERS, read_rows, save_image

CANDIDATES = {"image": ("images", "image"),
              "question": ("problem", "question", "extra_info.question", "prompt"),
              "answer": ("answer", "reward_model.ground_truth", "extra_info.answer", "ground_truth"),
              "domain": ("domain", "subject"),
              "id": ("id",),
              "solution": (),  # explicit only: a column of the wrong kind would teach the wrong format
              "options": ()}
REQUIRED = ("question", "answer")
_MISSING = object()

# -----------------------------------------------------------------------------
# Finding the files


def find_inputs(inputs, split):
    """Files and folders -> the data files to read, in a stable order."""
    files = []
    for p in inputs:
        if os.path.isfile(p):
            files.append(p)
            continue
        if not os.path.isdir(p):
            raise ValueError(f"{p}: no such file or folder")
        data = sorted(os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs if f.endswith((".parquet", ".arrow")))
        if os.path.isfile(os.path.join(p, "state.json")):  # save_to_disk of one Dataset: the folder is the split
            found = data
        else:
            found = [f for f in data if _is_split(f, p, split)]
        if not found:
            raise ValueError(f"{p}: no '{split}' parquet / arrow files under this folder"
                             + (f" (it has {len(data)} others: --split=...)" if data else ""))
        files += found
    return files


def _is_split(path, root, split):
    name = os.path.basename(path)
    stem = os.path.splitext(name)[0]
    folders = os.path.relpath(os.path.dirname(path), root).split(os.sep)
    return (name.startswith((f"{split}-", f"{split}.")) or stem.endswith(f"-{split}") or f"-{split}-" in stem
            or split in folders)

# -----------------------------------------------------------------------------
# Reading one row


def get(row, key):
    """row[key], or for "a.b" row["a"]["b"] (a column literally named "a.b" wins); _MISSING if absent."""
    if key in row:
        return row[key]
    node = row
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def resolve_keys(row, given, path):
    """The column for each role: the one given, else the first usual name present in the first row."""
    keys = {}
    for role, names in CANDIDATES.items():
        if given.get(role):
            if get(row, given[role]) is _MISSING:
                raise ValueError(f"{path}: no column {given[role]!r} for --{role}_key; the file has: "
                                 + ", ".join(sorted(row)))
            keys[role] = given[role]
        else:
            keys[role] = next((n for n in names if get(row, n) is not _MISSING), None)
            if keys[role] is None and role in REQUIRED:
                raise ValueError(f"{path}: no {role} column (tried {', '.join(names)}): set --{role}_key; the file "
                                 f"has: {', '.join(sorted(row))}")
    return keys


def scalar_text(v, what):
    """A string or number -> its text: ints as they are, floats in the shortest positional form (3.0 -> '3')."""
    if isinstance(v, str):
        return v.strip()
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"{what} is {v}")
        return np.format_float_positional(v, trim="-")
    if isinstance(v, decimal.Decimal):
        return format(v.normalize(), "f")
    if isinstance(v, list) and len(v) == 1:
        return scalar_text(v[0], what)
    if isinstance(v, list):
        raise ValueError(f"{what} holds {len(v)} values, expected one")
    raise ValueError(f"{what} is a {type(v).__name__}, expected a string or a number")


def question_text(v, what):
    """A string, or a chat list -> the question: the last user turn's text ("image" content parts -> "<image>")."""
    if isinstance(v, str):
        return v.strip()
    if isinstance(v, list) and v and all(isinstance(t, dict) and "content" in t for t in v):
        users = [t for t in v if t.get("role") == "user"]
        if not users:
            raise ValueError(f"{what} is a chat with no user turn")
        content = users[-1]["content"]
        if isinstance(content, list):
            content = "".join("<image>" if isinstance(p, dict) and p.get("type") == "image"
                              else str(p.get("text", "")) if isinstance(p, dict) else str(p) for p in content)
        if not isinstance(content, str):
            raise ValueError(f"{what}: the user turn's content is a {type(content).__name__}")
        return content.strip()
    raise ValueError(f"{what} is a {type(v).__name__}, expected a string or a chat list")


def image_cells(v, what):
    """An image column's value -> a list of cells for save_image (null / [] -> no images)."""
    if v is None:
        return []
    cells = v if isinstance(v, list) else [v]
    for j, c in enumerate(cells):
        if c is not None and not isinstance(c, (dict, bytes, bytearray, str)):
            raise ValueError(f"{what}: image {j + 1} is a {type(c).__name__}, expected bytes, a path or "
                             "a {bytes, path} cell")
        if not c or (isinstance(c, dict) and not c.get("bytes") and not c.get("path")):
            raise ValueError(f"{what}: image {j + 1} is empty (no bytes, no path)")
    return cells


def to_sample(row, keys, default_id, notes):
    """One row -> (our sample without images, image cells). Raises ValueError(what is wrong)."""
    def col(role):
        v = get(row, keys[role])
        if v is _MISSING:
            raise ValueError(f"no column {keys[role]!r}")
        if v is None:
            raise ValueError(f"column {keys[role]!r} is null")
        return v
    question = question_text(col("question"), f"column {keys['question']!r}")
    answer = scalar_text(col("answer"), f"column {keys['answer']!r}")
    for role, text in (("question", question), ("answer", answer)):
        if not text:
            raise ValueError(f"column {keys[role]!r} is empty")
    if isinstance(get(row, keys["answer"]), (int, float, decimal.Decimal)):
        notes["answers given as numbers (written as strings)"] += 1
    sid = default_id if keys["id"] is None or get(row, keys["id"]) in (None, "") else scalar_text(col("id"), "id")
    s = {"id": sid, "images": [], "question": question, "answer": answer}
    cells = image_cells(get(row, keys["image"]), f"column {keys['image']!r}") if keys["image"] else []
    n_ph = question.count("<image>")
    if n_ph and n_ph != len(cells):
        raise ValueError(f"the question has {n_ph} '<image>' placeholders but the row has {len(cells)} images")
    notes["'<image>' placeholders kept" if n_ph else "no '<image>' in the question (images go before it)" if cells
          else "rows without images"] += 1
    if keys["options"]:
        opts = col("options")
        if not isinstance(opts, list) or not 2 <= len(opts) <= len(LETTERS):
            raise ValueError(f"column {keys['options']!r} must be a list of 2..{len(LETTERS)} options")
        opts = [scalar_text(o, f"option {i + 1}") for i, o in enumerate(opts)]
        if answer not in LETTERS[:len(opts)]:
            if answer not in opts:
                raise ValueError(f"answer {answer!r} is neither an option letter A..{LETTERS[len(opts) - 1]} nor "
                                 "an option's text")
            s["answer"] = LETTERS[opts.index(answer)]
            notes["option texts as answers (mapped to letters)"] += 1
        s["options"] = opts
    if keys["solution"]:
        s["solution"] = col("solution")
        if not isinstance(s["solution"], str):
            raise ValueError(f"column {keys['solution']!r} is a {type(s['solution']).__name__}, expected a string")
        if not s["solution"].strip():
            raise ValueError(f"column {keys['solution']!r} is empty")
        if "</think>" not in s["solution"]:
            notes["solutions without </think> (not R1V3's SFT format)"] += 1
    if keys["domain"] and get(row, keys["domain"]) not in (None, ""):
        s["domain"] = scalar_text(get(row, keys["domain"]), f"column {keys['domain']!r}")
    return s, cells

# -----------------------------------------------------------------------------


def convert(inputs, out_path, split="train", limit=0, image_root=None, skip_bad=False, **keys):
    """Converts `inputs` (files or folders) to out_path; keys: the --<role>_key flags (question_key="problem", ...).
    Returns the samples written. Errors name the file and the row."""
    given = {k[:-len("_key")]: v for k, v in keys.items() if k.endswith("_key")}
    unknown = set(keys) - {f"{role}_key" for role in CANDIDATES}
    if unknown:
        raise ValueError(f"unknown argument(s): {', '.join(sorted(unknown))} (column keys: "
                         f"{', '.join(r + '_key' for r in CANDIDATES)})")
    files = find_inputs([inputs] if isinstance(inputs, str) else inputs, split)
    out_dir = os.path.dirname(os.path.abspath(out_path))
    img_dir = os.path.join(out_dir, os.path.splitext(os.path.basename(out_path))[0] + "_images")
    os.makedirs(img_dir, exist_ok=True)
    samples, seen, skipped, notes, used = [], {}, [], Counter(), {}
    for path in files:
        if limit and len(samples) >= limit:
            break
        root = os.path.abspath(image_root or os.path.dirname(os.path.abspath(path)))
        stem, keys = os.path.splitext(os.path.basename(path))[0], None
        for n, (where, row) in enumerate(read_rows(path)):
            if limit and len(samples) >= limit:
                break
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected an object, got {type(row).__name__}")
            if keys is None:  # the mapping, from the file's first row
                keys = resolve_keys(row, given, path)
                used[path] = keys
            try:
                s, cells = to_sample(row, keys, f"{stem}-{n}", notes)
                if s["id"] in seen:
                    raise ValueError(f"duplicate id {s['id']!r} (first at {seen[s['id']]})")
                dest = os.path.join(img_dir, f"{len(samples):07d}")
                s["images"] = [save_image(c, f"image {j + 1}", f"{dest}-{j + 1}", root, out_dir)
                               for j, c in enumerate(cells)]
            except ValueError as e:
                if not skip_bad:
                    raise ValueError(f"{where}: {e}") from e
                skipped.append(f"{where}: {e}")
                continue
            seen[s["id"]] = where
            samples.append(s)
    if not samples:
        raise ValueError(f"{', '.join(files)}: no samples" + (" left after skipping bad rows" if skipped else ""))
    with open(out_path, "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s, ensure_ascii=False) + "\n")
    print(f"{out_path}: {len(samples)} samples from {len(files)} file(s), "
          f"{sum(len(s['images']) for s in samples)} images (in-file ones written to {img_dir})")
    for keys in {json.dumps(k) for k in used.values()}:
        print("  columns: " + ", ".join(f"{role}={col}" for role, col in json.loads(keys).items() if col))
    domains = Counter(s.get("domain", "-") for s in samples)
    print("  per domain: " + ", ".join(f"{d}: {n}" for d, n in sorted(domains.items())))
    for note, n in sorted(notes.items()):
        print(f"  {note}: {n}")
    if skipped:
        print(f"  skipped {len(skipped)} bad rows, e.g.:\n    " + "\n    ".join(skipped[:5]))
    return samples


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="parquet / arrow / jsonl files, or folders")
    ap.add_argument("out_path", help="output JSONL (in-file images go to <stem>_images/ beside it)")
    ap.add_argument("--split", default="train", help="the split to pick up in folders (default: train)")
    for role in CANDIDATES:
        ap.add_argument(f"--{role}_key", default=None, help=f"the {role} column (default: the first of "
                        f"{', '.join(CANDIDATES[role])} present)" if CANDIDATES[role] else f"the {role} column")
    ap.add_argument("--image_root", default=None, help="folder image paths are relative to (default: the file's)")
    ap.add_argument("--limit", type=int, default=0, help="keep the first N samples (0 = all)")
    ap.add_argument("--skip_bad", action="store_true", help="skip bad rows (counted and shown) instead of stopping")
    args = ap.parse_args()
    try:
        convert(args.inputs, args.out_path, args.split, args.limit, args.image_root, args.skip_bad,
                **{f"{role}_key": getattr(args, f"{role}_key") for role in CANDIDATES})
    except ValueError as e:
        raise SystemExit(f"convert_parquet.py: error: {e}")
