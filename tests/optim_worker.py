"""
Worker for tests/test_optim.py::test_fsdp2_two_processes (plumbing/optim.py under FSDP2, 2 CPU processes, gloo).
    torchrun --standalone --nproc_per_node=2 tests/optim_worker.py OUT_DIR
Checks: build_model(master_dtype=bf16) shards bf16 parameters (DTensors) whose gradients are bf16 DTensors;
plumbing.optim.AdamW steps the shards and keeps bf16 DTensor moments sharded like the parameters; at lr 1e-6 the
bf16 model travels along the fp32-master (bf16 compute) run's path as far as it does, while torch.optim.AdamW on the
same bf16 shards does not move; a save_checkpoint / build_model('resume') / load_checkpoint round trip continues bit
for bit as the uninterrupted run (parameters and both moments: the rounding noise is seeded by step and shard).
Prints "OPTIM WORKER OK rank R" on success; any failed check raises (non-zero exit).
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from plumbing import (AdamW, build_model, build_optimizer, compute_cleanup, compute_init, load_checkpoint,  # noqa: E402
                      save_checkpoint)


class StubTok:
    """The three things build_model('scratch') asks of a tokenizer."""
    unk_token_id, name_or_path = 0, "stub"

    def __len__(self):
        return 128

    def convert_tokens_to_ids(self, t):
        return 125 if t == "<IMG_CONTEXT>" else 0


SCRATCH = dict(image_size=16, patch_size=4, vit_hidden=32, vit_layers=2, vit_heads=2, vit_mlp=64, n_embd=64,
               n_layer=2, n_head=4, n_kv_head=2, mlp_hidden=128)


def batch(k, rank):
    """This rank's micro-batch of step k: 2 samples of 12 tokens, one tile each, random targets."""
    g = torch.Generator().manual_seed(1000 * k + rank)
    ids = torch.randint(6, 120, (2, 12), generator=g)
    ids[:, 1:5] = 125  # 4 image tokens per 16 x 16 tile
    return ids, torch.randn(2, 3, 16, 16, generator=g), torch.randint(0, 128, (2, 12), generator=g)


def step(model, opt, k, rank):
    ids, px, tgt = batch(k, rank)
    F.cross_entropy(model(ids, px).float().flatten(0, 1), tgt.flatten()).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def full(model):
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().float().clone() for k, v in sd.items()}


def main():
    out = sys.argv[1]
    ddp, rank, _, world, device = compute_init(seed=0)
    assert ddp and world == 2 and device.type == "cpu", (ddp, world, device)
    bf16 = torch.bfloat16

    def build(master, param_dtype=None, path=None):
        torch.manual_seed(0)  # the same init on every rank and in every run (rounded to bf16 for bf16 masters)
        return build_model("resume" if path else "scratch", StubTok(), device, resume_path=path, scratch=SCRATCH,
                           fsdp=True, activation_checkpointing=True, master_dtype=master, param_dtype=param_dtype)[0]

    # 1. bf16 masters: bf16 DTensor shards, bf16 DTensor gradients, bf16 DTensor moments sharded like the params
    model = build(bf16)
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(isinstance(p, DTensor) and p.dtype == bf16 and p.to_local().dtype == bf16 for p in params)
    opt = build_optimizer(params, "bfloat16", lr=1e-3, weight_decay=0.1, seed=0)
    assert isinstance(opt, AdamW)
    ids, px, tgt = batch(0, rank)
    F.cross_entropy(model(ids, px).float().flatten(0, 1), tgt.flatten()).backward()
    assert all(isinstance(p.grad, DTensor) and p.grad.to_local().dtype == bf16 for p in params)
    before = [p.to_local().clone() for p in params]
    opt.step()
    opt.zero_grad(set_to_none=True)
    moved = sum(int((p.to_local() != b).sum()) for p, b in zip(params, before))
    assert moved > 0.9 * sum(b.numel() for b in before), moved  # lr 1e-3: nearly every element moves
    for p in params:
        st = opt.state[p]
        for key in ("exp_avg", "exp_avg_sq"):
            assert isinstance(st[key], DTensor) and st[key].dtype == bf16 and st[key].placements == p.placements
            assert st[key].to_local().shape == p.to_local().shape

    # 2. small updates: 30 steps at lr 1e-6, the displacement along the fp32-master run's direction
    def travel(master, kind, param_dtype=None, steps=30):
        m = build(master, param_dtype)
        ps = [p for p in m.parameters() if p.requires_grad]
        o = torch.optim.AdamW(ps, lr=1e-6, weight_decay=0.0) if kind == "torch" else \
            build_optimizer(ps, "bfloat16", lr=1e-6, seed=0)
        w0 = full(m)
        for k in range(steps):
            step(m, o, k, rank)
        w1 = full(m)
        return torch.cat([(w1[n] - w0[n]).flatten() for n in sorted(w0)])

    d32 = travel(torch.float32, "torch", param_dtype=bf16)  # the GPU default: fp32 masters, bf16 compute
    d_sr = travel(bf16, "ours")
    d_bf16 = travel(bf16, "torch")
    u = d32 / d32.norm()
    n32, n_sr, n_bf16 = float(d32.norm()), float(d_sr @ u), float(d_bf16 @ u)
    print(f"OPTIM rank {rank}: 30 steps at lr 1e-6 on {d32.numel()} weights: d32 {n32:.3e} d_sr {n_sr:.3e} "
          f"(ratio {n_sr / n32:.3f}) d_bf16 {n_bf16:.3e} (ratio {n_bf16 / n32:.3f})", flush=True)
    assert abs(n_sr / n32 - 1) < 0.15 and abs(n_bf16) / n32 < 0.1, (n32, n_sr, n_bf16)

    # 3. checkpoint round trip: 3 steps, save, 3 more (the reference); rebuilt from the checkpoint, the same 3 more
    model = build(bf16)
    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], "bfloat16", lr=1e-4, weight_decay=0.1,
                          seed=0)
    for k in range(3):
        step(model, opt, k, rank)
    path = save_checkpoint(out, 3, model, opt, {"note": "optim"}, {})
    for k in range(3, 6):
        step(model, opt, k, rank)
    model2 = build(bf16, path=path)
    opt2 = build_optimizer([p for p in model2.parameters() if p.requires_grad], "bfloat16", lr=1e-4,
                           weight_decay=0.1, seed=0)
    got_step, state, _ = load_checkpoint(path, model2, opt2)
    assert got_step == 3 and state["note"] == "optim"
    for (n, p), (_, q) in zip(model.named_parameters(), model2.named_parameters()):
        assert q.dtype == bf16 and opt2.state[q]["step"].item() == 3 and opt2.state[q]["exp_avg"].dtype == bf16, n
    for k in range(3, 6):
        step(model2, opt2, k, rank)
    a, b = full(model), full(model2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed params differ"
    for (n, p), (_, q) in zip(model.named_parameters(), model2.named_parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key].to_local(), opt2.state[q][key].to_local()), (n, key)
    print(f"OPTIM WORKER OK rank {rank}", flush=True)
    compute_cleanup()


if __name__ == "__main__":
    main()
