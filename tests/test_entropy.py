"""entropy.py: critical words found across tokenizer variants (one token or several, leading space/newline,
capitalisation, a phrase, a multi-byte character before it, a non-canonical split), the entropy statistics on
hand-computed responses, Pearson/Spearman against hand values (and scipy), the selection rule, the checkpoint
list (globs, order, bad entries), and the script end to end on two tiny random checkpoints.

Decided: whole words only, so "Waiting" and "Hmmm" are NOT critical; "But wait" counts once, as "But wait"."""
import json
import math
import os
import runpy
import shutil
import subprocess
import sys

import pytest
import torch

import entropy
from entropy import (accuracy_se, correlations, critical_positions, pearson, pearson_ci, ranks, resolve_ckpts,
                     response_stats,
                     select_checkpoint, spearman)
from sampler import Sampling
from test_install import check_env_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # single-process DCP

# -----------------------------------------------------------------------------
# tokenizers built here, so the test does not depend on the synthetic data's vocabulary


def bytelevel_tokenizer(words=(), merges=()):
    """Byte-level BPE (GPT-2/Qwen style, as data/prepare.py builds) whose merges spell exactly `words` (byte-level
    strings, "Ġ" = leading space) plus `merges`; everything else is one token per byte."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    merges = list(merges)
    for w in words:  # left to right: "ĠWait" <- (Ġ, W), (ĠW, a), (ĠWa, i), (ĠWai, t)
        merges += [(w[:j], w[j]) for j in range(1, len(w))]
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = list(dict.fromkeys(merges))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in ("<|endoftext|>", "<|im_end|>")])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")


def metaspace_tokenizer(corpus):
    """SentencePiece-style BPE ("▁" marks a space; decode drops the first one), trained on corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=120, special_tokens=["<|im_end|>"],
                                                       show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")


# "Wait" (and "Hmm", "But") one token with or without a leading space
WHOLE = dict(words=["ĠWait", "Wait", "Ġwait", "wait", "ĠHmm", "Hmm", "ĠBut", "But", "ĠAlternatively"])
# "Wait" split into "W"/"ĠW" + "ait"; "Hmm" into "Hm" + "m"; "Alternatively" into single letters
SPLIT = dict(merges=[("Ġ", "W"), ("a", "i"), ("ai", "t"), ("Ġ", "w"), ("H", "m")])

TEXT = ("Let me see. Wait, 3 is wrong.\nwait no. But wait, hmm... Waiting is fine, Hmmm too. Alternatively 5.\n"
        "é Wait!<|im_end|>")
# not "Waiting", "Hmmm", nor the "wait" of "But wait"
WANT = ["Wait", "Wait", "But wait", "Hmm", "Alternatively", "Wait"]


@pytest.fixture(scope="module")
def toks():
    return {"whole": bytelevel_tokenizer(**WHOLE), "split": bytelevel_tokenizer(**SPLIT),
            "metaspace": metaspace_tokenizer([TEXT.replace("<|im_end|>", ""), "Wait. ok"] * 5)}


def check_occurrences(tok, ids, found, words, piece=True):
    """Each occurrence's token is the one that spells its first character (checked from the definition, without
    the binary search), and (piece=True) that token's own text starts the word, so it is not a neighbour."""
    text = tok.decode(ids, skip_special_tokens=False)
    starts = [m.start() for m in entropy.critical_regex(words)[0].finditer(text)]
    assert len(starts) == len(found)
    for (i, w), c in zip(found, starts):
        before = os.path.commonprefix([tok.decode(ids[:i], skip_special_tokens=False), text])
        upto = os.path.commonprefix([tok.decode(ids[:i + 1], skip_special_tokens=False), text])
        assert len(before) <= c < len(upto), (w, i)
        if not piece:
            continue
        piece, word = tok.decode(ids[i:i + 1]).strip().lower(), w.lower()
        assert piece and (word.startswith(piece) or piece.startswith(word)), (w, piece)  # "W", "Wait", "Wait,"


