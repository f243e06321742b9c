"""
Verifiable rewards for GRPO and evaluation (docs/recipe.md: "GRPO", "Evaluation", "R1V2 and Skywork-OR1").

    from rewards import decode_response, score, score_batch, close
    text = decode_response(tok, token_ids)     # the one way to turn a sampled response into text for scoring
    score(text, answer)                        # -> {"accuracy", "format", "reward", "pred", "timeout"}
    score_batch(responses, answers, options_list=None, timeout=5.0, workers=2)

R1V3: R = 0.8 * accuracy + 0.2 * format.
- accuracy: only the text after the LAST </think> counts; the final answer is the last \\boxed{} / \\fbox{}
  (else an <answer> tag, else an "answer is X" / "Answer: X" line). Several different boxed answers
  (hedging) score 0. Multiple choice compares option letters (a box naming two options, "(B) or (C)", is a
  hedge and scores 0); a value instead of a letter ("0.5" for the option "1/2") is Math-Verified against every
  option text: right iff it equals the gold option's and no other. Everything else is a normalised string
  compare, then Math-Verify with the gold wrapped in \\boxed{} (R1V3 / OR1).
- format: exactly one </think>, then an extractable answer after it.
- special tokens: responses are decoded with them kept (decode_response), since a tokenizer that marks
  </think> as special would lose it otherwise. Trailing stop tokens are dropped; a stop token or <|im_start|>
  left inside the text means the response ran past its turn: it scores 0 (not one answer).
- optional LLM judge: accuracy = rule check OR judge(question, answer_part, answer) (R1V3 used one).

Never raises on model output, never hangs: cheap in-process checks decide most items (length caps,
power towers, exact and integer matches, letters); only the rest go to Math-Verify in a process pool
with a hard per-item timeout. Math-Verify's own timeout uses SIGALRM, which works only in a main
thread (a pool worker runs tasks in its main thread) and cannot interrupt C code (9^{9^{9^9}} is one
big-int power), so a worker past the hard timeout is killed and the pool restarted. A worker that crashes
(segfault, OOM kill) breaks the whole pool: the items that were running are re-run one at a time, so the
crash is charged to the item that crashes alone and to no other. The pool is created
lazily on first need (Math-Verify is imported and warmed in the parent first, ~1-3 s once, so forked workers
start warm) and shut down by close(), also registered with atexit.
"""

import atexit
import concurrent.futures as cf
import logging
import math
import multiprocessing as mp
import re
import signal
import time

ACC_WEIGHT = 0.8  # R1V3: R = 0.8 * accuracy + 0.2 * format
FMT_WEIGHT = 0.2
MAX_RESPONSE_CHARS = 131072  # ~32k tokens; longer responses score 0 without being parsed
MAX_PRED_CHARS = 500         # an extracted final answer longer than this is not verified (scores 0)
MAX_BRACE_DEPTH = 24         # deeper nesting in a final answer is adversarial, not maths
MAX_POWER_DIGITS = 100000    # a^b with more digits than this is not evaluated
START_METHOD = 'fork'        # 'spawn' re-runs a flat script's top level in every worker; fork does not
SPECIAL_TOKENS = ('<|im_end|>', '<|endoftext|>')  # stop tokens a sampler leaves at the end: dropped there
TURN_TOKENS = SPECIAL_TOKENS + ('<|im_start|>',)   # any of these inside a response: it ran past its turn
THINK_TOKENS = ('<think>', '</think>')             # never stripped: the format and the answer split need them

# -----------------------------------------------------------------------------
# decoding (callers decode a response only through here)

def strip_stops(text, stops=SPECIAL_TOKENS):
    """Drop stop tokens, and the whitespace between and before them, from the end of text only; text that does
    not end in a stop token is returned as it is."""
    cut, found = len(text.rstrip()), False
    while True:  # moves an index and copies nothing: a padded row may end in thousands of pad tokens
        s = next((s for s in stops if s and text.endswith(s, 0, cut)), None)
        if s is None:
            return text[:cut] if found else text
        cut, found = cut - len(s), True
        while cut and text[cut - 1].isspace():
            cut -= 1


