"""Tests for data/: synthetic task, prepare, tokenizer, JSONL validation, tiling, prompts, masks, converter."""
import hashlib
import io
import json
import os
import random
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from data.common import (IMAGENET_MEAN, IMAGENET_STD, SPECIAL_TOKENS, build_prompt_ids, build_prompt_text, collate,
                         dynamic_preprocess, encode_sft, load_image, load_jsonl, load_sft_data)
from data.convert_llava import convert
from data.prepare import prepare, render_split, train_tokenizer
from data.synth import ALL_CODES, COLORS, DIFFICULTIES, DOMAINS, SHAPES, make_sample

CFG = SimpleNamespace(image_size=64, max_tiles=1, use_thumbnail=True, tokens_per_tile=16)  # the tiny VLM's values

# -----------------------------------------------------------------------------
# synthetic task

def png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()

def read_scene(img):
    """Reads the scene back from the pixels, independently of synth.py's drawing code."""
    a = np.asarray(img).astype(int)
    scene = []
    for r in range(1, 5):
        for c in range(1, 5):
            x0, y0 = (c - 1) * 16 + 2, (r - 1) * 16 + 2
            px = a[y0 + 7, x0 + 6]
            color = min(COLORS, key=lambda k: np.abs(px - COLORS[k]).sum())
            if np.abs(px - COLORS[color]).sum() > 30:
                continue  # background
            filled = lambda x, y: np.abs(a[y, x] - COLORS[color]).sum() <= 30
            shape = "square" if filled(x0 + 1, y0 + 1) else "triangle" if filled(x0 + 1, y0 + 10) else "circle"
            scene.append(dict(row=r, col=c, color=color, shape=shape))
    return scene

def solve(q, scene, options):
    """Independent answer from the question text and the scene."""
    assert q.endswith("\n<image>"), q  # the image comes after the question (data/synth.py: fixed-offset reading)
    q = q[:-len("\n<image>")]
    n = lambda f: sum(1 for o in scene if f(o))
    col = lambda c: n(lambda o: o["color"] == c)
    shp = lambda s: n(lambda o: o["shape"] == s)
    letter = lambda color: "ABCD"[options.index(color)]
    if m := re.fullmatch(r"How many (\w+) shapes are there\?", q):
        return str(col(m[1]))
    if m := re.fullmatch(r"How many (\w+) (\w+)s are there\?", q):
        return str(n(lambda o: (o["color"], o["shape"]) == (m[1], m[2])))
    if (m := re.fullmatch(r"How many shapes are (\w+) or (\w+)s\?", q)) and m[2] in SHAPES:
        return str(n(lambda o: o["color"] == m[1] or o["shape"] == m[2]))
    if m := re.fullmatch(r"How many shapes are (\w+) or (\w+)\?", q):
        return str(col(m[1]) + col(m[2]))
    if m := re.fullmatch(r"How many (\w+)s are there\?", q):
        return str(shp(m[1]))
    if m := re.fullmatch(r"How many shapes are not (\w+)s\?", q):
        return str(n(lambda o: o["shape"] != m[1]))
    if m := re.fullmatch(r"How many more (\w+) shapes than (\w+) shapes are there\?", q):
        return str(col(m[1]) - col(m[2]))
    if m := re.fullmatch(r"What is the number of (\w+)s minus the number of (\w+) shapes\?", q):
        return str(shp(m[1]) - col(m[2]))
    if m := re.fullmatch(r"Each (\w+) shape is worth (\d+) points and each (\w+) shape is worth (\d+) points\. "
                         r"Other shapes are worth nothing\. What is the total\?", q):
        return str(col(m[1]) * int(m[2]) + col(m[3]) * int(m[4]))
    if m := re.fullmatch(r"A circle is worth (\d+) points, a square (\d+) and a triangle (\d+)\. What is the total\?", q):
        return str(shp("circle") * int(m[1]) + shp("square") * int(m[2]) + shp("triangle") * int(m[3]))
    if m := re.fullmatch(r"What colour is the shape in row (\d), column (\d)\?", q):
        [o] = [o for o in scene if (o["row"], o["col"]) == (int(m[1]), int(m[2]))]
        return letter(o["color"])
    if m := re.fullmatch(r"What colour is the shape directly (to the right of|below) the (\w+) (\w+)\?", q):
        [ref] = [o for o in scene if (o["color"], o["shape"]) == (m[2], m[3])]  # the reference must be unique
        dr, dc = (0, 1) if m[1] == "to the right of" else (1, 0)
        [o] = [o for o in scene if (o["row"], o["col"]) == (ref["row"] + dr, ref["col"] + dc)]
        return letter(o["color"])
    raise AssertionError(f"unknown question template: {q}")