def test_tokenizer_preconditions(toks):
    # the two byte-level tokenizers really differ where the test needs them to
    whole, split = toks["whole"], toks["split"]
    enc = lambda t, s: t.convert_ids_to_tokens(t.encode(s, add_special_tokens=False))
    assert enc(whole, " Wait") == ["ĠWait"] and enc(whole, "\nwait") == ["Ċ", "wait"]
    assert enc(split, " Wait") == ["ĠW", "ait"] and enc(split, "Wait") == ["W", "ait"]
    assert enc(split, "But wait") == ["B", "u", "t", "Ġw", "ait"] and len(enc(split, "é")) == 2  # é: 2 byte tokens


@pytest.mark.parametrize("name", ["whole", "split", "metaspace"])
def test_critical_positions_across_tokenizers(toks, name):
    tok = toks[name]
    ids = tok.encode(TEXT, add_special_tokens=False)
    found = critical_positions(tok, ids, entropy.CRITICAL_WORDS)
    assert [w for _, w in found] == WANT
    # metaspace splits only at spaces, so a token may span "wrong.\nwait": no piece check there
    check_occurrences(tok, ids, found, entropy.CRITICAL_WORDS, piece=name != "metaspace")
    assert [i for i, _ in found] == sorted(i for i, _ in found)
    # at the very start of the response, and nothing in a response without critical words
    ids = tok.encode("Wait. ok", add_special_tokens=False)
    assert critical_positions(tok, ids, ["Wait"]) == [(0, "Wait")]
    assert critical_positions(tok, tok.encode("Waiting, awaited.", add_special_tokens=False)) == []
    assert critical_positions(tok, []) == []


def test_critical_positions_exact_tokens(toks):
    whole, split = toks["whole"], toks["split"]
    ids = whole.encode(TEXT, add_special_tokens=False)
    got = [whole.convert_ids_to_tokens(ids[i]) for i, _ in critical_positions(whole, ids)]
    assert got == ["ĠWait", "wait", "ĠBut", "h", "ĠAlternatively", "ĠWait"]
    ids = split.encode(TEXT, add_special_tokens=False)
    got = [split.convert_ids_to_tokens(ids[i]) for i, _ in critical_positions(split, ids)]
    assert got == ["ĠW", "w", "B", "h", "A", "ĠW"]  # the FIRST token of a split word (" Alternatively": Ġ A l ..)
    # a sampled sequence need not be the canonical encoding: "Wait" spelled byte by byte with a vocabulary that has
    # it as one token; the occurrence is at "W", not at the space before it
    pre = whole.encode("So", add_special_tokens=False)
    ids = pre + whole.convert_tokens_to_ids(["Ġ", "W", "a", "i", "t", ","])
    assert critical_positions(whole, ids) == [(len(pre) + 1, "Wait")]
    # phrase across a newline, custom list, capitals, duplicates up to case kept once
    ids = split.encode("BUT\nwait. hmm Hmm", add_special_tokens=False)
    found = critical_positions(split, ids, ["hmm", "But wait", "Hmm", "Wait"])
    assert [w for _, w in found] == ["But wait", "hmm", "hmm"]
    check_occurrences(split, ids, found, ["hmm", "But wait", "Wait"])
    ids = split.encode("Wait a minute. Wait.", add_special_tokens=False)  # the longer entry wins where both start
    assert [w for _, w in critical_positions(split, ids, ["Wait", "wait a  minute"])] == ["wait a  minute", "Wait"]
    with pytest.raises(ValueError, match="empty entry"):
        critical_positions(split, ids, ["Wait", " "])


