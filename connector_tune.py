"""
Connector-only tuning after RL: the last training stage of Skywork-R1V3 (section 4; docs/recipe.md,
"Connector-only tuning").
The ViT and the LLM are frozen (no gradients, no optimizer state); only the MLP connector trains, on multi-domain
SFT data, with early stopping on validation loss. The report: MMMU 74.5 after RL -> 76.0 after connector tuning.

One training loop for both stages: this file is both the command and a config file of sft.py. Run, it starts
sft.py with itself as the first config file (the mechanism of `python sft.py config/x.py`), so every later config
file and --key=value flag overrides the values below. Only sft.py config keys may appear at the top level here.

CPU, the embedded default (starts from the checkpoint `python grpo.py` exported to out/grpo/hf):
    python connector_tune.py
    python connector_tune.py --init_from=out/sft/hf          # any HF model directory
The report's setting on one 8-GPU node (lr 1e-5, cosine, warmup 3%, 2 epochs, global batch 64, max length 16384):
    torchrun --standalone --nproc_per_node=8 connector_tune.py config/connector_tune_r1v3_38b.py --init_from=out/grpo_38b/hf
The ablation of R1V3 Table 2 (connector only 76.0 / connector + LLM 73.2 / connector + ViT + LLM 69.7 on MMMU):
    python connector_tune.py                                   # connector only (default)
    python connector_tune.py --train_llm=True                  # connector + LLM
    python connector_tune.py --train_llm=True --train_vit=True # connector + ViT + LLM
Multi-domain data (the JSONL 'domain' field; the synthetic task's question families are its domains):
    python connector_tune.py --domains=count_color,compare --balance_domains=True
Resume: the same command with --init_from=resume (reads out_dir's latest checkpoint, early-stopping state included).

Writes out_dir/log.jsonl (loss, val loss with the best so far; once: trainable params, gradient and AdamW-state
bytes), out_dir/ckpt_XXXXXXX/ and out_dir/hf/ = the weights of the step with the best val loss (step 0 = the
starting weights, when tuning only made things worse).
"""
# -----------------------------------------------------------------------------
# defaults for this stage (any other sft.py key keeps sft.py's default)
init_from = "out/grpo/hf"  # the RL policy
out_dir = "out/connector_tune"
wandb_run_name = "connector_tune"
data = "data/synth/sft.jsonl"  # the synthetic task's SFT split: six question families = six domains
val_data = "data/synth/val.jsonl"
train_vit = False  # R1V3 section 4: ViT and LLM frozen
train_connector = True
train_llm = False
# the report's lr 1e-5 / global batch 64 / 2 epochs / max length 16384 are for a 38B model
# (config/connector_tune_r1v3_38b.py). The tiny default's connector (50K params) needs a larger step (1e-2 already
# raises the val loss), its samples fit in 400 tokens, and half an epoch (62 steps) keeps the stage near 1 minute
# on 2 CPU cores (measured 62 s): the LLM is frozen, but the backward pass still runs through it to the image tokens.
lr = 1e-3
min_lr_frac = 0.0  # cosine to 0
warmup_frac = 0.03
batch_size = 32  # global batch 32 on one process
grad_accum = 1
epochs = 0.5
max_len = 400
weight_decay = 0.0
early_stop_patience = 3  # evaluations without a new best val loss
eval_every = 25
log_every = 10
save_every = 100
# -----------------------------------------------------------------------------

if __name__ == "__main__":
    import os as _os
    import runpy as _runpy
    import sys as _sys
    if {"-h", "--help"} & set(_sys.argv[1:]):
        print(__doc__)  # then sft.py's settings, with this file's values (its --help)
    _here = _os.path.dirname(_os.path.abspath(__file__))
    _sys.argv = [_os.path.join(_here, "sft.py"), _os.path.abspath(__file__)] + _sys.argv[1:]
    _runpy.run_path(_sys.argv[0], run_name="__main__")
