"""
Runs grpo.py with a fault injected by patching (tests only; grpo.py itself has no test hooks):
    python tests/grpo_patch.py FAULT [FAULT ...] -- GRPO_ARGS...          (or under torchrun)
FAULTs:
    nan_step=S[@R]   the loss of step S (1-based) is NaN, on rank R only if given
    budget=B[@R]     sampler.memory_budget() reports B bytes, on rank R only if given
    raise_step=S[@R] rank R raises inside step S's update
"""
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import rl  # noqa: E402
import sampler  # noqa: E402

split = sys.argv.index("--")
faults, args = sys.argv[1:split], sys.argv[split + 1:]
rank = int(os.environ.get("RANK", 0))


def parse(f):
    key, val = f.split("=", 1)
    val, _, on = val.partition("@")
    return key, float(val), (on == "" or int(on) == rank)


def loop_step():  # the step the loop is in (grpo.py's module-level `step`, before it is incremented)
    frame = sys._getframe(2)
    while "max_steps" not in frame.f_globals:
        frame = frame.f_back
    return frame.f_globals["step"] + 1


for key, val, here in map(parse, faults):
    if key in ("nan_step", "raise_step") and here:
        def patched(*a, _orig=rl.ppo_clip_loss, _key=key, _at=int(val), **k):
            loss, st = _orig(*a, **k)
            if loop_step() == _at:
                if _key == "raise_step":
                    raise RuntimeError(f"injected failure on rank {rank} at step {_at}")
                loss = loss * float("nan")
            return loss, st
        rl.ppo_clip_loss = patched
    elif key == "budget" and here:
        sampler.memory_budget = lambda device, _b=int(val): _b
    elif key not in ("nan_step", "raise_step", "budget"):
        raise SystemExit(f"grpo_patch.py: unknown fault {key}")

sys.argv = [os.path.join(ROOT, "grpo.py")] + args
runpy.run_path(sys.argv[0], run_name="__main__")
