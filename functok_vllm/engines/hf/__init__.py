"""The transformers engine: model loading, temporary residual-stream hooks, dynamic batching."""
