"""
Worker for tests/test_tp.py: tensor-parallel rollouts (tp.py) on 2 CPU processes with gloo, tp=2.
    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/tp_worker.py SPEC.json
SPEC: {"out": dir, "hf": [HF dirs], "parts": ["generate", "reshard", "memory"]}. Each rank writes its results to
out/rank{R}.pt (the test compares them with one process); nothing is checked here except what only the ranks see:
  generate  per HF dir: the TP model read from the checkpoint slice by slice (tp.load_tp_model), then
            sampler.generate on every CASES entry: {case: (tokens, logprobs, entropies, lengths, truncated)}
  reshard   from FSDP2 shards of hf[0] (fp32, bf16 mixed precision, CPU offload): {mode: the TP model's state dict},
            the greedy case generated on it, and, after the block: its weights freed, the FSDP2 model still training
  memory    the default tiny model (VLMConfig()) as grpo.py would run it at tp=2 (4 prompts x 4 samples, the union of
            2 per rank): the TP model's parameter bytes and the KV cache's tensor bytes, fp32 and bf16
The case definitions (prompts, generate kwargs) live here and test_tp.py imports them.
"""
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import hf_fixtures as hx  # noqa: E402
from plumbing.hf import load_pretrained  # noqa: E402
from sampler import Sampling  # noqa: E402


def prompts():
    """Ragged prompts (3..23 tokens) with 1, 0, 2 and 1 tiles, and two text-only ones."""
    g = torch.Generator().manual_seed(1)
    return [hx.rand_prompt(g, 7, 1), hx.rand_prompt(g, 3, 0), hx.rand_prompt(g, 12, 2), hx.rand_prompt(g, 5, 1),
            hx.rand_prompt(g, 9, 0), hx.rand_prompt(g, 4, 0)]


EOS = list(range(0, hx.N_REGULAR, 5))  # 24 of 128 ids: rows end at different steps, so compaction runs
CASES = {  # name: (prompt indices, generate kwargs (sampling: temperature 1 unless said), Triton kernels on)
    "greedy": ([0, 1, 2, 3], dict(n=2, max_new_tokens=8, sampling=Sampling(temperature=0)), False),
    "greedy_text": ([4, 1, 5], dict(n=2, max_new_tokens=8, sampling=Sampling(temperature=0)), False),  # no ViT run
    "sample": ([0, 1, 2, 3], dict(n=3, max_new_tokens=8, sampling=Sampling(top_p=0.9), seed=[10, 11, 12, 13]), False),
    "eos": ([0, 1, 2, 3, 4], dict(n=3, max_new_tokens=12, seed=2, eos_token_id=EOS, sync_every=2), False),
    "eos_static": ([0, 1, 2, 3, 4], dict(n=3, max_new_tokens=12, seed=2, eos_token_id=EOS, sync_every=2,
                                         cuda_graph=True), False),  # bucketed compaction
    "triton": ([1, 2], dict(n=2, max_new_tokens=4, seed=5, sync_every=2), True),
}


def run_case(model, name):
    import decode_kernels
    from sampler import generate
    idx, kw, triton = CASES[name]
    ps = prompts()
    decode_kernels.USE_TRITON = True if triton else False
    try:
        out = generate(model, [ps[i] for i in idx], **kw)
    finally:
        decode_kernels.USE_TRITON = None
    return out.tokens, out.logprobs, out.entropies, out.lengths, out.truncated


# the memory case: grpo.py's shapes at tp=2 (test_tp.py gives plan.plan_run the same numbers)
MEM = dict(prompts_per_step=4, group_size=4, max_new=24, prompt=40)


def memory_case(dtype):
    """Bytes of the TP model's parameters and of the KV cache's tensors in one grpo-like rollout of the default tiny
    model (FSDP2 on 2 ranks, param_dtype=dtype), each rank bringing 2 prompts of MEM['prompt'] tokens (1 tile)."""
    import sampler
    from plumbing import apply_fsdp
    from model import VLM, VLMConfig
    from plumbing.tp import tp_group, tp_rollout_model, tp_union
    torch.manual_seed(0)
    m = apply_fsdp(VLM(VLMConfig()), param_dtype=None if dtype == torch.float32 else dtype)
    cfg, rank = m.cfg, torch.distributed.get_rank()
    L, tiles = MEM["prompt"], 1
    n_img = tiles * cfg.tokens_per_tile
    ids = [5, 6] + [cfg.image_token_id] * n_img + [7] * (L - 2 - n_img)
    pix = torch.randn(tiles, 3, cfg.image_size, cfg.image_size)
    mine = list(range(rank * 2, rank * 2 + 2))  # this rank's 2 prompts (grpo.next_prompts: prompts_per_step / W)
    union, _ = tp_union(tp_group(2), mine)
    seen = []
    init = sampler.DecodeCache.__init__

    def spy(self, *a, **k):  # every cache the sampler allocates: its tensors' bytes
        init(self, *a, **k)
        seen.append(sum(t.numel() * t.element_size() for t in (self.pk, self.pv, self.gk, self.gv)))

    sampler.DecodeCache.__init__ = spy
    try:
        with tp_rollout_model(m, tp_group(2)) as policy:
            weights = sum(p.numel() * p.element_size() for p in policy.parameters())
            sampler.generate(policy, [(ids, pix)] * len(union), n=MEM["group_size"], max_new_tokens=MEM["max_new"],
                             sampling=Sampling(temperature=1.0), seed=union)
    finally:
        sampler.DecodeCache.__init__ = init
    return dict(weights=weights, kv=max(seen), chunks=len(seen))


def main():
    import torch.distributed as dist
    from plumbing import apply_fsdp
    from plumbing.tp import load_tp_model, tp_group, tp_rollout_model
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, g = dist.get_rank(), tp_group(2)
    res = {}
    if "generate" in spec["parts"]:
        for d in spec["hf"]:
            m = load_tp_model(d, g, "cpu")
            res[d] = {name: run_case(m, name) for name in CASES}
    if "reshard" in spec["parts"]:
        ids = torch.tensor([[3, 4, 5, 6]])
        for mode in ("fp32", "bf16", "offload"):
            m = load_pretrained(spec["hf"][0])
            apply_fsdp(m, param_dtype=torch.bfloat16 if mode == "bf16" else None, offload=mode == "offload")
            with tp_rollout_model(m, g) as t:
                sd = {k: v.clone() for k, v in t.state_dict().items()}
                toks = run_case(t, "greedy") if mode != "bf16" else None
            freed = all(p.is_meta for p in t.parameters())
            m(ids).float().sum().backward()  # the FSDP2 model trains after the rollout phase
            sharded = all(type(p).__name__ == "DTensor" for p in m.parameters())
            grads = all(p.grad is not None for p in m.llm.parameters())
            res["reshard", mode] = dict(sd=sd, greedy=toks, freed=freed, sharded=sharded, grads=grads)
    if "memory" in spec["parts"]:
        res["memory"] = {str(dt): memory_case(dt) for dt in (torch.float32, torch.bfloat16)}
    torch.save(res, os.path.join(spec["out"], f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    print(f"WORKER OK rank {rank}", flush=True)


if __name__ == "__main__":
    main()
