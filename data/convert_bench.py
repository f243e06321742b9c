"""
Converts benchmark files, as they are distributed, to our JSONL (format in data/common.py) for eval.py.

    python data/convert_bench.py mmmu /data/MMMU out/bench/mmmu_val.jsonl             # <Subject>/validation-*.parquet
    python data/convert_bench.py mathvista /data/MathVista/data out/bench/mathvista.jsonl   # testmini-*.parquet
    python data/convert_bench.py mmk12 /data/MMK12/data/test-00000-of-00001.parquet out/bench/mmk12.jsonl --limit=200
    python eval.py --init_from=out/grpo --data=out/bench/mmmu_val.jsonl --group_size=5 --temperature=1.0 \\
        --max_new_tokens=16384

Inputs: parquet or Arrow files (needs pyarrow), JSON (a list of records, or a dict of records keyed by id), JSONL, or
folders, searched recursively for the files of one split (--split; default validation / testmini / test: a file
named "<split>-*" or "<split>.*", or any file in a folder named <split>). Images stored in the file (Hugging Face
image cells {"bytes", "path"}) are decoded once to check them, then written as they are to <output stem>_images/
beside the output; images given as paths (relative to --image_root, default the input file's folder) are checked
and referenced, not copied. Every sample gets a domain (and subject / difficulty where the benchmark has them) for
eval.py's breakdown. A bad row stops the conversion with "file: row N (id ...): what is wrong"; --skip_bad skips
such rows and reports how many and why. --limit=N keeps the first N samples (in file order).

Layouts: what was checked against the public dataset cards and loaders, and what is assumed, is written above
each converter below.
"""
import argparse
import ast
import io
import json
import os
import re
from collections import Counter

from PIL import Image

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # as data/common.py (not imported: it would pull in torch)
SPLITS = {"mmmu": "validation", "mathvista": "testmini", "mmk12": "test"}
EXTS = (".parquet", ".arrow", ".json", ".jsonl")

# -----------------------------------------------------------------------------
# Reading rows: parquet, Arrow, JSON, JSONL. Yields (where, row) with where = "file: row N" or "file:line".

