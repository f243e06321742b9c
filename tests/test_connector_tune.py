"""connector_tune.py end to end on a tiny model (R1V3 section 4): only the connector changes and only it holds
optimizer state; the ablation switches change what trains; early stopping stops, exports the best step's weights,
and a run resumed between its best step and its stop ends identically; bad input gives a clear error."""
import json
import os
import runpy
import shutil
import subprocess
import sys
from unittest import mock

import pytest
import torch

from test_sft import ROOT, TINY, synth  # noqa: F401  (synth is a fixture: 48 SFT / 8 val samples)

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # single-process DCP is intended
TUNE = ["--batch_size=8", "--max_steps=4", "--eval_every=2", "--save_every=2", "--log_every=1", "--lr=1e-2"]


def run(script, argv, capsys):
    """`python script *argv`, in this process (imports are paid once; the scripts are flat, runpy runs them as
    __main__ exactly as the command line does). Returns what it printed."""
    capsys.readouterr()
    with mock.patch.object(sys, "argv", [script] + argv):
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def base(synth, tmp_path_factory):
    """A tiny model after 6 SFT steps, exported as an HF directory (what grpo.py would hand over)."""
    out = str(tmp_path_factory.mktemp("base"))
    with mock.patch.object(sys, "argv", ["sft.py", f"--out_dir={out}", f"--data={synth}/sft.jsonl", "--val_data=",
                                         f"--tokenizer={synth}/tokenizer", "--batch_size=8"] + TINY):
        runpy.run_path(os.path.join(ROOT, "sft.py"), run_name="__main__")
    return os.path.join(out, "hf")


def tune(args, out, synth, hf, capsys):
    return run("connector_tune.py", [f"--init_from={hf}", f"--out_dir={out}", f"--data={synth}/sft.jsonl",
                                     f"--val_data={synth}/val.jsonl"] + TUNE + args, capsys)


def weights(path):
    """{name: tensor} of a model: an HF directory or a ckpt_* checkpoint (names vit.* / connector.* / llm.*)."""
    from plumbing import load_inference_model
    model, _, _ = load_inference_model(path, "cpu")
    return {k: v.clone() for k, v in model.state_dict().items()}


def changed(a, b, tower):
    """Which of the tower's tensors differ between a and b (bit-exact comparison)."""
    names = [k for k in a if k.startswith(tower + ".")]
    assert names, tower
    return [k for k in names if not torch.equal(a[k], b[k])]


def optim_params(ckpt):
    """The parameter names that have AdamW state in a checkpoint (read from the DCP metadata, nothing loaded)."""
    import torch.distributed.checkpoint as dcp
    keys = dcp.FileSystemReader(ckpt).read_metadata().state_dict_metadata
    return {k[len("optim.state."):].rsplit(".", 1)[0] for k in keys if k.startswith("optim.state.")}


def log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_only_the_connector_trains(synth, base, tmp_path, capsys):
    out = str(tmp_path / "ct")
    printed = tune([], out, synth, base, capsys)
    w0, w1 = weights(base), weights(os.path.join(out, "ckpt_0000004"))
    assert changed(w0, w1, "vit") == [] and changed(w0, w1, "llm") == []  # frozen: bit-identical
    conn = [k for k in w0 if k.startswith("connector.")]
    assert changed(w0, w1, "connector") == conn  # every connector tensor moved
    # AdamW state exists for the connector's tensors only, and its size is what the log says
    assert optim_params(os.path.join(out, "ckpt_0000004")) == set(conn)
    n_conn = sum(w0[k].numel() for k in conn)
    mem = next(r for r in log(out) if "optim_state_bytes" in r)
    assert mem["trainable_params"] == n_conn
    assert mem["optim_state_bytes"] == 2 * 4 * n_conn + 4 * len(conn)  # exp_avg + exp_avg_sq fp32, a step each
    assert mem["grad_bytes"] == 4 * n_conn
    assert f"memory: {n_conn:,} trainable params" in printed
    # the export holds the frozen towers unchanged too (whichever step was best)
    w_hf = weights(os.path.join(out, "hf"))
    assert changed(w0, w_hf, "vit") == [] and changed(w0, w_hf, "llm") == []


