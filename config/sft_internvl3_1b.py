# SFT of InternVL3-1B on one GPU (or a few with torchrun):
#   python sft.py config/sft_internvl3_1b.py --init_from=/models/InternVL3-1B --data=/data/train.jsonl
init_from = "/models/InternVL3-1B"
data = "/data/train.jsonl"
val_data = ""
out_dir = "out/sft_1b"
max_len = 4096
batch_size = 4
grad_accum = 16  # global batch 64 on one GPU
epochs = 1.0
lr = 1e-5
warmup_frac = 0.03
min_lr_frac = 0.0
activation_checkpointing = True
log_every = 1
save_every = 100