def read_batches(path, rows=64):
    """A parquet file, or an Arrow IPC file (the stream format `datasets` writes: save_to_disk's data-*.arrow, its
    cache's *.arrow; or the file format, magic "ARROW1") -> its record batches of at most `rows` rows, read as they
    are needed (parquet streamed from disk, Arrow memory-mapped): a data set of images need not fit in memory."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ValueError(f"{path}: reading parquet / arrow files needs pyarrow (pip install pyarrow)") from e
    try:
        if path.endswith(".parquet"):
            batches = pq.ParquetFile(path).iter_batches(batch_size=rows)
        else:
            with open(path, "rb") as f:
                magic = f.read(6)
            source = pa.memory_map(path)
            reader = pa.ipc.open_file(source) if magic == b"ARROW1" else pa.ipc.open_stream(source)
            batches = iter(reader.read_all().to_batches(max_chunksize=rows))  # zero-copy views of the mapped file
        for batch in batches:
            yield batch
    except Exception as e:  # pyarrow raises its own ArrowInvalid / OSError variants
        kind = "parquet" if path.endswith(".parquet") else "arrow"
        raise ValueError(f"{path}: cannot read {kind}: {type(e).__name__}: {e}") from e


def read_rows(path):
    if path.endswith((".parquet", ".arrow")):
        start = 0
        for batch in read_batches(path):  # to Python objects a batch at a time (image bytes are large)
            for i, row in enumerate(batch.to_pylist()):
                yield f"{path}: row {start + i}", row
            start += batch.num_rows
    elif path.endswith(".jsonl"):
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                    if line.strip():
                        yield f"{path}:{lineno}", json.loads(line)
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise ValueError(f"{path}:{lineno}: not a JSON line: {e}") from e
    elif path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: malformed JSON: {e}") from e
        if isinstance(data, dict):  # MathVista's annotation files: {pid: record}
            data = list(data.values())
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a list of records or a dict of them, got {type(data).__name__}")
        for i, row in enumerate(data):
            yield f"{path}: row {i}", row
    else:
        raise ValueError(f"{path}: unknown format (expected {', '.join(EXTS)})")


def find_files(inputs, split):
    files = []
    for p in inputs:
        if os.path.isdir(p):
            found = sorted(os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs if f.endswith(EXTS) and
                           (f.startswith(split + "-") or f.startswith(split + ".") or os.path.basename(d) == split))
            if not found:
                raise ValueError(f"{p}: no '{split}' files ({', '.join(EXTS)}) under this folder (--split=...)")
            files += found
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise ValueError(f"{p}: no such file or folder")
    return files

# -----------------------------------------------------------------------------
# Images: an in-file cell is decoded (to check it) and written as it is; a path is checked and referenced

def save_image(cell, what, dest_stem, image_root, out_dir):
    """cell: {"bytes", "path"} (Hugging Face image), raw bytes, or a path. -> path relative to out_dir."""
    data = cell.get("bytes") if isinstance(cell, dict) else cell if isinstance(cell, (bytes, bytearray)) else None
    path = cell.get("path") if isinstance(cell, dict) else cell if isinstance(cell, str) else None
    if data:
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()  # a full decode: also catches truncated files
                ext = {"JPEG": "jpg", "MPO": "jpg"}.get(im.format, (im.format or "png").lower())
        except Exception as e:
            raise ValueError(f"{what}: cannot decode the image bytes: {type(e).__name__}: {e}") from e
        dest = f"{dest_stem}.{ext}"
        with open(dest, "wb") as f:
            f.write(data)
        return os.path.relpath(dest, out_dir)
    if path:
        full = os.path.normpath(os.path.join(image_root, path))
        if not os.path.isfile(full):
            raise ValueError(f"{what}: image not found: {path} ({full}; set --image_root)")
        try:
            with Image.open(full) as im:
                im.load()
        except Exception as e:
            raise ValueError(f"{what}: cannot decode image {full}: {type(e).__name__}: {e}") from e
        return os.path.relpath(full, out_dir)
    raise ValueError(f"{what}: empty image (neither bytes nor a path)")

# -----------------------------------------------------------------------------
# MMMU (validation). Verified (HF dataset cards MMMU/MMMU mirrors: HuggingFaceM4/MMMU, lmms-lab/MMMU_random_100;
# MMMU-Benchmark/MMMU eval/data_utils.py, eval/answer_dict_val.json): columns id ("validation_<Subject>_<n>"),
# question, options (a str: Python list literal, "[]" for open questions), explanation, image_1..image_7 (image
# cells or None), img_type, answer (a letter; open questions: a string, or a list literal of accepted
# alternatives such as "['24/7', '3.429']"), topic_difficulty (Easy/Medium/Hard), question_type ('multiple-choice'
# | 'open'), subfield; one folder per subject (Accounting/validation-00000-of-00001.parquet).
# Images: the text refers to them as "<image k>" (question and options). We keep the images in the order of first
# reference and renumber the references to match; the prompt builder lists them up front as "Image-1: ...",
# as InternVL's VLMEvalKit prompt for MMMU does. Assumed: a row without any reference uses all its images.
# domain = the discipline (MMMU's 6 groups), subject = the subject (30): MMMU reports both.

MMMU_DISCIPLINES = {
    "Art and Design": ["Art", "Art_Theory", "Design", "Music"],
    "Business": ["Accounting", "Economics", "Finance", "Manage", "Marketing"],
    "Science": ["Biology", "Chemistry", "Geography", "Math", "Physics"],
    "Health and Medicine": ["Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
                            "Pharmacy", "Public_Health"],
    "Humanities and Social Science": ["History", "Literature", "Sociology", "Psychology"],
    "Tech and Engineering": ["Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics",
                             "Energy_and_Power", "Materials", "Mechanical_Engineering"]}
MMMU_DOMAIN = {s: d for d, subjects in MMMU_DISCIPLINES.items() for s in subjects}
_IMAGE_REF = re.compile(r"<image (\d+)>")


def mmmu_sample(row, path, notes):
    sid, question = str(row["id"]), str(row["question"])
    opts = row["options"]
    try:
        options = ast.literal_eval(opts) if isinstance(opts, str) else opts
    except (ValueError, SyntaxError) as e:
        raise ValueError(f"'options' is not a Python list literal: {str(opts)[:80]!r}") from e
    if not isinstance(options, list):
        raise ValueError(f"'options' must be a list, got {type(options).__name__}")
    options = [str(o) for o in options]
    # images in order of first reference in the question, then the options
    refs = []
    for m in _IMAGE_REF.finditer(question + "\n" + "\n".join(options)):
        refs += [int(m.group(1))] if int(m.group(1)) not in refs else []
    if not refs:
        refs = [k for k in range(1, 8) if row.get(f"image_{k}") is not None]
    for k in refs:
        if row.get(f"image_{k}") is None:
            raise ValueError(f"the text refers to <image {k}> but column image_{k} is missing or empty")
    new = {k: i + 1 for i, k in enumerate(refs)}

    def renumber(text):
        return _IMAGE_REF.sub(lambda m: f"<image {new[int(m.group(1))]}>", text)
    m = re.fullmatch(r"(?:dev|validation|test)_(.+)_\d+", sid)
    folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
    subject = m.group(1) if m else folder
    s = {"id": sid, "images": [], "question": renumber(question)}
    answer = str(row["answer"]).strip()
    if row["question_type"] == "multiple-choice":
        if not 2 <= len(options) <= len(LETTERS):
            raise ValueError(f"multiple-choice question with {len(options)} options")
        if answer not in LETTERS[:len(options)]:
            raise ValueError(f"answer {answer!r} is not an option letter A..{LETTERS[len(options) - 1]}")
        s["options"] = [renumber(o) for o in options]
    elif answer.startswith("["):  # open question with accepted alternatives: keep the first (one gold answer)
        try:
            alts = [str(a) for a in ast.literal_eval(answer)]
        except (ValueError, SyntaxError) as e:
            raise ValueError(f"answer looks like a list but is not a list literal: {answer[:80]!r}") from e
        if not alts:
            raise ValueError("empty list of answers")
        answer = alts[0]
        s["answer_alternatives"] = alts
        notes["open answers with alternatives (first kept)"] += 1
    if not answer:
        raise ValueError("empty answer")
    s.update(answer=answer, domain=MMMU_DOMAIN.get(subject, subject), subject=subject)
    if row.get("topic_difficulty"):
        s["difficulty"] = str(row["topic_difficulty"])
    s.update({k: row[k] for k in ("question_type", "subfield", "img_type") if row.get(k) is not None})
    return s, [row[f"image_{k}"] for k in refs]

# -----------------------------------------------------------------------------
# MathVista (testmini). Verified (HF dataset card AI4Math/MathVista): columns pid, question, image (a path such as
# "images/1.jpg"), decoded_image (image cell), choices (list of str, None for free-form), unit, precision,
# answer (the choice's text for multiple choice), question_type ('multi_choice' | 'free_form'), answer_type
# ('integer' | 'float' | 'text' | 'list'), metadata {category, context, grade, img_height, img_width, language,
# skills, source, split, task}, query (the question with MathVista's answer-format hint). The metadata has no
# subject or difficulty field. Multiple choice: options = choices, answer = the letter of the choice equal to the
# answer; the question is `question` (the prompt builder adds the options). Free form: the question is `query`
# (its hint says integer / N decimals / list, which the exact-match check needs). domain = metadata.task.
# Assumed: the JSON layout (a dict {pid: record} or a list) has the same fields, with `image` relative to the
# JSON file's folder (or --image_root).

def mathvista_sample(row, path, notes):
    meta = row.get("metadata") or {}
    if not isinstance(meta, dict):
        raise ValueError(f"'metadata' must be an object, got {type(meta).__name__}")
    choices = row.get("choices") or None
    s = {"id": str(row["pid"]), "images": []}
    answer = str(row["answer"]).strip()
    if row.get("question_type") == "multi_choice" or choices:
        if not choices or not 2 <= len(choices) <= len(LETTERS):
            raise ValueError(f"multiple-choice question with choices {choices!r}")
        options = [str(c) for c in choices]
        hits = [i for i, c in enumerate(options) if c.strip() == answer]
        if not hits:
            raise ValueError(f"answer {answer!r} is not one of the choices {options!r}")
        s.update(question=str(row["question"]), options=options, answer=LETTERS[hits[0]])
    else:
        s.update(question=str(row.get("query") or row["question"]), answer=answer)
    if not answer:
        raise ValueError("empty answer")
    if meta.get("task"):
        s["domain"] = str(meta["task"])
    s.update({k: row[k] for k in ("question_type", "answer_type", "precision", "unit") if row.get(k) not in (None, "")})
    s.update({k: meta[k] for k in ("category", "context", "grade", "skills", "source") if meta.get(k)})
    dec = row.get("decoded_image")
    cell = dec if isinstance(dec, dict) and dec.get("bytes") else row.get("image")
    if not cell:
        raise ValueError("no image: both 'decoded_image' and 'image' are empty")
    return s, [cell]

# -----------------------------------------------------------------------------
# MMK12 (FanqingM/MMK12, from MM-Eureka). Verified (lmms-eval's mmk12 task notes; public loaders of the parquet):
# columns id, subject (math / physics / chemistry / biology), question, image (image cell), answer. The test split
# is 2000 multiple-choice questions (500 per subject) with the options written inline at the end of the question
# ("A. ..." lines) and the answer a letter; the train split has free-form answers. We split a trailing block of
# lettered lines A, B, C, ... into `options` when the answer is one of its letters (the prompt then renders them
# as for MMMU); otherwise the question stays verbatim (a bare-letter answer is still scored as a letter by
# rewards.py, anything else by Math-Verify). domain = subject. Assumed: a JSONL/JSON export with the same
# fields, `image` a cell or a path.

_CHOICE_LINE = re.compile(r"\s*\(?([A-Z])\)?\s*[.．、:：)]\s*(.*\S)\s*")


def split_choices(question):
    """'stem\\nA. x\\nB. y' -> (stem, ['x', 'y']) when the question ends with lettered lines A, B, ...; else None."""
    lines, opts = question.rstrip().split("\n"), []
    while lines and (m := _CHOICE_LINE.fullmatch(lines[-1])):
        opts.insert(0, (m.group(1), m.group(2)))
        lines.pop()
    stem = "\n".join(lines).strip()
    if len(opts) < 2 or [c for c, _ in opts] != list(LETTERS[:len(opts)]) or not stem:
        return None
    return stem, [t for _, t in opts]


def mmk12_sample(row, path, notes):
    question, answer = str(row["question"]), str(row["answer"]).strip()
    if not answer:
        raise ValueError("empty answer")
    if question.count("<image>") > 1:
        raise ValueError(f"question has {question.count('<image>')} '<image>' placeholders for one image")
    s = {"id": str(row["id"]), "images": []}
    parsed = split_choices(question)
    if parsed and answer in LETTERS[:len(parsed[1])]:
        s.update(question=parsed[0], options=parsed[1], answer=answer)
        notes["multiple choice (options split out)"] += 1
    else:
        s.update(question=question, answer=answer)
        notes["kept verbatim (" + ("letter answer" if re.fullmatch(r"[A-Z]", answer) else "open answer") + ")"] += 1
    if row.get("subject"):
        s["domain"] = str(row["subject"])
    if not row["image"]:
        raise ValueError("empty 'image'")
    return s, [row["image"]]


CONVERTERS = {"mmmu": (mmmu_sample, "id", ("id", "question", "options", "answer", "question_type")),
              "mathvista": (mathvista_sample, "pid", ("pid", "question", "answer")),
              "mmk12": (mmk12_sample, "id", ("id", "question", "image", "answer"))}

# -----------------------------------------------------------------------------

def convert(bench, inputs, out_path, split=None, limit=0, image_root=None, skip_bad=False):
    """Converts the benchmark files `inputs` (files or folders) to out_path. Returns the samples written.
    Errors name the file, the row and the sample id."""
    if bench not in CONVERTERS:
        raise ValueError(f"unknown benchmark {bench!r}: one of {', '.join(CONVERTERS)}")
    to_sample, id_col, required = CONVERTERS[bench]
    files = find_files([inputs] if isinstance(inputs, str) else inputs, split or SPLITS[bench])
    out_dir = os.path.dirname(os.path.abspath(out_path))
    img_dir = os.path.join(out_dir, os.path.splitext(os.path.basename(out_path))[0] + "_images")
    os.makedirs(img_dir, exist_ok=True)
    samples, seen, skipped, notes = [], {}, [], Counter()
    for path in files:
        if limit and len(samples) >= limit:
            break
        root = os.path.abspath(image_root or os.path.dirname(os.path.abspath(path)))
        for where, row in read_rows(path):
            if limit and len(samples) >= limit:
                break
            try:
                if not isinstance(row, dict):
                    raise ValueError(f"expected an object, got {type(row).__name__}")
                where += f" (id {row.get(id_col)!r})" if id_col in row else ""
                missing = [c for c in required if c not in row]
                if missing:
                    raise ValueError(f"missing column(s): {', '.join(missing)}")
                s, cells = to_sample(row, path, notes)
                if s["id"] in seen:
                    raise ValueError(f"duplicate id (first at {seen[s['id']]})")
                stem = os.path.join(img_dir, f"{len(samples):06d}")
                s["images"] = [save_image(c, f"image {j + 1}", f"{stem}-{j + 1}", root, out_dir)
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
    domains = Counter(s.get("domain", "-") for s in samples)
    print(f"{out_path}: {len(samples)} samples from {len(files)} file(s), "
          f"{sum(len(s['images']) for s in samples)} images (in-file ones written to {img_dir})")
    print("  per domain: " + ", ".join(f"{d}: {n}" for d, n in sorted(domains.items())))
    for note, n in sorted(notes.items()):
        print(f"  {note}: {n}")
    if skipped:
        print(f"  skipped {len(skipped)} bad rows, e.g.:\n    " + "\n    ".join(skipped[:5]))
    return samples


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bench", choices=list(CONVERTERS))
    ap.add_argument("inputs", nargs="+", help="benchmark files or folders")
    ap.add_argument("out_path", help="output JSONL (images go to <stem>_images/ beside it)")
    ap.add_argument("--split", default=None, help="split to pick up in folders (default: %s)" % SPLITS)
    ap.add_argument("--limit", type=int, default=0, help="keep the first N samples (0 = all)")
    ap.add_argument("--image_root", default=None, help="folder image paths are relative to (default: the input's)")
    ap.add_argument("--skip_bad", action="store_true", help="skip bad rows (counted and shown) instead of stopping")
    args = ap.parse_args()
    try:
        convert(args.bench, args.inputs, args.out_path, args.split, args.limit, args.image_root, args.skip_bad)
    except ValueError as e:
        raise SystemExit(f"convert_bench.py: error: {e}")