def test_response_stats_hand_computed(toks):
    tok = toks["split"]
    r1 = tok.encode("Wait, x Hmm", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(r1) == ["W", "ait", ",", "Ġ", "x", "Ġ", "Hm", "m"]  # occurrences at 0 and 6
    r3 = tok.encode("Wait", add_special_tokens=False)
    rows = [{"tokens": r1, "entropies": [1.0, 0.5, 0.5, 0.5, 0.5, 0.5, 3.0, 0.5]},
            {"tokens": tok.encode("no", add_special_tokens=False), "entropies": [4.0, 0.0]},
            {"tokens": r3, "entropies": [5.0, 7.0]}]
    s = response_stats(rows, tok, ["Wait", "Hmm"], threshold=2.5)
    assert s["critical_count"] == 3 and s["responses_with_critical"] == 2 and s["n_responses"] == 3
    assert s["critical_entropy"] == pytest.approx((1 + 3 + 5) / 3)  # over occurrences
    assert s["critical_entropy_per_response"] == pytest.approx((2 + 5) / 2)  # mean of (1+3)/2 and 5
    assert s["critical_by_word"] == {"Wait": {"count": 2, "entropy": pytest.approx(3.0)},
                                     "Hmm": {"count": 1, "entropy": pytest.approx(3.0)}}
    assert s["mean_entropy"] == pytest.approx((7.0 + 4.0 + 12.0) / 12) and s["n_tokens"] == 12
    assert s["high_entropy_share"] == pytest.approx(4 / 12)  # 3.0, 4.0, 5.0, 7.0
    s = response_stats(rows[1:2], tok, ["Wait"], 2.5)
    assert s["critical_entropy"] is None and s["critical_count"] == 0


def test_correlations_hand_computed():
    # x = 1,2,3 / y = 1,3,2: deviations (-1,0,1) and (-1,1,0): r = 1 / sqrt(2 * 2)
    assert pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert pearson([1, 2, 3], [6, 4, 2]) == pytest.approx(-1.0)
    # ties share the average rank: x ranks 1, 2.5, 2.5, 4; r = 4.5 / sqrt(4.5 * 5)
    assert ranks([1, 2, 2, 3]) == [1, 2.5, 2.5, 4] and ranks([3, 1, 3, 3]) == [3, 1, 3, 3]
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    # monotone but not linear: Spearman 1, Pearson below 1
    assert spearman([1, 2, 3, 4], [1, 4, 9, 100]) == pytest.approx(1.0)
    assert pearson([1, 2, 3, 4], [1, 4, 9, 100]) < 0.9
    # undefined: fewer than 3 points, or a constant column
    assert pearson([1, 2], [3, 4]) is None and spearman([1, 2], [3, 4]) is None
    assert pearson([0.1, 0.1, 0.1], [1, 2, 3]) is None and spearman([1, 2, 3], [5, 5, 5]) is None
    with pytest.raises(ValueError, match="3 x values but 2 y values"):
        pearson([1, 2, 3], [1, 2])
    rows = [{"critical_entropy": e, "accuracy": a} for e, a in [(1, 1), (None, 9), (2, 3), (3, 2)]]
    assert correlations(rows) == {"n": 3, "pearson": pytest.approx(0.5), "pearson_ci": None, "ci": "95% Fisher z",
                                  "spearman": pytest.approx(0.5)}


def test_pearson_ci_fisher_z_hand_computed():
    # r = 0.5 from 12 points: z = atanh(0.5) = 0.549306, sd 1 / sqrt(12 - 3) = 1/3, 95%: z -+ 1.959964 / 3
    # = [-0.104015, 1.202628] -> tanh: [-0.103642, 0.834454]
    lo, hi = pearson_ci(0.5, 12)
    assert (lo, hi) == (pytest.approx(-0.103642, abs=1e-6), pytest.approx(0.834454, abs=1e-6))
    # 90%: z -+ 1.644854 / 3 = [0.001022, 1.097591] -> [0.001022, 0.799632]
    assert pearson_ci(0.5, 12, level=0.90) == [pytest.approx(0.001022, abs=1e-6), pytest.approx(0.799632, abs=1e-6)]
    # pooled over 3 groups after centring each: 2 more degrees of freedom spent, as 2 fewer points
    assert pearson_ci(0.5, 14, n_controlled=2) == pytest.approx(pearson_ci(0.5, 12))
    assert pearson_ci(-0.5, 12) == pytest.approx([-0.834454, 0.103642], abs=1e-6)  # symmetric in the sign
    assert pearson_ci(1.0, 5) == [1.0, 1.0] and pearson_ci(None, 12) is None
    assert pearson_ci(0.5, 3) is None and pearson_ci(0.5, 5, n_controlled=1) == pytest.approx(pearson_ci(0.5, 4))
    rows = [{"critical_entropy": float(i), "val": float(v)} for i, v in enumerate([1, 3, 2, 5, 4, 6])]
    c = correlations(rows, y_key="val")
    assert c["n"] == 6 and c["pearson_ci"] == pytest.approx(pearson_ci(c["pearson"], 6))
    assert c["pearson_ci"][0] < c["pearson"] < c["pearson_ci"][1]


def test_accuracy_se_hand_computed():
    # 4 items x 2 runs, item means 1, 0.5, 0, 0.5: mean 0.5, sample variance (0.25 + 0 + 0.25 + 0) / 3 = 1/6,
    # SE = sqrt(1/6 / 4)
    rows = [{"id": i, "run": j, "correct": c} for i, cs in enumerate([(1, 1), (1, 0), (0, 0), (0, 1)])
            for j, c in enumerate(cs)]
    assert accuracy_se(rows) == pytest.approx(math.sqrt(1 / 24))
    # one run: the binomial SE with n - 1, sqrt(p (1 - p) / (n - 1)) = sqrt(0.25 / 3)
    assert accuracy_se([r for r in rows if r["run"] == 0]) == pytest.approx(math.sqrt(0.25 / 3))
    assert accuracy_se(rows[:2]) is None  # one item


def test_correlations_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (12,), generator=g).tolist()  # with ties
    y = (torch.randn(12, generator=g) + torch.tensor(x, dtype=torch.float)).tolist()
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    ci = stats.pearsonr(x, y).confidence_interval(0.95)  # scipy's default is the Fisher z interval too
    assert pearson_ci(pearson(x, y), 12) == pytest.approx([ci.low, ci.high], abs=1e-9)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)