def decode_response(tok, token_ids):
    """Response token ids -> text for score(): special tokens kept (skip_special_tokens=True would delete a
    special </think> and every reward would be 0), then the trailing end-of-turn / eos / pad tokens dropped.
    tok: a transformers or `tokenizers` tokenizer; token_ids: a list or 1-D tensor of ints."""
    text = tok.decode([int(t) for t in token_ids], skip_special_tokens=False)
    stops = list(SPECIAL_TOKENS)
    for name in ('eos_token', 'pad_token'):  # a transformers tokenizer's own; a bare `tokenizers` one has none
        s = getattr(tok, name, None)
        if isinstance(s, str) and s and s not in stops and s not in THINK_TOKENS:
            stops.append(s)
    return strip_stops(text, tuple(stops))

# -----------------------------------------------------------------------------
# answer extraction (docs/recipe.md, "Evaluation": strip everything before </think>, take the last \boxed{})

def split_think(text, think=True):
    """-> (final answer part or None, format_ok). think=True needs a </think>; only text after the last one
    counts. The forced "<think>\\n" is part of the prompt, so the response may or may not start with <think>."""
    if not think:
        return text, True
    n_close = text.count('</think>')
    if n_close == 0:
        return None, False
    i = text.rfind('</think>')
    body, final = text[:i], text[i + len('</think>'):]
    # format: one reasoning block: at most one <think>, and only at the very start
    opens = body.count('<think>')
    ok = n_close == 1 and '<think>' not in final and (opens == 0 or (opens == 1 and body.lstrip().startswith('<think>')))
    return final, ok


def _brace_matches(s, start=0):
    # {index of '{': index of its matching '}'} in one pass over the braces only; escaped \{ \} are text
    stack, match = [], {}
    for m in re.finditer(r'(?<!\\)[{}]', s[start:]):
        j = m.start() + start
        if s[j] == '{':
            stack.append(j)
        elif stack:
            match[stack.pop()] = j
    return match


def boxed_all(s):
    """All \\boxed{...} / \\fbox{...} contents in s, in order (balanced braces; unclosed ones are skipped)."""
    first = min((i for i in (s.find('\\boxed'), s.find('\\fbox')) if i >= 0), default=-1)
    if first < 0:
        return []
    match = _brace_matches(s, first)
    out = []
    for m in re.finditer(r'\\(?:boxed|fbox)(?![A-Za-z])\s*', s[first:]):
        j = m.end() + first
        if j < len(s) and s[j] == '{':
            if j in match:
                out.append(s[j + 1:match[j]])
        else:  # \boxed 5 (no braces): one token
            t = re.match(r'[^\s$]+', s[j:])
            if t:
                out.append(t.group(0))
    return out


_ANSWER_IS = re.compile(r'answer\s*(?:is\b|:)\s*:?\s*([^\n]+)', re.IGNORECASE)


def _clean(a):
    # strip markdown bold, $...$, and a trailing full stop from a free-text answer
    a = a.replace('**', '').strip()
    a = a.rstrip('.').strip().strip('$').strip()
    return a


def extract_answer(final):
    """-> (pred or None, hedged). Priority: last boxed, else last <answer>...</answer>, else 'answer is X'."""
    boxes = [b.strip() for b in boxed_all(final)]
    boxes = [b for b in boxes if b]
    if boxes:
        hedged = len({norm_str(b) for b in boxes}) > 1
        return boxes[-1], hedged
    e = final.rfind('</answer>')
    if e >= 0:
        s = final.rfind('<answer>', 0, e)
        if s >= 0:
            a = _clean(final[s + len('<answer>'):e])
            if a:
                return a, False
    m = None
    for m in _ANSWER_IS.finditer(final):
        pass
    if m is not None:
        a = _clean(m.group(1))
        if a:
            return a, False
    return None, False

# -----------------------------------------------------------------------------
# rule checks: normalised strings, multiple-choice letters, cheap number compare

_TEXT_CMD = re.compile(r'\\(?:text|textbf|textrm|mathrm|mathbf|operatorname)\s*\{([^{}]*)\}')


def norm_str(s):
    s = _TEXT_CMD.sub(r'\1', s)
    for a, b in (('\\left', ''), ('\\right', ''), ('\\!', ''), ('\\,', ''), ('\\;', ''), ('\\dfrac', '\\frac'),
                 ('\\tfrac', '\\frac'), ('$', ''), ('**', '')):
        s = s.replace(a, b)
    s = re.sub(r'\s+', '', s).lower()
    return s.rstrip('.')


