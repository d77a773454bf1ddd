"""vLLM general plugin (entry point `vllm.general_plugins: functok_steering`): runs in every vLLM process.

vLLM calls `register()` in the API process, the engine core and every worker, possibly several times; it imports
nothing heavy at module import time. It refuses a vLLM release whose internals functok was not written against
(`compat.check_version`) and installs two things, both inert for requests without steering:

- on CPU, the slot-mapping fix (`compat.cpu_fix`: vLLM 0.32.0's no-Triton fallback fails otherwise);
- the admission hook in `admission` (spec validation -> HTTP 400, canonical spec, prefix-cache salt).

The steering itself lives in the worker extension, `functok_vllm.engines.vllm.worker.SteeringWorkerExtension`.
"""

from __future__ import annotations

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from functok_vllm.engines.vllm import admission, compat

    compat.check_version()
    compat.cpu_fix()
    admission.install()
    _registered = True
