"""
See what RL is doing: one self-contained HTML page per run directory (issue 13). Images are inlined, and so are
the CSS and JS (tools/viewer.css and tools/viewer.js, read when a page is built); nothing is fetched: the page
opens from disk, without a server.

    python tools/viewer.py out/grpo                              # GRPO out_dir -> out/grpo/rollouts.html
    python tools/viewer.py out/eval_grpo                         # eval.py out_dir -> out/eval_grpo/responses.html
    python tools/viewer.py out/eval_grpo --compare=out/eval_sft  # + the items that flipped between the two runs
    python tools/viewer.py out/entropy                           # entropy.py out_dir -> out/entropy/entropy.html
    python tools/viewer.py out/grpo --screenshot=docs/viewer_rollouts.png   # also a PNG of the page (chromium)

The kind of directory is told by its files (their formats are at the end of this docstring):
  entropy.json                          -> entropy.html: the checkpoint table, critical-token entropy and accuracy
                                           against step, the correlation and the selection
  responses.jsonl + summary.json        -> responses.html: each item's image, question, response (tokens coloured
                                           by entropy), prediction, answer; the domain / subject / difficulty tables
  log.jsonl and/or rollouts.jsonl       -> rollouts.html: the run curves; per step, each dumped prompt with its
                                           group of samples side by side, tokens coloured by entropy, advantage x
                                           log-prob or train - rollout log-prob; filters
The data goes into the page as one JSON block (each distinct image once, as a data: URI) and the page's script
renders one step / 20 groups (or items) at a time, so thousands of samples stay fast. Model output is untrusted:
it reaches the page only as text (textContent, never innerHTML) and the JSON block is escaped so that no string
can end it. Bad input (a missing directory, no known files, a malformed line) stops with "file:line: what".
The first view can come from the URL's fragment, e.g. rollouts.html#step=5&filter=wrong&page=2 (the keys: step,
mode, filter, groups, domain, page; eval: filter, flip, domain, subject, difficulty, page).
--screenshot runs `chromium --headless --screenshot` (Debian's chromium) and writes a PNG of at most 200 KB;
tests/test_viewer.py reads the rendered pages with `chromium --headless --dump-dom` (both through chromium()).

The formats (grpo.py and eval.py write them; every key is read here):
  log.jsonl (grpo.py)        one JSON object per line, merged by "step" (the last record of a step wins): reward,
                             accuracy, format, resp_len, truncated, clip_frac, approx_kl, gnorm, loss, lr, entropy,
                             critical_entropy (null if none), high_entropy_share, all_correct, all_wrong,
                             groups_kept, logp_mismatch, t_rollout, t_update, t_step; validation: {step, val_accuracy}
  rollouts.jsonl (grpo.py)   one line per dumped prompt group: step, prompt_index, id, question, images (absolute
                             paths), answer, options (null or a list), domain, difficulty, samples: a list of
                             {response, pieces (each token's text, the stop token's included), tokens, logp (the
                             sampler's), entropy, train_logp (the trainer's, or null), advantage, reward, accuracy,
                             format, pred, n_tokens, finish_reason ("eos" | "length"), critical (token indices)}
  responses.jsonl (eval.py)  one line per (item, run): id, run, question, images, options, response, tokens, pieces,
                             entropies, pred, answer, correct, format, reward, n_tokens, truncated, domain, subject,
                             difficulty, mean_entropy; summary.json: accuracy, format, mean_tokens, by_<key> and
                             n_by_<key> for domain / subject / difficulty
  entropy.json (entropy.py)  rows (one per checkpoint: ckpt, step, accuracy, accuracy_std, critical_entropy,
                             critical_count, mean_entropy, high_entropy_share, ...), correlation, selection
"""
import argparse
import base64
import hashlib
import html
import io
import json
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile


class ViewerError(Exception):
    pass


def warn(msg):
    print(f"viewer.py: warning: {msg}", file=sys.stderr)

# -----------------------------------------------------------------------------
# reading the dumps


