"""rollout.py, the one prompts -> samples -> rewards path: every rollout bans the vision special tokens (on top of the
caller's bans) and stops at the chat template's end tokens (data/common.py, written once), decodes with special tokens
kept, and scores each row against its own item."""
import torch

import hf_fixtures as hx
import rollout
from data.common import stop_token_ids, vision_token_ids
from plumbing.hf import load_pretrained
from sampler import Sampling


def test_rollout_bans_vision_tokens_and_scores_each_row(tmp_path, monkeypatch):
    from transformers import AutoTokenizer
    hf, d = hx.make_hf_model(tmp_path)
    hx.write_tokenizer(d)
    tok = AutoTokenizer.from_pretrained(d)
    m = load_pretrained(d).eval()
    vision = {hx.IMG_START_ID, hx.IMG_END_ID, hx.IMG_CONTEXT_ID}
    assert set(vision_token_ids(tok)) == vision
    assert hx.SPECIAL_IDS["<|im_end|>"] in stop_token_ids(tok)
    # make <IMG_CONTEXT> the most likely next token everywhere: without the ban greedy decoding picks it (and the
    # trainer's forward would then refuse the sequence: an image-context token without image features)
    with torch.no_grad():
        m.llm.lm_head.weight[hx.IMG_CONTEXT_ID] = 50 * m.llm.norm.weight.sign() * m.llm.lm_head.weight.abs().max()
    items = [{"id": "a", "question": "t1 t2 t3", "answer": "t5", "images": []},
             {"id": "b", "question": "t4 t6", "answer": "t7", "images": []}]
    seen = {}
    real = rollout.generate

    def spy(*a, **k):
        seen.update(k)
        return real(*a, **k)
    monkeypatch.setattr(rollout, "generate", spy)
    out, texts, scores, prompts = rollout.rollout(m, tok, items, 2, 6, [0, 1], sampling=Sampling(temperature=0))
    assert set(seen["sampling"].ban) == vision and set(seen["eos_token_id"]) == set(stop_token_ids(tok))
    assert seen["sampling"].temperature == 0
    assert not torch.isin(out.tokens, torch.tensor(sorted(vision))).any()
    assert len(texts) == len(scores) == 4 and len(prompts) == 2
    # the same model without the ban does emit it: the check above can fail
    free = real(m, prompts, 1, 6, sampling=Sampling(temperature=0))
    assert torch.isin(free.tokens, torch.tensor([hx.IMG_CONTEXT_ID])).any()
    # the caller's bans (eval.py's no-wait ones) stay, beside the vision tokens
    rollout.rollout(m, tok, items, 1, 2, [0, 1], sampling=Sampling(temperature=0, ban=[7]), prompts=prompts)
    assert set(seen["sampling"].ban) == vision | {7}
