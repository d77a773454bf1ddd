"""Steering on vLLM 0.32: a general plugin, a worker extension, and an AsyncLLM adapter for `functok serve`.

Stock vLLM server (steering travels in `vllm_xargs` as a JSON string):

    vllm serve models/functok-tiny --dtype float32 \\
        --worker-extension-cls functok_vllm.engines.vllm.worker.SteeringWorkerExtension \\
        [--additional-config '{"functok": {"saes": [...], "function_tokens": "..."}}']

    client.completions.create(..., extra_body={"vllm_xargs": {"steering": json.dumps(spec)}})

Modules: `plugin` (entry point, every process), `admission` (API process: validation, prefix-cache salt),
`worker` (model runner and decoder layers), `batch_state` (per-step slot index), `config`, `cpu_fix`, `engine`.
Nothing here imports vllm at package import time.
"""