def read_jsonl(path):
    """-> [(line number, dict)]. Blank lines are skipped; a malformed line is an error naming path:line, except an
    unterminated last line (a run still writing it), which is skipped with a warning."""
    with open(path, "rb") as f:
        raw = f.read()
    lines = raw.split(b"\n")
    out = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if lineno == len(lines) and not raw.endswith(b"\n"):
                warn(f"{path}:{lineno}: incomplete last line (still being written?): skipped")
                continue
            if isinstance(e, UnicodeDecodeError):
                raise ViewerError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            raise ViewerError(f"{path}:{lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(rec, dict):
            raise ViewerError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        out.append((lineno, rec))
    return out


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ViewerError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise ViewerError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not isinstance(d, dict):
        raise ViewerError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def clean(x, digits=6):
    """JSON-safe and smaller: NaN/inf -> None (JSON.parse rejects them), floats to `digits` significant digits."""
    if isinstance(x, float):
        return float(f"{x:.{digits}g}") if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: clean(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v, digits) for v in x]
    return x


def _floats(where, s, key, n, nd=3):
    """A per-token list of numbers (or None) of length n."""
    v = s.get(key)
    if v is None:
        return None
    if not isinstance(v, list) or len(v) != n:
        got = f"{len(v)} values" if isinstance(v, list) else type(v).__name__
        raise ViewerError(f"{where}: '{key}' must be a list with one number per piece ({n}), got {got}")
    try:
        return [round(float(x), nd) if x is not None and math.isfinite(float(x)) else None for x in v]
    except (TypeError, ValueError):
        raise ViewerError(f"{where}: '{key}' holds a non-number") from None


def _pieces(where, r, text_key):
    """The token pieces of a response; without them, the response as one piece (shown uncoloured)."""
    pieces = r.get("pieces")
    if pieces is None:
        return [str(r.get(text_key) or "")], False
    if not isinstance(pieces, list) or not all(isinstance(p, str) for p in pieces):
        raise ViewerError(f"{where}: 'pieces' must be a list of strings")
    return pieces, True


class Images:
    """Image files -> data: URIs, each distinct image (by content) once; the page refers to them by index.
    Images larger than max_side pixels are downscaled (benchmark photos would make the page huge)."""

    def __init__(self, max_side=512):
        self.max_side, self.items, self.by_path, self.by_hash = max_side, [], {}, {}

    def add(self, path, where, base):
        full = path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))
        if full in self.by_path:
            return self.by_path[full]
        try:
            with open(full, "rb") as f:
                data = f.read()
        except OSError as e:
            warn(f"{where}: image {path}: {e.strerror}: shown as missing")
            self.items.append({"path": path, "src": None})
            self.by_path[full] = len(self.items) - 1
            return self.by_path[full]
        h = hashlib.sha1(data).hexdigest()
        if h not in self.by_hash:
            src, width = self._uri(data, full, where)
            self.items.append({"path": path, "src": src, "width": width})
            self.by_hash[h] = len(self.items) - 1
        self.by_path[full] = self.by_hash[h]
        return self.by_hash[h]

    def _uri(self, data, full, where):
        from PIL import Image
        try:
            im = Image.open(io.BytesIO(data))
            fmt, size = im.format, im.size
            if max(size) > self.max_side or fmt not in ("PNG", "JPEG", "GIF", "WEBP"):
                im.thumbnail((self.max_side, self.max_side))
                buf = io.BytesIO()
                if im.mode in ("RGBA", "LA", "P"):
                    im.save(buf, "PNG", optimize=True)
                    fmt = "PNG"
                else:
                    im.convert("RGB").save(buf, "JPEG", quality=85)
                    fmt = "JPEG"
                data = buf.getvalue()
        except Exception as e:
            warn(f"{where}: image {full}: cannot read it ({type(e).__name__}: {e}): shown as missing")
            return None, None
        return f"data:image/{fmt.lower()};base64," + base64.b64encode(data).decode(), im.size[0]


