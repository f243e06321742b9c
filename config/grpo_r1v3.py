# GRPO as in Skywork-R1V3 section 3 (docs/recipe.md, "GRPO"), on one 8-GPU node:
#   torchrun --standalone --nproc_per_node=8 grpo.py config/grpo_r1v3.py --init_from=out/sft_8b/hf
# 1024 rollouts per step = 32 prompts x 32 samples; one optimizer step per rollout batch (on-policy);
# clip eps 0.2, no KL, reward 0.8 acc + 0.2 format, lr 1e-5 (1e-6 is the safe alternative), all modules trained,
# response length 4096 then 8192. Rollouts run on gathered FSDP weights (tp=1). `--plan=True` with InternVL3-8B on
# 8x80 GB: fits (peak ~78 GB, the rollout split into 2 chunks of 3 prompts per GPU). 38B: config/grpo_r1v3_38b.py.
init_from = "out/sft_8b/hf"
data = "/data/mmk12_rl.jsonl"  # question + answer (+ images, options); R1V3 used 15K K12 maths problems
val_data = "/data/mmk12_val.jsonl"
val_n = 256
out_dir = "out/grpo_r1v3"
prompts_per_step = 32
group_size = 32
temperature = 1.0
max_new_tokens = [[0, 4096], [200, 8192]]
lr = 1e-5
beta2 = 0.999
eps_low = 0.2
eps_high = 0.2
loss_agg = "seq_mean_token_mean"
kl_coef = 0.0
micro_batch = 4
micro_batch_tokens = 49152  # 4 sequences of 3840 + 8192 tokens (the plan's prompt + the longest response)
activation_checkpointing = True
max_steps = 400
high_entropy = 6.8  # R1V3's threshold for Qwen's 152k vocabulary
eval_every = 20
eval_at_start = False  # no 256-item validation of the SFT weights before step 1 (eval.py scores them)
save_every = 10
keep_last = 3  # entropy.py ranks the kept checkpoints; each is ~95 GB at 8B (fp32 params + 2 AdamW states)
# so the start-up disk check (plumbing.check_disk) stops the run unless out_dir has one checkpoint's ~96 GB free, and
# warns below keep_last + 1 = 4 of them (~385 GB): a save writes the new checkpoint before it prunes the oldest