# a standalone capital (B, (B), B), "B,"), the way an answer names an option; \Delta, \S, AB, B2 are not
_LETTER_REF = re.compile(r'(?<![A-Za-z0-9\\])[A-Z](?![A-Za-z0-9])')


def _mc_text(text):
    # a multiple-choice answer without markup and without an "Option(s)" / "Choice(s)" prefix
    t = _TEXT_CMD.sub(r'\1', text).replace('**', '').strip().strip('$').strip()
    return re.sub(r'^(?:options?|choices?)\s*', '', t, flags=re.IGNORECASE)


def _option_index(t, options):
    # index of the option whose text t is (normalised), else None
    for k, o in enumerate(options or ()):
        if norm_str(str(o)) == norm_str(t):
            return k
    return None


# in what follows "B)", a second option named as an option: "(C)", "C)", "or C", "and C", "/C", ", C", or a letter
# right at the start ("B.C.", "B:C"); a capital in a clause ("because A is wrong") or a unit ("5 A") is not one
_OTHER_REF = re.compile(r'^\s*\(?([A-Z])(?:\s*[.):]|\s*$)|\(([A-Z])\)|(?<![A-Za-z0-9\\])([A-Z])\)'
                        r'|(?:\bor\b|\band\b|[/&,])\s*\(?([A-Z])(?![A-Za-z0-9=])')
# where the answer stops and its justification starts: "(B) because A is wrong", "(B), as (A) gives 3 cm"
_CLAUSE = re.compile(r'\b(?:because|since|as|so|which|while|given|hence|thus|therefore|for)\b|;', re.IGNORECASE)


def _names_other(letter, rest, options):
    # "B) ..." names a second option in rest, before any justification clause: another letter as an option
    # ("(B) or (C)"), or another option's text, whole words ("B) green", "B) blue or green"); options contained in
    # B's own text ("blue" in "light blue") do not count. rest that is B's own text is fine ("B) 5 N" for "5 N")
    own = str(options[ord(letter) - ord('A')]) if options and ord(letter) - ord('A') < len(options) else None
    if own is not None and norm_str(rest) == norm_str(own):
        return False
    rest = _CLAUSE.split(rest, maxsplit=1)[0]
    if {x for m in _OTHER_REF.finditer(rest) for x in m.groups() if x} - {letter}:
        return True
    if own is None:
        return False
    low, own_low = ' '.join(rest.lower().split()), ' '.join(own.lower().split())
    return any(re.search(r'(?<!\w)' + re.escape(o) + r'(?!\w)', low)
               for o in (' '.join(str(x).lower().split()) for x in options) if o and o not in own_low)


def to_letter(text, options=None):
    """Option letter for "B", "(B)", "B.", "B) blue", "Option B", or the option text itself; else None.
    A text naming two options ("(B) or (C)", "B, C", "B/C", "B) green" where green is C) is a hedge: None."""
    t = _mc_text(text)
    n = len(options) if options else 26
    k = _option_index(t, options)
    if k is not None:
        return chr(ord('A') + k)
    m = re.fullmatch(r'\(?([A-Za-z])\)?\.?', t)  # alone: B, (B), B., b
    if m is None:
        m = re.match(r'\(?([A-Z])\s*[.):]\s*(?=\S)', t) or re.match(r'\(([A-Z])\)\s*(?=\S)', t)  # B) blue, (B) blue
        if m is None or _names_other(m.group(1), t[m.end():], options):
            return None
    letter = m.group(1).upper()
    return letter if ord(letter) - ord('A') < n else None


def mc_value(pred):
    """True if a multiple-choice pred is a value ("\\frac{1}{2}", "0.5"), not an attempt at a letter: it has a
    digit or a LaTeX command and no standalone capital. Such a pred is Math-Verified against the option texts."""
    t = _mc_text(pred)
    return bool(re.search(r'[\d\\]', t)) and not _LETTER_REF.search(t)


_INT = re.compile(r'[+-]?\d{1,30}')
_THOUSANDS = re.compile(r'[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?')


def _num(s):
    # 1,000 -> 1000 (thousands separators only: "1,2" is a pair, not twelve)
    return s.replace(',', '') if _THOUSANDS.fullmatch(s) else s

