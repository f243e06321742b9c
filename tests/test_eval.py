"""Benchmark converters (data/convert_bench.py) on tiny MMMU / MathVista / MMK12 fixtures written here, eval.py's
input checks (every bad input names its file and line or row), --responses re-scoring, and eval.py end to end on a
tiny random model over converted benchmarks."""
import io
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import eval as ev
from data.common import build_prompt_text, critical_token_ids, load_jsonl
from data.convert_bench import convert, split_choices
from sampler import Sampling
from test_install import check_env_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # a Hugging Face image cell


def png(color, size=(20, 12)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def cell(color):
    return {"bytes": png(color), "path": f"{color}.png"}


def write_parquet(path, rows, image_cols=()):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cols = {k: [r.get(k) for r in rows] for k in rows[0]}
    pq.write_table(pa.table({k: pa.array(v, type=IMAGE if k in image_cols else None) for k, v in cols.items()}), path)


def pixel(out_jsonl, rel):
    with Image.open(os.path.join(os.path.dirname(out_jsonl), rel)) as im:
        return im.convert("RGB").getpixel((0, 0))


def run(args, ok=True):
    p = subprocess.run([sys.executable] + args, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    if ok:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p

# -----------------------------------------------------------------------------
# fixtures in the public layouts (see the comments in data/convert_bench.py)

MMMU_IMAGES = [f"image_{k}" for k in range(1, 8)]


def mmmu_row(sid, question, options, answer, qtype="multiple-choice", difficulty="Medium", **images):
    row = dict(id=sid, question=question, options=options, explanation="", img_type="['Diagrams']", answer=answer,
               topic_difficulty=difficulty, question_type=qtype, subfield="sub")
    row.update({k: images.get(k) for k in MMMU_IMAGES})
    return row


@pytest.fixture(scope="module")
def mmmu_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("MMMU")
    write_parquet(str(d / "Accounting" / "validation-00000-of-00001.parquet"), [
        # refers to <image 2> first, then to <image 1> in an option: the images are reordered and renumbered
        mmmu_row("validation_Accounting_1", "Compare <image 2> with the options.", "['<image 1>', 'none', 'both']",
                 "B", image_1=cell("red"), image_2=cell("blue")),
        mmmu_row("validation_Accounting_2", "What is x in <image 1>?", "[]", "['24/7', '3.429']", qtype="open",
                 difficulty="Hard", image_1=cell("green")),
    ], MMMU_IMAGES)
    write_parquet(str(d / "Accounting" / "dev-00000-of-00001.parquet"), [  # another split: not picked up
        mmmu_row("dev_Accounting_1", "<image 1>?", "['a', 'b']", "A", image_1=cell("red"))], MMMU_IMAGES)
    write_parquet(str(d / "Math" / "validation-00000-of-00001.parquet"), [
        mmmu_row("validation_Math_1", "Area of <image 1>?", "['1', '2', '3', '4']", "D", difficulty="Easy",
                 image_1=cell("yellow"))], MMMU_IMAGES)
    return str(d)


def mathvista_rows():
    meta = dict(category="math-targeted-vqa", context="geometry diagram", grade="high school", img_height=12,
                img_width=20, language="english", skills=["geometry reasoning"], source="GeoQA+", split="testmini")
    return [dict(pid="1", question="How many sides?", image="images/1.png", decoded_image=cell("red"),
                 choices=["3", "4", "5"], unit=None, precision=None, answer="4", question_type="multi_choice",
                 answer_type="text", metadata=dict(meta, task="geometry problem solving"), query="Hint: ... (A) 3"),
            dict(pid="2", question="What is the value?", image="images/2.png", decoded_image=cell("blue"),
                 choices=None, unit=None, precision=1.0, answer="1.5", question_type="free_form",
                 answer_type="float", metadata=dict(meta, task="figure question answering"),
                 query="Hint: answer with one decimal place.\nQuestion: What is the value?")]


@pytest.fixture(scope="module")
def mmk12_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("MMK12")
    path = str(d / "data" / "test-00000-of-00001.parquet")
    write_parquet(path, [
        dict(id="mmk-1", subject="math", question="Which value is largest?\nA. 1\nB. 2\nC. 3\nD. 4", answer="D",
             image=cell("red")),
        dict(id="mmk-2", subject="physics", question="How many volts?", answer="12", image=cell("blue")),
        dict(id="mmk-3", subject="math", question="Pick one: A. x B. y", answer="A", image=cell("green")),
    ], ["image"])
    return path

# -----------------------------------------------------------------------------
# converters


def test_convert_mmmu(mmmu_dir, tmp_path):
    out = str(tmp_path / "mmmu.jsonl")
    convert("mmmu", mmmu_dir, out)
    items = {s["id"]: s for s in load_jsonl(out)}  # the repo's loader accepts it: images exist, options valid
    assert sorted(items) == ["validation_Accounting_1", "validation_Accounting_2", "validation_Math_1"]
    a1 = items["validation_Accounting_1"]
    assert a1["question"] == "Compare <image 1> with the options." and a1["options"] == ["<image 2>", "none", "both"]
    assert a1["answer"] == "B" and len(a1["images"]) == 2
    assert [pixel(out, p) for p in a1["images"]] == [(0, 0, 255), (255, 0, 0)]  # image_2 first, as referenced
    assert all(p.startswith(str(tmp_path / "mmmu_images")) for p in a1["images"])
    assert (a1["domain"], a1["subject"], a1["difficulty"]) == ("Business", "Accounting", "Medium")
    a2 = items["validation_Accounting_2"]
    assert a2["answer"] == "24/7" and a2["answer_alternatives"] == ["24/7", "3.429"] and "options" not in a2
    assert items["validation_Math_1"]["domain"] == "Science" and items["validation_Math_1"]["difficulty"] == "Easy"
    # two images, no "<image>" placeholder: the prompt lists them up front, options rendered with letters
    text = build_prompt_text(a1["question"], [1, 1], 1, options=a1["options"])
    assert "Image-1: <img>" in text and "Image-2: <img>" in text and "A. <image 2>" in text
    # --limit keeps the first N in file order
    convert("mmmu", mmmu_dir, str(tmp_path / "two.jsonl"), limit=2)
    assert [s["id"] for s in load_jsonl(str(tmp_path / "two.jsonl"))] == ["validation_Accounting_1",
                                                                          "validation_Accounting_2"]


def test_convert_mathvista_parquet_and_json(tmp_path):
    src = str(tmp_path / "MathVista" / "data" / "testmini-00000-of-00001.parquet")
    write_parquet(src, mathvista_rows(), ["decoded_image"])
    out = str(tmp_path / "mv.jsonl")
    convert("mathvista", os.path.dirname(src), out)
    a, b = load_jsonl(out)
    assert a["options"] == ["3", "4", "5"] and a["answer"] == "B" and a["question"] == "How many sides?"
    assert a["domain"] == "geometry problem solving" and a["grade"] == "high school"
    assert "options" not in b and b["answer"] == "1.5" and b["question"].startswith("Hint: answer with one decimal")
    assert pixel(out, b["images"][0]) == (0, 0, 255)
    # the JSON layout: {pid: record}, images as paths relative to the JSON file (referenced, not copied)
    root = tmp_path / "mvjson"
    (root / "images").mkdir(parents=True)
    recs = {}
    for r in mathvista_rows():
        r.pop("decoded_image")
        (root / r["image"]).write_bytes(png("green"))
        recs[r["pid"]] = r
    (root / "testmini.json").write_text(json.dumps(recs))
    out2 = str(tmp_path / "mv2.jsonl")
    convert("mathvista", str(root / "testmini.json"), out2)
    c, d = load_jsonl(out2)
    assert c["answer"] == "B" and c["images"] == [str(root / "images" / "1.png")] and d["answer"] == "1.5"


def test_convert_mmk12(mmk12_file, tmp_path):
    out = str(tmp_path / "mmk12.jsonl")
    convert("mmk12", mmk12_file, out)
    a, b, c = load_jsonl(out)
    assert a["question"] == "Which value is largest?" and a["options"] == ["1", "2", "3", "4"] and a["answer"] == "D"
    assert (b["question"], b["answer"], b["domain"]) == ("How many volts?", "12", "physics") and "options" not in b
    assert c["question"] == "Pick one: A. x B. y" and c["answer"] == "A" and "options" not in c  # one-line: verbatim
    assert split_choices("Q?\nA. x\nC. y") is None and split_choices("A. x\nB. y") is None  # gap / no stem


def test_convert_bad_input_names_file_and_row(tmp_path, capsys):
    d = tmp_path / "bad"
    # a missing column
    write_parquet(str(d / "nocol" / "validation-0.parquet"), [dict(id="validation_Art_1", question="q", options="[]",
                                                                  question_type="open")])
    with pytest.raises(ValueError, match=r"validation-0\.parquet: row 0 \(id 'validation_Art_1'\): missing column"
                                         r".*answer"):
        convert("mmmu", str(d / "nocol"), str(tmp_path / "o.jsonl"))
    # undecodable image bytes, in the second row
    rows = [mmmu_row("validation_Art_1", "<image 1>?", "['a', 'b']", "A", image_1=cell("red")),
            mmmu_row("validation_Art_2", "<image 1>?", "['a', 'b']", "A", image_1={"bytes": b"not an image",
                                                                                   "path": None})]
    write_parquet(str(d / "badimg" / "validation-0.parquet"), rows, MMMU_IMAGES)
    with pytest.raises(ValueError, match=r"row 1 \(id 'validation_Art_2'\): image 1: cannot decode"):
        convert("mmmu", str(d / "badimg"), str(tmp_path / "o.jsonl"))
    # a referenced image that the row does not have
    write_parquet(str(d / "noref" / "validation-0.parquet"), [
        mmmu_row("validation_Art_1", "<image 1> and <image 3>?", "['a', 'b']", "A", image_1=cell("red"))],
        MMMU_IMAGES)
    with pytest.raises(ValueError, match=r"row 0 .*<image 3> but column image_3 is missing or empty"):
        convert("mmmu", str(d / "noref"), str(tmp_path / "o.jsonl"))
    # a MathVista image path that does not exist; an answer that is not among the choices
    recs = mathvista_rows()
    for r in recs:
        r.pop("decoded_image")
    (d / "mv.json").write_text(json.dumps(recs))
    with pytest.raises(ValueError, match=r"mv\.json: row 0 \(id '1'\): image 1: image not found: images/1\.png"):
        convert("mathvista", str(d / "mv.json"), str(tmp_path / "o.jsonl"))
    recs[0]["answer"] = "7"
    (d / "mv.json").write_text(json.dumps(recs))
    with pytest.raises(ValueError, match=r"row 0 .*answer '7' is not one of the choices"):
        convert("mathvista", str(d / "mv.json"), str(tmp_path / "o.jsonl"))
    # --skip_bad: the good row is written, the bad one counted and shown
    samples = convert("mmmu", str(d / "badimg"), str(tmp_path / "o.jsonl"), skip_bad=True)
    assert [s["id"] for s in samples] == ["validation_Art_1"] and "skipped 1 bad rows" in capsys.readouterr().out
    # the command line: a clean error, non-zero exit
    p = run(["data/convert_bench.py", "mmmu", str(d / "noref"), str(tmp_path / "o.jsonl")], ok=False)
    assert p.returncode != 0 and "validation-0.parquet: row 0" in p.stderr and "Traceback" not in p.stderr
    with pytest.raises(ValueError, match="no 'validation_nope' files"):
        convert("mmmu", str(tmp_path), str(tmp_path / "o.jsonl"), split="validation_nope")

# -----------------------------------------------------------------------------
# eval.py: bad input, --responses


def test_eval_bad_benchmark_input(tmp_path):
    with pytest.raises(ValueError, match=r"nope\.jsonl: benchmark file not found"):
        ev.load_items(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="is a folder"):
        ev.load_items(str(tmp_path))
    binary = tmp_path / "bench.parquet"
    binary.write_bytes(b"PAR1\x15\x04\x15\xff\xfe" + png("red"))
    with pytest.raises(ValueError, match=r"bench\.parquet:1: not UTF-8 text"):
        ev.load_items(str(binary))
    (tmp_path / "ok.png").write_bytes(png("red"))
    good = {"id": "a", "image": "ok.png", "question": "q?", "answer": "1"}
    bad = tmp_path / "bench.jsonl"
    bad.write_text(json.dumps(good) + "\n" + json.dumps(dict(good, id="b", image="missing.png")) + "\n")
    with pytest.raises(ValueError, match=r"bench\.jsonl:2: image not found: missing\.png"):
        ev.load_items(str(bad))
    bad.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bench\.jsonl:2: malformed JSON"):
        ev.load_items(str(bad))
    bad.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(ValueError, match=r"bench\.jsonl:2: duplicate id 'a' \(also at .*bench\.jsonl:1\)"):
        ev.load_items(str(bad))
    bad.write_text(json.dumps(dict(good, answer=" ")) + "\n")
    with pytest.raises(ValueError, match=r"bench\.jsonl:1: empty 'answer'"):
        ev.load_items(str(bad))
    bad.write_text(json.dumps(good) + "\n" + json.dumps(dict(good, id="b")) + "\n")
    assert [s["id"] for s in ev.load_items(str(bad), limit=1)] == ["a"]


def test_eval_bad_responses_input(tmp_path):
    with pytest.raises(ValueError, match=r"r\.jsonl: responses file not found"):
        ev.read_responses(str(tmp_path / "r.jsonl"))
    f = tmp_path / "r.jsonl"
    ok = {"id": "a", "response": "x", "answer": "1"}
    for line, msg in [("{oops", "malformed JSON"), ("[1, 2]", "expected a JSON object"),
                      (json.dumps({"id": "b", "answer": "1"}), "missing field.*response"),
                      (json.dumps(dict(ok, answer="")), "empty 'answer'"),
                      (json.dumps(dict(ok, options=["p", "q"], answer="Z")), "answer .Z. is neither an option letter"),
                      (json.dumps(dict(ok, run=-1)), "'run' must be a non-negative integer")]:
        f.write_text(json.dumps(ok) + "\n\n" + line + "\n")
        with pytest.raises(ValueError, match=rf"r\.jsonl:3: {msg}"):
            ev.read_responses(str(f))
    # no run field: lines of one id are its runs, in order
    f.write_text("\n".join(json.dumps(dict(ok, id=i)) for i in ["a", "b", "a"]) + "\n")
    assert [(r["id"], r["run"]) for r in ev.read_responses(str(f))] == [("a", 0), ("b", 0), ("a", 1)]


def test_eval_responses_rescoring(tmp_path):
    # 3 items x 2 runs, written as another tool would (no n_tokens for one id, no pred/correct at all)
    rows = [dict(id="q1", run=0, response="<think>\nok\n</think>\n\n\\boxed{12}", answer="12", domain="count"),
            dict(id="q1", run=1, response="<think>\nok\n</think>\n\n\\boxed{13}", answer="12", domain="count"),
            dict(id="q2", run=0, response="<think>\nhm\n</think>\n\nThe answer is \\boxed{B}", answer="B",
                 options=["red", "blue"], domain="mc", n_tokens=10, truncated=1),
            dict(id="q2", run=1, response="<think>\nhm\n</think>\n\n\\boxed{blue}", answer="B",
                 options=["red", "blue"], domain="mc", n_tokens=20, truncated=0),
            dict(id="q3", run=0, response="no think, no box", answer="7", domain="count", n_tokens=30),
            dict(id="q3", run=1, response="<think>\n</think>\n\\boxed{\\frac{14}{2}}", answer="7", domain="count",
                 n_tokens=40)]
    resp = tmp_path / "gen" / "responses.jsonl"
    resp.parent.mkdir()
    resp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "rescored"
    run(["eval.py", f"--responses={resp}", f"--out_dir={out}"])
    s = json.loads((out / "summary.json").read_text())
    # run 0: q1 right, q2 right, q3 wrong; run 1: q1 wrong, q2 right (option text), q3 right (Math-Verify: 14/2 = 7)
    assert s["accuracy_per_run"] == pytest.approx([2 / 3, 2 / 3]) and s["accuracy_std"] == 0
    assert s["pass@2"] == 1.0 and s["format"] == pytest.approx(5 / 6)
    assert s["by_domain"] == {"count": 0.5, "mc": 1.0} and s["n_by_domain"] == {"count": 4, "mc": 2}
    assert s["mean_tokens"] == pytest.approx(25.0) and s["truncation_rate"] == pytest.approx(1 / 6)
    got = [json.loads(line) for line in (out / "responses_rescored.jsonl").read_text().splitlines()]
    assert [(r["id"], r["run"], r["pred"], r["correct"]) for r in got] == [
        ("q1", 0, "12", 1), ("q1", 1, "13", 0), ("q2", 0, "B", 1), ("q2", 1, "blue", 1), ("q3", 0, None, 0),
        ("q3", 1, "\\frac{14}{2}", 1)]
    assert "| mc | 100.0 | 2 |" in (out / "summary.md").read_text()

# -----------------------------------------------------------------------------
# end to end on a tiny random model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from data.common import MC_INSTRUCTION
    from data.prepare import train_tokenizer
    from model import VLM, VLMConfig
    from plumbing.hf import save_pretrained
    d = str(tmp_path_factory.mktemp("tiny"))
    texts = ["What is x? Which value is largest? How many volts? Compare the options. " + MC_INSTRUCTION,
             "<think>\nI look at the image.\n</think>\n\n\\boxed{12} A. B. C. D. Image-1: Image-2: 0123456789"] * 4
    tok = train_tokenizer(texts, 320, d)
    torch.manual_seed(0)
    cfg = VLMConfig(image_size=16, patch_size=4, vit_hidden=16, vit_layers=1, vit_heads=2, vit_mlp=32,
                    vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_kv_head=1, mlp_hidden=64,
                    tie_embeddings=True, image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), max_tiles=2)
    save_pretrained(VLM(cfg), d)
    return d


def test_evaluate_multi_image_mmmu(mmmu_dir, tiny_model, tmp_path):
    from plumbing import load_inference_model
    out = str(tmp_path / "mmmu.jsonl")
    convert("mmmu", mmmu_dir, out)
    items = ev.load_items(out)
    model, tok, _ = load_inference_model(tiny_model, "cpu")
    no_wait = Sampling(temperature=1.0, ban=critical_token_ids(tok))  # as eval.py --no_wait=True builds it
    rows = ev.evaluate(model, tok, items, 2, 6, no_wait, batch_prompts=2, progress=False)
    assert [(r["id"], r["run"]) for r in rows] == [(s["id"], i) for s in items for i in range(2)]
    assert all(0 < r["n_tokens"] <= 6 and r["correct"] == 0 for r in rows)  # random weights: never a \boxed answer
    s = ev.summarize(rows, 2)
    assert s["n_by_subject"] == {"Accounting": 4, "Math": 2} and s["n_by_difficulty"] == {"Easy": 2, "Hard": 2,
                                                                                          "Medium": 2}
    assert set(s["by_domain"]) == {"Business", "Science"} and "| subject | accuracy | n |" in ev.markdown(s, "t")


def test_eval_end_to_end_on_converted_mmk12(mmk12_file, tiny_model, tmp_path):
    bench = str(tmp_path / "bench" / "mmk12.jsonl")
    run(["data/convert_bench.py", "mmk12", mmk12_file, bench, "--limit=2"])
    out = tmp_path / "ev"
    run(["eval.py", f"--init_from={tiny_model}", f"--data={bench}", f"--out_dir={out}", "--group_size=2",
         "--temperature=1.0", "--max_new_tokens=8", "--device=cpu"])
    rows = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert [(r["id"], r["run"]) for r in rows] == [("mmk-1", 0), ("mmk-1", 1), ("mmk-2", 0), ("mmk-2", 1)]
    assert all({"id", "response", "pred", "answer", "correct", "n_tokens", "truncated", "domain"} <= set(r)
               for r in rows)
    assert rows[0]["options"] == ["1", "2", "3", "4"] and rows[0]["answer"] == "D" and rows[2]["answer"] == "12"
    s = json.loads((out / "summary.json").read_text())
    assert s["n_items"] == 2 and s["k"] == 2 and len(s["accuracy_per_run"]) == 2 and "pass@2" in s
    assert s["n_by_domain"] == {"math": 2, "physics": 2} and 0 < s["mean_tokens"] <= 8
    check_env_json(str(out), script="eval.py")
    # the same responses re-scored without the model (as --responses does) give the same scores
    again = ev.rescore(ev.read_responses(str(out / "responses.jsonl")))
    assert [r["correct"] for r in again] == [r["correct"] for r in rows] and ev.summarize(again, 2)["accuracy"] == \
        s["accuracy"]
    # a benchmark sample whose image is gone: the error names the file and line, before any model is loaded
    os.remove(load_jsonl(bench)[1]["images"][0])
    p = run(["eval.py", f"--init_from={tiny_model}", f"--data={bench}", f"--out_dir={tmp_path / 'ev2'}"], ok=False)
    assert p.returncode != 0 and f"{bench}:2: image not found" in p.stderr

# -----------------------------------------------------------------------------
# generation settings: the command line and config files, then generation_config.json, then the defaults; the
# R1V3 presets; the short-budget warning; the no-think prompt


def eval_settings(argv):
    """eval.py's settings after configure(argv), and which keys argv set."""
    from plumbing.configurator import config_keys, configure
    g = dict(vars(ev))
    sources = {}
    config = configure(g, argv, config_keys(g), sources=sources)
    return config, sources


def test_generation_config_defaults_and_command_line(tmp_path):
    gen = {"max_new_tokens": 2048, "do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20,
           "repetition_penalty": 1.05, "max_length": 32768, "transformers_version": "4.37.2"}
    config, sources = eval_settings(["--temperature=1.0"])
    assert sources == {"temperature": "command line"}
    updates, where, notes = ev.resolve_generation(config, sources, "ckpt/generation_config.json", gen)
    # generation_config fills what the command line left unset; the command line wins; max_length is no budget
    assert updates == {"max_new_tokens": 2048, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.05}
    assert where["temperature"] == "command line" and where["max_new_tokens"] == "ckpt/generation_config.json"
    assert not notes
    # do_sample false: greedy whatever its temperature says, as transformers' generate() decodes
    config, sources = eval_settings([])
    updates, where, _ = ev.resolve_generation(config, sources, "g.json", dict(gen, do_sample=False))
    assert updates["temperature"] == 0.0 and where["temperature"] == "g.json"
    # a key the script does not have is reported, not silently dropped
    no_penalty = {k: v for k, v in config.items() if k != "repetition_penalty"}
    _, _, notes = ev.resolve_generation(no_penalty, sources, "g.json", {"repetition_penalty": 1.05})
    assert notes == ["g.json: repetition_penalty=1.05 ignored (this sampler has no repetition_penalty)"]
    # no file: nothing changes, every value is the default; a bad value names the file
    assert ev.resolve_generation(config, sources, None, {})[:2] == ({}, {k: "default" for k in ev.GEN_KEYS
                                                                         if k in config})
    with pytest.raises(ValueError, match=r"g\.json: max_new_tokens='lots'"):
        ev.resolve_generation(config, sources, "g.json", {"max_new_tokens": "lots"})
    # the file is looked for in the checkpoint's folder, then the tokenizer's
    ckpt, tokdir = tmp_path / "ckpt", tmp_path / "tok"
    ckpt.mkdir()
    tokdir.mkdir()
    assert ev.read_generation_config(str(ckpt), str(tokdir)) == (None, {})
    (tokdir / "generation_config.json").write_text(json.dumps({"top_p": 0.8}))
    assert ev.read_generation_config(str(ckpt), str(tokdir)) == (str(tokdir / "generation_config.json"), {"top_p": 0.8})
    (ckpt / "generation_config.json").write_text("[1]")
    with pytest.raises(ValueError, match=r"ckpt/generation_config\.json: expected a JSON object"):
        ev.read_generation_config(str(ckpt), str(tokdir))


def test_r1v3_eval_presets():
    # Skywork's released settings (config/eval_r1v3_*.py); a preset's values are "set", so a checkpoint's
    # generation_config.json does not override them, and the command line still does
    presets = {"bench": dict(temperature=0.0, group_size=1), "mmk12": dict(temperature=0.8, group_size=1),
               "paper": dict(temperature=1.0, group_size=5)}
    for name, want in presets.items():
        path = f"config/eval_r1v3_{name}.py"
        want.update(top_p=1.0, top_k=0, max_new_tokens=16384)
        config, sources = eval_settings([os.path.join(ROOT, path)])
        assert {k: config[k] for k in want} == want, path
        assert ev.resolve_generation(config, sources, "g.json", {"max_new_tokens": 512, "temperature": 0.3})[0] == {}
        assert config["repetition_penalty"] == (1.05 if name == "bench" else 1.0)  # 1.05: Skywork's inference scripts
    config, sources = eval_settings([os.path.join(ROOT, "config/eval_r1v3_bench.py"), "--max_new_tokens=8192"])
    assert config["max_new_tokens"] == 8192 and sources["max_new_tokens"] == "command line"
    assert sources["temperature"].startswith("config file") and sources["temperature"].endswith("eval_r1v3_bench.py")


def test_budget_warning_on_real_checkpoints(tmp_path, tiny_model, capsys):
    line = ev.budget_warning(320, 151_674)
    print(line)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "WARNING: max_new_tokens=320 on a real checkpoint (vocabulary 151,674)" in out
    assert ev.budget_warning(4096, 151_674) is None and ev.budget_warning(320, 320, tiny_model) is None
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["InternVLChatModel"],
                                                      "model_type": "internvl_chat"}))
    assert "config.json names internvl_chat" in ev.budget_warning(1024, 1000, str(tmp_path))


