"""viewer.py in a real browser: the pages are rendered by headless Chromium (Debian's chromium, driven over the
DevTools protocol by viewer.Chromium) and the checks read the DOM after the page's script ran: the samples shown,
images decoded, token colours, filters, pagination, curves, no JS error, no request leaving the file, and a
non-blank screenshot. Pages come from synthetic dumps in viewer.py's formats (tests/viewer_dumps.py) and from a
tiny real run (data -> SFT -> GRPO -> eval). Hostile model output must show as text and run nothing. Bad input
stops with file:line. The README's screenshots are PNGs of at most 200 KB."""
import io
import json
import os
import subprocess
import sys

import pytest

import viewer
import viewer_dumps
from tiny_sft import tiny_sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CI = os.environ.get("CI") == "true"
# the keys viewer.py's docstring promises (the real run must write them all)
GROUP_KEYS = {"step", "prompt_index", "id", "question", "images", "answer", "options", "domain", "difficulty",
              "samples"}
SAMPLE_KEYS = {"response", "pieces", "tokens", "logp", "entropy", "train_logp", "advantage", "reward", "accuracy",
               "format", "pred", "n_tokens", "finish_reason", "critical"}
RESPONSE_KEYS = {"id", "run", "question", "images", "options", "response", "pieces", "entropies", "pred", "answer",
                 "correct", "format", "reward", "n_tokens", "truncated", "domain", "subject", "difficulty",
                 "mean_entropy"}
CURVE_KEYS = ["reward", "accuracy", "format", "resp_len", "truncated", "clip_frac", "gnorm", "entropy",
              "critical_entropy", "high_entropy_share", "val_accuracy"]


@pytest.fixture(scope="module")
def browser():
    path = viewer.find_chromium()
    if path is None:
        if CI:
            pytest.fail("no chromium in CI: .ci/run installs Debian's chromium when /usr/bin/chromium is missing")
        pytest.skip("no Chromium (/usr/bin/chromium): apt-get install -y chromium (.ci/run does it in CI)")
    try:
        b = viewer.Chromium(path)
    except viewer.ViewerError as e:
        if CI:
            raise
        pytest.skip(f"{path} cannot be started here: {e}")
    yield b
    b.close()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("viewer_demo"))
    groups, a, b, report = viewer_dumps.write_all(d)
    return d, groups, a, b, report


def make(*args):
    """viewer.py's main -> the path it wrote."""
    out = args[-1].split("=", 1)[1] if args[-1].startswith("--out=") else None
    viewer.main(list(args))
    return out or os.path.join(args[0], {"grpo": "rollouts.html", "eval": "responses.html",
                                         "entropy": "entropy.html"}[viewer.detect(args[0])])


def show(b, html, height=1000):
    """Opens the page, waits for its images; no JS error and no request but the file itself and data: URIs."""
    b.open(html, 1280, height)
    b.eval("Promise.all([...document.images].map(i => i.decode().catch(() => null)))")
    assert b.errors() == []
    assert all(u.startswith(("file:", "data:", "about:")) for u in b.requests()), b.requests()


def js(b, expr):
    return b.eval(expr)


def count(b, what=".sample"):
    return js(b, f"document.querySelectorAll('#list {what}').length")


def click(b, selector):
    js(b, f"document.querySelector({json.dumps(selector)}).click()")


def choose(b, select_id, value):
    js(b, f"(s => {{ s.value = {json.dumps(str(value))}; s.dispatchEvent(new Event('change')); }})"
          f"(document.getElementById({json.dumps(select_id)}))")


def image_widths(b):
    return js(b, "[...document.images].map(i => i.complete ? i.naturalWidth : 0)")


def colours(b, scope):
    """The computed background colours of the token spans under a selector, in order."""
    return js(b, f"[...document.querySelectorAll({json.dumps(scope + ' .tok')})]"
                 ".map(t => getComputedStyle(t).backgroundColor)")