def read_log(path):
    """log.jsonl -> one record per step (records of a step merged, the last value wins), sorted by step."""
    by_step = {}
    for lineno, r in read_jsonl(path):
        if not isinstance(r.get("step"), (int, float)):
            raise ViewerError(f"{path}:{lineno}: record without a numeric 'step'")
        by_step.setdefault(r["step"], {}).update(r)
    return [clean({k: v for k, v in by_step[s].items() if v is None or isinstance(v, (int, float))})
            for s in sorted(by_step)]


def read_rollouts(path, images):
    """rollouts.jsonl (one line per dumped prompt group) -> groups for the page."""
    groups, base = [], os.path.dirname(os.path.abspath(path))
    for lineno, r in read_jsonl(path):
        where = f"{path}:{lineno}"
        if not isinstance(r.get("samples"), list):
            hint = (" (one line per sample: the dump format before session 4; rerun with the current grpo.py)"
                    if "response" in r else "")
            raise ViewerError(f"{where}: no 'samples' list{hint}")
        if not isinstance(r.get("step"), int):
            raise ViewerError(f"{where}: 'step' must be an integer")
        samples = []
        for j, s in enumerate(r["samples"]):
            w = f"{where}: sample {j}"
            if not isinstance(s, dict):
                raise ViewerError(f"{w}: expected a JSON object")
            pieces, has = _pieces(w, s, "response")
            n = len(pieces)
            logp = _floats(w, s, "logp", n, 4) if has else None
            dlogp = None
            if logp is not None and _floats(w, s, "train_logp", n) is not None:
                # from the unrounded values: the difference can be ~1e-6 (fp32), a few significant digits kept
                dlogp = [None if a is None or b is None or not math.isfinite(a - b) else float(f"{a - b:.3g}")
                         for a, b in zip(s["train_logp"], s["logp"])]
            crit = s.get("critical") or []
            if not (isinstance(crit, list) and all(isinstance(i, int) for i in crit)):
                raise ViewerError(f"{w}: 'critical' must be a list of token indices")
            samples.append({
                "pieces": pieces, "tokenized": has, "entropy": _floats(w, s, "entropy", n) if has else None,
                "logp": logp, "dlogp": dlogp, "critical": crit,
                **{k: clean(s.get(k)) for k in ("advantage", "reward", "accuracy", "format", "pred",
                                                  "finish_reason")},
                "n_tokens": clean(s.get("n_tokens", n if has else None))})
        groups.append({  # (the per-token lists are rounded already, to what each needs)
            **{k: clean(r.get(k)) for k in ("prompt_index", "id", "answer", "options", "domain", "difficulty")},
            "step": r["step"], "question": str(r.get("question") or ""),
            "images": [images.add(p, where, base) for p in r.get("images") or []], "samples": samples})
    return groups


def read_responses(path, images):
    """eval.py's responses.jsonl -> items for the page."""
    items, base = [], os.path.dirname(os.path.abspath(path))
    for lineno, r in read_jsonl(path):
        where = f"{path}:{lineno}"
        if "id" not in r or ("response" not in r and "pieces" not in r):
            raise ViewerError(f"{where}: a response line needs 'id' and 'response' (or 'pieces')")
        pieces, has = _pieces(where, r, "response")
        items.append({
            **{k: clean(r.get(k)) for k in ("options", "pred", "answer", "correct", "format", "reward",
                                              "n_tokens", "truncated", "domain", "subject", "difficulty",
                                              "mean_entropy")},
            "id": str(r["id"]), "run": clean(r.get("run", 0)), "question": str(r.get("question") or ""),
            "pieces": pieces, "tokenized": has,
            "entropy": _floats(where, r, "entropies", len(pieces)) if has else None,
            "images": [images.add(p, where, base) for p in r.get("images") or []]})
    if not items:
        raise ViewerError(f"{path}: no responses (empty file)")
    return items


def eval_files(d):
    for name in ("responses.jsonl", "responses_rescored.jsonl"):
        if os.path.isfile(os.path.join(d, name)) and os.path.isfile(os.path.join(d, "summary.json")):
            return os.path.join(d, name), os.path.join(d, "summary.json")
    return None


