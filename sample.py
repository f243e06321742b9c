"""
Sample from a checkpoint (nanoGPT's sample.py): a question, optionally an image, group_size responses from
sampler.generate, each with its finish reason and mean entropy, and with --show_entropy=True every token's entropy
and log-prob.

    python sample.py --init_from=out/sft/hf --image=cat.png --question="How many cats?" --show_entropy=True
    python sample.py --init_from=out/grpo --question="..." --group_size=4 --temperature=1.0 --no_wait=True
    torchrun --nproc_per_node=8 sample.py --init_from=DIR --image=cat.png --question="..." --tp=8   # rank 0 prints

--init_from takes an HF directory, a ckpt_XXXXXXX checkpoint or a training out_dir (plumbing.load_inference_model).
"""
import sys

import torch

from plumbing import load_inference_model
from plumbing.configurator import config_keys, configure
from data.common import (build_prompt_ids, check_chat_template, critical_token_ids, load_image, resolve_system,
                         stop_token_ids, vision_token_ids)
from rewards import decode_response
from sampler import Sampling, generate, memory_budget

# -----------------------------------------------------------------------------
init_from = ""  # the model: an HF directory, a ckpt_XXXXXXX checkpoint or a training out_dir
tokenizer = ""  # default: the checkpoint's
image = ""  # an image file (optional)
question = ""
system_prompt = "auto"  # 'auto': the checkpoint's (data/common.py resolve_system); '': no system turn; or the text
check_template = True  # False: run even if the checkpoint's chat template renders other prompts than ours
think = True  # the forced "<think>\n" prefix, as in training
group_size = 1  # responses to the question
max_new_tokens = 512
temperature = 0.0  # 0 = greedy
top_p = 1.0
top_k = 0
repetition_penalty = 1.0  # 1 = off; Skywork-R1V3's own inference uses 1.05
seed = 0
show_entropy = False  # every token's entropy and log-prob
no_wait = False  # ban the single-token spellings of the critical words (the paper's "no-wait" mode)
tp = 1  # > 1: under torchrun --nproc_per_node=tp, the ranks hold TP shards and generate together (plumbing/tp.py)
# -----------------------------------------------------------------------------


def main(argv=None):
    """Runs the command line argv (default sys.argv[1:]); returns (Rollouts, the decoded texts)."""
    c = dict(globals())  # a copy: the module's defaults stay as they are (tests call main more than once)
    configure(c, sys.argv[1:] if argv is None else argv, config_keys(globals()))
    if not c["init_from"] or not c["question"]:
        raise SystemExit("usage: python sample.py --init_from=DIR --question='...' [--image=path.png] "
                         "[--show_entropy=True]")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    group, rank, budget = None, 0, None
    if c["tp"] > 1:  # every rank loads its TP shard (plumbing/tp.py) and generates with the others; rank 0 prints
        from plumbing import agree_min, compute_cleanup
        from plumbing.tp import check_same, init_tp, load_tp_inference_model
        group, rank, device = init_tp(c["tp"], c["seed"])
        model, tok, path = load_tp_inference_model(c["init_from"], group, device, dtype, c["tokenizer"])
        budget = agree_min(memory_budget(device))  # one value for the group: the same chunks on every rank
    else:
        model, tok, path = load_inference_model(c["init_from"], device, dtype, c["tokenizer"])
    c["system_prompt"] = resolve_system(c["system_prompt"], path, tok)  # 'auto' -> the checkpoint's
    check_chat_template(tok, c["system_prompt"], c["think"], path, c["check_template"])
    say = print if rank == 0 else (lambda *a, **k: None)
    cfg = model.cfg
    pix = load_image(c["image"], cfg.image_size, cfg.max_tiles, cfg.use_thumbnail) if c["image"] else None
    n_tiles = [pix.shape[0]] if pix is not None else []
    ids = build_prompt_ids(tok, c["question"], n_tiles, cfg.tokens_per_tile, think=c["think"],
                           system=c["system_prompt"] or None)
    sampling = Sampling(temperature=c["temperature"], top_k=c["top_k"], top_p=c["top_p"],
                        repetition_penalty=c["repetition_penalty"],
                        ban=vision_token_ids(tok) + (list(critical_token_ids(tok)) if c["no_wait"] else []))
    say(f"{path}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params{' per rank' if group else ''}, "
        f"prompt {len(ids)} tokens, {len(n_tiles) and n_tiles[0]} tiles")
    st = {}
    out = generate(model, [(ids, pix)], n=c["group_size"], max_new_tokens=c["max_new_tokens"], sampling=sampling,
                   eos_token_id=stop_token_ids(tok), seed=c["seed"], stats=st, budget=budget)
    if group is not None:
        check_same(group, out.tokens)  # every rank drew the same tokens
    texts = []
    for r in range(out.tokens.shape[0]):
        L = int(out.lengths[r])
        texts.append(decode_response(tok, out.response(r)))
        say(f"--- sample {r} ({L} tokens, {'length' if out.truncated[r] else 'eos'}, mean entropy "
            f"{out.entropies[r, :L].mean():.3f})")
        say(texts[-1])
        if c["show_entropy"]:
            say(f"{'pos':>4} {'entropy':>8} {'logp':>8}  token")
            for j in range(L):
                say(f"{j:4d} {out.entropies[r, j]:8.3f} {out.logprobs[r, j]:8.3f}  {tok.decode([out.tokens[r, j]])!r}")
    say(f"{st['new_tokens']} tokens in {st['prefill_s'] + st['decode_s']:.2f} s ({st['tokens_per_s']:.0f} tokens/s)")
    if group is not None:
        compute_cleanup()
    return out, texts


if __name__ == "__main__":
    main()
