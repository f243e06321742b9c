"""
Renders the embedded synthetic task (data/synth.py) and trains its tiny tokenizer.

    python data/prepare.py                      # defaults below, into data/synth/
    python data/prepare.py --out=/tmp/synth --n_sft=500 --n_rl=500 --n_val=50 --n_test=100
    python data/prepare.py --teacher_blind_frac=0     # cold-start traces all correct (see below)
    python data/prepare.py --n_val_big=1000           # + val_big.jsonl, a larger validation split (below)

Writes (data/synth/ is gitignored; re-running with the same settings does nothing):
    {out}/{sft,rl,val,test}.jsonl       format in data/common.py; rl has no "solution"
    {out}/images/{split}/{id}.png       64x64 RGB
    {out}/tokenizer/                    byte-level BPE, loads with AutoTokenizer.from_pretrained(dir)
    {out}/meta.json                     the settings used, plus a few statistics
    {out}/val_big.jsonl                 with --n_val_big=N > 0 only: N more validation items (entropy.py's checkpoint
                                        ranking needs more than val's 200 to see accuracy differences of a point)
Each split has its own seed, and samples are de-duplicated by (image bytes, question) across all
splits, test and val first, so the evaluation splits do not change when sft/rl sizes do. val_big has its own
seed too and is rendered after all of them (de-duplicated against every one) and kept out of the tokenizer's
texts, so sft/rl/val/test and the tokenizer are byte-identical with or without it; asking for it on an up-to-date
directory renders only val_big.
The default cold-start teacher is imperfect on purpose: 60% of the sft traces overlook yellow shapes and conclude
a wrong answer when one matters (README "The embedded default"); rl, val and test are the same either way.
Timing (defaults): about 5-7 s wall on 2 cores. The tokenizer ends up with ~660 entries (added tokens included),
not vocab_size: the task's text has few distinct words, and BPE runs out of merges.
"""
import argparse
import hashlib
import io
import json
import os
import random
import sys
import time

from tqdm import tqdm

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.common import IM_END, SPECIAL_TOKENS, THINK_END, THINK_START, build_prompt_text
from data.synth import ALL_CODES, COLORS, DIFFICULTIES, DOMAINS, KEY_VALUES, make_sample

VERSION = 9  # bump when synth.py or the tokenizer recipe changes, so old outputs are rebuilt
SEEDS = dict(test=1001, val=1002, sft=1003, rl=1004)  # splits are rendered in this order
VAL_BIG_SEED = 1005  # the optional val_big split, rendered after them (not in SEEDS: the default's config keeps)
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "synth")

