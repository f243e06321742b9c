"""viewer.py in a real browser: the pages are rendered by headless Chromium (Debian's chromium, run as
`chromium --headless --dump-dom` by viewer.chromium) and the checks read the DOM after the page's script ran: the
samples shown, their images, token colours, filtered views, pagination, curves, no console message (no JS error,
no request refused), no URL but data: ones, and a non-blank `--screenshot`. A filtered view is the page opened at
a URL fragment (rollouts.html#filter=wrong), as a link to it would open it. Pages come from synthetic dumps in
viewer.py's formats (tests/viewer_dumps.py) and from a tiny real run (data -> SFT -> GRPO -> eval). Hostile model
output must show as text and run nothing. Bad input stops with file:line. The README's screenshots are PNGs of at
most 200 KB."""
import base64
import io
import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from urllib.parse import urlencode

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

# -----------------------------------------------------------------------------
# the dumped DOM as a tree, and querySelectorAll for the selectors used here: tag, #id, .class, [attr] and
# [attr=value], :nth-child(n), :first-child, :last-child; descendant and child (>) combinators

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
PART = re.compile(r"([#.])([\w-]+)|\[([\w-]+)(?:=([^\]]+))?\]|:nth-child\((\d+)\)|:(first|last)-child")


class Node:
    def __init__(self, tag, attrs, parent):
        self.tag, self.attrs, self.parent, self.kids = tag, dict(attrs), parent, []  # kids: Nodes and strings

    def has_class(self, c):
        return c in (self.attrs.get("class") or "").split()

    @property
    def text(self):  # textContent, less the scripts' source
        return "".join(k if isinstance(k, str) else "" if k.tag == "script" else k.text for k in self.kids)

    def elements(self):
        return [k for k in self.kids if isinstance(k, Node)]

    def walk(self):
        for k in self.elements():
            yield k
            yield from k.walk()

    def select(self, selector):
        steps = parse(selector)
        return [n for n in self.walk() if matches(n, steps)]

    def one(self, selector):
        found = self.select(selector)
        assert found, f"nothing matches {selector}"
        return found[0]


def parse(selector):
    """-> [(combinator before it: ' ' or '>', tag or None, [PART matches])]"""
    steps, comb = [], " "
    for tok in selector.replace(">", " > ").split():
        if tok == ">":
            comb = ">"
            continue
        tag = re.match(r"[\w-]*", tok).group()
        parts = list(PART.finditer(tok, len(tag)))
        assert "".join(m.group() for m in parts) == tok[len(tag):], f"unsupported selector {tok}"
        steps.append((comb, tag or None, [m.groups() for m in parts]))
        comb = " "
    return steps


def matches(n, steps):
    *rest, (comb, tag, parts) = steps
    if n.tag is None or (tag and n.tag != tag):
        return False
    for kind, name, attr, value, nth, end in parts:
        sibs = n.parent.elements() if nth or end else None
        if ((kind == "#" and n.attrs.get("id") != name) or (kind == "." and not n.has_class(name))
                or (attr and (attr not in n.attrs or (value is not None and n.attrs[attr] != value.strip("\"'"))))
                or (nth and sibs.index(n) + 1 != int(nth)) or (end and sibs[0 if end == "first" else -1] is not n)):
            return False
    if not rest:
        return True
    p = n.parent
    while p is not None and not matches(p, rest):
        p = None if comb == ">" else p.parent
    return p is not None


class DOM(HTMLParser):
    def __init__(self, text):
        super().__init__()
        self.root = self.cur = Node(None, [], None)
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        n = Node(tag, attrs, self.cur)
        self.cur.kids.append(n)
        if tag not in VOID:
            self.cur = n

    def handle_startendtag(self, tag, attrs):
        self.cur.kids.append(Node(tag, attrs, self.cur))

    def handle_endtag(self, tag):
        n = self.cur
        while n.tag is not None and n.tag != tag:
            n = n.parent
        if n.tag is not None:
            self.cur = n.parent

    def handle_data(self, data):
        self.cur.kids.append(data)

