# rewards.py on hand-written responses: extraction, think/format rules, multiple choice, Math-Verify
# equivalence, adversarial strings under a time bound, and the process pool's hard timeout.
import os
import time

import pytest

import rewards
from rewards import score, score_batch, to_letter

_real_worker = rewards._verify_worker
_real_verify_many = rewards.verify_many


@pytest.fixture(scope='module', autouse=True)
def shut_pool():
    yield
    rewards.close()  # pytest must exit without waiting on pool workers


def test_boxed_correct_and_incorrect():
    d = score("Count the squares: 3 + 4 = 7.\n</think>\n\nThe total is \\boxed{7}.", "7")
    assert d == {'accuracy': 1, 'format': 1, 'reward': 1.0, 'pred': '7', 'timeout': False}
    d = score("3 + 4 = 8\n</think>\n\n\\boxed{8}", "7")
    assert (d['accuracy'], d['format'], d['pred']) == (0, 1, '8')
    assert d['reward'] == pytest.approx(0.2)
    # the stop token a sampler may leave in the text does not matter
    assert score("ok</think>\\boxed{7}<|im_end|>", "7")['accuracy'] == 1


def test_only_text_after_last_think_counts():
    # an answer only inside the reasoning is not credited
    d = score("so it is \\boxed{7}\n</think>\n\nI am not sure.", "7")
    assert (d['accuracy'], d['format'], d['pred']) == (0, 0, None)
    # no </think> at all: nothing counts in think mode ...
    d = score("the answer is \\boxed{7}", "7")
    assert (d['accuracy'], d['format'], d['reward']) == (0, 0, 0.0)
    # ... but in no-think mode the whole text counts
    d = score("the answer is \\boxed{7}", "7", think=False)
    assert (d['accuracy'], d['format']) == (1, 1)
    assert score("no answer here", "7", think=False)['format'] == 0


def test_format_rules():
    # with and without the leading <think> (the forced prefix belongs to the prompt)
    assert score("<think>\nr\n</think>\n\\boxed{7}", "7")['format'] == 1
    assert score("r\n</think>\n\\boxed{7}", "7")['format'] == 1
    # two </think>: format 0, accuracy still from the last part
    d = score("r</think>more</think>\\boxed{7}", "7")
    assert (d['accuracy'], d['format']) == (1, 0)
    # a second reasoning block, or <think> after the answer
    assert score("r<think>again</think>\\boxed{7}", "7")['format'] == 0
    assert score("r</think>\\boxed{7}<think>", "7")['format'] == 0
    # </think> followed by nothing extractable
    assert score("r</think>\n\n", "7")['format'] == 0
    assert score("r</think>\\boxed{}", "7")['format'] == 0


def test_hedging_is_not_credited():
    d = score("r</think>It is \\boxed{3} or maybe \\boxed{4}", "4")
    assert (d['accuracy'], d['format']) == (0, 1)
    # the same answer boxed twice is not hedging
    assert score("r</think>\\boxed{4}, so the answer is \\boxed{ 4 }.", "4")['accuracy'] == 1
    # a different boxed answer inside the reasoning is not hedging either
    assert score("\\boxed{3}? no.</think>\\boxed{4}", "4")['accuracy'] == 1


def test_extraction_forms():
    assert score("r</think>\\fbox{7}", "7")['accuracy'] == 1
    assert score("r</think><answer> 7 </answer>", "7")['accuracy'] == 1
    assert score("r</think>The answer is $7$.", "7")['accuracy'] == 1
    assert score("r</think>**Answer:** 7", "7")['accuracy'] == 1
    # the last boxed wins over an <answer> tag and nested braces are balanced
    d = score("r</think><answer>3</answer> \\boxed{\\text{7}}", "7")
    assert (d['pred'], d['accuracy']) == ('\\text{7}', 1)
    # an unclosed \boxed is skipped, a later "answer is" still counts
    d = score("r</think>\\boxed{7 ... the answer is 7", "7")
    assert (d['pred'], d['accuracy']) == ('7', 1)
    assert rewards.boxed_all("a \\boxed{\\{1,2\\}} b \\boxed 5 c") == ['\\{1,2\\}', '5']


