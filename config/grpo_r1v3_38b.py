# GRPO as in Skywork-R1V3 section 3 on the report's own model size, Skywork-R1V3-38B / InternVL3-38B, on one node of
# 8 x 80 GB GPUs (issue 12):
#   torchrun --standalone --nproc_per_node=8 grpo.py config/grpo_r1v3.py config/grpo_r1v3_38b.py --init_from=/models/r1v3_sft
# Two nodes (16 x 80 GB, no offload): add --offload=False --micro_batch=1 and the usual torchrun --nnodes/--node_rank
# /--rdzv flags (out_dir on a shared filesystem).
# What makes it fit (`--plan=True`, plan.py, README "Memory plan"): the rollouts are tensor-parallel over the 8 GPUs
# (each holds 1/8 of every LLM block, the ViT and embeddings replicated: 20.6 GB), and the fp32 masters, gradients
# and AdamW state live on the CPUs: 792 GB of host RAM on the node (572 GB of states; FSDP2 pins each shard on its
# own and the pinned allocator rounds it up to a power of two). Peak ~71 GB per GPU; without offload the training
# step needs ~120 GB per GPU.
# The alternative without offload on the same node (issue 20): --offload=False --master_dtype=bfloat16 --micro_batch=1
# keeps parameters, gradients and AdamW state in bf16 (plumbing/optim.py: each update computed in fp32 and written back
# with stochastic rounding, so lr-1e-6 updates are not lost): 35.8 GB of states per GPU instead of 71.5, no host RAM.
# Plan: fits (peak ~76 GB per GPU, the validation rollout; training step ~65.5 GB; the rollout in 16 chunks of 2
# prompts per TP group, est. step ~3220 s vs ~2860 s with offload). The gradients are accumulated over micro-batches in bf16 (reduce-scatter still in fp32).
#   master_dtype = "bfloat16"; offload = False; micro_batch = 1
tp = 8
offload = True
micro_batch = 2  # 4 fits too, by 0.2 GB (79.4 of 79.6 GB): no margin for what the plan does not model
activation_checkpointing = True
