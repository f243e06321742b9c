"""
Worker for tests/test_common.py::test_fsdp_gloo_two_processes, and tiny helpers shared with that file.
    torchrun --standalone --nproc_per_node=2 tests/dist_common_worker.py OUT_DIR
Checks, on 2 CPU processes with gloo: FSDP2 + activation checkpointing gives the same update as one unsharded
model on the full batch; a DCP checkpoint is written as one shard per rank and reloads into a fresh FSDP model
(params, optimizer state, per-rank RNG) so that the next step equals the uninterrupted run; a root unit that mixes
frozen and trainable params trains only the trainable ones; export_hf gathers a model that loads back.
Prints "WORKER OK" on success; any failed check raises (non-zero exit).
"""
import os
import random
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import VLM, VLMConfig  # noqa: E402
from plumbing.hf import load_pretrained


def tiny_cfg():
    # 16x16 tiles of 4x4 patches -> 16 patches -> 4 tokens per tile after pixel shuffle; tied embeddings
    return VLMConfig(image_size=16, patch_size=4, vit_hidden=16, vit_layers=2, vit_heads=2, vit_mlp=32,
                     vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_kv_head=2, mlp_hidden=64,
                     tie_embeddings=True, image_token_id=5)


def make_batch(cfg, B, seed):
    """B samples of T=12 tokens, one tile each (4 image tokens at positions 1..4), random targets."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, cfg.vocab_size, (B, 12), generator=g)
    ids[:, 1:1 + cfg.tokens_per_tile] = cfg.image_token_id
    px = torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=g)
    tgt = torch.randint(0, cfg.vocab_size, (B, 12), generator=g)
    return ids, px, tgt


def train_step(model, opt, ids, px, tgt):
    loss = F.cross_entropy(model(ids, px).flatten(0, 1), tgt.flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def draws():
    """One number from each RNG a training loop may use."""
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()


def main():
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from plumbing import (apply_activation_checkpointing, apply_fsdp, compute_cleanup, compute_init, export_hf,
                        latest_checkpoint, load_checkpoint, save_checkpoint, set_trainable)
    out = sys.argv[1]
    ddp, rank, local_rank, world, device = compute_init(seed=0)
    assert ddp and world == 2 and device.type == "cpu", (ddp, world, device)
    cfg = tiny_cfg()

    def build(seed, train_llm=True, sharded=True):
        torch.manual_seed(seed)
        m = VLM(cfg)
        set_trainable(m, train_vit=False, train_connector=True, train_llm=train_llm)  # frozen ViT unit
        if sharded:
            apply_activation_checkpointing(m)
            apply_fsdp(m)
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
        return m, opt

    def full(m):  # the full (unsharded) state dict on every rank
        sd = get_model_state_dict(m, options=StateDictOptions(full_state_dict=True))
        return {k: v.detach().clone() for k, v in sd.items()}

    def close(a, b, what, atol=1e-6):
        assert a.keys() == b.keys(), (what, set(a) ^ set(b))
        for k in a:
            assert torch.allclose(a[k], b[k], atol=atol, rtol=0), f"{what}: {k} max diff {(a[k] - b[k]).abs().max()}"

    batches = [make_batch(cfg, 2 * world, seed=s) for s in (1, 2)]
    mine = lambda b: [t[rank::world] for t in b]  # this rank's half of the global batch

    # 1. FSDP2 + AC step on half-batches == unsharded step on the full batch (grads averaged over ranks)
    model, opt = build(0)
    ref, _ = build(0, sharded=False)
    p0 = full(model)
    for m, b in ((model, mine(batches[0])), (ref, batches[0])):
        ids, px, tgt = b
        F.cross_entropy(m(ids, px).flatten(0, 1), tgt.flatten()).backward()
    # compare gradients, not weights after Adam: its first step is lr * sign(g), which turns the float noise
    # of exactly-zero gradients (k_proj.bias: softmax ignores a constant shift of k) into +-lr
    g = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    g_ref = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    close(g, g_ref, "fsdp+AC grads vs unsharded full-batch grads", atol=1e-6)
    assert not any(n.startswith("vit.") for n in g), "frozen ViT got gradients"
    opt.step()
    opt.zero_grad(set_to_none=True)
    p1 = full(model)
    assert torch.equal(p1["vit.patch.weight"], p0["vit.patch.weight"]), "frozen ViT changed"
    assert model.llm.lm_head.weight is model.llm.wte.weight, "tie broken by fully_shard"

    # 2. checkpoint at step 1 (per-rank RNG differs so a wrong rank file would be caught)
    torch.manual_seed(100 + rank)
    np.random.seed(100 + rank)
    random.seed(100 + rank)
    path = save_checkpoint(out, 1, model, opt, state={"pos": 3}, config={"lr": 1e-2}, keep_last=1)
    after_save = draws()
    files = set(os.listdir(path))
    assert {"__0_0.distcp", "__1_0.distcp", "rank0.pt", "rank1.pt", "state.json",
            "model_config.json", ".metadata"} <= files, files
    loss2 = train_step(model, opt, *mine(batches[1]))  # the uninterrupted run
    p2 = full(model)

    # 3. resume into a fresh FSDP model built from another seed
    model2, opt2 = build(123)
    assert latest_checkpoint(out) == path
    step, state, config = load_checkpoint(path, model2, opt2)
    assert (step, state, config) == (1, {"pos": 3}, {"lr": 1e-2}), (step, state, config)
    assert draws() == after_save, "RNG not restored for this rank"
    close(full(model2), p1, "params after load")
    loss2b = train_step(model2, opt2, *mine(batches[1]))  # needs the restored Adam moments and step count
    assert abs(loss2 - loss2b) < 1e-6, (loss2, loss2b)
    close(full(model2), p2, "params one step after resume")

    # 4. root unit mixing trainable (connector) and frozen (wte, norm) params; frozen LLM blocks
    model3, opt3 = build(7, train_llm=False)
    q0 = full(model3)
    train_step(model3, opt3, *mine(batches[0]))
    q1 = full(model3)
    for k in q0:
        changed = not torch.equal(q0[k], q1[k])
        assert changed == k.startswith("connector."), f"{k}: changed={changed}"

    # 5. HF export from the sharded model loads back with the same tensors
    export_hf(model2, os.path.join(out, "hf"))
    if rank == 0:
        back = load_pretrained(os.path.join(out, "hf"))
        close({k: v.detach() for k, v in back.state_dict().items()}, p2, "export_hf round trip", atol=0)
    compute_cleanup()
    print(f"WORKER OK rank {rank}")


if __name__ == "__main__":
    main()