def test_make_sample_deterministic():
    a = [make_sample(random.Random(7), d, "hard") for d in DOMAINS]
    b = [make_sample(random.Random(7), d, "hard") for d in DOMAINS]
    c = [make_sample(random.Random(8), d, "hard") for d in DOMAINS]
    key = lambda s: (png_bytes(s["image"]), s["question"], s["solution"], s["answer"], s["options"])
    assert [key(s) for s in a] == [key(s) for s in b]
    assert [key(s) for s in a] != [key(s) for s in c]

def test_answers_are_right_for_the_image():
    rng = random.Random(0)
    for domain in DOMAINS:
        for diff in DIFFICULTIES:
            for _ in range(12):
                s = make_sample(rng, domain, diff, p_wait=0.5, p_hmm=0.3)
                assert s["image"].size == (64, 64) and s["image"].mode == "RGB"
                scene = read_scene(s["image"])
                assert scene == s["scene"], "image does not show the scene"
                lo, hi = (3, 6) if diff == "normal" else (6, 10)
                assert lo <= len(scene) <= hi
                if s["options"] is not None:  # multiple choice: four distinct colours, answer a letter
                    assert sorted(s["options"]) == sorted(COLORS) and s["answer"] in "ABCD"
                else:
                    assert re.fullmatch(r"-?\d+", s["answer"])
                    assert int(s["answer"]) >= 0 or "minus" in s["question"], s  # "how many more" is never negative
                assert solve(s["question"], scene, s["options"]) == s["answer"], s
                # the trace ends with the same answer, and is short
                assert s["solution"].startswith("<think>\n") and "\n</think>\n\n" in s["solution"]
                assert re.findall(r"\\boxed\{(.*?)\}", s["solution"]) == [s["answer"]]
                assert 5 <= len(s["solution"].split()) <= 200, s["solution"]
                # it opens with one code per cell ("rc" = red circle, "--" = empty), in reading order, as the image
                # shows it
                lines = s["solution"].split("\n")
                codes = re.fullmatch(r"Grid: (.*)", lines[1]).group(1).split(" ")
                want = []
                for r in range(1, 5):
                    for c in range(1, 5):
                        o = next((o for o in scene if (o["row"], o["col"]) == (r, c)), None)
                        want.append(o["color"][0] + o["shape"][0] if o else "--")
                assert codes == want, (codes, scene)
                # counting questions: the key (what each kind of shape is worth), each cell's value looked up in
                # it, the running total, whose last entry is the answer (a slip states a wrong total first)
                if s["options"] is None:
                    key = dict(e.split("=") for e in re.fullmatch(r"Key: (.*)", lines[2]).group(1).split(" "))
                    assert list(key) == [c[0] + sh[0] for c in COLORS for sh in SHAPES], lines[2]
                    vals = [int(x) for x in re.fullmatch(r"Values: ((?:-?\d+ ){15}-?\d+)", lines[3]).group(1).split()]
                    assert vals == [int(key[c]) if c != "--" else 0 for c in codes], (lines, codes)
                    run = [int(x) for x in re.fullmatch(r"Tally: ((?:-?\d+ ){15}-?\d+)", lines[4]).group(1).split()]
                    assert run == [sum(vals[:i + 1]) for i in range(16)] and run[-1] == int(s["answer"]), lines
                    # the key is the question's condition: a scene holding one shape of each kind would score each
                    # kind at its key value (checked with the independent solver)
                    for kind, v in key.items():
                        one = [dict(row=1, col=1, color=next(c for c in COLORS if c[0] == kind[0]),
                                    shape=next(sh for sh in SHAPES if sh[0] == kind[1]))]
                        assert solve(s["question"], one, None) == v, (kind, v, s["question"])
                    m = re.fullmatch(r"That is (-?\d+)\.(?: Wait, the tally ends at (-?\d+)\. That is (-?\d+)\.)?", lines[5])
                    assert int(m[3] or m[1]) == run[-1] and (m[2] is None) == (int(m[1]) == run[-1]), lines[5]
                else:  # position questions: the code looked up is the asked cell's
                    m = re.search(r"(?:Row (\d), column (\d)|(One|Four) cells? after (\w\w)): (\w\w|--)\n(?!Wait)", s["solution"])
                    k = 4 * (int(m[1]) - 1) + int(m[2]) - 1 if m[1] else codes.index(m[4]) + (1 if m[3] == "One" else 4)
                    assert m[5] == codes[k], s["solution"]

