"""
The plumbing: what the stages need and a forker should not need to read.
  dist.py          process setup with and without torchrun, collectives, rank agreement (agree*, together)
  watchdog.py      fail fast: one rank's failure stops every rank within seconds, on every node
  checkpoint.py    build_model (scratch / resume / HF, frozen towers, activation checkpointing, FSDP2), atomic DCP
                   checkpoints, the HF export, the disk check, load_inference_model
  optim.py         the optimizer: torch AdamW on fp32 masters, or bf16 masters + AdamW with stochastic rounding
  run.py           the LR schedule, log.jsonl, env.json, wandb, the embedded default's data
  hf.py            Hugging Face checkpoints: the checked key maps, both layouts, sharded reading, the one writer
  tp.py            tensor-parallel rollouts
  configurator.py  config globals, config files and --key=value
The stages import what they use from here: `from plumbing import compute_init, build_model, ...`.
"""
from plumbing.checkpoint import (apply_activation_checkpointing, apply_fsdp, build_model, check_disk,
                                 checkpoint_bytes, export_hf, latest_checkpoint, list_checkpoints, load_checkpoint,
                                 load_inference_model, load_tokenizer, save_checkpoint, set_trainable)
from plumbing.dist import (agree, agree_max, agree_min, all_reduce_sum, autocast_ctx, barrier, compute_cleanup,
                           compute_init, print0, rank, together)
from plumbing.optim import AdamW, build_optimizer, master_torch_dtype, stochastic_round_
from plumbing.run import ensure_synth_data, environment, get_lr, log_jsonl, wandb_init, write_env
from plumbing.watchdog import fail