def render_split(split, n, seed, p_wait, seen, out, blind="", blind_frac=0.0):
    """Renders n unique samples; seen: set of (image sha1, question) shared by all splits. blind, blind_frac: that
    share of the traces comes from a teacher that overlooks the colour `blind` (data/synth.py make_sample)."""
    rng = random.Random(seed)
    brng = random.Random(seed + 1)  # its own stream: the scenes and questions are the same with or without it
    os.makedirs(os.path.join(out, "images", split), exist_ok=True)
    records, samples, dupes = [], [], 0
    bar = tqdm(total=n, desc=f"render {split}", unit="sample", leave=False)
    while len(records) < n:
        i = len(records)
        # domains round-robin, difficulty at random: every domain is equally represented
        b = blind if brng.random() < blind_frac else None
        s = make_sample(rng, DOMAINS[i % len(DOMAINS)], rng.choice(DIFFICULTIES), p_wait=p_wait, blind=b)
        buf = io.BytesIO()
        s["image"].save(buf, format="PNG")
        key = (hashlib.sha1(buf.getvalue()).hexdigest(), s["question"])
        if key in seen:
            dupes += 1
            assert dupes < 10 * n + 100, f"{split}: too many duplicates, the task space is exhausted"
            continue
        seen.add(key)
        sid = f"{split}-{i:06d}"
        rel = f"images/{split}/{sid}.png"
        with open(os.path.join(out, rel), "wb") as f:
            f.write(buf.getvalue())
        rec = dict(id=sid, image=rel, question=s["question"], answer=s["answer"])
        if s["options"]:
            rec["options"] = s["options"]
        if split != "rl":  # RL learns from the answer only; val/test keep the trace for val loss
            rec["solution"] = s["solution"]
        rec.update(domain=s["domain"], difficulty=s["difficulty"])
        records.append(rec)
        samples.append(s)
        bar.update(1)
    bar.close()
    with open(os.path.join(out, f"{split}.jsonl"), "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    return samples, dupes

def train_tokenizer(texts, vocab_size, out_dir):
    """Byte-level BPE (as GPT-2/Qwen). Unlike Qwen2 (one token per digit), small numbers stay whole tokens (" 12"):
    the traces' running tallies need one token per grid cell (data/synth.py)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    plain = [THINK_START, THINK_END]  # ordinary added tokens, as in R1-style Qwen tokenizers (see below)
    specials = [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS if t not in plain]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(plain), special_tokens=specials, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # the trainer does not split out special tokens itself: remove them, or it learns merges like "IMG"
    for t in SPECIAL_TOKENS:
        texts = [x.replace(t, "\n") for x in texts]
    tok.train_from_iterator(texts, trainer)
    # <think> </think>: one token each, but kept by decode(skip_special_tokens=True), so a reward can check the format
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
    # signed tallies (data/synth.py) need " -3" as one token, like " 3"; byte-level BPE splits off the "-"
    tok.add_tokens([AddedToken(f" -{i}", normalized=False) for i in range(1, 17)])
    # the tallies' key entries ("rc=1": red circles count 1) are one token each, so looking a cell's code up in the
    # key is a single attention hop for the tiny model (data/synth.py)
    tok.add_tokens([AddedToken(f" {c}={v}", normalized=False) for c in ALL_CODES for v in KEY_VALUES])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token="<|endoftext|>")
    # ChatML template, so tok.apply_chat_template works too (images are inserted by data/common.py)
    hf.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    hf.save_pretrained(out_dir)
    return hf

def prepare(out=DEFAULT_OUT, n_sft=8000, n_rl=4000, n_val=200, n_test=500, p_wait=0.2, vocab_size=1024,
            teacher_blind="yellow", teacher_blind_frac=0.6, n_val_big=0):
    """Renders all splits and the tokenizer into out; skips if out/meta.json matches. Returns meta.
    teacher_blind_frac > 0: that share of the sft traces overlook the colour teacher_blind (a systematically wrong
    cold-start teacher, as distilled cold-start data can be: SFT learns its blind spot, RL with the verifiable
    answers of the rl split can unlearn it; README "The embedded default"); the rl, val and test splits are
    unchanged. teacher_blind_frac=0 gives correct traces only.
    n_val_big > 0: also val_big.jsonl (render_val_big), recorded in meta['val_big'], not in meta['config'], so the
    default's up-to-date check and files do not depend on it."""
    config = dict(version=VERSION, n_sft=n_sft, n_rl=n_rl, n_val=n_val, n_test=n_test, p_wait=p_wait,
                  vocab_size=vocab_size, seeds=SEEDS)
    if teacher_blind_frac > 0:
        if teacher_blind not in COLORS:
            raise ValueError(f"teacher_blind must be one of {list(COLORS)}, got {teacher_blind!r}")
        config.update(teacher_blind=teacher_blind, teacher_blind_frac=teacher_blind_frac)
    meta_path = os.path.join(out, "meta.json")
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("config") == config:
            if n_val_big and (meta.get("val_big", {}).get("n") != n_val_big
                              or not os.path.isfile(os.path.join(out, "val_big.jsonl"))):
                return render_val_big(out, meta, n_val_big, p_wait)  # the default splits stay as they are
            print(f"{out}: up to date, nothing to do")
            return meta
    t0 = time.time()
    os.makedirs(out, exist_ok=True)
    if os.path.exists(meta_path):
        os.remove(meta_path)  # a half-written directory must not pass as complete
    if os.path.exists(os.path.join(out, "val_big.jsonl")):
        os.remove(os.path.join(out, "val_big.jsonl"))  # an earlier render's: it may overlap the new splits
    sizes = dict(test=n_test, val=n_val, sft=n_sft, rl=n_rl)
    seen, stats, texts = set(), {}, []
    for split in SEEDS:
        frac = teacher_blind_frac if split == "sft" else 0.0  # only the cold-start traces come from the teacher
        samples, dupes = render_split(split, sizes[split], SEEDS[split], p_wait, seen, out, teacher_blind, frac)
        stats[split] = dict(n=len(samples), duplicates_skipped=dupes,
                            with_wait=sum("Wait," in s["solution"] for s in samples))
        for s in samples:  # the tokenizer learns from prompts (no image tokens) and responses
            q = s["question"].replace("<image>", "")  # image tokens are special: the tokenizer never sees them
            texts.append(build_prompt_text(q, [], 0, options=s["options"]) + s["solution"] + IM_END)
    texts.append(build_prompt_text("Image-1: <image>\nImage-2: <image>\nx", [1, 1], 1, system="You are a helpful assistant."))
    tok = train_tokenizer(texts, vocab_size, os.path.join(out, "tokenizer"))
    meta = dict(config=config, stats=stats, vocab_size=len(tok), seconds=round(time.time() - t0, 1))
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=1)
    print(f"{out}: {stats}, tokenizer vocab {len(tok)}, {meta['seconds']} s")
    return render_val_big(out, meta, n_val_big, p_wait) if n_val_big else meta


def render_val_big(out, meta, n, p_wait):
    """val_big.jsonl: n validation items (with traces, as val) from VAL_BIG_SEED, de-duplicated against every split
    already in out (their keys read back from the files: the PNG bytes on disk are the ones hashed when rendering),
    so it is the same whether rendered with the others or later. Updates meta.json's 'val_big'."""
    t0, seen = time.time(), set()
    for split in SEEDS:
        with open(os.path.join(out, f"{split}.jsonl")) as f:
            for line in f:
                rec = json.loads(line)
                with open(os.path.join(out, rec["image"]), "rb") as g:
                    seen.add((hashlib.sha1(g.read()).hexdigest(), rec["question"]))
    samples, dupes = render_split("val_big", n, VAL_BIG_SEED, p_wait, seen, out)
    meta["val_big"] = dict(n=n, seed=VAL_BIG_SEED, duplicates_skipped=dupes,
                           with_wait=sum("Wait," in s["solution"] for s in samples), seconds=round(time.time() - t0, 1))
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"{out}: val_big {meta['val_big']}")
    return meta


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    for k, v in dict(n_sft=8000, n_rl=4000, n_val=200, n_test=500, p_wait=0.2, vocab_size=1024,
                     teacher_blind="yellow", teacher_blind_frac=0.6, n_val_big=0).items():
        ap.add_argument(f"--{k}", type=type(v), default=v)
    prepare(**vars(ap.parse_args()))