# -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium(tmp_path_factory):
    path = viewer.find_chromium()
    if path is None:
        if CI:
            pytest.fail("no chromium in CI: .ci/run installs Debian's chromium when /usr/bin/chromium is missing")
        pytest.skip("no Chromium (/usr/bin/chromium): apt-get install -y chromium (.ci/run does it in CI)")
    probe = tmp_path_factory.mktemp("chromium") / "probe.html"
    probe.write_text("<!DOCTYPE html><p id=a></p><script>document.getElementById('a').textContent = 'ran'</script>")
    try:
        out, _ = viewer.chromium(str(probe), "--dump-dom")
    except viewer.ViewerError as e:
        if CI:
            raise
        pytest.skip(f"{path} cannot be started here: {e}")
    assert '<p id="a">ran</p>' in out, out[:500]
    return path


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("viewer_demo"))
    groups, a, b, report = viewer_dumps.write_all(d)
    return d, groups, a, b, report


def make(*args):
    """viewer.py's main -> the path it wrote."""
    out = [a.split("=", 1)[1] for a in args if a.startswith("--out=")]
    viewer.main(list(args))
    return out[0] if out else os.path.join(args[0], {"grpo": "rollouts.html", "eval": "responses.html",
                                                     "entropy": "entropy.html"}[viewer.detect(args[0])])


def dom(path, **view):
    """The page's DOM after its script ran, opened at the view given (its URL fragment: filter=wrong&step=5). No
    console message (a JS error, or a request the page's policy refused) and no URL but data: URIs."""
    out, console = viewer.chromium(path, "--dump-dom", fragment=urlencode(view))
    assert console == []
    d = DOM(out).root
    urls = [n.attrs[a] for n in d.walk() for a in ("src", "href") if n.attrs.get(a)]
    assert all(u.startswith("data:") for u in urls), [u[:80] for u in urls if not u.startswith("data:")]
    return d


def count(d, what=".sample"):
    return len(d.select("#list " + what))


def on(d, buttons_id):
    """The value of the button that is on in a row of buttons."""
    return d.one(f"#{buttons_id} button.on").attrs["data-v"]


def selected(d, select_id):
    return d.one(f"#{select_id} option[selected]").attrs["value"]


def image_widths(d):
    """The widths of the page's images, decoded from their data: URIs."""
    from PIL import Image
    widths = []
    for im in d.select("img"):
        with Image.open(io.BytesIO(base64.b64decode(im.attrs["src"].split(",", 1)[1]))) as x:
            widths.append(x.width)
    return widths


def colours(d, scope):
    """The background colours of the token spans under a selector, in order ("na": grey, no value)."""
    out = []
    for t in d.select(scope + " .tok"):
        m = re.search(r"background-color:\s*([^;]+)", t.attrs.get("style") or "")
        out.append(m.group(1).strip() if m else "na" if t.has_class("na") else "none")
    return out


def assert_safe(d):
    """Hostile strings were shown as text: nothing ran, no element was made from them."""
    assert all("data-pwned" not in n.attrs for n in d.walk())
    assert d.select("img[src=x]") == []
    assert [n.tag for r in d.select(".resp") for n in r.walk() if not n.has_class("tok")] == []
    assert [n.tag for q in d.select(".q") for n in q.walk()] == []
    assert viewer_dumps.HOSTILE in d.one("body").text


def assert_screenshot(png):
    """viewer.py --screenshot wrote a PNG of at most 200 KB that is not blank."""
    from PIL import Image
    assert os.path.getsize(png) <= 200_000
    with Image.open(png) as im:
        assert im.format == "PNG"
        im = im.convert("RGB")
    assert im.size[0] >= 320
    colors = im.getcolors(1 << 16)  # None: more colours than that
    assert colors is None or len(colors) > 16, "screenshot is (nearly) one colour"
    lo, hi = im.convert("L").getextrema()
    assert hi - lo > 100

