"""plumbing/dist.py in one process: the device the decision collectives (agree, agree_min/max, all_reduce_sum) put
their tensor on, for the backend strings torch.distributed reports. (The host threads of an offloaded run:
tests/test_offload.py.)"""
import pytest
import torch
import torch.distributed as dist

from plumbing import dist as pd


def test_reduce_device_follows_the_backend_string(monkeypatch):
    # compute_init's group reports 'cpu:gloo,cuda:nccl' (the old test `== "nccl"` never matched it, so the NCCL branch
    # was dead); an NCCL-only group reports 'nccl' and refuses CPU tensors; gloo, or no GPU: the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    for backend, want in (("cpu:gloo,cuda:nccl", "cuda:3"), ("cuda:nccl,cpu:gloo", "cuda:3"), ("nccl", "cuda:3"),
                          ("NCCL", "cuda:3"), ("gloo", "cpu")):
        monkeypatch.setattr(dist, "get_backend", lambda group=None, b=backend: b)
        assert pd._reduce_device() == torch.device(want), backend
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "cpu:gloo,cuda:nccl")
    assert pd._reduce_device() == torch.device("cpu")


def test_agree_puts_its_tensor_on_the_gpu_with_the_composite_backend(gloo1, monkeypatch):
    # the real collectives on a one-process gloo group: the composite string without a GPU reduces on the CPU...
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "cpu:gloo,cuda:nccl")
    assert pd.agree(True) is True and pd.agree_min(7) == 7 and pd.all_reduce_sum(2, 3.5) == [2.0, 3.5]
    # ... and with a GPU it asks for a CUDA tensor (this machine has none, so making it fails: the old code made a
    # CPU tensor instead and returned)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    for call in (lambda: pd.agree(True), lambda: pd.all_reduce_sum(1.0)):
        with pytest.raises((RuntimeError, AssertionError), match="(?i)cuda|nvidia|driver"):
            call()
