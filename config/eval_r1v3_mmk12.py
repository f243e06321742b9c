# MMK12 evaluation with the settings of Skywork's MMK12 script (SkyworkAI/Skywork-R1V, eval/MMK12/evaluate.py):
#   python data/convert_bench.py mmk12 /data/MMK12/data out/bench/mmk12.jsonl      # the 2,000-question test split
#   python eval.py config/eval_r1v3_mmk12.py --init_from=/models/Skywork-R1V3-38B --data=out/bench/mmk12.jsonl
# temperature 0.8, no top-p / top-k, 16384 new tokens, one run (their request to the vLLM server sets nothing else).
# Their script also sends a system prompt asking for the answer in \boxed{} inside <answer> tags; rewards.py takes
# the last \boxed{} after </think> either way, so the checkpoint's own is kept (add --system_prompt=... to match it).
temperature = 0.8
top_k = 0
top_p = 1.0
repetition_penalty = 1.0  # none given (set here so a generation_config.json cannot)
max_new_tokens = 16384
group_size = 1
