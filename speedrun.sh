#!/usr/bin/env bash
# The main job: the whole Skywork-R1V3 recipe on the embedded default, in one command.
#   render the synthetic task -> cold-start SFT -> GRPO -> critical-token-entropy checkpoint selection ->
#   connector tuning -> greedy evaluation of every stage on the test split -> out/summary.json + a table, and the
#   viewer pages of the runs (viewer.py).
# CPU by default (2 cores: see README for the measured time); on a machine with several GPUs the training stages
# run under torchrun on all local GPUs. To change a stage, add --key=value flags (or a config file) to its line below.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
PY=.venv/bin/python
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -gt 1 ]; then LAUNCH="$PY -m torch.distributed.run --standalone --nproc_per_node=$NGPU"; else LAUNCH=$PY; fi
mkdir -p out
declare -A T
stage() {  # stage NAME command...: run it, time it
    local name=$1; shift
    echo "=== $name: $*"
    local t0; t0=$(date +%s)
    "$@"
    T[$name]=$(( $(date +%s) - t0 ))
}
evaluate() {  # evaluate NAME CKPT: greedy, the whole test split
    stage "eval_$1" $PY eval.py --init_from="$2" --out_dir="out/eval_$1"
}
stage data $PY data/prepare.py
stage sft $LAUNCH sft.py --out_dir=out/sft
evaluate sft out/sft/hf
stage grpo $LAUNCH grpo.py --init_from=out/sft/hf --out_dir=out/grpo
evaluate grpo out/grpo/hf
# R1V3 section 5: rank the RL checkpoints by the entropy of their critical tokens on the validation split
stage entropy $PY entropy.py --init_from='out/grpo/ckpt_*' --out_dir=out/entropy
SELECTED=$(cat out/entropy/selected_hf.txt)
evaluate selected "$SELECTED"
stage connector_tune $LAUNCH connector_tune.py --init_from="$SELECTED" --out_dir=out/connector_tune
evaluate connector_tune out/connector_tune/hf
# the viewer pages (viewer.py: one HTML file each, opens from disk)
$PY tools/viewer.py out/grpo > /dev/null
$PY tools/viewer.py out/eval_sft > /dev/null
$PY tools/viewer.py out/eval_grpo --compare=out/eval_sft > /dev/null
$PY tools/viewer.py out/eval_selected > /dev/null
$PY tools/viewer.py out/eval_connector_tune --compare=out/eval_selected > /dev/null
$PY tools/viewer.py out/entropy > /dev/null
$PY - "$(declare -p T)" <<'PYEOF'
import json, re, sys
t = {k: int(v) for k, v in re.findall(r'\[(\w+)\]="?(\d+)', sys.argv[1])}
ev = {s: json.load(open(f"out/eval_{s}/summary.json")) for s in ["sft", "grpo", "selected", "connector_tune"]}
ent = json.load(open("out/entropy/entropy.json"))
stage = lambda s: {"accuracy": ev[s]["accuracy"], "format": ev[s]["format"], "by_domain": ev[s].get("by_domain"),
                   "mean_tokens": ev[s]["mean_tokens"]}
summary = {"sft": dict(stage("sft"), seconds=t["sft"]),
           "grpo": dict(stage("grpo"), seconds=t["grpo"]),
           "selected": dict(stage("selected"), checkpoint=open("out/entropy/selected.txt").read().strip(),
                            rule=ent.get("selection", {}).get("rule"), seconds=t["entropy"]),
           "connector_tune": dict(stage("connector_tune"), seconds=t["connector_tune"]),
           "seconds": dict(t, total=sum(t.values()))}
json.dump(summary, open("out/summary.json", "w"), indent=2)
print("\n| stage | test accuracy (greedy, 500 items) | format | time | pages (viewer.py) |\n|---|---|---|---|---|")
rows = [("cold-start SFT", "sft", "sft", "out/eval_sft/responses.html"),
        ("GRPO (last step)", "grpo", "grpo", "out/grpo/rollouts.html, out/eval_grpo/responses.html (vs SFT)"),
        (f"GRPO, selected by critical-token entropy ({summary['selected']['checkpoint']})", "selected", "entropy",
         "out/entropy/entropy.html, out/eval_selected/responses.html"),
        ("connector tuning (from the selected one)", "connector_tune", "connector_tune",
         "out/eval_connector_tune/responses.html (vs selected)")]
for name, s, k, pages in rows:
    print(f"| {name} | {100 * ev[s]['accuracy']:.1f} | {100 * ev[s]['format']:.1f} | {t[k]} s | {pages} |")
print(f"(data {t['data']} s, evaluations {sum(v for k, v in t.items() if k.startswith('eval_'))} s, "
      f"total {summary['seconds']['total']} s) -> out/summary.json")

PYEOF
