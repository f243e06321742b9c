"""passrate.py (Skywork-OR1's offline filter): the prompts solved 0/n and n/n are dropped, the others kept as their
original lines with their counts; image paths still resolve when the output is written elsewhere. The model and the
sampling are stubbed (rollout.py and eval.evaluate are tested elsewhere): this checks the filter itself."""
import json
import os
import runpy
import sys
from unittest import mock

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def rl_file(tmp_path_factory):
    sys.path.insert(0, ROOT)
    from data.prepare import prepare
    d = str(tmp_path_factory.mktemp("passrate"))
    prepare(d, n_sft=8, n_rl=6, n_val=2, n_test=2)
    return os.path.join(d, "rl.jsonl")


def run(argv, solved):
    """passrate.py with evaluate() stubbed: item i's group_size samples are correct solved[i] times."""
    import eval as ev
    import plumbing

    def fake_eval(model, tok, items, group_size, *a, **kw):
        return [{"id": s["id"], "correct": int(j < solved[i])} for i, s in enumerate(items) for j in range(group_size)]
    with mock.patch.object(ev, "evaluate", fake_eval), \
            mock.patch.object(plumbing, "load_inference_model", lambda *a, **k: (None, None, "ckpt")), \
            mock.patch.object(sys, "argv", ["tools/passrate.py"] + argv):
        runpy.run_path(os.path.join(ROOT, "tools", "passrate.py"), run_name="__main__")


def test_passrate_keeps_informative_prompts(rl_file, tmp_path):
    solved = [0, 1, 4, 3, 0, 2]  # n = 4: items 0 and 4 (0/4) and 2 (4/4) go
    out = str(tmp_path / "kept.jsonl")
    run([f"--data={rl_file}", f"--out_file={out}", "--group_size=4"], solved)
    with open(rl_file) as f:
        src = [json.loads(line) for line in f]
    with open(out) as f:
        kept = [json.loads(line) for line in f]
    assert [k["id"] for k in kept] == [src[i]["id"] for i in (1, 3, 5)]
    assert [k["pass_count"] for k in kept] == [1, 3, 2] and all(k["pass_n"] == 4 for k in kept)
    for k, i in zip(kept, (1, 3, 5)):  # the original record, images made absolute (the output is elsewhere)
        assert k["question"] == src[i]["question"] and k["answer"] == src[i]["answer"]
        assert all(os.path.isabs(p) and os.path.isfile(p) for p in k["images"])
    with open(str(tmp_path / "kept_counts.json")) as f:
        rep = json.load(f)
    assert (rep["kept"], rep["dropped_unsolved"], rep["dropped_always_solved"]) == (3, 2, 1)
    assert rep["histogram"] == {"0": 2, "1": 1, "2": 1, "3": 1, "4": 1}
    # the kept file is a valid RL data file in its own right
    from data.common import load_jsonl
    assert len(load_jsonl(out)) == 3


def test_passrate_default_output_beside_the_data(rl_file):
    run([f"--data={rl_file}", "--group_size=2"], [1, 1, 0, 2, 1, 1])
    out = os.path.splitext(rl_file)[0] + "_passrate.jsonl"
    with open(out) as f:
        kept = [json.loads(line) for line in f]
    assert len(kept) == 4 and all(not os.path.isabs(p) for k in kept for p in k.get("images", [k.get("image")]))
    with pytest.raises(SystemExit, match="at least 2"):
        run([f"--data={rl_file}", "--group_size=1"], [0] * 6)
