# Benchmark evaluation with Skywork-R1V3's released settings (docs/recipe.md, "Evaluation"):
#   python eval.py config/eval_r1v3_bench.py --init_from=/models/Skywork-R1V3-38B --data=out/bench/mmmu_val.jsonl
#   torchrun --nproc_per_node=8 eval.py config/eval_r1v3_bench.py --tp=8 --init_from=... --data=...
# Source: the model entry their VLMEvalKit runs use (SkyworkAI/Skywork-R1V, eval/vlmevalkit/vlmeval/config.py,
# "R1V3-alpha"): temperature 0 (greedy), 16384 new tokens, one run. They score with VLMEvalKit's GPT-4o judge plus
# a rule-based re-check; eval.py has the rule check only (rewards.py: the last \boxed{} after </think>). Think mode
# (forced "<think>\n"), as R1V3 is trained; for a base InternVL3 add --think=False (eval.py's docstring). The
# report's own numbers are averages of 5 sampled runs at T=1.0: config/eval_r1v3_paper.py.
# repetition_penalty 1.05 is the value of Skywork's inference scripts (inference/inference_with_vllm.py and
# inference_with_transformers.py); their VLMEvalKit client sends none (vLLM's 1.0), which --repetition_penalty=1.0
# reproduces exactly. Over 16K greedy tokens the penalty keeps a repetition loop from eating the budget.
temperature = 0.0
top_k = 0
top_p = 1.0
repetition_penalty = 1.05
max_new_tokens = 16384
group_size = 1
