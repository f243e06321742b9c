# Evaluation as the Skywork-R1V3 report describes it (section 6; docs/recipe.md, "Evaluation"): 16384 new tokens,
# temperature 1.0, accuracy averaged over 5 runs (avg@5; eval.py also reports pass@5 and the spread over runs).
#   python eval.py config/eval_r1v3_paper.py --init_from=out/grpo_r1v3 --data=out/bench/mmmu_val.jsonl
# Their released VLMEvalKit settings are greedy instead: config/eval_r1v3_bench.py.
temperature = 1.0
top_k = 0
top_p = 1.0
repetition_penalty = 1.0  # none given (set here so a generation_config.json cannot)
max_new_tokens = 16384
group_size = 5