def test_blind_teacher():
    # a teacher that overlooks yellow: same scene and question (same rng draws), a key with every yellow kind at 0,
    # and the trace concludes what the scene would give without its yellow shapes
    wrong = 0
    for i in range(120):
        domain, diff = DOMAINS[i % 6], DIFFICULTIES[i % 2]
        a = make_sample(random.Random(i), domain, diff, p_wait=0.3)
        b = make_sample(random.Random(i), domain, diff, p_wait=0.3, blind="yellow")
        assert (a["question"], a["scene"], a["options"]) == (b["question"], b["scene"], b["options"])
        if a["options"] is not None:  # position questions have no key: unchanged
            assert a["solution"] == b["solution"]
            continue
        lines = b["solution"].split("\n")
        key = dict(e.split("=") for e in lines[2][len("Key: "):].split(" "))
        assert all(v == "0" for k, v in key.items() if k[0] == "y"), lines[2]
        assert b["answer"] == solve(b["question"], [o for o in b["scene"] if o["color"] != "yellow"], None)
        assert re.findall(r"\\boxed\{(.*?)\}", b["solution"]) == [b["answer"]]
        wrong += a["answer"] != b["answer"]
    assert wrong > 10  # the blind spot changes many answers

def test_prepare_blind_teacher_only_changes_sft(prepared, tmp_path):
    # the default's sft traces come from a teacher blind to yellow in 60% of them; without it only sft changes
    out = str(tmp_path / "plain")
    prepare(out=out, n_sft=90, n_rl=60, n_val=24, n_test=30, teacher_blind_frac=0.0)
    for split in ("rl", "val", "test"):
        with open(os.path.join(out, f"{split}.jsonl")) as f, open(os.path.join(prepared, f"{split}.jsonl")) as g:
            assert f.read() == g.read(), split
    a, b = (load_jsonl(os.path.join(d, "sft.jsonl"), require=("solution",)) for d in (out, prepared))
    assert [r["question"] for r in a] == [r["question"] for r in b]
    n_diff = sum(x["solution"] != y["solution"] for x, y in zip(a, b))
    assert 5 < n_diff < 90 * 0.6 * 5 / 6 + 15, n_diff  # only counting traces whose scene holds a yellow kind change
    with pytest.raises(ValueError, match="teacher_blind"):
        prepare(out=str(tmp_path / "bad"), teacher_blind="purple", teacher_blind_frac=0.5)

def test_wait_fraction():
    sols = lambda p: [make_sample(random.Random(i), DOMAINS[i % 6], DIFFICULTIES[i % 2], p_wait=p)["solution"] for i in range(300)]
    assert not any("Wait," in s for s in sols(0.0))
    frac = sum("Wait," in s for s in sols(0.2)) / 300
    assert 0.1 < frac < 0.3, frac
    assert sum("Wait," in s for s in sols(1.0)) > 250

# -----------------------------------------------------------------------------
# prepare + tokenizer (one small preparation shared by the tests below)

@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth"))
    prepare(out=out, n_sft=90, n_rl=60, n_val=24, n_test=30)
    return out

@pytest.fixture(scope="module")
def tok(prepared):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(os.path.join(prepared, "tokenizer"))

def test_prepare_splits_no_leak_and_idempotent(prepared, capsys):
    keys, ids = {}, set()
    for split, n in dict(sft=90, rl=60, val=24, test=30).items():
        path = os.path.join(prepared, f"{split}.jsonl")
        recs = load_jsonl(path, require=("question", "answer") + (("solution",) if split != "rl" else ()))
        assert len(recs) == n and ("solution" in recs[0]) == (split != "rl")
        for r in recs:
            with open(r["images"][0], "rb") as f:
                keys.setdefault((hashlib.sha1(f.read()).hexdigest(), r["question"]), []).append(split)
            ids.add(r["id"])
    assert len(ids) == 204 and all(len(v) == 1 for v in keys.values()), "a sample appears twice"
    # a second run with the same settings does nothing
    mtime = os.path.getmtime(os.path.join(prepared, "sft.jsonl"))
    prepare(out=prepared, n_sft=90, n_rl=60, n_val=24, n_test=30)
    assert "up to date" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(prepared, "sft.jsonl")) == mtime