def test_selection_rule():
    def row(ckpt, step, ce, n, acc):
        return {"ckpt": ckpt, "step": step, "critical_entropy": ce, "critical_count": n, "accuracy": acc}
    rows = [row("a", 10, 1.5, 50, 0.30), row("b", 20, 2.5, 40, 0.20), row("c", 30, 3.0, 2, 0.90),
            row("d", 40, None, 0, 0.50), row("e", 50, 2.5, 60, 0.25)]
    s = select_checkpoint(rows, "critical_entropy", min_critical=5)
    # "c" has the highest entropy but only 2 occurrences; "b" and "e" tie, "e" is more accurate
    assert (s["index"], s["ckpt"], s["step"], s["applied"]) == (4, "e", 50, "critical_entropy")
    assert "critical-token entropy" in s["reason"] and "R1V3 section 5" in s["reason"]
    assert select_checkpoint(rows, "critical_entropy", min_critical=1)["ckpt"] == "c"
    assert select_checkpoint(rows, "accuracy")["ckpt"] == "c"
    assert select_checkpoint(rows, "last")["ckpt"] == "e"
    # nothing rankable: falls back to the last checkpoint, and says so
    s = select_checkpoint(rows, "critical_entropy", min_critical=100)
    assert (s["ckpt"], s["rule"], s["applied"]) == ("e", "critical_entropy", "last") and "fell back" in s["reason"]
    with pytest.raises(ValueError, match="select='best'"):
        select_checkpoint(rows, "best")


def make_ckpt_dir(path, files=("state.json",)):
    os.makedirs(path)
    for f in files:
        open(os.path.join(path, f), "w").close()


