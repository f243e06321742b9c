"""
Converts LLaVA / ShareGPT conversation data to our JSONL (format in data/common.py).

    python data/convert_llava.py in.json out.jsonl [--image_root=DIR]

Input: a JSON list (or JSONL) of records like
    {"id": "000123", "image": "coco/1.jpg" (or ["a.jpg", "b.jpg"], or absent),
     "conversations": [{"from": "human", "value": "<image>\\nQuestion"}, {"from": "gpt", "value": "answer text"}]}
Output, one line per record: question = the first human turn ("<image>" placeholders kept: the
prompt builder puts the images there), solution = the gpt turn after it, answer = the content of
the last \\boxed{...} in it, else the whole gpt text. Image paths are relative to --image_root
(default: the input file's folder) and are rewritten relative to the output file. Later turns of
multi-turn records are dropped (counted in the summary). Images are not opened here: load_jsonl
checks them and names the line of any that is missing or unreadable.
"""
import argparse
import json
import os

def last_boxed(text):
    """Content of the last \\boxed{...} (braces may nest), or None."""
    i = text.rfind("\\boxed{")
    if i < 0:
        return None
    depth, start = 0, i + len("\\boxed{")
    for j in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth < 0:
            return text[start:j].strip()
    return None  # unbalanced braces

def read_records(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: malformed JSON: {e}") from e
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON: {e}") from e
    return records

def convert_record(rec, image_root, out_dir):
    """One LLaVA record -> our sample dict. Raises ValueError(problem) on a malformed record."""
    if not isinstance(rec, dict):
        raise ValueError(f"expected an object, got {type(rec).__name__}")
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in conv):
        raise ValueError("'conversations' must be a list of {'from', 'value'} turns")
    roles = [t.get("from") for t in conv]
    if "human" not in roles:
        raise ValueError("no 'human' turn")
    h = roles.index("human")
    if h + 1 >= len(conv) or roles[h + 1] != "gpt":
        raise ValueError("the first 'human' turn is not followed by a 'gpt' turn")
    images = rec.get("image", [])
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise ValueError("'image' must be a path or a list of paths")
    question, solution = conv[h]["value"].strip(), conv[h + 1]["value"].strip()
    n_ph = question.count("<image>")
    if n_ph and n_ph != len(images):
        raise ValueError(f"{n_ph} '<image>' placeholders but {len(images)} images")
    if not images:
        question = question.replace("<image>", "").strip()
    boxed = last_boxed(solution)
    return dict(id=str(rec.get("id", "")), images=[os.path.relpath(os.path.join(image_root, p), out_dir) for p in images],
                question=question, answer=boxed if boxed is not None else solution, solution=solution), len(conv) > h + 2

def convert(in_path, out_path, image_root=None):
    """Converts in_path to out_path; returns the number of records written. Errors name file and record."""
    image_root = os.path.abspath(image_root or os.path.dirname(os.path.abspath(in_path)))
    out_dir = os.path.dirname(os.path.abspath(out_path))
    records = read_records(in_path)
    if not isinstance(records, list) or not records:
        raise ValueError(f"{in_path}: expected a non-empty list of records")
    samples, multi_turn = [], 0
    for i, rec in enumerate(records):
        try:
            s, more = convert_record(rec, image_root, out_dir)
        except ValueError as e:
            raise ValueError(f"{in_path}: record {i}: {e}") from e
        s["id"] = s["id"] or str(i)
        samples.append(s)
        multi_turn += more
    os.makedirs(out_dir, exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s, ensure_ascii=False) + "\n")
    n_boxed = sum(last_boxed(s["solution"]) is not None for s in samples)
    print(f"{out_path}: {len(samples)} samples ({n_boxed} with \\boxed answers; {multi_turn} multi-turn records cut to the first turn)")
    return len(samples)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("in_path")
    ap.add_argument("out_path")
    ap.add_argument("--image_root", default=None, help="folder the image paths are relative to (default: the input's)")
    args = ap.parse_args()
    convert(args.in_path, args.out_path, args.image_root)