_DEC = re.compile(r'[+-]?\d{1,30}(?:\.\d{1,30})?')


def _log10(digits):
    # log10 of a non-negative integer literal of any length, without building it
    return math.log10(max(int(digits[:15]), 2)) + max(0, len(digits) - 15)


def too_hard(pred):
    """Cheap pre-check: answers no maths problem has (huge, deeply nested, power towers) are not verified."""
    if len(pred) > MAX_PRED_CHARS:
        return True
    depth = 0
    for c in pred:
        depth += (c == '{') - (c == '}')
        if depth > MAX_BRACE_DEPTH:
            return True
    # a^{b} with an integer exponent: digits ~ b * log10(a); a^{b^{c ...}}: a tower
    for m in re.finditer(r'(\d+)\s*(?:\^|\*\*)\s*[{(]?\s*(\d+)\s*(?:(\^|\*\*)\s*[{(]?\s*(\d+)\s*(\^|\*\*)?)?', pred):
        la, lb = _log10(m.group(1)), _log10(m.group(2))
        if m.group(3):  # a^{b^c}: log10 of the exponent is c * log10(b)
            if m.group(5):  # four levels: always huge
                return True
            lb = float(m.group(4)[:6]) * lb
        if lb > 9 or 10 ** lb * la > MAX_POWER_DIGITS:
            return True
    return False


def rule_check(pred, gold, options=None):
    """-> 1, 0, or None (undecided: ask Math-Verify; with options, against the option texts). Cheap,
    in-process, never raises."""
    # multiple choice (options given, or a bare letter gold): compare letters (an option text counts as its letter)
    gold_letter = to_letter(gold, options) if options else (
        gold.strip().strip('()').upper() if re.fullmatch(r'\(?[A-Z]\)?', gold.strip()) else None)
    if options or gold_letter:
        letter = to_letter(pred, options)
        if letter is None and options and mc_value(pred):
            return None  # a value, not a letter: only Math-Verify can say which option it equals
        return int(gold_letter is not None and letter == gold_letter)
    if norm_str(pred) == norm_str(gold):
        return 1
    p, g = _num(pred.strip().strip('$')), _num(gold.strip())
    if _INT.fullmatch(p) and _INT.fullmatch(g):
        return int(int(p) == int(g))  # two different integer literals are never equal
    if _DEC.fullmatch(p) and _DEC.fullmatch(g) and float(p) == float(g):
        return 1
    return None

# -----------------------------------------------------------------------------
# Math-Verify in a process pool with a hard per-item timeout

_pool = None
_pool_workers = 0


def _worker_init():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    logging.getLogger('math_verify').setLevel(logging.CRITICAL)  # timeouts are counted, not printed
    try:  # Linux: die with the parent. A rank killed by torchrun or by the watchdog (os._exit) runs no cleanup,
        # and orphaned workers would keep its stdout/stderr open and its memory held
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _verify_worker(pred, gold, t_in):
    # runs in a pool worker's main thread, where Math-Verify's SIGALRM timeouts work
    # -> (correct, timed_out)
    from math_verify import parse, verify
    slowest, ok = 0.0, False
    try:
        t0 = time.time()
        g = parse('\\boxed{' + gold + '}', parsing_timeout=t_in)
        t1 = time.time()
        p = parse('\\boxed{' + pred + '}', parsing_timeout=t_in)
        t2 = time.time()
        ok = bool(g) and bool(p) and bool(verify(g, p, timeout_seconds=t_in))
        slowest = max(t1 - t0, t2 - t1, time.time() - t2)
    except BaseException:  # anything Math-Verify or sympy throws is a wrong answer, not a crash
        ok = False
    # Math-Verify returns False when its own timer fires: count a call that used up its limit as a timeout
    return ok, (not ok and slowest >= 0.95 * t_in)


_warm = False


def _warm_up():
    # import Math-Verify and build its LaTeX parser (~1-3 s, once) in the parent before forking, so a
    # fresh or restarted worker starts warm and its first item does not spend its timeout on imports
    global _warm
    if _warm:
        return
    from math_verify import parse, verify
    log = logging.getLogger('math_verify')
    level = log.level
    log.setLevel(logging.CRITICAL)  # parsing_timeout=None logs a warning; the parent may not be a main thread
    try:
        verify(parse('\\boxed{x^2/2}', parsing_timeout=None), parse('\\boxed{\\frac{1}{2}}', parsing_timeout=None),
               timeout_seconds=None)
    finally:
        log.setLevel(level)
    _warm = True


