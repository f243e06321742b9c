"""FSDP2 CPU offload on a GPU node, what can be checked without one (docs/perf.md, "Offload"): tools/plan.py's host
RAM counts every pinned shard and gradient shard rounded up to a power of two (the CUDA caching host allocator), the
AdamW moments exactly; and an offloaded run gives its optimizer step the node's cores (plumbing.dist.offload_threads,
set by apply_fsdp(offload=True)) instead of torchrun's one thread per rank."""
import os

import pytest
import torch

from plumbing import dist as pd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def next_pow2(b):
    return 1 << (b - 1).bit_length()


@pytest.mark.parametrize("model", ["internvl3_1b", "skywork_r1v3_38b"])
def test_plan_host_ram_rounds_pinned_shards_to_powers_of_two(model):
    import plan
    from plumbing.hf import load_config
    cfg, _ = load_config(os.path.join(ROOT, "config", "models", model))
    c = plan.script_config("grpo.py", [os.path.join(ROOT, "config", "grpo_r1v3.py")])  # every tower trains
    W = 8
    shards = [plan._shard_numel(s, W) * 4 for _, s, _, _, _ in plan._params(plan._cfg_key(cfg))]  # fp32, rank 0
    pinned, exact = sum(next_pow2(b) for b in shards), sum(shards)
    adam = 2 * exact + 4 * len(shards)  # exp_avg, exp_avg_sq (pageable: exact) + a step per tensor
    kw = dict(gpus=W, gpus_per_node=W, gpu_gb=80, tp=8 if model != "internvl3_1b" else 1, offload=True, _search=False)
    gpu = plan.plan_run("grpo", c, cfg, **kw)
    # on a GPU: the master shards and the gradient shards pinned, each block a power of two; 8 ranks on the node
    assert gpu["host_gb_node"] == pytest.approx((2 * pinned + adam) * W / plan.GB, rel=1e-9)
    assert pinned == plan.pinned_bytes(cfg, W, ("vit", "connector", "llm"), 4) and pinned > 1.2 * exact
    # no CUDA, no pinning (apply_fsdp: CPUOffloadPolicy(pin_memory=torch.cuda.is_available())): the exact bytes
    cpu = plan.plan_run("grpo", c, cfg, device="cpu", **kw)
    assert cpu["host_gb_node"] == pytest.approx((2 * exact + adam) * W / plan.GB, rel=1e-9)
    if model == "skywork_r1v3_38b":  # docs/perf.md's figures: ~789 GiB a node instead of ~572
        assert round(gpu["host_gb_node"]) == 789 and round(cpu["host_gb_node"]) == 572


def test_offload_threads_share_the_cores(monkeypatch):
    assert pd.offload_threads(local_world_size=8, cores=96) == 12
    assert pd.offload_threads(local_world_size=8, cores=4) == 1
    assert pd.offload_threads(local_world_size=1, cores=16) == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert pd.offload_threads(cores=16) == 4


def test_apply_fsdp_with_offload_raises_the_threads(gloo1, monkeypatch):
    # torchrun sets OMP_NUM_THREADS=1; an offloaded run's AdamW step runs on the host, so apply_fsdp(offload=True)
    # gives each rank its share of the cores (here: 6 cores, 2 local ranks -> 3), and never lowers a larger setting
    from model import VLM, VLMConfig
    from plumbing import apply_fsdp
    monkeypatch.setattr(pd.os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        apply_fsdp(VLM(VLMConfig()), offload=False)
        assert torch.get_num_threads() == 1  # no offload: untouched
        apply_fsdp(VLM(VLMConfig()), offload=True)
        assert torch.get_num_threads() == 3
        torch.set_num_threads(5)
        assert pd.set_offload_threads() == 5 and torch.get_num_threads() == 5
    finally:
        torch.set_num_threads(n)