# -----------------------------------------------------------------------------
# synthetic dumps in viewer.py's formats


def test_rollouts_page(chromium, demo, tmp_path):
    d, groups, *_ = demo
    png = str(tmp_path / "rollouts.png")
    path = make(os.path.join(d, "grpo"), f"--screenshot={png}")
    assert_screenshot(png)
    with open(path) as f:
        text = f.read()
    assert text.count("data:image/") == 25  # 25 prompts' images, each once though step 10 reuses 4 of them
    # one file: the script and the style inline
    assert viewer.asset("viewer.js") in text and viewer.asset("viewer.css") in text
    assert "<link" not in text and "<script src" not in text
    p = dom(path)
    at10 = [g for g in groups if g["step"] == 10]
    samples10 = [s for g in at10 for s in g["samples"]]
    # the last dumped step is shown first: 4 groups side by side, 16 samples, each group's image
    assert selected(p, "step") == "10" and on(p, "filter") == "all"
    assert count(p) == 16 and count(p, ".group") == 4
    assert p.one("#count").text == "4 groups, 16 samples at step 10"
    widths = image_widths(p)
    assert len(widths) == 4 and min(widths) == 64
    # tokens coloured by entropy; the pieces spell the response; critical tokens marked
    c = colours(p, "#list .group:nth-child(1) .sample:nth-child(1)")
    assert len(c) == len(at10[0]["samples"][0]["pieces"]) and len(set(c)) > 5
    assert p.one("#list .resp").text == \
        at10[0]["samples"][0]["response"] + "\u2205"  # the empty end-of-turn piece is shown as a mark
    assert count(p, ".tok.crit") == sum(len(s["critical"]) for s in samples10) > 0
    assert_safe(p)
    # filters: the page opened at rollouts.html#filter=wrong etc.; the controls show the view
    wrong = sum(s["accuracy"] != 1 for s in samples10)
    p = dom(path, filter="wrong")
    assert on(p, "filter") == "wrong"
    assert count(p) == wrong and all(s.has_class("wrong") for s in p.select("#list .sample"))
    p = dom(path, filter="truncated")
    assert count(p) == 1 and count(p, ".group") == 1
    assert count(dom(path, filter="correct")) == len(samples10) - wrong
    p = dom(path, groups="equal")  # the all-correct group: every advantage is 0
    assert on(p, "groups") == "equal" and count(p, ".group") == 1 and count(p) == 4
    p = dom(path, groups="varied")
    assert count(p, ".group") == 3 and count(p) == 12
    p = dom(path, domain=at10[2]["domain"])
    assert selected(p, "domain") == at10[2]["domain"]
    assert count(p, ".group") == sum(g["domain"] == at10[2]["domain"] for g in at10)
    # colour modes: train - rollout log-prob is grey where train_logp is null (group 4), coloured elsewhere
    p = dom(path, mode="dlogp")
    assert "checked" in p.one("input[name=mode][value=dlogp]").attrs
    assert {t.has_class("na") for t in p.select("#list .group:nth-child(4) .tok")} == {True}
    assert len(set(colours(p, "#list .group:nth-child(2) .sample:nth-child(1)"))) > 3
    p = dom(path, mode="advlogp")  # green where A > 0, red where A < 0
    assert all("26, 152, 80" in x for x in colours(p, "#list .group:nth-child(2) .sample:nth-child(1)"))
    assert all("215, 48, 39" in x for x in colours(p, "#list .group:nth-child(2) .sample:nth-child(2)"))
    # another step, paginated: 25 groups -> 20 on the first page, 5 on the second
    p = dom(path, step=5)
    assert selected(p, "step") == "5" and count(p, ".group") == 20 and count(p) == 80
    assert p.one("#count").text == "25 groups, 100 samples at step 5"
    p = dom(path, step=5, page=2)
    assert p.one("#page").text.strip() == "page 2/2"
    assert count(p, ".group") == 5 and count(p) == 20 and min(image_widths(p)) == 64
    # a view the page does not offer is the first view
    p = dom(path, step=7, filter="bogus", mode="none", page=9, constructor=1)
    assert selected(p, "step") == "10" and on(p, "filter") == "all" and count(p) == 16
    # the run curves: every key is in log.jsonl; a path with one point a step (critical_entropy: a gap at step 4)
    curves = [(s.attrs["data-key"], "".join(re.findall("[ML]", s.one("path.line").attrs["d"])))
              for s in p.select("#curves svg.plot")]
    assert [k for k, _ in curves] == CURVE_KEYS
    paths = dict(curves)
    assert paths["reward"] == "M" + "L" * 11 and paths["val_accuracy"] == "MLL"
    assert paths["critical_entropy"] == "MLL" + "M" + "L" * 7
    assert p.select("#curves-missing") == []
    assert viewer.read_log(os.path.join(d, "grpo", "log.jsonl"))[3]["reward"] > 0  # step 3's second record won


