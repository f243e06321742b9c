"""
Measurements that tests/test_plan.py compares with plan.py, and the 2-process worker:
    torchrun --standalone --nproc_per_node=2 tests/plan_worker.py OUT.json
Every number is counted from real tensors, never from a formula: the distinct storages of the parameters, gradients
and AdamW state after one real optimizer step (built as sft.py builds it, plumbing.apply_fsdp under FSDP2), the
storages autograd saves during one forward (torch.autograd.graph.saved_tensors_hooks, parameters excluded), the
parameters of sampler.unsharded's gathered model, the KV cache sampler.generate allocates, and, with a dispatch
mode that follows every storage an op creates until it is freed, the peak of the decode and log-prob buffers.
The worker writes rank 0's and rank 1's numbers to OUT.json and prints "PLAN WORKER OK".
"""
import json
import os
import sys
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import VLMConfig  # noqa: E402


def tiny_cfg(**kw):
    """A tiny VLM with every part the real ones have: 16x16 tiles of 4x4 patches (17 ViT tokens, 4 image tokens per
    tile), GQA, untied embeddings and a vocabulary large enough for the log-prob chunks to matter."""
    base = dict(image_size=16, patch_size=4, vit_hidden=32, vit_layers=2, vit_heads=2, vit_mlp=64,
                vocab_size=512, n_embd=64, n_layer=3, n_head=4, n_kv_head=2, mlp_hidden=128, image_token_id=5,
                max_tiles=2, use_thumbnail=True)
    base.update(kw)
    return VLMConfig(**base)


