# Cold-start SFT of a 38B InternVL3-layout model (Skywork-R1V3 section 2; docs/recipe.md, "Cold-start SFT"),
# on one 8-GPU node:
#   torchrun --standalone --nproc_per_node=8 sft.py config/sft_r1v3_38b.py --init_from=/models/InternVL3-38B
# The report gives no epochs / lr / batch for this stage: these are ours (lr 1e-5, cosine, warmup 3%, global batch 64).
init_from = "/models/InternVL3-38B"  # a local directory (original or transformers-native layout)
data = "/data/r1v3_cold_start.jsonl"  # ~12K rejection-sampled reasoning traces
val_data = ""
out_dir = "out/sft_38b"
max_len = 16384
batch_size = 1  # per GPU
grad_accum = 8  # 1 x 8 x 8 GPUs = global batch 64
epochs = 1.0
lr = 1e-5
min_lr_frac = 0.0
warmup_frac = 0.03
weight_decay = 0.05
grad_clip = 1.0
train_vit = False  # ours: ViT optional; connector + LLM trained (docs/recipe.md, "Cold-start SFT")
train_connector = True
train_llm = True
activation_checkpointing = True
# `--plan=True` (plan.py): without offload the training step needs ~96 GB per 80 GB GPU (fp32 masters + grads +
# AdamW alone are 63.8 GB); with the fp32 states on the CPU, ~29 GB (or 16 GPUs without offload, ~62 GB)
offload = True
log_every = 1
save_every = 50
keep_last = 2
