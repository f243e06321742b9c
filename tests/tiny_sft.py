"""
A tiny SFT'd model on the embedded task, for the loop-level tests (grpo, tp, viewer): short traces, so that a
1-layer model learns the answer format in 40 steps and rewards vary within GRPO groups.

    synth, hf = tiny_sft(d)      # data in d/synth, the SFT export in d/sft/hf
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_sft(d, n_rl=32, n_val=8, n_kv_head=1, thought="I look."):
    from data.prepare import prepare
    synth = os.path.join(d, "synth")
    prepare(synth, n_sft=64, n_rl=n_rl, n_val=n_val, n_test=8)
    with open(f"{synth}/sft.jsonl") as f, open(f"{synth}/short.jsonl", "w") as g:
        for line in f:
            s = json.loads(line)
            s["solution"] = "<think>\n" + thought + "\n</think>\n\n\\boxed{" + s["answer"] + "}"
            g.write(json.dumps(s) + "\n")
    p = subprocess.run([sys.executable, "sft.py", f"--out_dir={d}/sft", f"--data={synth}/short.jsonl", "--val_data=",
                        f"--tokenizer={synth}/tokenizer", "--n_layer=1", "--n_embd=32", "--n_head=2",
                        f"--n_kv_head={n_kv_head}", "--vit_hidden=32", "--vit_layers=1", "--vit_heads=2",
                        "--max_steps=40", "--batch_size=16", "--lr=1e-2", "--warmup_frac=0.1"], cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return synth, f"{d}/sft/hf"