def test_eval_page_and_compare(chromium, demo, tmp_path):
    d, _, a, bb, _ = demo
    path = make(os.path.join(d, "eval_grpo"), f"--screenshot={tmp_path / 'eval.png'}")
    assert_screenshot(tmp_path / "eval.png")
    p = dom(path)
    assert count(p, ".item") == 20 and p.one("#count").text == "30 of 30 items"
    assert len(image_widths(p)) == 20 and min(image_widths(p)) == 64
    assert len(set(colours(p, "#list .item:nth-child(2)"))) > 5
    assert len(p.select("table.by_domain tr")) == 1 + 6
    assert len(p.select("table.by_difficulty tr")) == 1 + 2
    assert_safe(p)
    wrong = sum(r["correct"] != 1 for r in a)
    p = dom(path, filter="wrong")
    assert count(p, ".item") == min(20, wrong) and count(p, ".sample.correct") == 0
    assert p.one("#count").text == f"{wrong} of 30 items"
    assert count(dom(path, filter="truncated"), ".item") == 1
    p = dom(path, filter="wrong", difficulty="hard")
    assert selected(p, "difficulty") == "hard"
    assert p.one("#count").text == f"{sum(r['correct'] != 1 and r['difficulty'] == 'hard' for r in a)} of 30 items"
    # two runs: the flipped items, side by side
    out = os.path.join(d, "compare.html")
    path = make(os.path.join(d, "eval_grpo"), f"--compare={os.path.join(d, 'eval_sft')}", f"--out={out}",
                f"--screenshot={tmp_path / 'compare.png'}")
    assert_screenshot(tmp_path / "compare.png")
    p = dom(path)
    a_only = sum(x["correct"] == 1 and y["correct"] != 1 for x, y in zip(a, bb))
    b_only = sum(x["correct"] != 1 and y["correct"] == 1 for x, y in zip(a, bb))
    assert a_only > 0 and b_only > 0
    assert on(p, "flip") == "any"
    assert count(p, ".item") == min(20, a_only + b_only) and count(p, ".pair") == count(p, ".item")
    assert count(p, ".pair > .sample") == 2 * count(p, ".item")
    p = dom(path, flip="b")
    assert count(p, ".item") == b_only
    assert all(x.elements()[0].has_class("wrong") and x.elements()[1].has_class("correct")
               for x in p.select("#list .pair"))
    p = dom(path, flip="all")
    assert p.one("#count").text == "30 of 30 items"
    assert p.one("table.by_domain tr").text == "domaineval_grpoeval_sft\u0394n"