def detect(d):
    """-> 'entropy' | 'eval' | 'grpo' from the files in d."""
    if not os.path.isdir(d):
        raise ViewerError(f"{d}: no such directory" if not os.path.exists(d) else f"{d}: not a directory")
    if os.path.isfile(os.path.join(d, "entropy.json")):
        return "entropy"
    if eval_files(d):
        return "eval"
    if any(os.path.isfile(os.path.join(d, f)) for f in ("log.jsonl", "rollouts.jsonl")):
        return "grpo"
    raise ViewerError(f"{d}: none of the files viewer.py reads: log.jsonl / rollouts.jsonl (a grpo.py out_dir), "
                      f"responses.jsonl + summary.json (an eval.py out_dir) or entropy.json (an entropy.py out_dir)")


def build(run_dir, compare="", max_image=512):
    """-> (kind, data for the page, default output file name)."""
    kind = detect(run_dir)
    images = Images(max_image)
    title = os.path.basename(os.path.normpath(os.path.abspath(run_dir)))
    data = {"kind": kind, "title": title, "source": os.path.abspath(run_dir), "images": images.items}
    if compare and kind != "eval":
        raise ViewerError(f"--compare is for eval directories; {run_dir} is a {kind} directory")
    if kind == "grpo":
        log, roll = os.path.join(run_dir, "log.jsonl"), os.path.join(run_dir, "rollouts.jsonl")
        data["log"] = read_log(log) if os.path.isfile(log) else None
        data["groups"] = read_rollouts(roll, images) if os.path.isfile(roll) else None
        return kind, data, "rollouts.html"
    if kind == "eval":
        resp, summ = eval_files(run_dir)
        data.update(items=read_responses(resp, images), summary=clean(read_json(summ)))
        if compare:
            files = eval_files(compare) if os.path.isdir(compare) else None
            if not files:
                raise ViewerError(f"--compare={compare}: not an eval directory (needs responses.jsonl + summary.json)")
            data["compare"] = {"title": os.path.basename(os.path.normpath(os.path.abspath(compare))),
                               "source": os.path.abspath(compare), "items": read_responses(files[0], images),
                               "summary": clean(read_json(files[1]))}
        return kind, data, "responses.html"
    report = read_json(os.path.join(run_dir, "entropy.json"))
    if not isinstance(report.get("rows"), list) or not all(isinstance(r, dict) for r in report["rows"]):
        raise ViewerError(f"{os.path.join(run_dir, 'entropy.json')}: 'rows' must be a list of objects")
    data["report"] = clean(report)
    return kind, data, "entropy.html"


def asset(name):
    """viewer.css or viewer.js (beside this file), to be inlined: the page stays one file that opens from disk."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), name), encoding="utf-8") as f:
        text = f.read()
    end = "</style" if name.endswith(".css") else "</script"
    if end in text.lower():  # it would end the inline element early
        raise ViewerError(f"{name} holds '{end}': it cannot be inlined")
    return text


def page(data):
    """The HTML: the data as a JSON block that no string can end (<, >, & escaped), the script (viewer.js) renders
    it. The Content-Security-Policy allows nothing but the page's own inline script and style and data: images."""
    blob = json.dumps(data, separators=(",", ":"), allow_nan=False)
    blob = blob.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    title = html.escape(f"nanoR1V {data['kind']}: {data['title']}")
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>\n'
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f'<style>\n{asset("viewer.css")}</style></head>\n'
            f'<body><div id="app"></div>\n<script type="application/json" id="data">{blob}</script>\n'
            f'<script>\n{asset("viewer.js")}</script></body></html>\n')

# -----------------------------------------------------------------------------
# headless Chromium, one process a page: --screenshot here, --dump-dom in tests/test_viewer.py

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars",
                  "--virtual-time-budget=5000",  # the page's script has run (and its images loaded) before the
                                                 # picture or the DOM is taken; virtual time: no real wait
                  "--run-all-compositor-stages-before-draw",  # without it, parts of a screenshot can be left blank
                  "--enable-logging=stderr", "--v=0"]  # the page's console messages, script errors among them
CONSOLE = re.compile(r':CONSOLE\S*\] "(.*?)", source: ', re.S)