def assert_safe(b):
    """Hostile strings were shown as text: nothing ran, no element was made from them."""
    assert js(b, "window.__pwned === undefined")
    assert js(b, "document.querySelectorAll('img[src=\"x\"], .resp *:not(.tok), .q *').length") == 0
    assert "</script><script>window.__pwned=1</script>" in js(b, "document.body.textContent")


def assert_screenshot(b):
    from PIL import Image
    im = Image.open(io.BytesIO(viewer.small_png(b.screenshot()))).convert("RGB")
    assert im.size[0] >= 320
    colors = im.getcolors(1 << 16)  # None: more colours than that
    assert colors is None or len(colors) > 16, "screenshot is (nearly) one colour"
    lo, hi = im.convert("L").getextrema()
    assert hi - lo > 100

# -----------------------------------------------------------------------------
# synthetic dumps in viewer.py's formats


def test_rollouts_page(browser, demo):
    d, groups, *_ = demo
    b = browser
    html = make(os.path.join(d, "grpo"))
    with open(html) as f:
        text = f.read()
    assert text.count("data:image/") == 25  # 25 prompts' images, each once though step 10 reuses 4 of them
    show(b, html)
    at10 = [g for g in groups if g["step"] == 10]
    samples10 = [s for g in at10 for s in g["samples"]]
    # the last dumped step is shown first: 4 groups side by side, 16 samples, each group's image decoded
    assert js(b, "document.getElementById('step').value") == "10"
    assert count(b) == 16 and count(b, ".group") == 4
    assert js(b, "document.getElementById('count').textContent") == "4 groups, 16 samples at step 10"
    widths = image_widths(b)
    assert len(widths) == 4 and min(widths) == 64
    # tokens coloured by entropy; the pieces spell the response; critical tokens marked
    c = colours(b, "#list .group:nth-child(1) .sample:nth-child(1)")
    assert len(c) == len(at10[0]["samples"][0]["pieces"]) and len(set(c)) > 5
    assert js(b, "document.querySelector('#list .resp').textContent") == \
        at10[0]["samples"][0]["response"] + "\u2205"  # the empty end-of-turn piece is shown as a mark
    assert count(b, ".tok.crit") == sum(len(s["critical"]) for s in samples10) > 0
    assert_safe(b)
    # filters: click, count again
    wrong = sum(s["accuracy"] != 1 for s in samples10)
    click(b, "#filter button[data-v=wrong]")
    assert count(b) == wrong and js(b, "[...document.querySelectorAll('#list .sample')]"
                                       ".every(s => s.classList.contains('wrong'))")
    click(b, "#filter button[data-v=truncated]")
    assert count(b) == 1 and count(b, ".group") == 1
    click(b, "#filter button[data-v=correct]")
    assert count(b) == len(samples10) - wrong
    click(b, "#filter button[data-v=all]")
    click(b, "#groups button[data-v=equal]")  # the all-correct group: every advantage is 0
    assert count(b, ".group") == 1 and count(b) == 4
    click(b, "#groups button[data-v=varied]")
    assert count(b, ".group") == 3 and count(b) == 12
    click(b, "#groups button[data-v=all]")
    choose(b, "domain", at10[2]["domain"])
    assert count(b, ".group") == sum(g["domain"] == at10[2]["domain"] for g in at10)
    choose(b, "domain", "")
    # colour modes: train - rollout log-prob is grey where train_logp is null (group 4), coloured elsewhere
    click(b, "input[name=mode][value=dlogp]")
    assert set(js(b, "[...document.querySelectorAll('#list .group:nth-child(4) .tok')]"
                     ".map(t => t.classList.contains('na'))")) == {True}
    assert len(set(colours(b, "#list .group:nth-child(2) .sample:nth-child(1)"))) > 3
    click(b, "input[name=mode][value=advlogp]")  # green where A > 0, red where A < 0
    assert all("26, 152, 80" in x for x in colours(b, "#list .group:nth-child(2) .sample:nth-child(1)"))
    assert all("215, 48, 39" in x for x in colours(b, "#list .group:nth-child(2) .sample:nth-child(2)"))
    click(b, "input[name=mode][value=entropy]")
    # another step, paginated: 25 groups -> 20 on the first page, 5 on the second
    choose(b, "step", 5)
    assert count(b, ".group") == 20 and count(b) == 80
    assert js(b, "document.getElementById('count').textContent") == "25 groups, 100 samples at step 5"
    click(b, "#next")
    assert count(b, ".group") == 5 and count(b) == 20 and min(image_widths(b)) == 64
    # the run curves: every key is in log.jsonl; a path with one point a step (critical_entropy: a gap at step 4)
    curves = js(b, "[...document.querySelectorAll('#curves svg.plot')].map(s => [s.dataset.key, "
                   "s.querySelector('path.line').getAttribute('d').match(/[ML]/g).join('')])")
    assert [k for k, _ in curves] == CURVE_KEYS
    paths = dict(curves)
    assert paths["reward"] == "M" + "L" * 11 and paths["val_accuracy"] == "MLL"
    assert paths["critical_entropy"] == "MLL" + "M" + "L" * 7
    assert js(b, "document.getElementById('curves-missing')") is None
    assert viewer.read_log(os.path.join(d, "grpo", "log.jsonl"))[3]["reward"] > 0  # step 3's second record won
    assert_screenshot(b)
    assert b.errors() == []