def test_entropy_page(chromium, demo, tmp_path):
    d, *_, report = demo
    p = dom(make(os.path.join(d, "entropy"), f"--screenshot={tmp_path / 'entropy.png'}"))
    assert_screenshot(tmp_path / "entropy.png")
    rows, sel = report["rows"], report["selection"]
    assert len(p.select("table.ckpts tr")) == 1 + len(rows)
    assert [t.text for t in p.select("table.ckpts tr.selected td")][1] == str(sel["step"])
    # the plot is drawn from the numbers: a path of 12 points for each of entropy and accuracy; the scatter
    assert [int(x.attrs["data-n"]) for x in p.select("#plots svg:first-child path.line")] == [12, 12]
    assert len(p.select("#plots svg:last-child circle")) == 12
    assert len(p.select("#plots svg:first-child .cursor")) == 1  # the selection
    text = p.one("body").text
    assert f"{report['correlation']['critical_entropy']['pearson']:.4f}" in text and sel["reason"] in text


def test_log_only_run_and_absent_curves(chromium, tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "log.jsonl").write_text("".join(json.dumps({"step": s, "reward": 0.1 * s, "accuracy": 0.05 * s}) + "\n"
                                         for s in range(1, 6)))
    p = dom(make(str(d)))
    assert [s.attrs["data-key"] for s in p.select("#curves svg.plot")] == ["reward", "accuracy"]
    missing = p.one("#curves-missing").text
    assert all(k in missing for k in CURVE_KEYS[2:])
    assert "no rollouts.jsonl" in p.one("body").text


def test_screenshot_without_chromium(tmp_path, monkeypatch):
    (tmp_path / "log.jsonl").write_text('{"step": 1, "reward": 0.5}\n')
    monkeypatch.setattr(viewer, "find_chromium", lambda: None)
    with pytest.raises(SystemExit) as e:
        viewer.main([str(tmp_path), f"--screenshot={tmp_path / 'x.png'}"])
    assert str(e.value.code).startswith("viewer.py: error: no chromium found")
    assert (tmp_path / "rollouts.html").is_file() and not (tmp_path / "x.png").exists()

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
    run("eval.py", [f"--init_from={d}/grpo/hf", f"--data={synth}/test.jsonl", f"--out_dir={d}/eval",
                    "--max_new_tokens=32"])
    return d


def test_real_run_pages(chromium, real, tmp_path):
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
    path = make(f"{real}/grpo", f"--screenshot={tmp_path / 'rollouts.png'}")
    assert_screenshot(tmp_path / "rollouts.png")
    for step in sorted({g["step"] for g in dump}):
        p = dom(path, step=step)
        at = [g for g in dump if g["step"] == step][:20]
        assert count(p) == sum(len(g["samples"]) for g in at) and count(p, ".group") == len(at)
        assert len(image_widths(p)) == sum(len(g["images"]) for g in at) and min(image_widths(p)) > 0
        assert len(set(colours(p, "#list"))) > 3
    log = viewer.read_log(f"{real}/grpo/log.jsonl")
    present = [k for k in CURVE_KEYS if any(isinstance(r.get(k), (int, float)) for r in log)]
    assert {"reward", "accuracy", "entropy", "val_accuracy"} <= set(present)
    assert [s.attrs["data-key"] for s in p.select("#curves svg.plot")] == present
    assert all(int(x.attrs["data-n"]) >= 1 for x in p.select("#curves path.line"))
    with open(f"{real}/eval/responses.jsonl") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    assert not RESPONSE_KEYS - set(rows[0]), f"responses.jsonl lacks {sorted(RESPONSE_KEYS - set(rows[0]))}"
    p = dom(make(f"{real}/eval", f"--screenshot={tmp_path / 'eval.png'}"))
    assert_screenshot(tmp_path / "eval.png")
    assert count(p, ".item") == min(20, len(rows)) and min(image_widths(p)) > 0
    assert len(set(colours(p, "#list"))) > 3


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