def test_val_big_leaves_the_default_unchanged(prepared, tmp_path, capsys):
    # --n_val_big: an extra validation split rendered after the others; sft/rl/val/test and the tokenizer stay
    # byte-identical, it overlaps none of them, and adding it to an up-to-date directory gives the same file
    small = dict(n_sft=90, n_rl=60, n_val=24, n_test=30)
    fresh, later = str(tmp_path / "fresh"), str(tmp_path / "later")
    prepare(out=fresh, n_val_big=40, **small)
    shutil.copytree(prepared, later)
    prepare(out=later, n_val_big=40, **small)
    assert "val_big" in capsys.readouterr().out
    files = [f"{s}.jsonl" for s in ("sft", "rl", "val", "test")] + \
        [os.path.join("tokenizer", f) for f in sorted(os.listdir(os.path.join(prepared, "tokenizer")))]
    for d in (fresh, later):
        for name in files:
            with open(os.path.join(prepared, name), "rb") as f, open(os.path.join(d, name), "rb") as g:
                assert f.read() == g.read(), (d, name)
    with open(os.path.join(fresh, "val_big.jsonl"), "rb") as f, open(os.path.join(later, "val_big.jsonl"), "rb") as g:
        assert f.read() == g.read()
    keys = lambda d, split: {(hashlib.sha1(open(r["images"][0], "rb").read()).hexdigest(), r["question"])
                             for r in load_jsonl(os.path.join(d, f"{split}.jsonl"))}
    big = load_jsonl(os.path.join(fresh, "val_big.jsonl"), require=("solution",))
    assert len(big) == 40 and len({r["id"] for r in big}) == 40 and big[0]["id"] == "val_big-000000"
    assert len(keys(fresh, "val_big")) == 40
    for split in ("sft", "rl", "val", "test"):
        assert not keys(fresh, "val_big") & keys(fresh, split), split
    with open(os.path.join(fresh, "meta.json")) as f, open(os.path.join(prepared, "meta.json")) as g:
        meta, meta0 = json.load(f), json.load(g)
    assert meta["config"] == meta0["config"] and meta["val_big"]["n"] == 40
    # the default settings again: up to date, val_big kept; the same option again: nothing to do
    for kw in ({}, {"n_val_big": 40}):
        prepare(out=fresh, **small, **kw)
        assert "up to date" in capsys.readouterr().out and os.path.isfile(os.path.join(fresh, "val_big.jsonl"))
    # a full re-render without it removes the old one (it could overlap the new splits)
    prepare(out=fresh, **{**small, "n_val": 25})
    assert not os.path.exists(os.path.join(fresh, "val_big.jsonl"))

def test_dedupe_across_splits(tmp_path):
    # the same seed twice: without the shared `seen` set the second split would repeat the first one
    key = lambda samples: {(png_bytes(s["image"]), s["question"]) for s in samples}
    seen = set()
    a, _ = render_split("a", 12, 5, 0.2, seen, str(tmp_path))
    b, dupes = render_split("b", 12, 5, 0.2, seen, str(tmp_path))
    c, _ = render_split("c", 12, 5, 0.2, set(), str(tmp_path))
    assert key(a) == key(c)
    assert dupes >= 1 and not key(a) & key(b)

def test_tokenizer(prepared, tok, tmp_path):
    for t in SPECIAL_TOKENS:  # each special string is a single token
        assert len(tok.encode(t, add_special_tokens=False)) == 1, t
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    ids = tok.encode("<|im_start|>assistant\n<think>\nx\n</think><|im_end|>", add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n<think>\nx\n</think>"  # <think> is not "special"
    for w in ["Wait", " Wait", "Hmm", "Alternatively"]:
        assert len(tok.encode(w, add_special_tokens=False)) == 1, w
    # the traces' numbers, signed ones included, and the key's entries are one token each (data/synth.py)
    for w in [" 0", " 12", " -1", " -16"] + [f" {c}={v}" for c in ALL_CODES for v in range(-1, 4)]:
        assert len(tok.encode(w, add_special_tokens=False)) == 1, w
    assert tok.tokenize(" rc=1 rs=-1") == [" rc=1", " rs=-1"]
    s = load_jsonl(os.path.join(prepared, "sft.jsonl"), require=("solution",))[0]
    text = build_prompt_text(s["question"], [2], 16, system="Be brief.", options=s.get("options")) + s["solution"] + "<|im_end|>"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.decode(tok.encode("Ünïcode 日本 ok 123", add_special_tokens=False)) == "Ünïcode 日本 ok 123"  # byte fallback
    # training is deterministic
    texts = [json.dumps(r) for r in load_jsonl(os.path.join(prepared, "val.jsonl"))]
    v1 = train_tokenizer(texts, 400, str(tmp_path / "t1")).get_vocab()
    v2 = train_tokenizer(texts, 400, str(tmp_path / "t2")).get_vocab()
    assert v1 == v2

# -----------------------------------------------------------------------------
# image tiling (expected grids derived by hand from InternVL's rules)

@pytest.mark.parametrize("w,h,max_tiles,n", [
    (448, 448, 12, 1),    # square, small: (1,1), no thumbnail
    (896, 448, 12, 3),    # 2:1 -> (2,1) + thumbnail
    (448, 1344, 12, 4),   # 1:3 -> (1,3) + thumbnail
    (800, 600, 12, 13),   # 4:3 -> (4,3) = 12 tiles + thumbnail
    (1000, 1000, 12, 10), # tie (1,1)/(2,2)/(3,3): area 1e6 > 0.5*448^2*9 -> (3,3) + thumbnail
    (500, 500, 12, 1),    # tie again, but 250000 < 0.5*448^2*4 -> stays (1,1)
    (1000, 500, 1, 1),    # max_tiles=1: always one tile
])
def test_tiling_grid(w, h, max_tiles, n):
    assert len(dynamic_preprocess(Image.new("RGB", (w, h)), 1, max_tiles, 448, use_thumbnail=True)) == n

def test_load_image_tiles_and_normalisation():
    img = Image.new("RGB", (128, 64), (255, 255, 255))
    img.paste((0, 0, 0), (64, 0, 128, 64))  # left half white, right half black
    x = load_image(img, 64, 4, use_thumbnail=True)
    assert x.shape == (3, 3, 64, 64) and x.dtype == torch.float32  # (2,1) grid + thumbnail
    white = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    black = -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(x[0, :, 32, 32], white, atol=1e-5) and torch.allclose(x[1, :, 32, 32], black, atol=1e-5)
    assert torch.allclose(x[2, :, 32, 10], white, atol=1e-5) and torch.allclose(x[2, :, 32, 54], black, atol=1e-5)

# -----------------------------------------------------------------------------
# prompts and SFT encoding

def test_prompt_layout(tok):
    img_id = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    ids = build_prompt_ids(tok, "How many?", [1, 3], 16)
    assert ids.count(img_id) == 16 * 4
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>user\nImage-1: <img>") and "</img>\nImage-2: <img>" in text
    assert text.endswith("</img>\nHow many?<|im_end|>\n<|im_start|>assistant\n<think>\n")
    one = tok.decode(build_prompt_ids(tok, "Q?", [1], 16, think=False, system="S", options=["red", "blue"]))
    assert one == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 16 +
                   "</img>\nQ?\nA. red\nB. blue\nAnswer with the option's letter from the given choices.<|im_end|>\n<|im_start|>assistant\n")
    ph = tok.decode(build_prompt_ids(tok, "First <image> then <image>?", [1, 1], 2))
    assert "First <img><IMG_CONTEXT><IMG_CONTEXT></img> then <img>" in ph and "Image-1" not in ph
    with pytest.raises(ValueError, match="IMG_CONTEXT"):  # a literal image token in the text breaks the count
        build_prompt_ids(tok, "sneaky <IMG_CONTEXT>", [1], 16)

