"""Engines that run a model with the steering core: transformers (embedded default) and vLLM (production)."""
