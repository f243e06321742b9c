#!/bin/bash
# The R1V3 paper's findings rerun on the embedded default (issue #5). One command per experiment, each over
# 3 seeds; every run writes under out/exp/ and prints its greedy test accuracy. Results: dev/LOG.md.
#
#   bash speedrun.sh                          # first: the data, the venv and the SFT checkpoint out/sft/hf
#   bash dev/experiments.sh rl_vs_sft         # 1. 60 GRPO steps vs 60 more SFT steps from the same SFT model
#   bash dev/experiments.sh connector_in_rl   # 2. connector trainable (default) vs frozen during GRPO
#   bash dev/experiments.sh after_rl          # 3. after GRPO: tune the connector only / connector + LLM / all
#   bash dev/experiments.sh curriculum        # 4. GRPO on normal then hard prompts vs mixed (same 60 steps)
#   bash dev/experiments.sh entropy           # 5. critical-token entropy vs accuracy over 12 GRPO checkpoints a run
#   bash dev/experiments.sh think             # 6. think vs no-think vs no-wait decoding of the GRPO models
#
# SEEDS="1337 2 3" by default; the GRPO runs with the default config (out/exp/grpo_s<seed>) are shared by
# experiments 1-4 and 6 and made on first use (5 makes its own, out/exp/f5_s<seed>, with a checkpoint every 5
# steps). The runs are not timed (run two at once if you like).
set -e
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SEEDS=${SEEDS:-"1337 2 3"}
E=out/exp
mkdir -p $E

acc() {  # acc CKPT OUT_DIR [eval args]: greedy test accuracy (%) of an HF checkpoint, printed as one line
    $PY eval.py --init_from="$1" --out_dir="$2" "${@:3}" > "$2.log" 2>&1 || { cat "$2.log"; exit 1; }
    $PY -c "import json, sys; print(f'{sys.argv[2]}: {100 * json.load(open(sys.argv[1]))[\"accuracy\"]:.1f}%')" "$2/summary.json" "$2"
}
once() {  # once DIR CMD...: run CMD (logging to DIR.log) unless DIR already holds its exported model
    local d=$1; shift
    [ -f $d/hf/config.json ] || "$@" > $d.log 2>&1
}
grpo_default() {  # the shared default GRPO run of seed $1
    once $E/grpo_s$1 $PY grpo.py --seed=$1 --out_dir=$E/grpo_s$1
}
[ -f out/sft/hf/config.json ] || { echo "no out/sft/hf: run bash speedrun.sh first"; exit 1; }

case "$1" in
rl_vs_sft)
    # R1V3 Table 3 asks whether RL beats SFT on the same data. Here: from the same SFT checkpoint, the same number
    # of optimizer steps (60), same lr, either GRPO on the rl prompts or more SFT on the sft traces.
    acc out/sft/hf $E/eval_sft
    for s in $SEEDS; do
        grpo_default $s
        acc $E/grpo_s$s/hf $E/eval_grpo_s$s
        once $E/moresft_s$s $PY sft.py --init_from=out/sft/hf --out_dir=$E/moresft_s$s --seed=$s \
            --max_steps=60 --lr=5e-5 --warmup_frac=0 --min_lr_frac=1.0 --val_data=
        acc $E/moresft_s$s/hf $E/eval_moresft_s$s
    done ;;
connector_in_rl)
    for s in $SEEDS; do
        grpo_default $s
        acc $E/grpo_s$s/hf $E/eval_grpo_s$s
        once $E/grpo_noconn_s$s $PY grpo.py --seed=$s --train_connector=False --out_dir=$E/grpo_noconn_s$s
        acc $E/grpo_noconn_s$s/hf $E/eval_grpo_noconn_s$s
    done ;;
after_rl)
    for s in $SEEDS; do
        grpo_default $s
        acc $E/grpo_s$s/hf $E/eval_grpo_s$s
        for parts in connector:True:False:False connector_llm:True:True:False all:True:True:True; do
            IFS=: read name conn llm vit <<< "$parts"
            d=$E/ct_${name}_s$s
            once $d $PY connector_tune.py --init_from=$E/grpo_s$s/hf --out_dir=$d --seed=$s \
                --train_connector=$conn --train_llm=$llm --train_vit=$vit
            acc $d/hf $E/eval_ct_${name}_s$s
        done
    done ;;
curriculum)
    # the same 60 GRPO steps: 30 on normal prompts then 30 on hard ones, vs the default's mixed prompts
    for diff in normal hard; do
        $PY -c "import json, sys; [print(l, end='') for l in open('data/synth/rl.jsonl') if json.loads(l)['difficulty'] == sys.argv[1]]" \
            $diff > data/synth/rl_$diff.jsonl  # beside rl.jsonl: image paths are relative to the file
    done
    for s in $SEEDS; do
        grpo_default $s
        acc $E/grpo_s$s/hf $E/eval_grpo_s$s
        once $E/cur1_s$s $PY grpo.py --seed=$s --data=data/synth/rl_normal.jsonl --max_steps=30 --out_dir=$E/cur1_s$s
        once $E/cur2_s$s $PY grpo.py --seed=$s --init_from=$E/cur1_s$s/hf --data=data/synth/rl_hard.jsonl \
            --max_steps=30 --out_dir=$E/cur2_s$s
        acc $E/cur2_s$s/hf $E/eval_curriculum_s$s
    done ;;
entropy)
    # R1V3 Fig. 5 / section 5, measured so that it can show something (issue #13): a checkpoint every 5 steps (12 a
    # run), critical-token entropy and sampled accuracy (k=4, T=1) on the 1000 val_big items, the greedy test accuracy
    # of every checkpoint, then one report over the seeds (dev/finding5.py: r with its Fisher-z interval per seed and
    # pooled, selection by entropy vs the last and a random checkpoint on test) -> $E/finding5, viewer.py's page
    $PY data/prepare.py --n_val_big=1000 > /dev/null
    for s in $SEEDS; do
        once $E/f5_s$s $PY grpo.py --seed=$s --save_every=5 --keep_last=0 --out_dir=$E/f5_s$s
        acc $E/f5_s$s/hf $E/eval_f5_s$s
        [ -f $E/f5_entropy_s$s/entropy.json ] || $PY entropy.py --init_from="$E/f5_s$s/ckpt_*" \
            --data=data/synth/val_big.jsonl --out_dir=$E/f5_entropy_s$s --export_hf=False > $E/f5_entropy_s$s.log 2>&1
        mkdir -p $E/f5_test_s$s
        for c in $E/f5_s$s/ckpt_*; do
            [ -f $E/f5_test_s$s/$(basename $c)/summary.json ] || acc $c $E/f5_test_s$s/$(basename $c)
        done
    done
    $PY dev/finding5.py --seeds="[$(echo $SEEDS | tr ' ' ,)]" --entropy_dir="$E/f5_entropy_s{seed}" \
        --test_dir="$E/f5_test_s{seed}/{ckpt}" --out_dir=$E/finding5
    $PY tools/viewer.py $E/finding5 ;;
think)
    for s in $SEEDS; do
        grpo_default $s
        acc $E/grpo_s$s/hf $E/eval_think_s$s
        acc $E/grpo_s$s/hf $E/eval_nothink_s$s --think=False
        acc $E/grpo_s$s/hf $E/eval_nowait_s$s --no_wait=True
    done ;;
*)
    sed -n 2,16p "$0"; exit 1 ;;
esac