def test_loss_mask_covers_exactly_the_response(tok):
    sample = dict(id="x", question="How many red shapes are there?", answer="2",
                  solution="<think>\nRed shapes: row 1 col 2, row 3 col 4. That is 2.\n</think>\n\n\\boxed{2}")
    pix = [torch.zeros(1, 3, 64, 64)]
    e = encode_sft(tok, sample, pix, 16, 512)
    ids, mask = torch.tensor(e["input_ids"]), torch.tensor(e["loss_mask"])
    assert len(ids) == len(mask) and e["pixel_values"].shape == (1, 3, 64, 64) and e["n_tiles"] == [1]
    assert mask.sum() > 0 and (mask[:-1] <= mask[1:]).all()  # one contiguous block at the end
    assert tok.decode(ids[mask == 1]) == sample["solution"][len("<think>\n"):] + "<|im_end|>"  # no duplicated <think>
    assert tok.decode(ids[mask == 0]).endswith("<|im_start|>assistant\n<think>\n")
    e2 = encode_sft(tok, sample, pix, 16, 512, think=False)  # no forced prefix: the model writes <think> itself
    m2 = torch.tensor(e2["loss_mask"])
    assert tok.decode(torch.tensor(e2["input_ids"])[m2 == 1]) == sample["solution"] + "<|im_end|>"
    with pytest.raises(ValueError, match="sample x is too long"):
        encode_sft(tok, sample, pix, 16, 30)

def test_load_sft_data_and_collate(prepared, tok):
    items = load_sft_data(os.path.join(prepared, "sft.jsonl"), tok, CFG, max_len=512)
    assert len(items) == 90
    img_id = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert all(it["input_ids"].count(img_id) == 16 and it["pixel_values"].shape == (1, 3, 64, 64) for it in items)
    b = collate(items[:3], tok.pad_token_id)
    L = [len(it["input_ids"]) for it in items[:3]]
    assert b["input_ids"].shape == (3, max(L)) and b["input_ids"].dtype == torch.long
    assert b["pixel_values"].shape == (3, 3, 64, 64) and b["n_tiles"] == [1, 1, 1]
    for i, n in enumerate(L):
        assert b["input_ids"][i, :n].tolist() == items[i]["input_ids"] and (b["input_ids"][i, n:] == tok.pad_token_id).all()
        assert b["loss_mask"][i, :n].tolist() == items[i]["loss_mask"] and b["loss_mask"][i, n:].sum() == 0

# -----------------------------------------------------------------------------
# bad input

def write_jsonl(path, lines):
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return str(path)

@pytest.fixture
def bad_dir(tmp_path):
    Image.new("RGB", (64, 64), (255, 0, 0)).save(tmp_path / "ok.png")
    (tmp_path / "garbage.png").write_bytes(b"this is not a png")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "ok.png").read_bytes()[:60])
    return tmp_path

