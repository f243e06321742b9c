"""
See what RL is doing: one self-contained HTML page per run directory (issue 13). Images are inlined, CSS and JS
are inline, nothing is fetched: the page opens from disk, without a server.

    python viewer.py out/grpo                                # GRPO out_dir -> out/grpo/rollouts.html
    python viewer.py out/eval_grpo                           # eval.py out_dir -> out/eval_grpo/responses.html
    python viewer.py out/eval_grpo --compare=out/eval_sft    # + the items that flipped between the two runs
    python viewer.py out/entropy                             # entropy.py out_dir -> out/entropy/entropy.html
    python viewer.py out/grpo --screenshot=docs/viewer_rollouts.png   # also a PNG of the page (headless Chromium)

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
--screenshot drives Debian's chromium over the DevTools protocol on a pipe (class Chromium; stdlib only, also used
by tests/test_viewer.py) and writes a PNG of at most 200 KB.

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
import fcntl
import hashlib
import html
import io
import json
import math
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time


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


def page(data):
    """The HTML: the data as a JSON block that no string can end (<, >, & escaped), the script renders it. The
    Content-Security-Policy allows nothing but the page's own inline script and style and data: images."""
    blob = json.dumps(data, separators=(",", ":"), allow_nan=False)
    blob = blob.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    title = html.escape(f"nanoR1V {data['kind']}: {data['title']}")
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>\n'
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<style>{CSS}</style></head>\n'
            f'<body><div id="app"></div>\n<script type="application/json" id="data">{blob}</script>\n'
            f'<script>{JS}</script></body></html>\n')

# -----------------------------------------------------------------------------
# headless Chromium over the DevTools protocol (for --screenshot and tests/test_viewer.py)

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-extensions", "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio",
                  "--no-default-browser-check", "--remote-debugging-pipe"]


def find_chromium():
    for c in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
              shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