def test_no_think_prompt_and_scoring(tiny_model, tmp_path):
    # --think=False: the plain ChatML prompt (no forced "<think>\n"), and the whole response scored; the baseline
    # for a base InternVL3, which never learned the <think> format
    from data.common import encode_prompt
    from plumbing import load_inference_model
    model, tok, _ = load_inference_model(tiny_model, "cpu")
    (tmp_path / "a.png").write_bytes(png("red"))
    sample = load_jsonl(str(_jsonl(tmp_path, [{"id": "q", "image": "a.png", "question": "How many volts?",
                                               "answer": "12"}])))[0]
    think = tok.decode(encode_prompt(tok, sample, model.cfg, think=True)[0])
    plain = tok.decode(encode_prompt(tok, sample, model.cfg, think=False)[0])
    assert think.endswith("<|im_start|>assistant\n<think>\n") and think.startswith(plain)
    assert plain.endswith("How many volts?<|im_end|>\n<|im_start|>assistant\n") and "<think>" not in plain
    rows = [{"id": "q", "response": "The answer is \\boxed{12}.", "answer": "12"}]
    assert ev.rescore([dict(r) for r in rows], think=False)[0]["correct"] == 1
    assert ev.rescore([dict(r) for r in rows], think=True)[0]["correct"] == 0  # no </think>: think mode scores 0