GOOD = dict(id="g", image="ok.png", question="Q?", answer="1", solution="<think>\nx\n</think>\n\n\\boxed{1}")
BAD = {  # line content -> expected message
    "missing image": (dict(GOOD, image="nope.png"), "image not found: nope.png"),
    "garbage image": (dict(GOOD, image="garbage.png"), "cannot read image garbage.png"),
    "truncated image": (dict(GOOD, image="truncated.png"), "cannot read image truncated.png"),
    "malformed JSON": ('{"id": "x", "question": ', "malformed JSON"),
    "missing field": ({k: v for k, v in GOOD.items() if k != "answer"}, "missing field.*answer"),
    "wrong type": (dict(GOOD, answer=3), "'answer' must be a string"),
    "bad option letter": (dict(GOOD, options=["a", "b"], answer="C"), "not an option letter"),
    "placeholders": (dict(GOOD, question="<image> and <image>"), "2 '<image>' placeholders but 1 images"),
}

@pytest.mark.parametrize("case", list(BAD))
def test_bad_line_names_file_and_line(bad_dir, case):
    line, msg = BAD[case]
    path = write_jsonl(bad_dir / "d.jsonl", [GOOD, GOOD, line, GOOD])
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: ") + ".*" + msg):
        load_jsonl(path)

def test_skip_bad_reports_counts(bad_dir, capsys):
    path = write_jsonl(bad_dir / "d.jsonl", [GOOD, BAD["missing image"][0], BAD["garbage image"][0],
                                            BAD["malformed JSON"][0], "", GOOD, BAD["missing field"][0]])
    got = load_jsonl(path, skip_bad=True)
    assert len(got) == 2 and got[1]["src"] == f"{path}:6" and got[0]["images"] == [str(bad_dir / "ok.png")]
    out = capsys.readouterr().out
    assert "skipped 4 samples" in out and "missing image: 1" in out and "corrupt image: 1" in out and "malformed JSON: 1" in out

def test_empty_file_and_encode_errors_name_the_line(bad_dir, tok):
    with pytest.raises(ValueError, match="empty file"):
        load_jsonl(write_jsonl(bad_dir / "e.jsonl", []))
    long = dict(GOOD, id="long", solution="word " * 600)
    path = write_jsonl(bad_dir / "d.jsonl", [GOOD, long])
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: sample long is too long")):
        load_sft_data(path, tok, CFG, max_len=256)
    path = write_jsonl(bad_dir / "d.jsonl", [GOOD, dict(GOOD, id="tok", question="<IMG_CONTEXT> sneaky")])
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: sample tok: prompt has 17")):
        load_sft_data(path, tok, CFG, max_len=256)
    assert len(load_sft_data(path, tok, CFG, max_len=256, skip_bad=True)) == 1

# -----------------------------------------------------------------------------
# LLaVA converter