def find_chromium():
    for c in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
              shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def chromium(html_path, *flags, fragment="", size=(1280, 1000), timeout=60):
    """Runs headless Chromium once on a page, in a fresh profile: flags say what it does (--screenshot=PNG,
    --dump-dom), fragment is the page's first view ("filter=wrong": the URL's #...). -> (its stdout, the page's
    console messages). The page writes none: a message is a script error or a request its CSP refused."""
    binary = find_chromium()
    if not binary:
        raise ViewerError("no chromium found (Debian: apt-get install -y chromium; or set CHROMIUM=path)")
    url = pathlib.Path(os.path.abspath(html_path)).as_uri() + (f"#{fragment}" if fragment else "")
    with tempfile.TemporaryDirectory(prefix="viewer-chromium-", ignore_cleanup_errors=True) as profile:
        cmd = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
               *flags, url]
        # a session of its own: on a timeout its helper processes (which hold the pipes open) are killed too
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.communicate()
            raise ViewerError(f"chromium: no result in {timeout} s for {url}") from None
    err = err.decode(errors="replace")
    if p.returncode:
        raise ViewerError(f"chromium exited with code {p.returncode}: {' | '.join(err.strip().splitlines()[-3:])}")
    return out.decode(errors="replace"), CONSOLE.findall(err)


def small_png(png, max_bytes=200_000):
    """A screenshot cut a little below the page's end (a page shorter than the window leaves empty rows), as a
    palette PNG (text pages need few colours), scaled down until it is at most max_bytes."""
    from PIL import Image, ImageChops
    im = Image.open(io.BytesIO(png)).convert("RGB")
    box = ImageChops.difference(im, Image.new("RGB", im.size, im.getpixel((0, im.height - 1)))).getbbox()
    if box:
        im = im.crop((0, 0, im.width, min(im.height, box[3] + 8)))
    scale = 1.0
    while True:
        w, h = int(im.width * scale), int(im.height * scale)
        small = im if scale == 1.0 else im.resize((w, h), Image.LANCZOS)
        buf = io.BytesIO()
        small.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(buf, "PNG", optimize=True)
        if buf.tell() <= max_bytes or w < 320:
            return buf.getvalue()
        scale *= 0.85


def screenshot(html_path, png_path, width=1280, height=1400):
    """A PNG of the page's top width x height CSS pixels, at most 200 KB."""
    with tempfile.TemporaryDirectory(prefix="viewer-shot-") as tmp:
        raw = os.path.join(tmp, "page.png")
        _, console = chromium(html_path, f"--screenshot={raw}", size=(width, height))
        if console:
            raise ViewerError(f"{html_path}: the page failed (its console: {console[0]})")
        if not os.path.isfile(raw):
            raise ViewerError(f"chromium wrote no screenshot of {html_path}")
        with open(raw, "rb") as f:
            png = small_png(f.read())
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    with open(png_path, "wb") as f:
        f.write(png)

# -----------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(prog="viewer.py", description="One self-contained HTML page for a run directory.")
    ap.add_argument("run_dir", help="a grpo.py, eval.py or entropy.py out_dir")
    ap.add_argument("--compare", default="", help="eval: a second eval out_dir; shows the items that flipped")
    ap.add_argument("--out", default="", help="the HTML file (default: RUN_DIR/{rollouts,responses,entropy}.html)")
    ap.add_argument("--screenshot", default="", help="also write a PNG of the page (<= 200 KB; needs chromium)")
    ap.add_argument("--max_image", type=int, default=512, help="images larger than this many pixels are downscaled")
    args = ap.parse_args(argv)
    try:
        kind, data, name = build(args.run_dir, args.compare, args.max_image)
        out = args.out or os.path.join(args.run_dir, name)
        with open(out, "w", encoding="utf-8") as f:
            f.write(page(data))
        print(out)
        if args.screenshot:
            screenshot(out, args.screenshot)
            print(args.screenshot)
    except (ViewerError, OSError) as e:
        sys.exit(f"viewer.py: error: {e}")


if __name__ == "__main__":
    main()