def _get_pool(workers=None):
    # lazily created, module-level; workers=None reuses the current pool whatever its size
    global _pool, _pool_workers
    if _pool is not None and workers is not None and workers != _pool_workers:
        close()
    if _pool is None:
        _warm_up()
        method = START_METHOD if START_METHOD in mp.get_all_start_methods() else 'spawn'
        _pool_workers = workers or 2
        _pool = cf.ProcessPoolExecutor(_pool_workers, mp_context=mp.get_context(method), initializer=_worker_init)
    return _pool


def close(kill=False):
    """Shut the verifier pool down; workers still running after a moment (or at once with kill=True) are
    SIGKILLed: one stuck in C code ignores SIGALRM and would otherwise block interpreter exit. Idempotent."""
    global _pool
    if _pool is None:
        return
    procs = list((getattr(_pool, '_processes', None) or {}).values())
    if kill:
        for p in procs:
            p.kill()
    _pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        p.join(0.1 if kill else 2.0)
        if p.is_alive():
            p.kill()
            p.join(1.0)
    _pool = None


atexit.register(close)


def _keep_done(futs, results):
    # results of the items that finished before the pool goes (a killed pool cancels the rest)
    for j, f in futs.items():
        if results[j] is None and f.done() and not f.cancelled() and f.exception() is None:
            results[j] = f.result()


def verify_many(pairs, timeout=5.0, workers=2):
    """Math-Verify each (pred, gold) in the pool. -> list of (correct, timed_out).
    Items are dispatched in order, so when we start waiting for item i every earlier item is done and i is
    running (or next): the wait is a per-item bound. A timeout kills the pool; unfinished items are resubmitted.
    A crashed worker (BrokenProcessPool) fails every pending future, whichever item caused it: the culprit is
    among the first unfinished items (the running ones), so those are re-run one at a time in a fresh pool and
    an item whose worker dies while it runs alone is the one that fails, as (False, True); finished items keep
    their result, the rest go back to the pool together."""
    t_in = max(1, int(timeout / 3))  # Math-Verify's own (soft) limit for each of its three calls
    results = [None] * len(pairs)
    todo = list(range(len(pairs)))
    alone = 0  # after a crash: how many of the next items run one at a time
    while todo:
        pool = _get_pool(workers)
        batch = todo[:1] if alone else todo
        alone = max(0, alone - 1)
        futs = {i: pool.submit(_verify_worker, pairs[i][0], pairs[i][1], t_in) for i in batch}
        for i in batch:
            try:
                results[i] = futs[i].result(timeout=timeout)
                continue
            except cf.TimeoutError:
                results[i] = (False, True)
            except Exception:  # BrokenProcessPool: some worker died (OOM killer, segfault)
                if len(batch) == 1:
                    results[i] = (False, True)  # it ran alone: it is the one that crashed
                else:
                    # running ones come first (dispatch is in order); 2x the workers covers results lost in
                    # flight. A culprit outside these crashes the next batch again and is caught then.
                    alone = 2 * _pool_workers
            _keep_done(futs, results)
            close(kill=True)
            break
        todo = [i for i in todo if results[i] is None]
    return results

# -----------------------------------------------------------------------------
# public API

def _prepare(response, answer, options, think):
    """In-process part of scoring one item. -> (result dict, (pred, gold text, other option texts) to verify
    or None, final answer part or None)."""
    out = {'accuracy': 0, 'format': 0, 'reward': 0.0, 'pred': None, 'timeout': False}
    text = response if isinstance(response, str) else ''
    if len(text) > MAX_RESPONSE_CHARS:
        return out, None, None
    text = strip_stops(text)
    if any(t in text for t in TURN_TOKENS):
        return out, None, None  # an end of turn with more text after it: not one answer (and nothing to judge)
    final, fmt_ok = split_think(text, think)
    if final is None:
        return out, None, None
    pred, hedged = extract_answer(final)
    out['pred'] = pred
    out['format'] = int(fmt_ok and pred is not None)
    if pred is None or hedged or too_hard(pred):
        return out, None, (None if hedged else final)  # no judge for a hedged answer
    acc = rule_check(pred, answer, options)
    if acc is None:
        if not options:
            return out, (pred, answer, []), final
        k = ord(to_letter(answer, options)) - ord('A')  # a value for a multiple-choice question
        return out, (pred, str(options[k]), [str(o) for j, o in enumerate(options) if j != k]), final
    out['accuracy'] = acc
    return out, None, final


