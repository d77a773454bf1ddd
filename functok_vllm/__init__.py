"""functok-vllm: per-request SAE feature steering at function-token positions, for vLLM and transformers."""

__version__ = "0.1.0"