def test_eval_page_and_compare(browser, demo):
    d, _, a, bb, _ = demo
    b = browser
    show(b, make(os.path.join(d, "eval_grpo")))
    assert count(b, ".item") == 20 and js(b, "document.getElementById('count').textContent") == "30 of 30 items"
    assert len(image_widths(b)) == 20 and min(image_widths(b)) == 64
    assert len(set(colours(b, "#list .item:nth-child(2)"))) > 5
    assert js(b, "document.querySelectorAll('table.by_domain tr').length") == 1 + 6
    assert js(b, "document.querySelectorAll('table.by_difficulty tr').length") == 1 + 2
    assert_safe(b)
    wrong = sum(r["correct"] != 1 for r in a)
    click(b, "#filter button[data-v=wrong]")
    assert count(b, ".item") == min(20, wrong) and count(b, ".sample.correct") == 0
    assert js(b, "document.getElementById('count').textContent") == f"{wrong} of 30 items"
    click(b, "#filter button[data-v=truncated]")
    assert count(b, ".item") == 1
    assert_screenshot(b)
    # two runs: the flipped items, side by side
    out = os.path.join(d, "compare.html")
    show(b, make(os.path.join(d, "eval_grpo"), f"--compare={os.path.join(d, 'eval_sft')}", f"--out={out}"))
    a_only = sum(x["correct"] == 1 and y["correct"] != 1 for x, y in zip(a, bb))
    b_only = sum(x["correct"] != 1 and y["correct"] == 1 for x, y in zip(a, bb))
    assert a_only > 0 and b_only > 0
    assert count(b, ".item") == min(20, a_only + b_only) and count(b, ".pair") == count(b, ".item")
    assert count(b, ".pair > .sample") == 2 * count(b, ".item")
    click(b, "#flip button[data-v=b]")
    assert count(b, ".item") == b_only
    assert js(b, "[...document.querySelectorAll('#list .pair')].every(p => "
                 "p.children[0].classList.contains('wrong') && p.children[1].classList.contains('correct'))")
    click(b, "#flip button[data-v=all]")
    assert js(b, "document.getElementById('count').textContent") == "30 of 30 items"
    assert js(b, "document.querySelector('table.by_domain tr').textContent") == "domaineval_grpoeval_sft\u0394n"
    assert_screenshot(b)