def test_multiple_choice_letters():
    opts = ['red', 'blue', 'green']
    for ans in ['B', '(B)', 'B.', 'B) blue', 'B. blue', '\\text{B}', 'Option B', 'blue', 'Blue']:
        assert score(f"r</think>\\boxed{{{ans}}}", 'B', options=opts)['accuracy'] == 1, ans
    for ans in ['A', '(C)', 'red', 'D', 'purple']:
        assert score(f"r</think>\\boxed{{{ans}}}", 'B', options=opts)['accuracy'] == 0, ans
    # an "answer is" line, and a gold given as the option text
    assert score("r</think>The answer is (B).", 'B', options=opts)['accuracy'] == 1
    assert score("r</think>\\boxed{B}", 'blue', options=opts)['accuracy'] == 1
    # a bare letter gold without options is compared as a letter
    assert score("r</think>\\boxed{(C)}", 'C')['accuracy'] == 1
    assert score("r</think>\\boxed{D}", 'C')['accuracy'] == 0


def test_math_verify_equivalents():
    # one batch: one pool start for all of them
    cases = [("\\frac{1}{2}", "0.5", 1), ("0.5", "\\frac{1}{2}", 1), ("\\dfrac{2}{4}", "1/2", 1),
             ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2", 1), ("(x+1)^2", "x^2+2x+1", 1), ("\\pi/2", "\\frac{\\pi}{2}", 1),
             ("\\frac{1}{3}", "0.5", 0), ("x^2+1", "(x+1)^2", 0), ("7.0", "7", 1), ("1,000", "1000", 1), ("12", "1,2", 0)]
    out = score_batch([f"r</think>\\boxed{{{p}}}" for p, _, _ in cases], [g for _, g, _ in cases], timeout=10.0)
    assert [d['accuracy'] for d in out] == [c[2] for c in cases]
    assert not any(d['timeout'] for d in out)


ADVERSARIAL = [
    "r</think>\\boxed{9^{9^{9^{9}}}}",
    "r</think>\\boxed{10^{10^{10}}}",
    "r</think>\\boxed{2^{1000000000}}",
    "r</think>\\boxed{" + "9" * 100000 + "}",                   # huge number
    "r</think>" + "x" * 200000 + "\\boxed{5}",                 # 200k characters
    "r</think>" + "{" * 200000,                                # unbalanced braces
    "r</think>" + "\\boxed{" * 20000,                          # many unclosed boxes
    "r</think>\\boxed{" + "{" * 5000 + "5" + "}" * 5000 + "}",  # deeply nested braces
    "r</think>\\boxed{" + "{" * 40 + "5" + "}" * 40 + "}",
    "r</think>\\boxed{\\frac{\\frac{\\frac{1}{2}}{" + "}" * 3,
    None, 12345, "",
]


def test_adversarial_strings_score_zero_fast():
    t0 = time.time()
    out = score_batch(ADVERSARIAL, ["5"] * len(ADVERSARIAL), timeout=3.0)
    elapsed = time.time() - t0
    assert [d['accuracy'] for d in out] == [0] * len(ADVERSARIAL)
    assert elapsed < 10.0, elapsed
    # each alone too (score() on a single item)
    for r in ADVERSARIAL[:3]:
        t0 = time.time()
        assert score(r, "5", timeout=3.0)['accuracy'] == 0
        assert time.time() - t0 < 5.0


def test_too_hard_precheck():
    assert rewards.too_hard("9^{9^{9^{9}}}") and rewards.too_hard("10**10**10") and rewards.too_hard("7^{99999999}")
    assert not rewards.too_hard("2^{10}") and not rewards.too_hard("2^{3^{2}}") and not rewards.too_hard("e^{x^2}")


def _hang_or_verify(pred, gold, t_in):
    # stand-in for the pool's worker: sleeps through any signal-based timeout, like a big-int power in C
    if pred == 'hang':
        time.sleep(60)
    return _real_worker(pred, gold, t_in)


