#!/usr/bin/env bash
# The main job on the embedded default: render the synthetic task -> cold-start SFT -> GRPO -> evaluate
# both stages on the test split, then print and save a summary (out/summary.json).
# CPU by default; on a machine with GPUs it runs the training stages under torchrun on all local GPUs.
# (Connector tuning and critical-token-entropy checkpoint selection join the pipeline with issue #5.)
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
PY=.venv/bin/python
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -gt 1 ]; then LAUNCH="$PY -m torch.distributed.run --standalone --nproc_per_node=$NGPU"; else LAUNCH=$PY; fi
mkdir -p out
declare -A T
t0=$(date +%s); $PY data/prepare.py; T[data]=$(( $(date +%s) - t0 ))
t0=$(date +%s); $LAUNCH sft.py --out_dir=out/sft; T[sft]=$(( $(date +%s) - t0 ))
t0=$(date +%s); $PY eval.py --ckpt=out/sft/hf --out_dir=out/eval_sft; T[eval_sft]=$(( $(date +%s) - t0 ))
t0=$(date +%s); $LAUNCH grpo.py --init_from=out/sft/hf --out_dir=out/grpo; T[grpo]=$(( $(date +%s) - t0 ))
t0=$(date +%s); $PY eval.py --ckpt=out/grpo/hf --out_dir=out/eval_grpo; T[eval_grpo]=$(( $(date +%s) - t0 ))
$PY - "${T[data]}" "${T[sft]}" "${T[eval_sft]}" "${T[grpo]}" "${T[eval_grpo]}" <<'PYEOF'
import json, sys
t = dict(zip(["data", "sft", "eval_sft", "grpo", "eval_grpo"], map(int, sys.argv[1:])))
sft = json.load(open("out/eval_sft/summary.json"))
grpo = json.load(open("out/eval_grpo/summary.json"))
summary = {"sft": {"accuracy": sft["accuracy"], "format": sft["format"], "by_domain": sft.get("by_domain"),
                   "seconds": t["sft"]},
           "grpo": {"accuracy": grpo["accuracy"], "format": grpo["format"], "by_domain": grpo.get("by_domain"),
                    "seconds": t["grpo"]},
           "seconds": t}
json.dump(summary, open("out/summary.json", "w"), indent=2)
print("\n| stage | test accuracy (greedy) | format | time |\n|---|---|---|---|")
print(f"| cold-start SFT | {100 * sft['accuracy']:.1f} | {100 * sft['format']:.1f} | {t['sft']} s |")
print(f"| GRPO | {100 * grpo['accuracy']:.1f} | {100 * grpo['format']:.1f} | {t['grpo']} s |")
print(f"(data {t['data']} s, evaluation {t['eval_sft'] + t['eval_grpo']} s) -> out/summary.json")
PYEOF
