"""Markers that transformers' common test files use (registered by transformers' own conftest, not shipped)."""

TRANSFORMERS_MARKERS = {
    "accelerate_tests": "transformers: tests that need accelerate's big-model features",
    "flash_attn_test": "transformers: Flash Attention 2 tests",
    "flash_attn_3_test": "transformers: Flash Attention 3 tests",
    "flash_attn_4_test": "transformers: Flash Attention 4 tests",
    "torch_compile_test": "transformers: torch.compile tests",
    # Added by transformers.testing_utils decorators (is_pipeline_test, ...).
    "is_pipeline_test": "transformers: pipeline tests",
    "is_staging_test": "transformers: Hub staging tests",
    "is_agent_test": "transformers: agent tests",
    "is_training_test": "transformers: training tests",
    "is_tensor_parallel_test": "transformers: tensor-parallel tests",
    "is_expert_parallel_test": "transformers: expert-parallel tests",
    "is_fsdp_test": "transformers: FSDP tests",
    "order": "pytest-order ordering (transformers' run_first)",
}


def pytest_configure(config):
    for name, text in TRANSFORMERS_MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
