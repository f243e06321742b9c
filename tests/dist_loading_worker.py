"""
Worker for tests/test_loading.py: loading a Hugging Face checkpoint into FSDP2 shards unit by unit
(plumbing.build_model), on 2 CPU processes with gloo.
    torchrun --standalone --nproc_per_node=2 tests/dist_loading_worker.py MODE SPEC.json
MODE load: first every directory in SPEC["bad"] raises on BOTH ranks with the error naming the tensor, and quickly,
  and an error that rank 1 alone sees (its own directory missing) stops rank 0 too; then, in the same process group,
  every checkpoint in SPEC["dirs"] loads sharded == single-process VLM.from_pretrained (full state dict equal,
  exactly; the same logits); n_params / n_trainable count the full model; a tied lm_head stays tied; offload=True,
  'resume' (meta build + DCP) and 'scratch' still work; export_hf from the 2 ranks in bf16 loads back as
  bf16(fp32 masters).
MODE rss: peak resident memory per rank while SPEC["dir"] loads, after a warm-up load of SPEC["warmup"] (torch's
  lazily loaded code and allocator pools are then part of the baseline, not of the measurement).
Prints one line per result, and "WORKER OK rank R" at the end; a failed check raises (non-zero exit).
"""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def status_kb(key):
    """A /proc/self/status value in kB: VmRSS (resident now) or VmHWM (peak resident since start or reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def reset_peak_rss():
    """Reset VmHWM to the current RSS (Linux clear_refs 5); False if the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def say(msg):
    """One line in one write(): the two ranks share a pipe, and print() writes the text and the newline apart."""
    os.write(1, (msg.replace("\n", " ") + "\n").encode())


class StubTok:
    """The three things build_model('scratch') asks of a tokenizer."""
    unk_token_id, name_or_path = 0, "stub"

    def __len__(self):
        return 128

    def convert_tokens_to_ids(self, t):
        return 125 if t == "<IMG_CONTEXT>" else 0