def test_batch_hard_timeout_restarts_pool(monkeypatch):
    rewards.close()  # workers fork after the patch, so they run the stand-in
    monkeypatch.setattr(rewards, '_verify_worker', _hang_or_verify)
    preds = ['hang', '\\frac{1}{2}', 'hang', '2/4', '\\frac{1}{3}']
    t0 = time.time()
    out = score_batch([f"r</think>\\boxed{{{p}}}" for p in preds], ['0.5'] * len(preds), timeout=1.0, workers=2)
    elapsed = time.time() - t0
    assert [d['timeout'] for d in out] == [True, False, True, False, False]
    assert [d['accuracy'] for d in out] == [0, 1, 0, 1, 0]
    assert sum(d['timeout'] for d in out) == 2
    assert elapsed < 8.0, elapsed  # two 1 s timeouts plus restarts, never the 60 s sleep
    monkeypatch.undo()
    rewards.close()
    # the pool comes back after close()
    assert score("r</think>\\boxed{\\frac{3}{6}}", "0.5")['accuracy'] == 1


def test_judge_hook_and_weights():
    calls = []

    def judge(question, response, answer):
        calls.append((question, response, answer))
        return 'seven' in response

    d = score("r</think>The result: seven apples, \\boxed{seven}", "7", judge=judge, question="How many?")
    assert d['accuracy'] == 1 and calls == [("How many?", "The result: seven apples, \\boxed{seven}", "7")]
    # not asked when the rule check already says 1, nor without a final answer part, nor for a hedge
    score("r</think>\\boxed{7}", "7", judge=judge)
    score("seven \\boxed{seven}", "7", judge=judge)
    score("r</think>\\boxed{seven} \\boxed{six}", "7", judge=judge)
    assert len(calls) == 1
    d = score("r</think>\\boxed{7}", "7", acc_weight=0.5, fmt_weight=0.5)
    assert d['reward'] == 1.0
    d = score("r</think>\\boxed{8}", "7", acc_weight=0.5, fmt_weight=0.5)
    assert d['reward'] == 0.5


def test_bad_gold_is_an_error_naming_the_sample():
    with pytest.raises(ValueError, match="sample 1: empty gold"):
        score_batch(["r</think>\\boxed{1}"] * 2, ["1", ""])
    with pytest.raises(ValueError, match="sample 0: gold answer 'purple'"):
        score("r</think>\\boxed{A}", "purple", options=['red', 'blue'])
    with pytest.raises(ValueError, match="2 responses but 1 answers"):
        score_batch(["a", "b"], ["1"])


# -----------------------------------------------------------------------------
# special tokens, multiple-choice hedges and values, crashed workers (issue 10, section 6)

def _think_tokenizer():
    # a tiny fast tokenizer in which <think> and </think> are special added tokens, as in some real checkpoints
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    words = ['r', 'so', '\\boxed{7}', '\\boxed{8}']
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token='r'))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = ['<think>', '</think>', '<|im_end|>', '<|endoftext|>', '<|eot|>']
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


def test_decode_response_keeps_special_think():
    import torch
    from transformers import PreTrainedTokenizerFast
    tok = _think_tokenizer()
    ids = tok.encode("r so </think> \\boxed{7} <|im_end|>").ids
    assert tok.token_to_id('</think>') in ids
    # skip_special_tokens=True deletes the special </think>: every reward would be 0
    lost = tok.decode(ids, skip_special_tokens=True)
    assert '</think>' not in lost and score(lost, "7")['reward'] == 0.0
    text = rewards.decode_response(tok, ids)
    assert text == "r so </think> \\boxed{7}"  # the trailing stop token is gone, </think> is kept
    assert score(text, "7") == {'accuracy': 1, 'format': 1, 'reward': 1.0, 'pred': '7', 'timeout': False}
    # a <think> the model wrote itself is kept too: still one reasoning block
    d = score(rewards.decode_response(tok, tok.encode("<think> r </think> \\boxed{7}").ids), "7")
    assert (d['accuracy'], d['format']) == (1, 1)
    # a transformers tokenizer's own eos / pad strings are dropped at the end, however many; tensors work
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token='<|eot|>', pad_token='<|endoftext|>')
    ids = hf.encode("r </think> \\boxed{8} <|eot|> <|endoftext|> <|endoftext|>", add_special_tokens=False)
    assert rewards.decode_response(hf, torch.tensor(ids)) == "r </think> \\boxed{8}"
    # only at the end: a stop token inside the response stays, and scoring then rejects it
    ids = hf.encode("r </think> \\boxed{8} <|im_end|> \\boxed{7}", add_special_tokens=False)
    text = rewards.decode_response(hf, ids)
    assert '<|im_end|>' in text and score(text, "7")['reward'] == 0.0


