"""The OpenAI-compatible HTTP server with per-request steering (`functok serve`)."""