class Chromium:
    """One headless Chromium; --remote-debugging-pipe: JSON messages ending in NUL, commands on the child's fd 3,
    replies and events on its fd 4. open() loads a page in a fresh tab; eval() runs JS there and returns the value."""

    def __init__(self, binary=None, timeout=30.0):
        binary = binary or find_chromium()
        if not binary:
            raise ViewerError("no chromium found (Debian: apt-get install -y chromium; or set CHROMIUM=path)")
        self.timeout, self.events, self._id, self._buf, self.session = timeout, [], 0, bytearray(), None
        self.profile = tempfile.mkdtemp(prefix="viewer-chromium-")
        self.stderr = tempfile.TemporaryFile()
        cmd_r, self._w = os.pipe()
        self._r, out_w = os.pipe()
        hi_r, hi_w = fcntl.fcntl(cmd_r, fcntl.F_DUPFD_CLOEXEC, 10), fcntl.fcntl(out_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(cmd_r)
        os.close(out_w)

        def pipes():  # in the child, before exec: fd 3 and 4 are the pipe ends (dup2 makes them inheritable)
            os.dup2(hi_r, 3)
            os.dup2(hi_w, 4)
        self.proc = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.stderr,
                                     preexec_fn=pipes, close_fds=False)  # our other fds are all close-on-exec
        os.close(hi_r)
        os.close(hi_w)
        try:
            self.send("Target.getTargets")  # waits until the browser answers
        except ViewerError:
            self._cleanup()
            raise

    def _read(self, deadline):
        while b"\0" not in self._buf:
            left = deadline - time.time()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise ViewerError(f"chromium: no answer in {self.timeout:.0f} s{self._tail()}")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise self._exited()
            self._buf += chunk
        i = self._buf.index(b"\0")
        msg = json.loads(bytes(self._buf[:i]))
        del self._buf[:i + 1]
        return msg

    def _exited(self):
        try:
            code = self.proc.wait(5)
        except subprocess.TimeoutExpired:
            code = "still running"
        return ViewerError(f"chromium exited (code {code}){self._tail()}")

    def _tail(self):
        self.stderr.seek(0)
        tail = self.stderr.read().decode(errors="replace").strip().splitlines()[-5:]
        return (": " + " | ".join(tail)) if tail else ""

    def send(self, method, params=None, session=True):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        data = json.dumps(msg).encode() + b"\0"
        try:
            while data:
                data = data[os.write(self._w, data):]
        except OSError:  # a broken pipe: it has exited
            raise self._exited() from None
        deadline = time.time() + self.timeout
        while True:
            m = self._read(deadline)
            if m.get("id") == self._id:
                if "error" in m:
                    raise ViewerError(f"chromium: {method}: {m['error'].get('message')}")
                return m.get("result", {})
            self.events.append(m)

    def wait_event(self, method):
        deadline = time.time() + self.timeout
        while True:
            for i, m in enumerate(self.events):
                if m.get("method") == method:
                    return self.events.pop(i)
            self.events.append(self._read(deadline))

    def open(self, path, width=1280, height=900):
        """Loads a file (or URL) in a new tab of width x height CSS pixels; returns when its load event fired."""
        if self.session:
            self.send("Target.closeTarget", {"targetId": self.target}, session=False)
        self.target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": self.target, "flatten": True},
                                 session=False)["sessionId"]
        for domain in ("Page", "Runtime", "Network"):
            self.send(f"{domain}.enable")
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        self.events.clear()
        url = path if "://" in path else "file://" + os.path.abspath(path)
        self.send("Page.navigate", {"url": url})
        self.wait_event("Page.loadEventFired")

    def eval(self, expr):
        """Runs a JS expression in the page (promises awaited) -> its JSON value; a thrown error is raised."""
        r = self.send("Runtime.evaluate", {"expression": expr, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            raise ViewerError(f"chromium: JS error: {d.get('exception', {}).get('description') or d.get('text')}")
        return r["result"].get("value")

    def requests(self):
        """URLs the page asked for since it was opened (Network events)."""
        return [m["params"]["request"]["url"] for m in self.events if m.get("method") == "Network.requestWillBeSent"]

    def errors(self):
        """Uncaught JS exceptions and console errors since the page was opened."""
        out = [m["params"]["exceptionDetails"].get("exception", {}).get("description", "exception")
               for m in self.events if m.get("method") == "Runtime.exceptionThrown"]
        return out + [" ".join(str(a.get("value", a.get("description", ""))) for a in m["params"]["args"])
                      for m in self.events if m.get("method") == "Runtime.consoleAPICalled"
                      and m["params"]["type"] == "error"]

    def screenshot(self):
        """-> PNG bytes of the viewport, cut at the end of the page if it ends before."""
        w, h, bottom = self.eval("[innerWidth, innerHeight, Math.ceil(document.body.getBoundingClientRect().bottom)]")
        h = min(h, bottom + 8)
        clip = {"x": 0, "y": 0, "width": w, "height": h, "scale": 1}
        return base64.b64decode(self.send("Page.captureScreenshot", {"format": "png", "clip": clip})["data"])

    def close(self):
        try:
            self.send("Browser.close", session=False)
            self.proc.wait(10)
        except Exception:
            pass
        self._cleanup()

    def _cleanup(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for fd in (self._r, self._w):
            os.close(fd)
        self.stderr.close()
        shutil.rmtree(self.profile, ignore_errors=True)


def small_png(png, max_bytes=200_000):
    """A screenshot as a palette PNG (text pages need few colours), scaled down until it is at most max_bytes."""
    from PIL import Image
    im = Image.open(io.BytesIO(png)).convert("RGB")
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
    b = Chromium()
    try:
        b.open(html_path, width, height)
        b.eval("Promise.all([...document.images].map(i => i.decode().catch(() => null)))")
        errors = b.errors()
        if errors:
            raise ViewerError(f"{html_path}: the page's script failed: {errors[0]}")
        png = small_png(b.screenshot())
    finally:
        b.close()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    with open(png_path, "wb") as f:
        f.write(png)

# -----------------------------------------------------------------------------
# the page: CSS and the script that renders the data (every string from the data goes in as text)

CSS = r"""
body{font:13px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#222;background:#fafafa}
#app{padding:12px 18px;max-width:1800px}
h1{font-size:18px;margin:4px 0 2px}h2{font-size:15px;margin:16px 0 6px}
.muted{color:#777}.note{color:#777;font-style:italic}
.bar{position:sticky;top:0;background:#fafafa;z-index:2;padding:6px 0;border-bottom:1px solid #ddd;display:flex;
 flex-wrap:wrap;gap:6px 14px;align-items:center}
.bar label{white-space:nowrap}
button{font:inherit;padding:2px 8px;border:1px solid #bbb;background:#fff;border-radius:3px;cursor:pointer}
button.on{background:#333;color:#fff;border-color:#333}button:disabled{opacity:.4;cursor:default}
select{font:inherit}
.plots{display:flex;flex-wrap:wrap;gap:8px}
svg.plot{background:#fff;border:1px solid #ddd}svg.plot text{font-size:10px;fill:#555}
svg.plot .title{font-size:11px;fill:#222;font-weight:600}
svg.plot path.line{fill:none;stroke-width:1.6}svg.plot .axis{stroke:#999}
svg.plot .cursor{stroke:#e33;stroke-dasharray:3 2}
.group,.item{background:#fff;border:1px solid #ddd;border-radius:4px;margin:10px 0;padding:8px}
.ghead,.ihead{font-size:12px;color:#555;margin-bottom:4px}
.prompt{display:flex;gap:10px;align-items:flex-start;margin-bottom:6px}
.imgs img{max-width:360px;border:1px solid #ccc;margin-right:4px}
.imgs img.small{width:128px;image-rendering:pixelated}
.missing{width:128px;height:64px;border:1px dashed #c33;color:#c33;font-size:11px;padding:4px;overflow:hidden}
.q{white-space:pre-wrap}.gold{margin-top:4px;font-weight:600}
.samples{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:6px}
.sample{border:1px solid #ddd;border-left:4px solid #bbb;border-radius:3px;padding:4px 6px;background:#fff;min-width:0}
.sample.correct{border-left-color:#2a2}.sample.wrong{border-left-color:#d33}
.shead{font-size:11.5px;color:#444;margin-bottom:3px;display:flex;flex-wrap:wrap;gap:2px 8px}
.badge{padding:0 4px;border-radius:3px;background:#eee}.badge.ok{background:#d8f0d8}.badge.bad{background:#f6d6d6}
.badge.warn{background:#ffe2b0}
.resp{white-space:pre-wrap;word-break:break-word;font:12px/1.5 ui-monospace,Menlo,Consolas,monospace}
.tok{border-radius:2px}.tok.crit{outline:2px solid #7b2cbf;font-weight:700}.tok.na{background:#e4e4e4}
.tok.empty{color:#aaa}
.legend{font-size:12px}.legend .sw{display:inline-block;width:40px;height:10px;vertical-align:middle;margin:0 4px}
table{border-collapse:collapse;background:#fff;margin:4px 0}
td,th{border:1px solid #ddd;padding:2px 8px;text-align:right}td{white-space:nowrap}th{background:#f0f0f0}
table.kv td,table.kv th{text-align:left;white-space:normal;max-width:900px}
td:first-child,th:first-child{text-align:left}
tr.selected td{background:#fff3c4;font-weight:600}
.tables{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:8px}
pre.json{background:#fff;border:1px solid #ddd;padding:6px;white-space:pre-wrap}
"""

JS = r"""
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const PAGE = 20;  // groups (or items) rendered at a time
const app = document.getElementById("app");

// --- helpers: every string from the data becomes a text node or an attribute value, never HTML
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of kids.flat()) if (has(c) && c !== false) e.append(c instanceof Node ? c : String(c));
  return e;
}
function sv(tag, attrs, text) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);  // a namespace name, not a request
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
const num = x => typeof x === "number" && isFinite(x);
const has = x => x !== null && x !== undefined;
const yes = x => x === 1 || x === true;  // accuracy / correct: 1 or true
const fmt = (x, d = 3) => !num(x) ? "\u2013" : Number.isInteger(x) ? String(x) : x.toFixed(Math.abs(x) >= 1000 ? 0 : d);
const pct = x => num(x) ? (100 * x).toFixed(1) + "%" : "\u2013";
const sgn = (x, d = 2) => num(x) ? (x >= 0 ? "+" : "") + x.toFixed(d) : "\u2013";
const uniq = xs => [...new Set(xs.filter(has))].sort((a, b) => a < b ? -1 : a > b ? 1 : 0);
const dot = parts => parts.filter(has).join(" \u00b7 ");
function quantile(arrays, q) {  // of |x| over the arrays (at most ~50k values looked at)
  let n = 0;
  for (const a of arrays) n += a ? a.length : 0;
  const stride = Math.max(1, Math.floor(n / 50000)), v = [];
  let i = 0;
  for (const a of arrays) if (a) for (const x of a) if (i++ % stride === 0 && num(x)) v.push(Math.abs(x));
  v.sort((a, b) => a - b);
  return v.length ? v[Math.min(v.length - 1, Math.floor(q * (v.length - 1)))] : 0;
}
const alpha = (v, max) => (0.04 + 0.8 * Math.min(1, Math.abs(v) / (max || 1))).toFixed(3);
const ORANGE = "240, 90, 20", GREEN = "26, 152, 80", RED = "215, 48, 39", BLUE = "33, 102, 172";
const heat = (v, max) => num(v) ? `rgba(${ORANGE}, ${alpha(v, max)})` : null;  // light -> dark orange
const diverge = (v, max, pos, neg) => num(v) ? `rgba(${v >= 0 ? pos : neg}, ${alpha(v, max)})` : null;
const swatch = (...c) => el("span", {class: "sw", style: `background:linear-gradient(to right,${c.join(",")})`});
const light = c => `rgba(${c},.04)`, dark = c => `rgba(${c},.84)`;
const legend = parts => el("div", {class: "legend"}, parts);

function images(idx) {  // small images (the embedded task's 64 px) at 128 px, pixels kept sharp
  return el("div", {class: "imgs"}, (idx || []).map(i => {
    const im = D.images[i];
    if (!im || !im.src) return el("div", {class: "missing"}, "missing image: " + (im ? im.path : i));
    return el("img", {src: im.src, title: im.path, alt: "image", class: im.width < 128 ? "small" : null});
  }));
}
function question(q, options) {
  const box = el("div", {class: "q"}, q.replace(/\n?<image>/g, ""));
  for (const [i, o] of (options || []).entries()) box.append("\n" + String.fromCharCode(65 + i) + ". " + o);
  return box;
}
// a response as token spans. color: undefined (not tokenized: plain text) or i -> CSS colour, or null for "no value"
// (grey); crit: indices to outline; info: i -> tooltip text (made on first hover, not for every token up front)
function tokens(pieces, color, crit, info) {
  const box = el("div", {class: "resp"}), c = new Set(crit || []), frag = document.createDocumentFragment();
  for (let i = 0; i < pieces.length; i++) {
    const s = document.createElement("span");
    s.className = "tok" + (c.has(i) ? " crit" : "") + (pieces[i] === "" ? " empty" : "");
    s.textContent = pieces[i] === "" ? "\u2205" : pieces[i];  // a token that decodes to nothing: a mark
    const bg = color ? color(i) : undefined;
    if (bg === null) s.classList.add("na");
    else if (bg) s.style.backgroundColor = bg;
    s.dataset.i = i;
    frag.append(s);
  }
  box.append(frag);
  box._info = info;
  return box;
}
document.addEventListener("mouseover", e => {
  const t = e.target, info = t.parentNode && t.parentNode._info;
  if (t.classList && t.classList.contains("tok") && !t.title && info) t.title = info(+t.dataset.i);
});
function buttons(id, values, labels, onpick) {  // one of several, the first one on
  const box = el("span", {class: "btns", id});
  for (const v of values) box.append(el("button", {"data-v": v, class: v === values[0] ? "on" : null, onclick: e => {
    for (const b of box.children) b.classList.toggle("on", b === e.currentTarget);
    onpick(v);
  }}, labels[v] || v));
  return box;
}
function selectBox(id, values, labels, current, onpick) {
  const s = el("select", {id, onchange: () => onpick(s.value)},
               values.map(v => el("option", {value: v}, labels[v] || v)));
  s.value = current;
  return s;
}
function table(head, rows, cls) {  // rows: arrays of cells, or {cls, cells}
  return el("table", {class: cls}, el("tr", {}, head.map(h => el("th", {}, h))),
            rows.map(r => el("tr", {class: r.cls || null}, (r.cells || r).map(c => el("td", {}, c)))));
}
function pager(n, st, redraw) {
  const pages = Math.max(1, Math.ceil(n / PAGE));
  st.page = Math.min(st.page, pages - 1);
  const go = d => () => { st.page += d; redraw(); };
  return el("span", {}, el("button", {id: "prev", disabled: st.page === 0, onclick: go(-1)}, "\u25c0"),
            el("span", {id: "page"}, ` page ${st.page + 1}/${pages} `),
            el("button", {id: "next", disabled: st.page >= pages - 1, onclick: go(1)}, "\u25b6"));
}

// --- a small plot. series: {pts: [[x, y or null]], color, axis: "left" | "right", err: [spread], dotsOnly}
// o: {w, h, xname, marks: [x] (dotted lines), cursor: true (svg._cursor(x) moves a dotted line)}
function plot(title, series, o = {}) {
  const W = o.w || 250, H = o.h || 130, L = 44, R = series.some(s => s.axis === "right") ? 44 : 10, T = 18, B = 20;
  const svg = sv("svg", {class: "plot", width: W, height: H, viewBox: `0 0 ${W} ${H}`});
  const ok = p => num(p[0]) && num(p[1]);
  const span = (vals, pad) => {
    let a = Math.min(...vals), b = Math.max(...vals);
    if (!vals.length) [a, b] = [0, 1];
    if (a === b) [a, b] = [a - (pad ? Math.abs(a) * 0.1 || 0.5 : 1), b + (pad ? Math.abs(b) * 0.1 || 0.5 : 1)];
    return [a, b];
  };
  const [x0, x1] = span(series.flatMap(s => s.pts.filter(ok).map(p => p[0])), false);
  const yr = axis => span(series.filter(s => (s.axis || "left") === axis).flatMap(s => s.pts.flatMap((p, i) => {
    const e = s.err && num(s.err[i]) ? s.err[i] : 0;
    return ok(p) ? [p[1] - e, p[1] + e] : [];
  })), true);
  const ranges = {left: yr("left"), right: yr("right")};
  const X = x => L + (x - x0) / (x1 - x0) * (W - L - R);
  const Y = (y, axis) => { const [a, b] = ranges[axis || "left"]; return H - B - (y - a) / (b - a) * (H - T - B); };
  const fx = v => Number.isInteger(v) ? String(v) : v.toFixed(x1 - x0 < 1 ? 3 : x1 - x0 < 10 ? 2 : 0);
  svg.append(sv("text", {x: 4, y: 12, class: "title"}, title),
             sv("line", {x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis"}),
             sv("line", {x1: L, y1: T, x2: L, y2: H - B, class: "axis"}),
             sv("text", {x: L - 3, y: T + 8, "text-anchor": "end"}, fmt(ranges.left[1])),
             sv("text", {x: L - 3, y: H - B, "text-anchor": "end"}, fmt(ranges.left[0])),
             sv("text", {x: L, y: H - 6}, fx(x0)),
             sv("text", {x: W - R, y: H - 6, "text-anchor": "end"}, (o.xname || "step") + " " + fx(x1)));
  if (R > 10) svg.append(sv("line", {x1: W - R, y1: T, x2: W - R, y2: H - B, class: "axis"}),
                         sv("text", {x: W - R + 3, y: T + 8}, fmt(ranges.right[1])),
                         sv("text", {x: W - R + 3, y: H - B}, fmt(ranges.right[0])));
  for (const s of series) {
    let d = "", pen = false;  // a gap (null) lifts the pen
    for (const p of s.pts) {
      if (!ok(p)) { pen = false; continue; }
      d += (pen ? "L" : "M") + X(p[0]).toFixed(1) + " " + Y(p[1], s.axis).toFixed(1);
      pen = true;
    }
    if (!s.dotsOnly) svg.append(sv("path", {d, class: "line", stroke: s.color, "data-n": s.pts.filter(ok).length}));
    s.pts.forEach((p, i) => {
      if (!ok(p)) return;
      const [x, y] = p, cx = X(x).toFixed(1);
      if (s.err && num(s.err[i])) {
        const [lo, hi] = [Y(y - s.err[i], s.axis), Y(y + s.err[i], s.axis)];
        svg.append(sv("line", {x1: cx, x2: cx, y1: lo, y2: hi, stroke: s.color}));
      }
      if (s.pts.length > 40 && !s.dotsOnly) return;  // dots only where they can be told apart
      svg.append(sv("circle", {cx, cy: Y(y, s.axis).toFixed(1), r: 2.5, fill: s.color}));
    });
  }
  for (const m of o.marks || []) svg.append(sv("line", {x1: X(m), x2: X(m), y1: T, y2: H - B, class: "cursor"}));
  if (o.cursor) {
    const c = sv("line", {y1: T, y2: H - B, class: "cursor", visibility: "hidden"});
    svg.append(c);
    svg._cursor = x => {
      const on = num(x) && x >= x0 && x <= x1;
      if (on) { c.setAttribute("x1", X(x)); c.setAttribute("x2", X(x)); }
      c.setAttribute("visibility", on ? "visible" : "hidden");
    };
  }
  return svg;
}

// --- GRPO run: curves from log.jsonl, then the dumped groups of rollouts.jsonl, one step at a time
const CURVES = [["reward", "reward"], ["accuracy", "accuracy"], ["format", "format"],
  ["resp_len", "mean response length"], ["truncated", "truncated share"], ["clip_frac", "clip fraction"],
  ["gnorm", "grad norm"], ["entropy", "mean entropy"], ["critical_entropy", "critical-token entropy"],
  ["high_entropy_share", "high-entropy share"], ["val_accuracy", "val accuracy"]];
function runCurves(log) {  // -> [the section, its plots]
  const box = el("div", {id: "curves"}, el("h2", {}, "Run curves (log.jsonl)"));
  if (!log) return [el("div", {}, box, el("p", {class: "note"}, "no log.jsonl in this directory")), []];
  const plots = el("div", {class: "plots"}), missing = [], svgs = [];
  for (const [key, label] of CURVES) {
    const pts = log.filter(r => key in r).map(r => [r.step, r[key]]);  // null: a gap
    const vals = pts.filter(p => num(p[1]));
    if (!vals.length) { missing.push(key); continue; }
    const svg = plot(`${label}: ${fmt(vals[vals.length - 1][1])}`, [{pts, color: "#1f77b4"}], {cursor: true});
    svg.setAttribute("data-key", key);
    plots.append(svg);
    svgs.push(svg);
  }
  box.append(plots);
  if (missing.length) {
    box.append(el("p", {class: "note", id: "curves-missing"}, "not in log.jsonl (no curve): " + missing.join(", ")));
  }
  return [box, svgs];
}

function renderRollouts() {
  app.append(el("h1", {}, "GRPO rollouts: " + D.title), el("div", {class: "muted"}, D.source));
  const [curves, svgs] = runCurves(D.log);
  app.append(curves, el("h2", {}, "Rollouts (rollouts.jsonl)"));
  const G = D.groups;
  const note = text => app.append(el("p", {class: "note"}, text));
  if (!G) return note("no rollouts.jsonl in this directory (grpo.py writes it every dump_every steps)");
  if (!G.length) return note("rollouts.jsonl is empty");
  for (const g of G) g.allEqual = g.samples.length > 0 && g.samples.every(s => s.reward === g.samples[0].reward);
  const S = G.flatMap(g => g.samples);
  const advlogp = s => s.logp && num(s.advantage) ? i => -s.advantage * s.logp[i] : null;  // > 0: pushed up
  const scale = {entropy: quantile(S.map(s => s.entropy), 0.98) || 1, dlogp: quantile(S.map(s => s.dlogp), 1) || 1e-6,
                 advlogp: quantile(S.map(s => advlogp(s) && s.logp.map((_, i) => advlogp(s)(i))), 0.98) || 1};
  const MODES = {
    entropy: {label: "entropy", off: !S.some(s => s.entropy),
              color: s => s.entropy ? i => heat(s.entropy[i], scale.entropy) : null,
              legend: () => ["low ", swatch(light(ORANGE), dark(ORANGE)),
                             ` high entropy (${fmt(scale.entropy, 2)} nats and above)`]},
    advlogp: {label: "advantage \u00d7 log-prob", off: !S.some(s => s.logp),
              color: s => advlogp(s) ? i => diverge(advlogp(s)(i), scale.advlogp, GREEN, RED) : null,
              legend: () => ["pushed down (A < 0) ", swatch(dark(RED), light(RED), light(GREEN), dark(GREEN)),
                             " pushed up (A > 0); darker: larger |A \u00d7 log p|",
                             ` (${fmt(scale.advlogp, 2)} and above)`]},
    dlogp: {label: "train \u2212 rollout log-prob", off: !S.some(s => s.dlogp),
            color: s => s.dlogp ? i => diverge(s.dlogp[i], scale.dlogp, RED, BLUE) : null,
            legend: () => ["trainer lower ", swatch(dark(BLUE), light(BLUE), light(RED), dark(RED)),
                           ` trainer higher (train_logp \u2212 logp, up to ${scale.dlogp.toExponential(1)});`,
                           " grey: no train_logp"]},
  };
  const steps = uniq(G.map(g => g.step)), domains = uniq(G.map(g => g.domain));
  const st = {step: steps[steps.length - 1], mode: "entropy", filter: "all", domain: "", groups: "all", page: 0};
  const okSample = s => st.filter === "all" || (st.filter === "correct" ? yes(s.accuracy)
    : st.filter === "wrong" ? !yes(s.accuracy) : s.finish_reason === "length");
  const okGroup = g => g.step === st.step && (!st.domain || g.domain === st.domain) &&
    (st.groups === "all" || (st.groups === "equal") === g.allEqual);
  const set = (k, v) => { st[k] = v; st.page = 0; draw(); };
  const list = el("div", {id: "list"}), count = el("span", {id: "count"}), pg = el("span", {}), leg = el("div", {});
  const modes = el("span", {}, "colour: ", Object.entries(MODES).map(([k, m]) => el("label", {},
    el("input", {type: "radio", name: "mode", value: k, checked: k === st.mode, disabled: m.off,
                 onchange: () => set("mode", k)}),
    " " + m.label + (m.off ? " (not in this dump)" : ""), " ")));
  const bar = el("div", {class: "bar"},
    el("label", {}, "step ", selectBox("step", steps.map(String), {}, String(st.step), v => set("step", +v))),
    el("span", {class: "muted"}, `(${steps.length} dumped steps)`), modes,
    el("span", {}, "samples: ", buttons("filter", ["all", "correct", "wrong", "truncated"], {}, v => set("filter", v))),
    el("span", {}, "groups: ", buttons("groups", ["all", "equal", "varied"],
                                       {equal: "all-equal only (A = 0)", varied: "hide all-equal"},
                                       v => set("groups", v))),
    domains.length ? el("label", {}, "domain ", selectBox("domain", ["", ...domains], {"": "all"}, "",
                                                            v => set("domain", v))) : null,
    pg, count);
  app.append(bar, leg, list);

  function sampleCard(g, s, k) {
    const acc = yes(s.accuracy), trunc = s.finish_reason === "length", good = "badge " + (acc ? "ok" : "bad");
    const head = el("div", {class: "shead"}, el("b", {}, "#" + k),
      el("span", {class: good}, `reward ${fmt(s.reward, 2)}: acc ${fmt(s.accuracy)}, fmt ${fmt(s.format)}`),
      el("span", {class: "badge"}, "A " + sgn(s.advantage)),
      el("span", {class: good}, `pred ${has(s.pred) ? s.pred : "none"} / gold ${g.answer}`),
      el("span", {}, `${fmt(s.n_tokens)} tok`),
      el("span", {class: "badge" + (trunc ? " warn" : "")}, s.finish_reason || "?"),
      s.critical.length ? el("span", {}, `${s.critical.length} critical`) : null,
      st.mode === "dlogp" && !s.dlogp ? el("span", {class: "muted"}, "no train_logp") : null);
    const info = i => [`#${i} ${JSON.stringify(s.pieces[i])}`, s.entropy && `entropy ${fmt(s.entropy[i])}`,
      s.logp && `logp ${fmt(s.logp[i], 4)}`, s.dlogp && `train \u2212 rollout ${s.dlogp[i]}`,
      advlogp(s) && `A \u00d7 logp ${fmt(-advlogp(s)(i), 4)}`].filter(x => x).join(" | ");
    const color = s.tokenized ? MODES[st.mode].color(s) || (() => null) : undefined;
    return el("div", {class: "sample " + (acc ? "correct" : "wrong") + (trunc ? " truncated" : "")}, head,
              tokens(s.pieces, color, s.critical, s.tokenized ? info : null));
  }
  function groupCard(g, shown) {
    const nc = g.samples.filter(s => yes(s.accuracy)).length;
    const mean = g.samples.reduce((a, s) => a + (s.reward || 0), 0) / (g.samples.length || 1);
    return el("div", {class: "group"},
      el("div", {class: "ghead"}, dot([`step ${g.step}`, has(g.prompt_index) ? `prompt ${g.prompt_index}` : null, g.id,
        g.domain, g.difficulty, `${nc}/${g.samples.length} correct`, `mean reward ${fmt(mean, 2)}`,
        g.allEqual ? "all equal: zero advantage" : null])),
      el("div", {class: "prompt"}, images(g.images),
         el("div", {}, question(g.question, g.options), el("div", {class: "gold"}, "gold: " + g.answer))),
      el("div", {class: "samples"}, shown.map(k => sampleCard(g, g.samples[k], k))));
  }
  function draw() {
    const shown = [];  // [group, indices of its samples that pass the filter]
    for (const g of G) {
      if (!okGroup(g)) continue;
      const ks = g.samples.map((s, k) => okSample(s) ? k : -1).filter(k => k >= 0);
      if (ks.length) shown.push([g, ks]);
    }
    pg.replaceChildren(pager(shown.length, st, draw));
    const n = shown.reduce((a, x) => a + x[1].length, 0);
    count.textContent = `${shown.length} groups, ${n} samples at step ${st.step}`;
    leg.replaceChildren(legend([...MODES[st.mode].legend(), "; ", el("span", {class: "tok crit"}, "critical"),
                                " tokens outlined; hover a token for its numbers"]));
    list.replaceChildren(...shown.slice(st.page * PAGE, (st.page + 1) * PAGE).map(([g, ks]) => groupCard(g, ks)));
    for (const s of svgs) s._cursor(st.step);
  }
  draw();
}

// --- eval run: summary and breakdown tables, then the items; --compare: a second run beside the first
function renderEval() {
  const A = D.items, C = D.compare, SA = D.summary, K = ["domain", "subject", "difficulty"];
  const key = r => r.id + "\u0000" + r.run;
  const B = C ? new Map(C.items.map(r => [key(r), r])) : null;
  app.append(el("h1", {}, "Evaluation: " + D.title + (C ? " vs " + C.title : "")),
             el("div", {class: "muted"}, D.source + (C ? " | " + C.source : "")));
  const metrics = s => [pct(s.accuracy) + (num(s.accuracy_std) ? " \u00b1 " + pct(s.accuracy_std) : ""),
                        pct(s["pass@" + s.k]), pct(s.format), fmt(s.mean_tokens, 1), pct(s.truncation_rate),
                        fmt(s.n_items), fmt(s.k)];
  app.append(el("h2", {}, "Summary (summary.json)"),
             table(["run", "accuracy", "pass@k", "format", "mean tokens", "truncated", "items", "k"],
                   [[D.title, ...metrics(SA)], ...(C ? [[C.title, ...metrics(C.summary)]] : [])], "summary"));
  const tabs = el("div", {class: "tables", id: "breakdown"});
  for (const k of K) {
    const a = SA["by_" + k] || {}, b = C ? C.summary["by_" + k] || {} : null, n = SA["n_by_" + k] || {};
    const groups = uniq([...Object.keys(a), ...Object.keys(b || {})]);
    if (!groups.length) continue;
    tabs.append(table(C ? [k, D.title, C.title, "\u0394", "n"] : [k, "accuracy", "n"], groups.map(g => C
      ? [g, pct(a[g]), pct(b[g]), num(a[g]) && num(b[g]) ? sgn(100 * (a[g] - b[g]), 1) : "\u2013", fmt(n[g])]
      : [g, pct(a[g]), fmt(n[g])]), "by_" + k));
  }
  if (tabs.children.length) app.append(el("h2", {}, "By domain / subject / difficulty"), tabs);
  const scale = quantile([...A, ...(C ? C.items : [])].map(r => r.entropy), 0.98) || 1;
  const rows = A.map(r => ({a: r, b: B ? B.get(key(r)) || null : null}));
  const flip = r => !r.b || yes(r.a.correct) === yes(r.b.correct) ? "" : yes(r.a.correct) ? "a" : "b";
  const st = {filter: "all", flip: C ? "any" : "all", domain: "", subject: "", difficulty: "", page: 0};
  const ok = r => (st.filter === "all" || (st.filter === "correct" ? yes(r.a.correct)
      : st.filter === "wrong" ? !yes(r.a.correct) : yes(r.a.truncated))) &&
    (st.flip === "all" || (st.flip === "any" ? flip(r) !== "" : flip(r) === st.flip)) &&
    K.every(k => !st[k] || String(r.a[k]) === st[k]);
  const set = (k, v) => { st[k] = v; st.page = 0; draw(); };
  const list = el("div", {id: "list"}), count = el("span", {id: "count"}), pg = el("span", {});
  const bar = el("div", {class: "bar"},
    el("span", {}, "items: ", buttons("filter", ["all", "correct", "wrong", "truncated"], {}, v => set("filter", v))));
  if (C) {
    const na = rows.filter(r => flip(r) === "a").length, nb = rows.filter(r => flip(r) === "b").length;
    bar.append(el("span", {}, "compare: ", buttons("flip", ["any", "a", "b", "all"], {any: `flipped (${na + nb})`,
      a: `${D.title} right, ${C.title} wrong (${na})`, b: `${D.title} wrong, ${C.title} right (${nb})`,
      all: "all items"}, v => set("flip", v))));
  }
  for (const k of K) {
    const vals = uniq(A.map(r => has(r[k]) ? String(r[k]) : null));
    if (vals.length < 2) continue;
    bar.append(el("label", {}, k + " ", selectBox(k, ["", ...vals], {"": "all"}, "", v => set(k, v))));
  }
  bar.append(pg, count);
  app.append(el("h2", {}, "Responses (responses.jsonl)"), bar, legend(["tokens coloured by entropy: low ",
    swatch(light(ORANGE), dark(ORANGE)), ` high (${fmt(scale, 2)} nats and above); hover a token for its number`]),
    list);
  function response(r, title) {
    const c = yes(r.correct), good = "badge " + (c ? "ok" : "bad");
    const info = i => `#${i} ${JSON.stringify(r.pieces[i])}` + (r.entropy ? ` | entropy ${fmt(r.entropy[i])}` : "");
    const color = r.tokenized ? (r.entropy ? i => heat(r.entropy[i], scale) : () => null) : undefined;
    return el("div", {class: "sample " + (c ? "correct" : "wrong")},
      el("div", {class: "shead"}, title ? el("b", {}, title) : null, el("span", {class: good}, c ? "correct" : "wrong"),
        el("span", {class: good}, `pred ${has(r.pred) ? r.pred : "none"} / answer ${r.answer}`),
        el("span", {}, `format ${fmt(r.format)}`), el("span", {}, `${fmt(r.n_tokens)} tok`),
        yes(r.truncated) ? el("span", {class: "badge warn"}, "truncated") : null,
        el("span", {}, `mean entropy ${fmt(r.mean_entropy)}`),
        r.tokenized ? null : el("span", {class: "muted"}, "(no token pieces in this dump)")),
      tokens(r.pieces, color, null, r.tokenized ? info : null));
  }
  function draw() {
    const shown = rows.filter(ok);
    pg.replaceChildren(pager(shown.length, st, draw));
    count.textContent = `${shown.length} of ${rows.length} items`;
    list.replaceChildren(...shown.slice(st.page * PAGE, (st.page + 1) * PAGE).map(r => el("div", {class: "item"},
      el("div", {class: "ihead"}, dot([r.a.id, `run ${r.a.run}`, ...K.map(k => r.a[k])])),
      el("div", {class: "prompt"}, images(r.a.images), question(r.a.question, r.a.options)),
      !C ? response(r.a) : el("div", {class: "pair"}, response(r.a, D.title),
                               r.b ? response(r.b, C.title) : el("div", {class: "note"}, "not in " + C.title)))));
  }
  draw();
}

// --- entropy.py: the checkpoints, critical-token entropy and accuracy against step, correlation, selection
function kv(obj, prefix = "") {  // a nested object -> [key, value] rows
  const out = [], show = x => num(x) ? fmt(x, 4) : x === null ? "\u2013" : String(x);
  for (const [k, v] of Object.entries(obj || {})) {
    if (v && typeof v === "object" && !Array.isArray(v)) out.push(...kv(v, prefix + k + "."));
    else out.push([prefix + k, Array.isArray(v) ? v.map(show).join(", ") : show(v)]);
  }
  return out;
}
function renderEntropy() {
  const R = D.report, rows = R.rows, sel = R.selection || {}, cfg = R.config || {};
  app.append(el("h1", {}, "Critical-token entropy: " + D.title), el("div", {class: "muted"}, D.source),
             el("div", {class: "muted"}, ["data", "k", "temperature", "max_new_tokens", "limit", "select", "threshold"]
               .filter(k => k in cfg).map(k => `${k}=${JSON.stringify(cfg[k])}`).join("  ")));
  const name = r => String(r.ckpt || r.path || "?").replace(/\/+$/, "").split("/").slice(-2).join("/");
  const COLS = [["step", r => fmt(r.step)], ["seed", r => fmt(r.seed)],
    ["accuracy", r => pct(r.accuracy) + (num(r.accuracy_std) ? " \u00b1 " + pct(r.accuracy_std) : "")],
    ["accuracy_se", r => pct(r.accuracy_se)],
    ["test_accuracy", r => pct(r.test_accuracy) +
      (num(r.test_accuracy_se) ? " \u00b1 " + pct(r.test_accuracy_se) : "")],
    ["critical_entropy", r => fmt(r.critical_entropy, 4)],
    ["critical_entropy_per_response", r => fmt(r.critical_entropy_per_response, 4)],
    ["critical_count", r => fmt(r.critical_count)], ["mean_entropy", r => fmt(r.mean_entropy, 4)],
    ["high_entropy_share", r => pct(r.high_entropy_share)], ["format", r => pct(r.format)],
    ["mean_tokens", r => fmt(r.mean_tokens, 1)], ["n_responses", r => fmt(r.n_responses)],
    ["seconds", r => fmt(r.seconds, 1)]].filter(([k]) => rows.some(r => has(r[k])));
  const si = num(sel.index) ? sel.index : -1;
  const cells = (r, i) => [name(r) + (i === si ? "  \u25c0 selected" : ""), ...COLS.map(c => c[1](r))];
  app.append(el("h2", {}, `Checkpoints (${rows.length})`),
             table(["checkpoint", ...COLS.map(c => c[0].replace(/_/g, " "))],
                   rows.map((r, i) => ({cls: i === si ? "selected" : null, cells: cells(r, i)})), "ckpts"));
  const byStep = rows.every(r => num(r.step)), xOf = (r, i) => byStep ? r.step : i;
  const seeds = uniq(rows.map(r => r.seed)), idx = rows.map((r, i) => [r, i]);
  const sets = seeds.length > 1 ? seeds.map(s => idx.filter(([r]) => r.seed === s)) : [idx];  // one line a seed
  const BLUES = ["#1f77b4", "#6baed6", "#08519c", "#9ecae1"], REDS = ["#d62728", "#fc9272", "#a50f15", "#fcbba1"];
  const series = sets.flatMap((set, j) => [
    {pts: set.map(([r, i]) => [xOf(r, i), r.critical_entropy]), color: BLUES[j % 4]},
    {pts: set.map(([r, i]) => [xOf(r, i), r.accuracy]), err: set.map(([r]) => r.accuracy_std), color: REDS[j % 4],
     axis: "right"}]);
  app.append(el("h2", {}, "Against step"), el("div", {class: "plots", id: "plots"},
    plot("critical-token entropy (blue, left) and accuracy (red, right)", series,
         {w: 560, h: 260, xname: byStep ? "step" : "checkpoint", marks: si >= 0 ? [xOf(rows[si], si)] : []}),
    plot("accuracy against critical-token entropy",
         [{pts: rows.map(r => [r.critical_entropy, r.accuracy]), color: "#444", dotsOnly: true}],
         {w: 330, h: 260, xname: "entropy"})),
    legend(["dotted line: the selected checkpoint; bars: \u00b1 the accuracy's spread over the k samples"]));
  if (Object.keys(R.correlation || {}).length) {
    app.append(el("h2", {}, "Correlation with accuracy"), table(["", "value"], kv(R.correlation), "kv correlation"));
  }
  app.append(el("h2", {}, "Selection"), Object.keys(sel).length ? table(["", "value"], kv(sel), "kv selection")
    : el("p", {class: "note"}, "no selection in entropy.json"));
  for (const k of Object.keys(R).filter(k => !["rows", "correlation", "selection", "config"].includes(k))) {
    app.append(el("h2", {}, k), el("pre", {class: "json"}, JSON.stringify(R[k], null, 1)));  // anything else, as JSON
  }
}

({grpo: renderRollouts, eval: renderEval, entropy: renderEntropy})[D.kind]();
"""

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