def test_resolve_ckpts(tmp_path):
    run = tmp_path / "grpo"
    for s in (40, 100, 5):
        make_ckpt_dir(run / f"ckpt_{s:07d}")
    make_ckpt_dir(tmp_path / "hf", ["config.json"])
    (run / "log.jsonl").write_text("")
    got = resolve_ckpts(f"{run}/ckpt_*")
    assert [entropy.parse_step(p) for p in got] == [5, 40, 100]  # by step, not as listed
    assert entropy.parse_step(str(tmp_path / "hf")) is None and entropy.parse_step(got[0] + "/") == 5
    # lists keep their order; a path twice is used once
    both = resolve_ckpts(f"{tmp_path}/hf,{run}/ckpt_000004*, {tmp_path}/hf")
    assert both == [f"{tmp_path}/hf", f"{run}/ckpt_0000040"]
    assert resolve_ckpts(f"['{tmp_path}/hf', '{run}/ckpt_0000005']") == [f"{tmp_path}/hf", f"{run}/ckpt_0000005"]
    # errors name the entry
    with pytest.raises(ValueError, match=r"pattern '.*/nope/ckpt_\*' matches no directory"):
        resolve_ckpts(f"{run}/ckpt_*,{tmp_path}/nope/ckpt_*")
    with pytest.raises(ValueError, match="matches no directory"):
        resolve_ckpts(f"{run}/*.json*")  # only a file matches
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        resolve_ckpts([f"{tmp_path}/missing_dir"])
    make_ckpt_dir(run / "ckpt_0000200", [])  # an empty (e.g. half-copied) checkpoint
    with pytest.raises(FileNotFoundError, match="ckpt_0000200.* holds no model"):
        resolve_ckpts(f"{run}/ckpt_*")
    with pytest.raises(ValueError, match="empty"):
        resolve_ckpts("")
    with pytest.raises(ValueError, match="not a Python list"):
        resolve_ckpts("['a', ")

# -----------------------------------------------------------------------------
# end to end on two tiny random checkpoints


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from transformers import AutoTokenizer
    from plumbing import save_checkpoint
    from data.prepare import prepare
    from model import VLM, VLMConfig
    from plumbing.hf import save_pretrained
    d = tmp_path_factory.mktemp("entropy")
    synth = str(d / "synth")
    prepare(synth, n_sft=4, n_rl=4, n_val=4, n_test=4)
    tok = AutoTokenizer.from_pretrained(f"{synth}/tokenizer")
    cfg = VLMConfig(vit_hidden=32, vit_layers=1, vit_heads=2, vit_mlp=64, n_embd=32, n_layer=1, n_head=2,
                    n_kv_head=1, mlp_hidden=64, vocab_size=len(tok),
                    image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"))
    for seed, step in ((1, 2), (2, 4)):
        torch.manual_seed(seed)
        m = VLM(cfg)
        save_checkpoint(str(d / "grpo"), step, m, None, {"tokenizer": f"{synth}/tokenizer"}, {})
    save_pretrained(m, str(d / "hf"))
    tok.save_pretrained(str(d / "hf"))
    # words a random policy emits: whole-word vocabulary entries with a leading space ("Ġrow" -> "row")
    words = sorted({t[1:] for t in tok.get_vocab() if t.startswith("Ġ") and t[1:].isalpha() and len(t) > 3})
    return synth, str(d / "grpo"), str(d / "hf"), words, len(tok)


def cli(args):
    return subprocess.run([sys.executable, "entropy.py"] + args, cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_end_to_end_two_checkpoints(tiny_run, tmp_path):
    synth, run, hf, words, V = tiny_run
    out = str(tmp_path / "out")
    p = cli([f"--init_from={run}/ckpt_*", f"--data={synth}/val.jsonl", f"--out_dir={out}", "--group_size=2",
             "--max_new_tokens=32", "--min_critical=1", f"--critical_words={words}", "--device=cpu"])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    with open(os.path.join(out, "entropy.json")) as f:
        rep = json.load(f)
    rows = rep["rows"]
    assert [r["step"] for r in rows] == [2, 4] and rows[0]["ckpt"].endswith("ckpt_0000002")
    assert rep["config"]["group_size"] == 2 and rep["config"]["init_from"] == f"{run}/ckpt_*"
    log_v = math.log(V)  # the largest entropy a distribution over V tokens can have
    for r in rows:
        assert r["n_responses"] == 8 and 0 <= r["accuracy"] <= 1
        assert r["critical_count"] > 0 and 0 < r["critical_entropy"] <= log_v  # a random model: near log(V)
        assert sum(v["count"] for v in r["critical_by_word"].values()) == r["critical_count"]
        assert 0 < r["mean_entropy"] <= log_v and 0 <= r["high_entropy_share"] <= 1
    assert rep["correlation"]["critical_entropy"] == {"n": 2, "pearson": None, "pearson_ci": None,
                                                      "ci": "95% Fisher z", "spearman": None}  # 2 points
    assert all(r["n_items"] == 4 and (r["accuracy_se"] is None or 0 <= r["accuracy_se"] <= 0.5) for r in rows)
    sel = rep["selection"]
    best = max(range(2), key=lambda i: rows[i]["critical_entropy"])
    assert sel["applied"] == "critical_entropy" and sel["index"] == best
    assert open(os.path.join(out, "selected.txt")).read().strip() == rows[best]["ckpt"]
    md = open(os.path.join(out, "entropy.md")).read()
    assert "| critical entropy |" in md and md.count("ckpt_000000") >= 2 and "(selected)" in md
    from PIL import Image
    with Image.open(os.path.join(out, "entropy.png")) as im:
        assert im.format == "PNG" and im.size[0] > 100
    assert f"selected: {rows[best]['ckpt']}" in p.stdout
    check_env_json(out, script="entropy.py")
    # the selected ckpt_* exported as an HF directory, with the same weights, for connector_tune.py
    from plumbing import load_inference_model
    assert sel["hf"] == os.path.join(out, "hf")
    assert open(os.path.join(out, "selected_hf.txt")).read().strip() == sel["hf"]
    a, b = load_inference_model(rows[best]["ckpt"], "cpu")[0], load_inference_model(sel["hf"], "cpu")[0]
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[n], sb[n]) for n in sa)



