#!/usr/bin/env bash
# Every stage at InternVL3-1B's real shapes, on CPU: the closest thing to a first real run without a GPU. Not part of
# CI (about 47 minutes and up to ~17 GB of RAM on 2 cores, README). Random weights at the real configuration (original
# layout), the real Qwen tokenizer (151,674 ids), real-size images (3 tiles = 768 image tokens each); whatever breaks
# at real shapes (a 151k vocabulary, 256 tokens a tile, 14/2 heads, the InternVL3 system turn) breaks here first.
#
#   bash dev/rehearsal.sh [DIR]        # DIR defaults to out/rehearsal; prints a table: stage, seconds, peak RSS
# A stage whose output exists is not run again (delete DIR/<stage> to redo it): a failed call goes on from there.
#
# Stages: sft.py 1 step of 2 samples (1 process) -> grpo.py 1 step on 2 processes with FSDP2 and --tp=2 -> entropy.py over its
# checkpoint -> connector_tune.py 1 step -> eval.py on 2 items -> the export loaded by transformers
# (InternVLForConditionalGeneration: logits against ours; AutoProcessor where torchvision is installed).
# Peak RSS is the largest single process of the stage (GNU time: for torchrun, the larger rank).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
R=${1:-out/rehearsal}
D=$R/data
mkdir -p "$R"
T="$R/times.tsv"
touch "$T"
stage() {  # stage NAME DONE CMD...: unless DONE exists (a finished stage of an earlier call), run CMD, log to
           # R/NAME.log, append "NAME seconds maxrss_kb" to the table
  local name=$1 done=$2; shift 2
  if [ -e "$done" ]; then echo "== $name: done earlier ($done)"; return; fi
  echo "== $name: $*"
  sed -i "/^$name /d; /^Command /d" "$T"  # an earlier failed try's line (GNU time adds "Command exited ...")
  if ! /usr/bin/time -f "$name %e %M" -a -o "$T" "$@" > "$R/$name.log" 2>&1; then
    tail -30 "$R/$name.log"; echo "rehearsal: stage $name failed (log: $R/$name.log)"; exit 1
  fi
  tail -3 "$R/$name.log"
}
COMMON=(--tokenizer= --activation_checkpointing=True --wandb_log=False)
stage setup "$R/model/model.safetensors" $PY dev/rehearsal_setup.py "$R"
stage sft "$R/sft/hf/config.json" $PY sft.py --init_from="$R/model" --data=$D/sft.jsonl --val_data=$D/val.jsonl \
  --out_dir="$R/sft" --max_steps=1 --batch_size=1 --grad_accum=2 --max_len=1536 --lr=1e-5 --log_every=1 \
  --eval_every=1 --save_every=1 "${COMMON[@]}"
stage grpo "$R/grpo/hf/config.json" $PY -m torch.distributed.run --standalone --nproc_per_node=2 grpo.py \
  --init_from="$R/sft/hf" --data=$D/rl.jsonl --val_data= --out_dir="$R/grpo" --prompts_per_step=2 --group_size=2 \
  --max_new_tokens=16 --max_steps=1 --tp=2 --micro_batch=1 --save_every=1 --lr=1e-6 "${COMMON[@]}"
stage entropy "$R/entropy/entropy.json" $PY entropy.py --init_from="$R/grpo/ckpt_*" --data=$D/val.jsonl \
  --out_dir="$R/entropy" --group_size=2 --max_new_tokens=16 --select=last
stage connector_tune "$R/connector_tune/hf/config.json" $PY connector_tune.py --init_from="$R/entropy/hf" \
  --data=$D/sft.jsonl --val_data=$D/val.jsonl --out_dir="$R/connector_tune" --max_steps=1 --batch_size=1 \
  --grad_accum=1 --max_len=1536 --eval_every=1 --save_every=1 --early_stop_patience=0 "${COMMON[@]}"
stage eval "$R/eval/summary.json" $PY eval.py --init_from="$R/connector_tune/hf" --data=$D/val.jsonl \
  --out_dir="$R/eval" --max_new_tokens=16
# the reload on the GPU machines' transformers (5.17) with torchvision where that venv exists (AutoProcessor needs it)
RELOAD_PY=${RELOAD_PY:-$([ -x .venv-gpu-stack/bin/python ] && echo .venv-gpu-stack/bin/python || echo "$PY")}
stage reload "$R/reload.ok" bash -c "$RELOAD_PY dev/rehearsal_reload.py $R/connector_tune/hf $D/val.jsonl && touch $R/reload.ok"
echo
echo "| stage | seconds | peak RSS (GB) |"
echo "|---|---|---|"
awk 'NF == 3 {printf "| %s | %.0f | %.1f |\n", $1, $2, $3 / 1048576}' "$T"
