"""The command line, the same in every script: --help prints the settings from the config block (value and the
comment beside it); bad input (a setting, a missing file, a bad data line) is one line, printed once for the whole
job, with a non-zero exit."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["sft.py", "grpo.py", "connector_tune.py", "eval.py", "entropy.py", "sample.py", "tools/passrate.py"]


def run(args, nproc=1, timeout=120):
    pre = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run(pre + args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_the_settings_with_their_comments(script):
    p = run([script, "--help"])
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.splitlines()
    assert any(line.startswith("usage: python ") for line in lines)
    settings = [line for line in lines if line.startswith("  --")]
    assert len(settings) >= 8, p.stdout
    commented = [line for line in settings if len(line.split(None, 1)) == 2]
    assert len(commented) >= 3, p.stdout  # the comments of the config block come along
    assert not p.stderr.strip() or "Traceback" not in p.stderr


def test_help_shows_the_values_a_config_file_sets():
    p = run(["grpo.py", "config/grpo_r1v3.py", "--help"])
    assert p.returncode == 0 and "  --prompts_per_step=32" in p.stdout, p.stdout[-3000:]
    p = run(["connector_tune.py", "--help"])  # sft.py's settings with connector_tune.py's values
    assert p.returncode == 0 and "  --train_llm=False" in p.stdout and "  --out_dir=out/connector_tune" in p.stdout


def one_line(p, *needles):
    err = [line for line in p.stderr.splitlines() if line.strip()]
    errors = [line for line in err if ": error: " in line]
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert len(errors) == 1 and all(n in errors[0] for n in needles), p.stderr[-3000:]
    return errors[0]


def test_bad_setting_is_one_line():
    line = one_line(run(["grpo.py", "--group_sizee=4"]), "unknown config key 'group_sizee'", "group_size")
    assert line.startswith("grpo.py: error: ")
    one_line(run(["sft.py", "--lr=fast"]), "lr='fast'")
    one_line(run(["grpo.py", "config/nope.py"]), "config/nope.py", "not found")


def test_missing_model_and_bad_data_line_are_one_line(tmp_path):
    one_line(run(["grpo.py", f"--init_from={tmp_path}/none", f"--out_dir={tmp_path}/o"]), f"{tmp_path}/none")
    bad = tmp_path / "rl.jsonl"
    bad.write_text(json.dumps({"id": "a", "question": "1+1?", "answer": "2"}) + "\n{not json\n")
    one_line(run(["eval.py", f"--data={bad}", f"--out_dir={tmp_path}/e"]), f"{bad}:2")


def test_under_torchrun_bad_input_is_printed_once(tmp_path):
    # two ranks find the same bad setting: rank 0 alone says so, in one line (torchrun's own summary aside)
    p = run(["grpo.py", "--group_sizee=4"], nproc=2)
    assert p.returncode != 0 and p.stderr.count("unknown config key 'group_sizee'") == 1, p.stderr[-3000:]
    assert 'grpo.py", line' not in p.stderr and "configurator.py\", line" not in p.stderr  # no traceback of ours
    # (torchrun's agent adds its own summary and traceback of the failed child: that is torchrun's, not ours)
