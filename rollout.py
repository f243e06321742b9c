"""
Prompts -> samples -> rewards: the one path used by grpo.py (rollouts and validation), eval.py and entropy.py.

    out, texts, scores, prompts = rollout(model, tok, items, n=8, max_new_tokens=512, seeds=[...],
                                          sampling=Sampling(temperature=1.0))
    out: sampler.Rollouts (row r = sample r % n of items[r // n]); texts: the decoded responses (special tokens
    kept, the stop token dropped); scores: rewards.score_batch's dicts; prompts: the (input_ids, pixel_values) pairs.

Images are decoded here, for these items only, so memory does not grow with the data set. Every rollout bans the
vision special tokens (a sampled <IMG_CONTEXT> has no image features) on top of the caller's bans, and stops at the
chat template's end token.
"""
from data.common import encode_prompt, stop_token_ids, vision_token_ids
from rewards import decode_response, score_batch
from sampler import Sampling, generate


def rollout(model, tok, items, n, max_new_tokens, seeds, *, sampling=Sampling(), think=True, system=None,
            budget=None, prompts=None, score_kw=None, stats=None, cuda_graph=False):
    """items: samples from data.common.load_jsonl; seeds: one per item (its samples depend on nothing else);
    sampling: how tokens are drawn (its bans, e.g. eval.py's no-wait ones, are kept); prompts: already encoded pairs
    (else encoded now); score_kw: rewards.score_batch options (acc_weight, fmt_weight, timeout)."""
    if prompts is None:
        prompts = [encode_prompt(tok, s, model.cfg, think, system) for s in items]
    out = generate(model, prompts, n, max_new_tokens, sampling=sampling.banning(vision_token_ids(tok)),
                   eos_token_id=stop_token_ids(tok), seed=seeds, budget=budget, stats=stats, cuda_graph=cuda_graph)
    texts = [decode_response(tok, out.response(r)) for r in range(out.tokens.shape[0])]
    golds = [items[r // n] for r in range(len(texts))]
    scores = score_batch(texts, [s["answer"] for s in golds], [s.get("options") for s in golds], think=think,
                         **(score_kw or {}))
    return out, texts, scores, prompts