def _verify_todo(outs, todo, timeout, workers):
    # todo: [(i, (pred, gold, others))]. Round 1: each pred against its gold. Round 2, only for a multiple-choice
    # value that matched its gold option: against the other option texts; equal to one of them too (or timed out
    # there, so unknown) is ambiguous -> 0. Two rounds keep a wrong value at one pool item, not one per option.
    first = verify_many([(p, g) for _, (p, g, _) in todo], timeout, workers)
    for (i, _), (ok, timed_out) in zip(todo, first):
        outs[i]['accuracy'], outs[i]['timeout'] = int(ok), timed_out
    again = [(i, (p, o)) for i, (p, _, others) in todo if outs[i]['accuracy'] for o in others]
    if again:
        for (i, _), (ok, timed_out) in zip(again, verify_many([x for _, x in again], timeout, workers)):
            if ok or timed_out:
                outs[i]['accuracy'] = 0
            outs[i]['timeout'] = outs[i]['timeout'] or timed_out


def _check_gold(answer, options, i):
    # the gold answer is data, not model output: a bad one is an error naming the sample
    if answer is None or str(answer).strip() == '':
        raise ValueError(f"rewards: sample {i}: empty gold answer")
    answer = str(answer).strip()
    if options and to_letter(answer, options) is None:
        raise ValueError(f"rewards: sample {i}: gold answer {answer!r} is neither an option letter "
                         f"nor an option text of {options!r}")
    return answer


def score_batch(responses, answers, options_list=None, timeout=5.0, workers=2, think=True, judge=None,
                questions=None, acc_weight=ACC_WEIGHT, fmt_weight=FMT_WEIGHT):
    """Score a batch. -> list of {"accuracy": 0|1, "format": 0|1, "reward": float, "pred": str|None,
    "timeout": bool}. timeout: hard seconds per Math-Verify item; d["timeout"] is True where the verifier gave
    up (hard timeout, or its worker crashed): count them with sum(d["timeout"]).
    judge(question, answer_part, answer) -> bool is asked only where the rule check says 0 (R1V3: rule OR judge),
    with the text after the last </think>; it is user code, so its exceptions propagate.
    Bad gold data (empty answer, MC answer not among the options, length mismatch) raises ValueError."""
    n = len(responses)
    if len(answers) != n or (options_list is not None and len(options_list) != n) or \
            (questions is not None and len(questions) != n):
        raise ValueError(f"rewards: {n} responses but {len(answers)} answers"
                         + (f", {len(options_list)} options" if options_list is not None else "")
                         + (f", {len(questions)} questions" if questions is not None else ""))
    options_list = options_list if options_list is not None else [None] * n
    outs, finals, todo = [], [], []
    for i in range(n):
        gold = _check_gold(answers[i], options_list[i], i)
        out, check, final = _prepare(responses[i], gold, options_list[i], think)
        outs.append(out)
        finals.append(final)
        if check is not None:
            todo.append((i, check))
    if todo:
        _verify_todo(outs, todo, timeout, workers)
    for i, out in enumerate(outs):
        # rule OR judge: only for a response that reached a final answer part and did not hedge
        if judge is not None and out['accuracy'] == 0 and finals[i] is not None:
            q = questions[i] if questions is not None else None
            out['accuracy'] = int(bool(judge(q, finals[i], str(answers[i]).strip())))
        out['reward'] = acc_weight * out['accuracy'] + fmt_weight * out['format']
    return outs


def score(response, answer, options=None, think=True, judge=None, question=None, timeout=5.0,
          acc_weight=ACC_WEIGHT, fmt_weight=FMT_WEIGHT):
    """Score one response against its gold answer (see score_batch); reuses the pool of any size."""
    return score_batch([response], [answer], [options], timeout=timeout, workers=None, think=think, judge=judge,
                       questions=[question], acc_weight=acc_weight, fmt_weight=fmt_weight)[0]