def test_convert_llava(tmp_path):
    (tmp_path / "imgs").mkdir()
    for n in ["a", "b"]:
        Image.new("RGB", (100, 50), (0, 0, 255)).save(tmp_path / "imgs" / f"{n}.png")
    records = [
        dict(id="r0", image="imgs/a.png", conversations=[dict(**{"from": "human", "value": "<image>\nHow many?"}),
                                                         dict(**{"from": "gpt", "value": "I count. \\boxed{\\frac{1}{2}}"})]),
        dict(image=["imgs/a.png", "imgs/b.png"], conversations=[{"from": "human", "value": "Compare <image> and <image>."},
                                                                {"from": "gpt", "value": "They differ."},
                                                                {"from": "human", "value": "more?"}, {"from": "gpt", "value": "no"}]),
        dict(id="r2", conversations=[{"from": "human", "value": "Text only?"}, {"from": "gpt", "value": "Yes."}]),
    ]
    src = tmp_path / "llava.json"
    src.write_text(json.dumps(records))
    out = tmp_path / "out" / "conv.jsonl"
    assert convert(str(src), str(out)) == 3
    got = load_jsonl(str(out), require=("question", "answer", "solution"))
    assert [g["answer"] for g in got] == ["\\frac{1}{2}", "They differ.", "Yes."]
    assert got[0]["images"] == [str(tmp_path / "imgs" / "a.png")] and len(got[1]["images"]) == 2 and got[2]["images"] == []
    assert got[1]["id"] == "1" and got[0]["question"] == "<image>\nHow many?"
    assert json.loads(out.read_text().splitlines()[0])["images"] == ["../imgs/a.png"]  # re-based on the output file
    # JSONL input, and a broken record named by file and index
    src2 = tmp_path / "llava.jsonl"
    src2.write_text(json.dumps(records[2]) + "\n" + json.dumps({"id": "bad", "conversations": [{"from": "gpt", "value": "x"}]}) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{src2}: record 1: no 'human' turn")):
        convert(str(src2), str(tmp_path / "o2.jsonl"))

# -----------------------------------------------------------------------------
# parquet / arrow converter (data/convert_parquet.py): the layouts of EasyR1, verl, MMK12, `datasets` save_to_disk

def image_type(many=False):
    """The Arrow type `datasets` stores an Image feature as (a {bytes, path} struct), or a list of them."""
    import pyarrow as pa
    cell = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    return pa.list_(cell) if many else cell


def hf_table(cols, images=(), image_lists=()):
    """A pyarrow table from {column: values}, the columns in `images` / `image_lists` typed as image cells."""
    import pyarrow as pa
    return pa.table({k: pa.array(v, type=image_type(False) if k in images else image_type(True) if k in image_lists
                                 else None) for k, v in cols.items()})


def rgb_png(color, size=(24, 16)):
    return png_bytes(Image.new("RGB", size, color))


def first_pixel(path):
    with Image.open(path) as im:
        return im.convert("RGB").getpixel((0, 0))


def test_convert_parquet_easyr1_and_mmk12_layouts(tmp_path):
    import pyarrow.parquet as pq
    from data.convert_parquet import convert as convert_pq
    # EasyR1's geometry3k: images = a list of cells, problem with "<image>" placeholders, answer a string; the hub
    # layout data/<split>-*.parquet: only the train split is picked up
    geo = tmp_path / "geometry3k" / "data"
    geo.mkdir(parents=True)
    (geo / "figs").mkdir()
    Image.new("RGB", (10, 10), (0, 255, 0)).save(geo / "figs" / "g.png")  # a path-only cell: relative to the file
    pq.write_table(hf_table({"images": [[{"bytes": rgb_png((255, 0, 0)), "path": "a.png"}],
                                        [{"bytes": rgb_png((0, 0, 255)), "path": None},
                                         {"bytes": None, "path": "figs/g.png"}]],
                             "problem": ["<image>Find x.", "Compare <image> with <image>."],
                             "answer": ["3", "\\frac{1}{2}"]}, image_lists=["images"]),
                   geo / "train-00000-of-00001.parquet")
    pq.write_table(hf_table({"images": [[]], "problem": ["test row"], "answer": ["0"]}, image_lists=["images"]),
                   geo / "test-00000-of-00001.parquet")
    out = tmp_path / "out" / "geo.jsonl"
    assert len(convert_pq(str(geo.parent), str(out))) == 2
    a, b = load_jsonl(str(out))
    assert (a["id"], a["question"], a["answer"]) == ("train-00000-of-00001-0", "<image>Find x.", "3")
    assert [first_pixel(p) for p in a["images"] + b["images"]] == [(255, 0, 0), (0, 0, 255), (0, 255, 0)]
    assert b["images"][1] == str(geo / "figs" / "g.png")  # referenced, not copied
    assert all(p.startswith(str(tmp_path / "out" / "geo_images")) for p in a["images"] + b["images"][:1])
    text = build_prompt_text(b["question"], [1, 1], 1)
    assert text.count("<img>") == 2 and "Compare <img>" in text  # the placeholders place the images
    # MMK12: one image cell per row, question / answer / subject; numeric answers and ids become strings
    mmk = tmp_path / "MMK12" / "data"
    mmk.mkdir(parents=True)
    pq.write_table(hf_table({"id": [7, 8, 9], "subject": ["math", "physics", None],
                             "image": [{"bytes": rgb_png((9, 9, 9)), "path": None}] * 3,
                             "question": ["Area?", "Speed in m/s?", "Ratio?"], "answer": [3.0, 0.25, 1e-05]},
                            images=["image"]), mmk / "train-00000-of-00001.parquet")
    got = convert_pq(str(mmk), str(tmp_path / "mmk12.jsonl"))
    assert [(s["id"], s["answer"], s.get("domain")) for s in got] == [("7", "3", "math"), ("8", "0.25", "physics"),
                                                                       ("9", "0.00001", None)]
    assert all(len(s["images"]) == 1 for s in load_jsonl(str(tmp_path / "mmk12.jsonl")))


def test_convert_parquet_arrow_verl_and_options(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from data.convert_parquet import convert as convert_pq
    table = hf_table({"images": [[{"bytes": rgb_png((255, 0, 0)), "path": None}]] * 2,
                      "problem": ["<image>How many?", "<image>Which?"], "answer": ["4", "12"]}, image_lists=["images"])
    # `datasets` save_to_disk of one Dataset: the IPC stream format, state.json beside it; the folder is the split
    disk = tmp_path / "thinklite"
    disk.mkdir()
    (disk / "state.json").write_text("{}")
    (disk / "dataset_info.json").write_text("{}")
    with pa.OSFile(str(disk / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    assert [s["answer"] for s in convert_pq(str(disk), str(tmp_path / "s.jsonl"))] == ["4", "12"]
    # the IPC file format (magic ARROW1), and a datasets cache file name "<name>-<split>.arrow"
    cache = tmp_path / "cache"
    cache.mkdir()
    for split in ("train", "test"):
        with pa.OSFile(str(cache / f"geometry3k-{split}.arrow"), "wb") as sink, \
                pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
    assert len(convert_pq(str(cache), str(tmp_path / "f.jsonl"))) == 2  # the train file only
    got = load_jsonl(str(tmp_path / "f.jsonl"))
    assert [s["question"] for s in got] == ["<image>How many?", "<image>Which?"]
    assert first_pixel(got[0]["images"][0]) == (255, 0, 0)
    # verl's preprocessed geo3k: prompt (a chat), images, reward_model.ground_truth, extra_info.question: found by
    # themselves; --question_key=prompt takes the chat's user turn instead (with verl's instruction in it)
    verl = tmp_path / "geo3k_verl"
    verl.mkdir()
    pq.write_table(pa.table({
        "data_source": ["hiyouga/geometry3k"],
        "prompt": [[{"role": "user", "content": "<image>Find y. Put the answer in \\boxed{}."}]],
        "images": pa.array([[{"bytes": rgb_png((0, 0, 255)), "path": None}]], type=image_type(many=True)),
        "reward_model": [{"style": "rule", "ground_truth": "7"}],
        "extra_info": [{"split": "train", "index": 0, "answer": "7", "question": "<image>Find y."}]}),
        verl / "train.parquet")
    s, = convert_pq(str(verl), str(tmp_path / "v.jsonl"))
    assert (s["question"], s["answer"]) == ("<image>Find y.", "7")
    s, = convert_pq(str(verl / "train.parquet"), str(tmp_path / "v2.jsonl"), question_key="prompt")
    assert s["question"] == "<image>Find y. Put the answer in \\boxed{}."
    # options: an answer given as the option's text becomes its letter; a solution column is the SFT target
    mc = tmp_path / "mc.parquet"
    pq.write_table(pa.table({"q": ["Colour?", "Size?"], "choices": [["red", "blue"], ["1", "2", "3"]],
                             "a": ["blue", "A"], "trace": ["<think>\nlook\n</think>\n\n\\boxed{B}",
                                                        "<think>\nx\n</think>\n\n\\boxed{A}"]}), mc)
    got = convert_pq(str(mc), str(tmp_path / "mc.jsonl"), question_key="q", answer_key="a", options_key="choices",
                     solution_key="trace")
    assert [(s["answer"], s["options"]) for s in got] == [("B", ["red", "blue"]), ("A", ["1", "2", "3"])]
    assert load_jsonl(str(tmp_path / "mc.jsonl"), require=("solution",))[0]["solution"].startswith("<think>")


def test_convert_parquet_bad_rows_name_file_and_row(tmp_path, capsys):
    import subprocess
    import sys
    import pyarrow.parquet as pq
    from data.convert_parquet import convert as convert_pq
    d = tmp_path / "geo3k"
    d.mkdir()
    bad = d / "train-00000.parquet"
    cell = [{"bytes": rgb_png((1, 2, 3)), "path": None}]
    pq.write_table(hf_table({"images": [cell, cell, cell], "problem": ["<image>a", "<image>b", "<image><image>c"],
                             "answer": ["1", None, "3"]}, image_lists=["images"]), bad)
    with pytest.raises(ValueError, match=re.escape(f"{bad}: row 1: column 'answer' is null")):
        convert_pq(str(d), str(tmp_path / "o.jsonl"))
    samples = convert_pq(str(d), str(tmp_path / "o.jsonl"), skip_bad=True)
    assert [s["question"] for s in samples] == ["<image>a"]
    out = capsys.readouterr().out
    assert "skipped 2 bad rows" in out and "row 2: the question has 2 '<image>' placeholders but the row has 1" in out
    assert "columns: image=images, question=problem, answer=answer" in out
    with pytest.raises(ValueError, match=r"no column 'solution_text' for --solution_key; the file has: answer, ima"):
        convert_pq(str(d), str(tmp_path / "o.jsonl"), solution_key="solution_text")
    pq.write_table(hf_table({"img": [cell], "text": ["q"], "answer": ["1"]}, image_lists=["img"]),
                   d / "train-1.parquet")
    with pytest.raises(ValueError, match=r"train-1\.parquet: no question column \(tried problem, question"):
        convert_pq(str(d / "train-1.parquet"), str(tmp_path / "o.jsonl"))
    with pytest.raises(ValueError, match="no 'validation' parquet / arrow files under this folder"):
        convert_pq(str(d), str(tmp_path / "o.jsonl"), split="validation")
    # the command line: one clean line naming the file and row, non-zero exit
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "data/convert_parquet.py", str(bad), str(tmp_path / "o.jsonl")], cwd=root,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and f"{bad}: row 1: column 'answer' is null" in p.stderr and "Traceback" not in p.stderr