def test_stop_tokens_at_the_end_only():
    d = score("ok</think>\\boxed{7}\n<|im_end|>\n<|endoftext|><|endoftext|>  ", "7")
    assert (d['accuracy'], d['format'], d['reward']) == (1, 1, 1.0)
    # a stop token (or a new turn) followed by more text: the response ran past its end of turn, so it is not
    # one answer, whichever side the right one is on
    for r in ["ok</think>\\boxed{7}<|im_end|>more text", "ok</think>\\boxed{8}<|im_end|>\\boxed{7}",
              "ok<|im_end|></think>\\boxed{7}", "ok</think>\\boxed{7}<|endoftext|>x",
              "ok</think>\\boxed{7}\n<|im_start|>user\nthanks"]:
        d = score(r, "7")
        assert (d['accuracy'], d['format'], d['reward']) == (0, 0, 0.0), r


def test_multiple_choice_box_naming_two_options_is_a_hedge():
    opts = ['red', 'blue', 'green', 'light blue']
    hedges = ["(B) or (C)", "B) or C)", "B, C", "B,C", "B and C", "B/C", "B or C", "B & C", "(B), (C)", "(B)(C)",
              "B.C.", "B:C", "either B or C", "Options B and C", "\\text{B} or \\text{C}", "B) blue, C) green",
              "B) blue or green", "B) green", "B) light blue"]  # the last three: B's letter with another's text
    for ans in hedges:
        for gold in 'BC':
            assert score(f"r</think>\\boxed{{{ans}}}", gold, options=opts)['accuracy'] == 0, (ans, gold)
    for ans in ["A and B", "A, B", "(A) or (B)"]:
        assert score(f"r</think>\\boxed{{{ans}}}", 'A', options=opts)['accuracy'] == 0, ans
    assert score("r</think>\\boxed{B}, \\boxed{C}", 'B', options=opts)['accuracy'] == 0
    assert score("r</think>The answer is (B) or (C).", 'B', options=opts)['accuracy'] == 0
    assert score("r</think>\\boxed{(B) or (C)}", 'B')['accuracy'] == 0  # a bare letter gold, no options
    # one option, however it is written, still counts
    for ans in ["B) blue", "(B) blue", "Option B", "B: blue", "(B) Blue.", "Choice (B)", "B) \\text{blue}"]:
        assert score(f"r</think>\\boxed{{{ans}}}", 'B', options=opts)['accuracy'] == 1, ans
    assert score("r</think>\\boxed{D) light blue}", 'D', options=opts)['accuracy'] == 1  # contains "blue"
    assert score("r</think>\\boxed{light blue}", 'D', options=opts)['accuracy'] == 1
    # a capital inside the option's own text is not a second option (5 N: newtons)
    assert score("r</think>\\boxed{(B) 5 N}", 'B', options=['3 N', '5 N'])['accuracy'] == 1