def test_entropy_page(browser, demo):
    d, *_, report = demo
    b = browser
    show(b, make(os.path.join(d, "entropy")))
    rows, sel = report["rows"], report["selection"]
    assert js(b, "document.querySelectorAll('table.ckpts tr').length") == 1 + len(rows)
    assert js(b, "[...document.querySelectorAll('table.ckpts tr.selected td')].map(t => t.textContent)")[1] \
        == str(sel["step"])
    # the plot is drawn from the numbers: a path of 12 points for each of entropy and accuracy; the scatter
    assert js(b, "[...document.querySelectorAll('#plots svg:first-child path.line')].map(p => +p.dataset.n)") \
        == [12, 12]
    assert js(b, "document.querySelectorAll('#plots svg:last-child circle').length") == 12
    assert js(b, "document.querySelectorAll('#plots svg:first-child .cursor').length") == 1  # the selection
    text = js(b, "document.body.textContent")
    assert f"{report['correlation']['critical_entropy']['pearson']:.4f}" in text and sel["reason"] in text
    assert_screenshot(b)


def test_log_only_run_and_absent_curves(browser, tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "log.jsonl").write_text("".join(json.dumps({"step": s, "reward": 0.1 * s, "accuracy": 0.05 * s}) + "\n"
                                         for s in range(1, 6)))
    show(browser, make(str(d)))
    assert js(browser, "[...document.querySelectorAll('#curves svg.plot')].map(s => s.dataset.key)") == \
        ["reward", "accuracy"]
    missing = js(browser, "document.getElementById('curves-missing').textContent")
    assert all(k in missing for k in CURVE_KEYS[2:])
    assert "no rollouts.jsonl" in js(browser, "document.body.textContent")


