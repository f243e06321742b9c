# Test-wide setup: runs before any test module is imported.
import os
import sys

import torch

# Triton kernels can only run under the interpreter on a machine without a GPU; it must be set before
# anything imports triton (docs/perf.md, "Triton on CPU").
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# the repo root holds flat modules (model.py, sampler.py, ...) and tools/ the tools beside the pipeline (plan.py,
# viewer.py, ...): make both importable from tests/
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# `bash test.sh --fast` (pytest -m "not slow"): the tests a developer runs while working, about a minute and a half
# on 2 cores: rl, the sampler core and kernels, model, rewards, data, configuration. Slow: end to end runs of the
# scripts, anything with several processes, the browser, the memory plan.
SLOW_MODULES = {"test_sft", "test_grpo", "test_tp", "test_failfast", "test_viewer", "test_gpu_check", "test_plan",
                "test_connector_tune"}
SLOW_TESTS = {  # in otherwise fast modules
    "test_fsdp_bad_checkpoint_stops_every_rank", "test_fsdp_load_equals_single_process_and_exports_bf16",
    "test_fsdp_load_peak_rss", "test_fsdp_gloo_two_processes", "test_end_to_end_two_checkpoints",
    "test_cli_glob_matching_nothing", "test_same_decodes_as_eval_and_bad_checkpoint", "test_eval_end_to_end_on_converted_mmk12",
    "test_evaluate_multi_image_mmmu", "test_fsdp2_unsharded_rollout", "test_wandb_missing_stops_the_run_before_the_model_loads",
    "test_under_torchrun_bad_input_is_printed_once", "test_help_lists_the_settings_with_their_comments",
    "test_help_shows_the_values_a_config_file_sets", "test_bad_setting_is_one_line",
    "test_missing_model_and_bad_data_line_are_one_line"}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end to end, multi-process, browser or memory-plan test (not in --fast)")


def pytest_collection_modifyitems(config, items):
    import pytest
    for item in items:
        if item.module.__name__ in SLOW_MODULES or item.originalname in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def real_tokenizer_dir(tmp_path_factory):
    """InternVL3's real tokenizer (Qwen2.5 BPE + InternVL's added tokens, no chat template), built once per session
    by tests/real_tokenizer.py (the first run downloads dashscope's qwen.tiktoken into .cache/)."""
    from real_tokenizer import build_internvl3_tokenizer
    return build_internvl3_tokenizer(str(tmp_path_factory.mktemp("internvl3_tokenizer")))


@pytest.fixture
def gloo1():
    """A one-process gloo group for the test (destroyed after it)."""
    import torch.distributed as dist
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()