def test_multiple_choice_value_is_verified_against_option_texts(monkeypatch):
    sent = []

    def spy(pairs, timeout=5.0, workers=2):
        sent.extend(pairs)
        return _real_verify_many(pairs, timeout, workers)

    monkeypatch.setattr(rewards, 'verify_many', spy)
    nums, same, words = ["1/2", "3/4", "\\sqrt{2}", "2"], ["1/2", "0.5", "3"], ["red", "blue"]
    cases = [("\\frac{1}{2}", 'A', nums, 1), ("0.5", 'A', nums, 1), ("\\dfrac{2}{4}", 'A', nums, 1),
             ("0.75", 'B', nums, 1), ("0.75", 'A', nums, 0), ("2^{1/2}", 'C', nums, 1), ("\\frac{4}{2}", 'D', nums, 1),
             ("1/2 or 3/4", 'A', nums, 0), ("1/2 or 3/4", 'B', nums, 0),
             ("\\frac{2}{4}", 'A', same, 0), ("\\frac{2}{4}", 'B', same, 0),  # equal to two options: ambiguous
             ("0.5", 'A', words, 0),
             ("\\sqrt{2}", 'C', nums, 1), ("B) 1/2", 'A', nums, 0)]  # cheap: an option's text, a letter
    out = score_batch([f"r</think>\\boxed{{{p}}}" for p, _, _, _ in cases], [g for _, g, _, _ in cases],
                      [o for _, _, o, _ in cases], timeout=10.0)
    assert [d['accuracy'] for d in out] == [c[3] for c in cases]
    assert not any(d['timeout'] for d in out)
    # through the pool: against the gold option's text first, the other texts only after a match
    assert [g for p, g in sent if p == "\\frac{1}{2}"] == ["1/2", "3/4", "\\sqrt{2}", "2"]
    assert [g for p, g in sent if p == "1/2 or 3/4"] == ["1/2", "3/4"]  # no match: one item per case
    assert not any(p in ("\\sqrt{2}", "B) 1/2") for p, _ in sent)


def _misbehave(pred, gold, t_in):
    # stand-in for the pool's worker: some preds kill their worker process (a segfault or the OOM killer
    # looks the same to the pool), some hang; the rest take a while, so they are running when a crash comes
    if 'crash' in pred:
        os._exit(1)
    if 'hang' in pred:
        time.sleep(60)
    time.sleep(0.3)
    return _real_worker(pred, gold, t_in)


def test_crashed_worker_fails_only_its_own_item(monkeypatch):
    rewards.close()  # workers fork after the patch, so they run the stand-in
    monkeypatch.setattr(rewards, '_verify_worker', _misbehave)
    preds = ['\\frac{1}{2}', 'crash', '2/4', '\\frac{1}{3}', 'crash', '1/2']
    t0 = time.time()
    out = score_batch([f"r</think>\\boxed{{{p}}}" for p in preds], ['0.5'] * len(preds), timeout=2.0, workers=2)
    assert [d['accuracy'] for d in out] == [1, 0, 1, 0, 0, 1]
    assert [d['timeout'] for d in out] == [False, True, False, False, True, False]
    # multiple-choice values go through the same pool: a crash or a hang there fails only that item
    opts = ["1/2", "3/4"]
    preds = ['\\frac{1}{2}', '\\hang{1}', '\\crash{1}', '0.75']
    out = score_batch([f"r</think>\\boxed{{{p}}}" for p in preds], ['A', 'A', 'A', 'B'], [opts] * len(preds),
                      timeout=1.0, workers=2)
    assert [d['accuracy'] for d in out] == [1, 0, 0, 1]
    assert [d['timeout'] for d in out] == [False, True, True, False]
    assert time.time() - t0 < 15.0  # restarts and one 1 s timeout, never the 60 s sleep
    monkeypatch.undo()
    rewards.close()
    assert score("r</think>\\boxed{\\frac{3}{6}}", "0.5")['accuracy'] == 1


def test_multiple_choice_letter_with_a_justification_is_not_a_hedge():
    # a capital in the justification ("because A is wrong") or a unit ("5 A") is not a second option
    opts = ["3 cm", "5 cm", "7 cm", "9 cm"]
    for t in ["(B) because A is wrong", "B) 5 cm, since C is wrong", "B. Since A and C fail", "(B), as (A) gives 3 cm"]:
        assert to_letter(t, opts) == "B", t
    for t in ["(B) or (C)", "B) or C)", "(B)(C)", "B.C.", "B:C", "B) 7 cm", "(B) and (C)", "B) 5 cm or C"]:
        assert to_letter(t, opts) is None, t  # the hedges stay hedges
    assert to_letter("C: I = 5 A", ["I = 2 A", "I = 3 A", "I = 5 A", "I = 7 A"]) == "C"
    assert to_letter("C) I = 5 A", ["I = 2 A", "I = 3 A", "I = 5 A", "I = 7 A"]) == "C"
