"""What several test modules share: the prompt set, a `functok serve` subprocess on loopback, and readers of its
error bodies and metrics. A plain module (tests import it by name; pytest puts tests/ on the path)."""

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch

from functok_vllm.launch import Server, ServerStartError, functok_serve, start
from functok_vllm.paths import DEMO_MODEL

MP = "VLLM_ENABLE_V1_MULTIPROCESSING"
PROMPTS = [
    "The king said to his son",
    "Once upon a time, there was a",
    "She walked into the room and",
    "War is",
    "My dear friend, I have written to you because",
    "It was the best of",
]


def openai_client(url: str, api_key: str = "none", timeout: float = 120):
    """The official client against a server of ours at `url`, without retries (a test sees every error)."""
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=timeout)


class ServerProc(Server):
    """`functok serve ARGS` on a free loopback port (`functok_vllm.launch.start`), its output in tmp/server.log; the
    demo model (functok-tiny, with its shipped SAEs) unless ARGS name a --model."""

    def __init__(self, tmp: Path, *args: str, config: dict | None = None, env: dict | None = None):
        if "--model" not in args:
            args = ("--model", str(DEMO_MODEL), *args)
        if config is not None:
            (tmp / "config.json").write_text(json.dumps(config))
            args = (*args, "--config", str(tmp / "config.json"))
        try:
            srv = start(functok_serve(*args), tmp / "server.log", env=env, timeout_s=300)
        except ServerStartError as e:
            pytest.fail(str(e))
        super().__init__(srv.proc, srv.url, srv.log)


def is_error_body(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    assert code is None or err["code"] == code, err
    return err


def metric(http, name: str, **labels) -> float:
    """The value of one sample on /metrics (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in http.get("/metrics").text.splitlines():
        head, _, value = line.rpartition(" ")
        if head == name or (want and head.startswith(name + "{") and all(p in head for p in want.split(","))):
            return float(value)
    return 0.0


def wait_idle(http, deadline_s=60) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if metric(http, "functok:num_requests_running") == metric(http, "functok:num_requests_waiting") == 0:
            return
        time.sleep(0.1)
    pytest.fail("the server did not become idle")


def batch_state(saes, function_tokens, max_clamps: int):
    """A vLLM worker's per-step steering state (`BatchSteering`) over the demo SAEs, parsing specs as the worker does;
    no vLLM engine needed."""
    from functok_vllm.core import SteeringTable
    from functok_vllm.engines.vllm.batch_state import BatchSteering
    from functok_vllm.engines.vllm.settings import from_additional_config
    from functok_vllm.engines.vllm.worker import _local_spec

    table = SteeringTable(saes, max_slots=8, max_clamps=max_clamps, max_tokens=256)
    cfg = from_additional_config({}, str(DEMO_MODEL))
    return BatchSteering(
        table, function_tokens.mask(8192), lambda value, extra=None: _local_spec(value, cfg, table, extra)
    )


@contextmanager
def vllm_in_process(in_process: bool):
    """vLLM's engine core and worker in this process (`in_process`), or in their own processes as in serving.

    In this process an engine starts about 20 s sooner on 2 cores (no two processes importing vLLM and torch); the
    worker, its steering op and the compiled model are the same code. Left as found: vLLM's environment reads (its
    in-process engine caches them) and `torch.set_num_threads` (its CPU worker replaces it with a no-op)."""
    import vllm.envs

    vllm.envs.disable_envs_cache()
    before, set_threads = os.environ.get(MP), torch.set_num_threads
    os.environ[MP] = "0" if in_process else "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[MP]
        else:
            os.environ[MP] = before
        torch.set_num_threads = set_threads
        vllm.envs.disable_envs_cache()


def steering_llm(model, saes=None, function_tokens=None, enforce_eager=False, functok=None, in_process=True, **kw):
    """vLLM's offline `LLM` with the steering worker extension, float32, seed 0, no prefix caching unless asked;
    `saes`/`function_tokens` None: the SAEs shipped for the model; `functok`: more additional_config["functok"] keys;
    `in_process`: see `vllm_in_process` (False where the test sets environment variables for vLLM's processes, or
    where the model runs on vLLM's Transformers backend, which changes the transformers class the reference uses)."""
    from vllm import LLM

    from functok_vllm.engines.vllm.settings import EXTENSION

    extra = dict(functok or {})
    if saes is not None:
        extra |= {"saes": [str(p) for p in saes], "function_tokens": str(function_tokens)}
    args = dict(max_model_len=256, max_num_seqs=16, enable_prefix_caching=False) | kw
    with vllm_in_process(in_process):
        return LLM(
            model=str(model),
            dtype="float32",
            seed=0,
            enforce_eager=enforce_eager,
            worker_extension_cls=EXTENSION,
            additional_config={"functok": extra} if extra else {},
            **args,
        )


def worker_stats(llm) -> dict:
    """The worker's `functok_stats` once it has been told which requests finished. vLLM tells it in the next step's
    schedule: served, the engine core's loop runs that step at once; in this process nothing runs it until the next
    request, so it is run here (a step with nothing scheduled)."""
    from vllm.v1.engine.core_client import InprocClient

    if isinstance(llm.llm_engine.engine_core, InprocClient):
        llm.llm_engine.step()
    return llm.collective_rpc("functok_stats")[0]


def write_gguf(path: Path, directions: dict, arch: str = "controlvector") -> bytes:
    """A control vector as repeng's `export_gguf` and llama.cpp's `cvector-generator` write it: {layer: (d_model,)
    numpy array}; the file's bytes."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_string(f"{arch}.model_hint", "llama")
    w.add_uint32(f"{arch}.layer_count", len(directions))
    for layer, d in directions.items():
        w.add_tensor(f"direction.{layer}", d)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()
