# Connector-only tuning after RL of a 38B InternVL3-layout model (Skywork-R1V3 section 4; docs/recipe.md,
# "Connector-only tuning"), one 8-GPU node:
#   torchrun --standalone --nproc_per_node=8 connector_tune.py config/connector_tune_r1v3_38b.py --init_from=out/grpo_38b/hf
# The report's values: only the connector trains; 2 epochs, global batch 64, lr 1e-5, cosine, warmup 3%, max length
# 16384, early stopping on validation loss; ~10K samples from 20 domains (maths ... law).
# Ablation (R1V3 Table 2, MMMU 76.0 / 73.2 / 69.7): add --train_llm=True, or --train_llm=True --train_vit=True, each
# with --offload=True on 8 x 80 GB (`--plan=True`: 29.1 / 32.8 GB per GPU; without offload 95.8 / 107.7 GB).
# Memory beyond the weights, from the architecture (fp32 AdamW state / fp32 gradients, summed over all GPUs):
# connector 91.8M params: 0.73 GB / 0.37 GB; + LLM (32.8B): 263 GB / 131 GB; + ViT (5.5B): 307 GB / 153 GB.
# The run prints and logs the measured figure after its first step ("memory: ..." / log.jsonl optim_state_bytes).
init_from = "out/grpo_38b/hf"  # the RL policy (grpo.py's export)
data = "/data/r1v3_connector_10k.jsonl"  # multi-domain SFT data with a 'domain' field
val_data = "/data/r1v3_connector_val.jsonl"  # held out, same domains: early stopping needs it
out_dir = "out/connector_tune_38b"
max_len = 16384
batch_size = 1  # per GPU
grad_accum = 8  # 1 x 8 x 8 GPUs = global batch 64
epochs = 2.0
lr = 1e-5
min_lr_frac = 0.0
warmup_frac = 0.03
weight_decay = 0.0  # ours: the report gives none
grad_clip = 1.0
train_vit = False
train_connector = True
train_llm = False
# the frozen LLM still needs its activations for the backward pass to the image tokens
activation_checkpointing = True
# ours: ~310 steps in all; evaluate every 20 steps, stop after 3 evaluations without a better val loss
eval_every = 20
early_stop_patience = 3
log_every = 1
save_every = 50
keep_last = 2