def main():
    mode, spec_path = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        spec = json.load(f)
    base_rss = status_kb("VmRSS")  # after the torch import, before anything else (mode rss)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from plumbing import build_model, compute_cleanup, compute_init, export_hf, load_checkpoint, save_checkpoint
    from model import VLM
    from plumbing.hf import load_pretrained
    ddp, rank, _, world, device = compute_init(seed=0)
    assert ddp and world == 2 and device.type == "cpu", (ddp, world, device)

    def full(m):  # the full (unsharded) state dict, on every rank
        return {k: v.detach().clone() for k, v in get_model_state_dict(
            m, options=StateDictOptions(full_state_dict=True)).items()}

    def equal(a, b, what):
        assert a.keys() == b.keys(), (what, sorted(set(a) ^ set(b)))
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{what}: {k} differs"

    if mode == "load":
        for d in spec["bad"]:
            t0 = time.time()
            try:
                build_model(d, None, device, fsdp=True)
            except Exception as e:
                say(f"BAD OK rank {rank} {time.time() - t0:.1f}s {os.path.basename(d)}: {e}")
            else:
                raise AssertionError(f"{d} loaded")
        # an error only rank 1 sees (its directory is missing) stops rank 0 as well
        t0 = time.time()
        try:
            build_model(spec["good"] if rank == 0 else spec["good"] + "_missing_on_rank1", None, device, fsdp=True)
        except Exception as e:
            say(f"RANK1 ERROR OK rank {rank} {time.time() - t0:.1f}s: {e}")
        else:
            raise AssertionError("no error")
        build_model(spec["good"], None, device, fsdp=True)  # the process group still works afterwards

        ids = torch.randint(0, 120, (2, 9), generator=torch.Generator().manual_seed(0))
        for d in spec["dirs"]:
            ref = load_pretrained(d).eval()
            model, n_params, n_train = build_model(d, None, device, fsdp=True, train=(False, True, True),
                                                   activation_checkpointing=True)
            equal(full(model), ref.state_dict(), f"sharded vs single-process load of {d}")
            n_ref = sum(p.numel() for p in ref.parameters())
            n_ref_train = sum(p.numel() for n, p in ref.named_parameters() if not n.startswith("vit."))
            assert (n_params, n_train) == (n_ref, n_ref_train), (n_params, n_train, n_ref, n_ref_train)
            assert not any(p.requires_grad for p in model.vit.parameters())
            assert (model.llm.lm_head.weight is model.llm.wte.weight) == ref.cfg.tie_embeddings
            with torch.no_grad():  # the shards are usable: the same logits as the unsharded model
                err = (model.eval()(ids) - ref(ids)).abs().max().item()
            assert err <= 1e-5, err
            say(f"LOAD OK rank {rank}: {os.path.basename(os.path.dirname(d))} {n_params} params, "
                f"logits max diff {err:.1e}")
        # offload=True (CPUOffloadPolicy; on this CPU-only machine host and device are the same memory)
        model_off, _, _ = build_model(spec["dirs"][0], None, device, fsdp=True, offload=True)
        equal(full(model_off), load_pretrained(spec["dirs"][0]).state_dict(), "offload=True load")
        del model_off
        # resume: built on meta and sharded; the weights come from the DCP checkpoint
        want = full(model)
        path = save_checkpoint(spec["out"], 1, model, None, {"init_from": d}, {})
        model2, _, _ = build_model("resume", None, device, resume_path=path, fsdp=True)
        assert all(torch.equal(v, torch.zeros_like(v)) for v in full(model2).values())  # defined, not garbage
        load_checkpoint(path, model2)
        equal(full(model2), want, "resume")
        # scratch: a tiny model built whole (the same init on every rank), then sharded
        scratch = dict(image_size=16, patch_size=4, vit_hidden=16, vit_layers=1, vit_heads=2, vit_mlp=32, n_embd=32,
                       n_layer=1, n_head=2, n_kv_head=1, mlp_hidden=64)
        model3, n3, _ = build_model("scratch", StubTok(), device, scratch=scratch, fsdp=True)
        torch.manual_seed(0)
        assert n3 == sum(p.numel() for p in VLM(model3.cfg).parameters()) and model3.cfg.image_token_id == 125
        # bf16 export from the 2 ranks of the first (fp32, untied) checkpoint
        model, _, _ = build_model(spec["dirs"][0], None, device, fsdp=True)
        masters = full(model)
        export_hf(model, spec["export"], dtype=torch.bfloat16)
        if rank == 0:
            back = load_pretrained(spec["export"], dtype=torch.bfloat16).state_dict()
            equal(back, {k: v.to(torch.bfloat16) for k, v in masters.items()}, "bf16 export")
            with open(os.path.join(spec["export"], "config.json")) as f:
                assert json.load(f)["dtype"] == "bfloat16"
            say("EXPORT OK: bf16 export == bf16(fp32 masters)")

    elif mode == "rss":
        warm, _, _ = build_model(spec["warmup"], None, device, fsdp=True)
        del warm
        reset = reset_peak_rss()
        start = status_kb("VmRSS")
        t0 = time.time()
        model, n_params, _ = build_model(spec["dir"], None, device, fsdp=True)
        dt = time.time() - t0
        peak, now = status_kb("VmHWM"), status_kb("VmRSS")
        shard = sum(p.to_local().numel() * p.to_local().element_size() for p in model.parameters())
        say("RSS " + json.dumps(dict(rank=rank, base_kb=base_rss, start_kb=start, peak_kb=peak, end_kb=now,
                                     peak_reset=reset, shard_kb=shard // 1024, n_params=n_params,
                                     seconds=round(dt, 2))))
    compute_cleanup()
    say(f"WORKER OK rank {rank}")


if __name__ == "__main__":
    main()