def test_bad_input(tmp_path, capsys):
    def error(*args):
        with pytest.raises(SystemExit) as e:
            viewer.main([str(a) for a in args])
        return str(e.value.code)
    assert "no such directory" in error(tmp_path / "nope") and "nope" in error(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "none of the files viewer.py reads" in error(tmp_path / "empty")
    g = tmp_path / "g"
    g.mkdir()
    (g / "log.jsonl").write_text('{"step": 1, "reward": 0.5}\n{"step": 2, "reward": \n{"step": 3}\n')
    assert f"{g / 'log.jsonl'}:2: malformed JSON" in error(g)
    (g / "log.jsonl").write_text('{"step": 1, "reward": 0.5}\n{"step": 2, "rew')  # still being written: skipped
    viewer.main([str(g)])
    assert "log.jsonl:2: incomplete last line" in capsys.readouterr().err
    sample = {"response": "ab", "pieces": ["a", "b"], "entropy": [0.1], "logp": [-1, -2]}
    (g / "rollouts.jsonl").write_text(json.dumps({"step": 1, "samples": [sample]}) + "\n")
    assert "rollouts.jsonl:1: sample 0: 'entropy' must be a list with one number per piece (2), got 1" in error(g)
    (g / "rollouts.jsonl").write_text("\n" + json.dumps({"step": 1, "response": "old", "reward": 1}) + "\n")
    assert "rollouts.jsonl:2: no 'samples' list (one line per sample" in error(g)
    (g / "rollouts.jsonl").write_text("[1, 2]\n")
    assert "rollouts.jsonl:1: expected a JSON object, got list" in error(g)
    assert "--compare is for eval directories" in error(g, f"--compare={g}")
    e = tmp_path / "e"
    e.mkdir()
    (e / "summary.json").write_text("{}")
    (e / "responses.jsonl").write_text('{"id": "a", "response": "x"}\n{"id": "b", "response": }\n')
    assert "responses.jsonl:2: malformed JSON" in error(e)
    (e / "responses.jsonl").write_text('{"id": "a", "response": "x", "images": ["gone.png"]}\n')
    viewer.main([str(e)])  # a missing image is a warning and a placeholder, not a stop
    assert "gone.png" in capsys.readouterr().err
    assert "not an eval directory" in error(e, f"--compare={g}")
    (e / "summary.json").write_text('{"accuracy": 0.5,\n "format": }')
    assert "summary.json:2: malformed JSON" in error(e)
    n = tmp_path / "n"
    n.mkdir()
    (n / "entropy.json").write_text('{"rows": 3}')
    assert "entropy.json: 'rows' must be a list" in error(n)

# -----------------------------------------------------------------------------
# a real run: tiny data -> SFT -> GRPO with dumps -> eval, then its pages


def run(script, args):
    p = subprocess.run([sys.executable, script] + args, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("viewer_real"))
    # a critical word in every trace, so that the pages have critical tokens to mark
    synth, _ = tiny_sft(d, n_rl=16, n_val=4, thought="I look. Wait, I count.")
    run("grpo.py", [f"--out_dir={d}/grpo", f"--init_from={d}/sft/hf", f"--data={synth}/rl.jsonl",
                    f"--val_data={synth}/val.jsonl", "--prompts_per_step=4", "--group_size=4",
                    "--max_new_tokens=[[0, 24]]", "--micro_batch=16", "--val_n=4", "--eval_every=2",
                    "--save_every=100", "--max_steps=2", "--dump_every=1"])
    run("eval.py", [f"--ckpt={d}/grpo/hf", f"--data={synth}/test.jsonl", f"--out_dir={d}/eval",
                    "--max_new_tokens=32"])
    return d


def test_real_run_pages(browser, real):
    b = browser
    with open(f"{real}/grpo/rollouts.jsonl") as f:
        dump = [json.loads(line) for line in f if line.strip()]
    assert dump, "grpo.py --dump_every=1 wrote no rollouts"
    assert not GROUP_KEYS - set(dump[0]), f"rollouts.jsonl lacks the documented keys {sorted(GROUP_KEYS - set(dump[0]))}"
    for g in dump:
        for s in g["samples"]:
            assert not SAMPLE_KEYS - set(s), f"a rollouts.jsonl sample lacks {sorted(SAMPLE_KEYS - set(s))}"
            # the pieces spell the response, perhaps + the end token's text (the response is decoded without it);
            # a token holding part of a UTF-8 character is "" alone and U+FFFD in the response's decode
            spelt, text = ("".join(s["pieces"]).replace("\ufffd", ""), s["response"].replace("\ufffd", ""))
            assert spelt in (text, text + s["pieces"][-1]), (s["pieces"], s["response"])
            assert len(s["pieces"]) == len(s["tokens"]) == len(s["entropy"]) == len(s["logp"]) == s["n_tokens"]
    show(b, make(f"{real}/grpo"))
    for step in sorted({g["step"] for g in dump}):
        choose(b, "step", step)
        at = [g for g in dump if g["step"] == step][:20]
        assert count(b) == sum(len(g["samples"]) for g in at) and count(b, ".group") == len(at)
        assert len(image_widths(b)) == sum(len(g["images"]) for g in at) and min(image_widths(b)) > 0
        assert len(set(colours(b, "#list"))) > 3
    log = viewer.read_log(f"{real}/grpo/log.jsonl")
    present = [k for k in CURVE_KEYS if any(isinstance(r.get(k), (int, float)) for r in log)]
    assert {"reward", "accuracy", "entropy", "val_accuracy"} <= set(present)
    assert js(b, "[...document.querySelectorAll('#curves svg.plot')].map(s => s.dataset.key)") == present
    assert js(b, "[...document.querySelectorAll('#curves path.line')].every(p => +p.dataset.n >= 1)")
    assert_screenshot(b)
    with open(f"{real}/eval/responses.jsonl") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    assert not RESPONSE_KEYS - set(rows[0]), f"responses.jsonl lacks {sorted(RESPONSE_KEYS - set(rows[0]))}"
    show(b, make(f"{real}/eval"))
    assert count(b, ".item") == min(20, len(rows)) and min(image_widths(b)) > 0
    assert len(set(colours(b, "#list"))) > 3
    assert_screenshot(b)


def test_readme_screenshots():
    # the README shows one PNG of each page, each at most 200 KB (viewer.py --screenshot makes them so)
    from PIL import Image
    for name in ("rollouts", "eval", "entropy"):
        path = os.path.join(ROOT, "docs", f"viewer_{name}.png")
        assert os.path.getsize(path) <= 200_000, path
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width >= 800
            lo, hi = im.convert("L").getextrema()
            assert hi - lo > 100, path
