"""
Runs grpo.py with a fault injected by patching (tests only; grpo.py itself has no test hooks):
    python tests/grpo_patch.py FAULT [FAULT ...] -- GRPO_ARGS...          (or under torchrun)
FAULTs (`@R`: on rank R only):
    nan_step=S[@R]        the loss of step S (1-based) is NaN
    raise_step=S[@R]      the rank raises inside step S's update
    budget=B[@R]          sampler.memory_budget() reports B bytes
    oom=1[@R]             sampler.fit_chunks() raises MemoryError (this rank's prompts do not fit the agreed budget)
    scores=zero[@R]       every reward, accuracy and format is 0 (no group is informative)
    scores=format_only[@R]  accuracy 0 everywhere, format alternating 1/0: rewards vary, accuracies do not
    record_norm=PATH      append each loss aggregation's normaliser (norm_const) to PATH, one per line
    gpu_gb=G[@R]          the start-up memory plan sees a GPU of G GB (tools.plan.device_memory), and build_model
                          prints "grpo_patch: build_model" when it is called (the check must come first)
    cuda_oom=K[@R]        generate() calls 1, 3, ..., 2K-1 (rollouts, validation) raise torch.OutOfMemoryError:
                          the first K operations fail once each; every call prints "grpo_patch: generate budget B"
    record_entropy=PATH   append "with_entropy grad_enabled" of each model.token_logprobs call to PATH
    script=NAME           run NAME (sft.py, connector_tune.py) instead of grpo.py
"""
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import plumbing  # noqa: E402
import rl  # noqa: E402
import model  # noqa: E402
import rollout  # noqa: E402
import sampler  # noqa: E402
import torch  # noqa: E402
import tools.plan  # noqa: E402

split = sys.argv.index("--")
faults, args = sys.argv[1:split], sys.argv[split + 1:]
rank = int(os.environ.get("RANK", 0))


script = "grpo.py"
current = {"step": 0}  # the step the loop is in (1-based): grpo.py asks get_lr(step, ...) once at the top of each


def get_lr(step, *a, _orig=plumbing.get_lr, **k):
    current["step"] = step + 1
    return _orig(step, *a, **k)


plumbing.get_lr = get_lr  # grpo.py takes it from plumbing


def loop_step():
    return current["step"]


for f in faults:
    key, val = f.split("=", 1)
    val, _, on = val.partition("@")
    if on and int(on) != rank:
        continue
    if key in ("nan_step", "raise_step"):
        def patched(*a, _orig=rl.ppo_clip_loss, _key=key, _at=int(val), **k):
            loss, st = _orig(*a, **k)
            if loop_step() == _at:
                if _key == "raise_step":
                    raise RuntimeError(f"injected failure on rank {rank} at step {_at}")
                loss = loss * float("nan")
            return loss, st
        rl.ppo_clip_loss = patched
    elif key == "budget":
        sampler.memory_budget = lambda device, _b=int(val): _b
    elif key == "oom":
        def oom(*a, **k):
            raise MemoryError(f"injected: rank {rank}'s prompts do not fit the budget")
        sampler.fit_chunks = oom
    elif key == "scores":
        def fake(texts, *a, _mode=val, **k):
            return [dict(accuracy=0, format=int(_mode == "format_only" and i % 2 == 0), pred=None, timeout=False,
                         reward=0.2 * int(_mode == "format_only" and i % 2 == 0)) for i in range(len(texts))]
        rollout.score_batch = fake
    elif key == "record_norm":
        def recorded(per_token, mask, agg="seq_mean_token_mean", norm_const=None, denom=None, _orig=rl.agg_loss,
                     _path=val):
            with open(_path, "a") as fh:
                fh.write(f"{norm_const}\n")
            return _orig(per_token, mask, agg, norm_const, denom)
        rl.agg_loss = recorded
    elif key == "gpu_gb":
        tools.plan.device_memory = lambda _g=float(val): ("cuda", _g)

        def build_model(*a, _orig=plumbing.build_model, **k):
            print("grpo_patch: build_model", flush=True)
            return _orig(*a, **k)
        plumbing.build_model = build_model
    elif key == "cuda_oom":
        calls = {"n": 0}

        def generate(*a, _orig=rollout.generate, _k=int(val), **k):
            print(f"grpo_patch: generate budget {k.get('budget')}", flush=True)
            calls["n"] += 1
            if calls["n"] <= 2 * _k and calls["n"] % 2:
                raise torch.OutOfMemoryError(f"CUDA out of memory (injected on rank {rank}, call {calls['n']})")
            return _orig(*a, **k)
        rollout.generate = generate
    elif key == "record_entropy":
        def logprobs(*a, _orig=model.token_logprobs, _path=val, **k):
            with open(_path, "a") as fh:
                fh.write(f"{k.get('with_entropy', True)} {torch.is_grad_enabled()}\n")
            return _orig(*a, **k)
        model.token_logprobs = logprobs
    elif key == "script":
        script = val
    else:
        raise SystemExit(f"grpo_patch.py: unknown fault {key}")

sys.argv = [os.path.join(ROOT, script)] + args
runpy.run_path(sys.argv[0], run_name="__main__")