def test_all_towers_and_domains(synth, base, tmp_path, capsys):
    # the ablation's connector + ViT + LLM (connector + LLM: the early-stopping test below), with a domain filter
    # and balancing on the way (R1V3 section 4's multi-domain data); images decoded by a DataLoader worker process
    out = str(tmp_path / "all")
    printed = tune(["--train_llm=True", "--train_vit=True", "--max_steps=2", "--domains=count_color,compare",
                    "--balance_domains=True", "--num_workers=1"], out, synth, base, capsys)
    w0, w1 = weights(base), weights(os.path.join(out, "ckpt_0000002"))
    assert changed(w0, w1, "vit") and changed(w0, w1, "llm") and changed(w0, w1, "connector")
    assert {k.split(".")[0] for k in optim_params(os.path.join(out, "ckpt_0000002"))} == {"vit", "connector", "llm"}
    line = next(s for s in printed.splitlines() if s.startswith(f"{synth}/sft.jsonl: domains"))
    counts = {c.split()[0]: c.split()[1].split("->") for c in line.split("domains ")[1].split(", ")}
    assert sorted(counts) == ["compare", "count_color"], line
    n = max(int(a) for a, _ in counts.values())
    assert all(int(b) == n for _, b in counts.values()) and f"data: {2 * n} train" in printed, printed


def test_early_stopping_exports_best_and_resumes(synth, base, tmp_path, capsys):
    # connector + LLM with an lr warming up linearly to a value far too high: the val loss falls, then rises;
    # patience 2, an evaluation and a checkpoint every step
    a = str(tmp_path / "a")
    args = ["--train_llm=True", "--max_steps=12", "--lr=0.2", "--warmup_frac=1.0", "--eval_every=1",
            "--save_every=1", "--early_stop_patience=2", "--keep_last=100"]
    printed = tune(args, a, synth, base, capsys)
    end = log(a)[-1]
    assert end["early_stopped"] is True, printed[-2000:]
    b, s = end["best_step"], end["step"]
    assert s == b + 2 < 12, end  # stopped 2 evaluations after the best, before max_steps
    vals = {r["step"]: r["val_loss"] for r in log(a) if "val_loss" in r}
    assert sorted(vals) == list(range(s + 1)) and end["best_val_loss"] == min(vals.values()) == vals[b]
    assert f"best val loss {vals[b]:.4f} at step {b}" in printed
    # connector + LLM: the ViT is frozen and has no optimizer state
    w0 = weights(base)
    last = weights(os.path.join(a, f"ckpt_{s:07d}"))
    assert changed(w0, last, "vit") == [] and changed(w0, last, "llm")
    assert {k.split(".")[0] for k in optim_params(os.path.join(a, f"ckpt_{s:07d}"))} == {"connector", "llm"}
    # the export is the best step's model (step 0: the starting one), not the last one
    w_hf = weights(os.path.join(a, "hf"))
    w_best = w0 if b == 0 else weights(os.path.join(a, f"ckpt_{b:07d}"))
    assert all(torch.equal(w_hf[k], w_best[k]) for k in w_best) and changed(last, w_hf, "llm")
    # resume from the checkpoint between the best step and the stop: the best weights come from best_XXXXXXX/
    assert os.path.isdir(os.path.join(a, f"best_{b + 1:07d}")) and not os.path.isdir(os.path.join(a, f"best_{b:07d}"))
    r = str(tmp_path / "r")
    shutil.copytree(a, r)
    shutil.rmtree(os.path.join(r, "hf"))
    shutil.rmtree(os.path.join(r, f"ckpt_{s:07d}"))
    shutil.rmtree(os.path.join(r, f"best_{s:07d}"))
    printed = tune(args + ["--init_from=resume"], r, synth, base, capsys)
    assert f"resumed from {r}/ckpt_{b + 1:07d}" in printed
    assert log(r)[-1] == end
    w_r = weights(os.path.join(r, "hf"))
    assert all(torch.equal(w_r[k], w_hf[k]) for k in w_hf)


def test_bad_input(synth, base, tmp_path, capsys):
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(FileNotFoundError, match=f"init_from='{missing}': no such directory"):
        tune([], str(tmp_path / "x"), synth, missing, capsys)
    with pytest.raises(ValueError, match="no samples of domain.*'nope'"):
        tune(["--domains=compare,nope"], str(tmp_path / "x"), synth, base, capsys)
    # --help prints the usage (the docstring) without starting anything
    p = subprocess.run([sys.executable, "connector_tune.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0 and "--train_llm=True --train_vit=True" in p.stdout