def test_cli_glob_matching_nothing(tiny_run, tmp_path, monkeypatch):
    # the script's own __main__, in this process (a second interpreter would spend seconds on imports): a clear
    # error naming the pattern, before any model is loaded or anything is written
    synth, run, _, _, _ = tiny_run
    monkeypatch.setattr(sys, "argv", ["entropy.py", f"--init_from={run}/nothing_*", f"--data={synth}/val.jsonl",
                                      f"--out_dir={tmp_path}/out"])
    with pytest.raises(ValueError, match=f"pattern '{run}/nothing_\\*' matches no directory"):
        runpy.run_path(os.path.join(ROOT, "entropy.py"), run_name="__main__")
    assert not os.path.exists(tmp_path / "out")


def test_same_decodes_as_eval_and_bad_checkpoint(tiny_run, tmp_path):
    import eval as evalmod
    from plumbing import load_inference_model
    from data.common import load_jsonl
    synth, run, hf, words, _ = tiny_run
    items = load_jsonl(f"{synth}/val.jsonl")[:3]
    model, tok, _ = load_inference_model(hf, "cpu")
    mine = entropy.decode(model, tok, items, 2, 12, Sampling(temperature=1.0), seed=3)
    ref = evalmod.evaluate(model, tok, items, 2, 12, Sampling(temperature=1.0), think=True, seed=3, progress=False)
    assert [(r["id"], r["run"], r["correct"], r["n_tokens"]) for r in mine] == \
           [(r["id"], r["run"], r["correct"], r["n_tokens"]) for r in ref]
    assert [sum(r["entropies"]) / len(r["entropies"]) for r in mine] == \
           pytest.approx([r["mean_entropy"] for r in ref], rel=1e-6)
    # an HF directory: no step; a checkpoint whose shards are gone: an error naming it
    kw = dict(device="cpu", tokenizer="", group_size=1, sampling=Sampling(temperature=0.0), max_new_tokens=4, seed=0,
              batch_prompts=64, think=True, system=None, words=words, threshold=2.0)
    assert entropy.measure(hf, items[:1], **kw)["step"] is None
    bad = str(tmp_path / "ckpt_0000009")
    shutil.copytree(f"{run}/ckpt_0000002", bad)
    for f in os.listdir(bad):
        if f.endswith(".distcp"):
            os.remove(os.path.join(bad, f))
    with pytest.raises(RuntimeError, match="cannot load checkpoint .*ckpt_0000009"):
        entropy.measure(bad, items[:1], **kw)
