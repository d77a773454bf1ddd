"""Scripts that make the shipped assets: demo tokenizer and model, SAEs, function tokens."""
