# GRPO as in Skywork-R1V3 section 3 on the report's own model size, Skywork-R1V3-38B / InternVL3-38B, on one node of
# 8 x 80 GB GPUs (issue 12):
#   torchrun --standalone --nproc_per_node=8 grpo.py config/grpo_r1v3.py config/grpo_r1v3_38b.py --init_from=/models/r1v3_sft
# Two nodes (16 x 80 GB, no offload): add --offload=False --micro_batch=1 and the usual torchrun --nnodes/--node_rank
# /--rdzv flags (out_dir on a shared filesystem).
# What makes it fit (`--plan=True`, plan.py, README "Memory plan"): the rollouts are tensor-parallel over the 8 GPUs
# (each holds 1/8 of every LLM block, the ViT and embeddings replicated: 20.6 GB), and the fp32 masters, gradients
# and AdamW state (614 GB in all) live on the CPUs (575 GB of host RAM on the node). Peak ~74 GB per GPU; without
# offload the training step needs ~120 GB per GPU.
tp = 8
offload = True
micro_batch = 2  # 4 fits too, by 0.2 GB (79.4 of 79.6 GB): no margin for what the plan does not model
activation_checkpointing = True