def _jsonl(d, records):
    path = d / "bench.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_eval_generation_config_end_to_end(mmk12_file, tiny_model, tmp_path):
    import shutil
    # a checkpoint with a generation_config.json, named as a Skywork model: its budget applies (5 new tokens) and
    # the one-line warning says it is far too short; --temperature on the command line beats its do_sample=false
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_model, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(dict(cfg, _name_or_path="Skywork/Skywork-R1V3-38B")))
    (ckpt / "generation_config.json").write_text(json.dumps({"max_new_tokens": 5, "do_sample": False, "top_k": 7}))
    bench = str(tmp_path / "mmk12.jsonl")
    convert("mmk12", mmk12_file, bench, limit=2)
    out = tmp_path / "ev"
    p = run(["eval.py", f"--init_from={ckpt}", f"--data={bench}", f"--out_dir={out}", "--temperature=1.0",
             "--think=False", "--device=cpu"])
    gen = str(ckpt / "generation_config.json")
    assert f"max_new_tokens=5 ({gen})" in p.stdout and "temperature=1.0 (command line)" in p.stdout
    assert f"top_k=7 ({gen})" in p.stdout and "top_p=1.0 (default)" in p.stdout
    warnings = [line for line in p.stdout.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "max_new_tokens=5 on a real checkpoint (config.json names Skywork/" in warnings[0]
    s = json.loads((out / "summary.json").read_text())
    assert (s["config"]["max_new_tokens"], s["config"]["temperature"], s["config"]["top_k"]) == (5, 1.0, 7)
    assert s["generation_from"]["temperature"] == "command line" and s["config"]["think"] is False
    rows = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert all(0 < r["n_tokens"] <= 5 for r in rows)