def batch(cfg, B, T, tiles_per_seq, seed=0):
    """B sequences of T tokens, each with tiles_per_seq tiles (their image tokens at positions 1..), targets."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, cfg.vocab_size, (B, T), generator=g)
    n_img = tiles_per_seq * cfg.tokens_per_tile
    ids[:, 1:1 + n_img] = cfg.image_token_id
    px = torch.randn(B * tiles_per_seq, 3, cfg.image_size, cfg.image_size, generator=g) if tiles_per_seq else None
    tgt = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    return ids, px, tgt


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def storage_bytes(tensors):
    """Bytes of the distinct storages behind `tensors` (an FSDP2 DTensor counts its local shard's storage)."""
    seen = {}
    for t in tensors:
        s = _local(t).untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def adamw(model):
    """The optimizer as sft.py builds it: AdamW, weight decay on matrices only."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.05},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95), eps=1e-8)


def state_bytes(model, opt):
    """(params, grads, optimizer state) bytes of this process, after a step (the grads before zero_grad)."""
    ps = list(model.parameters())
    st = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    # exp_avg / exp_avg_sq are distinct tensors; each 0-dim step has its own storage (4 bytes)
    return (storage_bytes(ps), storage_bytes([p.grad for p in ps if p.grad is not None]),
            sum(_local(t).untyped_storage().nbytes() for t in st))


def saved_bytes(model, fn):
    """Run fn() (a forward with grad) and return (bytes of the distinct storages autograd saved for backward and
    still holds when fn returns, parameters excluded, fn's result). A storage counts once however many ops save it;
    one saved by a part of the graph that is freed during the forward (a checkpointed block nothing flows back
    through) does not count. Under FSDP2 the gathered parameters are the modules' parameters while their unit runs:
    they are looked up at every pack."""
    seen = {}  # data_ptr -> (weakref to the storage, bytes)

    def params():
        return {_local(p).untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if (ptr not in seen or seen[ptr][0]() is None) and ptr not in params():
            seen[ptr] = (weakref.ref(s), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(n for r, n in seen.values() if r() is not None), out


class LiveBytes(TorchDispatchMode):
    """Follows every storage an op creates while the mode is on, until it is freed: `peak` is the largest total
    alive at once (tensors created before entering are not counted). An output sharing an input's storage (an
    in-place or out= result, a view) is no new memory: a gradient accumulated into an existing .grad (+=), a buffer
    a collective fills, are not counted again; neither are gloo's own copies inside a collective (they never surface
    as an op's output; NCCL works in place)."""

    def __init__(self):
        super().__init__()
        self.cur = self.peak = 0
        self.alive = {}

    def _free(self, key, n):
        if self.alive.pop(key, None) is not None:
            self.cur -= n

    @staticmethod
    def _storages(tree):  # plain tensors' storages (a DTensor has none of its own; FSDP2 uses its local shard)
        return [t.untyped_storage() for t in tree_leaves(tree)
                if isinstance(t, torch.Tensor) and not t.is_meta and not hasattr(t, "_local_tensor")]

    def _skip(self, s):
        return False

    def _now(self):
        return self.cur

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {s.data_ptr() for s in self._storages((args, kwargs))}
        out = func(*args, **(kwargs or {}))
        for s in self._storages(out):
            key = (s.data_ptr(), s.nbytes())
            if key[0] and key not in self.alive and key[0] not in inputs and not self._skip(s):
                self.alive[key] = True
                self.cur += key[1]
                weakref.finalize(s, self._free, key, key[1])
        self._update()
        return out

    def _update(self):
        self.peak = max(self.peak, self._now())


class FSDPLiveBytes(LiveBytes):
    """LiveBytes for an FSDP2 model, whose gathered parameters live in storages FSDP2 allocates at a unit's first
    all-gather and then only resizes (FSDPParam.all_gather_outputs: to the full size to gather, to 0 to reshard), so
    a dispatch mode never sees them freed. They are left out of the followed storages and their CURRENT sizes are
    read at every op: `peak` is the largest (followed storages + gathered parameters) alive at once, `at_peak` the
    units gathered then. Enter it after a first forward + backward (every unit gathered once)."""

    def __init__(self, model):
        super().__init__()
        from torch.distributed.fsdp import FSDPModule
        self.units = []  # (unit name, its gathered storages)
        for name, mod in model.named_modules():
            group = mod._get_fsdp_state()._fsdp_param_group if isinstance(mod, FSDPModule) else None
            if group is not None:
                ts = [t for fp in group.fsdp_params for t in fp.all_gather_outputs]
                assert ts, f"unit {name or 'root'} never gathered: run a forward + backward first"
                self.units.append((name or "root", ts))
        self.gathered_storages = {t.untyped_storage()._cdata for _, ts in self.units for t in ts}
        self.at_peak = []

    def _skip(self, s):
        return s._cdata in self.gathered_storages

    def _update(self):
        gathered = {name: sum(t.untyped_storage().nbytes() for t in ts) for name, ts in self.units}
        now = self.cur + sum(gathered.values())
        if now > self.peak:
            self.peak, self.at_peak = now, [u for u, n in gathered.items() if n]


def measure_train(model, cfg, B, T, tiles, ac_model=None, fsdp=False):
    """One real training step of `model` (AdamW, as sft.py): saved activations of the forward, then the
    params / grads / optimizer-state bytes. Returns a dict."""
    opt = adamw(model)
    ids, px, tgt = batch(cfg, B, T, tiles)
    act, (logp, ent) = saved_bytes(model, lambda: model(ids, px, targets=tgt, dummy_vision=fsdp))
    (-(logp.sum()) + 0.01 * ent.sum()).backward()
    opt.step()
    p, g, o = state_bytes(model, opt)
    opt.zero_grad(set_to_none=True)
    return dict(params=p, grads=g, optim=o, act=act)


def main():
    from plumbing import apply_activation_checkpointing, apply_fsdp, compute_cleanup, compute_init, set_trainable
    from model import VLM
    import sampler
    out_path = sys.argv[1]
    ddp, rank, _, world, _ = compute_init(seed=0)
    assert ddp and world == 2, (ddp, world)
    spec = json.loads(os.environ["PLAN_SPEC"])  # the cases test_plan.py wants measured
    res = {}
    for case in spec["cases"]:
        cfg = tiny_cfg(**case.get("cfg", {}))
        torch.manual_seed(0)
        m = VLM(cfg)
        set_trainable(m, *case["train"])
        if case["ac"]:
            apply_activation_checkpointing(m)
        apply_fsdp(m, param_dtype=torch.bfloat16 if case.get("bf16") else None)
        if case.get("bf16"):  # GPU-style mixed precision on the CPU: bf16 gathered weights + autocast
            with torch.autocast("cpu", dtype=torch.bfloat16):
                r = measure_train(m, cfg, case["B"], case["T"], case["tiles"], fsdp=True)
        else:
            r = measure_train(m, cfg, case["B"], case["T"], case["tiles"], fsdp=True)
        if case.get("step_peak"):  # a micro-batch after the first (gradients accumulated): forward + backward
            ids, px, tgt = batch(cfg, case["B"], case["T"], case["tiles"])

            def micro_batch(m=m):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(case.get("bf16"))):
                    logp, ent = m(ids, px, targets=tgt, dummy_vision=True)
                (-(logp.sum()) + 0.01 * ent.sum()).backward()

            micro_batch()
            live = FSDPLiveBytes(m)
            with live:
                micro_batch()
            r["step_peak"], r["step_peak_units"] = live.peak, live.at_peak
        if case.get("rollout"):
            with sampler.unsharded(m) as g:  # the gathered weights a rollout decodes with
                r["gathered"] = storage_bytes(list(g.parameters()))
            P, n, plen, new = case["rollout"]
            prompts = [([7 + (i + j) % 50 for j in range(plen)], None) for i in range(P)]
            st = {}
            sampler.generate(m, prompts, n=n, max_new_tokens=new, sampling=sampler.Sampling(), seed=rank * 100,
                             stats=st)
            r["cache_bytes"], r["chunks"] = st["cache_bytes"], st["chunks"]
            if case.get("tp"):  # tp.py: the 2 ranks form one TP group and generate the union of their prompts
                from plumbing import tp
                group = tp.tp_group(2)
                live = FSDPLiveBytes(m)  # tp.tp_model_from's peak: the TP model + the unit being gathered
                with live:
                    built = tp.tp_model_from(m, group)
                r["tp_build_peak"], r["tp_build_units"] = live.peak, live.at_peak
                built.to("meta")
                del built
                with tp.tp_rollout_model(m, group) as policy:
                    r["tp_weights"] = storage_bytes(list(policy.parameters()))
                    st = {}
                    sampler.generate(policy, prompts * 2, n=n, max_new_tokens=new, sampling=sampler.Sampling(), seed=7,
                                     stats=st)
                    r["tp_cache_bytes"] = st["cache_bytes"]
        res[case["name"]] = r
        del m
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, res)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(gathered, f)
    compute_cleanup()
    print(f"PLAN WORKER OK rank {rank}", flush=True)


if __name__ == "__main__":
    main()
