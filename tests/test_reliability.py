"""Limits, faults and security of `functok serve` as a real process on loopback: timeouts, SIGTERM draining, bad SAE
and function-token files at start-up, the API key on every endpoint, and logs without secrets."""

import json
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from helpers import ServerProc, is_error_body, metric, wait_idle

from functok_vllm.cli import build_parser
from functok_vllm.core import SAE, SAEConfig
from functok_vllm.paths import DEMO_FUNCTION_TOKENS, DEMO_MODEL, DEMO_SAES

KEY = "sk-reliability-93be1f"
SECRET = "Quetzalcoatl pumpernickel saxophone"  # a prompt that must never reach the log
MODEL = "functok-tiny"


# ---- one server with an API key, private metrics, and a request timeout far below any generation's length ----------

FILE_LIMITS = {"max_body_bytes": 999_999, "max_running": 4, "max_tokens": 500}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    flags = ["--api-key", KEY, "--no-metrics-public", "--request-timeout", "0.05", "--max-body-bytes", "8192"]
    server = ServerProc(tmp_path_factory.mktemp("guarded"), *flags, config={"limits": FILE_LIMITS})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def http(guarded):
    with httpx.Client(base_url=guarded.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


def test_limits_come_from_the_file_and_flags_override_it(http):
    limits = http.get("/v1/steering").json()["limits"]
    assert limits["max_running"] == 4 and limits["max_tokens"] == 500  # from the file
    assert limits["max_body_bytes"] == 8192 and limits["request_timeout"] == 0.05  # flags win over the file
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 9000})
    assert "8192" in is_error_body(r, 413, "request_too_large")["message"]


def test_every_endpoint_but_health_needs_the_key(guarded, http):
    gets = ["/v1/models", "/v1/steering", "/metrics", "/openapi.json", "/docs", "/no/such/path"]
    posts = ["/v1/completions", "/v1/chat/completions", "/v1/analysis/reactivation"]
    for headers in (
        {},
        {"Authorization": "Bearer sk-wrong"},
        {"Authorization": KEY},
        {"Authorization": f"Basic {KEY}"},
    ):
        for path in gets:
            is_error_body(httpx.get(guarded.url + path, headers=headers), 401, "invalid_api_key")
        for path in posts:
            is_error_body(httpx.post(guarded.url + path, json={}, headers=headers), 401, "invalid_api_key")
    assert httpx.get(f"{guarded.url}/health").json() == {"status": "ok"}
    for path in gets[:-1]:
        assert http.get(path).status_code == 200, path
    assert httpx.get(f"{guarded.url}/v1/models", headers={"Authorization": f"bearer {KEY}"}).status_code == 200
    assert http.get("/no/such/path").status_code == 404


def test_request_timeout_aborts_and_answers_504(http):
    body = {"model": MODEL, "prompt": SECRET, "max_tokens": 400, "ignore_eos": True, "temperature": 0}
    before = metric(http, "functok:request_finished_total", finish_reason="timeout", steered="false")
    err = is_error_body(http.post("/v1/completions", json=body), 504, "timeout")
    assert err["type"] == "timeout_error" and "0.05" in err["message"]
    with http.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
        if r.status_code == 200:  # the deadline passed after the first token: a final error event, then [DONE]
            events = [line.removeprefix("data: ") for line in r.iter_lines() if line]
            assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "timeout"
        else:  # the deadline passed before the first token
            r.read()
            is_error_body(r, 504, "timeout")
    wait_idle(http)  # both generations left the batch
    assert metric(http, "functok:request_finished_total", finish_reason="timeout", steered="false") == before + 2
    prompts = [f"{SECRET} number {i}, " * 20 for i in range(4)]  # 4 x ~440 tokens: far more work than 0.05 s
    is_error_body(http.post("/v1/analysis/reactivation", json={"prompts": prompts}), 504, "timeout")


def test_default_host_is_loopback(guarded):
    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"
    assert "on http://127.0.0.1:" in guarded.log.read_text()


def test_log_holds_neither_key_nor_prompts(guarded, http):  # last in the module: every request above is in the log
    http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": SECRET}]})
    http.post("/v1/completions", json={"model": MODEL, "prompt": SECRET, "temperature": 7})  # a 400 that echoes it
    http.post("/v1/analysis/reactivation", json={"prompts": [SECRET], "layers": [9]})
    httpx.get(f"{guarded.url}/v1/models", headers={"Authorization": f"Bearer {KEY}x"})
    log = guarded.log.read_text()
    assert "Uvicorn running" in log and "Traceback" not in log
    for secret in (KEY, SECRET, "Quetzalcoatl", "pumpernickel"):
        assert secret not in log


# ---- SIGTERM ------------------------------------------------------------------------------------------------------


def read_stream(url: str, max_tokens: int, out: list) -> None:
    """Append each SSE payload of a streamed greedy completion to `out` (the first one as soon as it arrives)."""
    body = {"model": MODEL, "prompt": "The king", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body | {"temperature": 0}, timeout=120) as r:
        out.append(r.status_code)
        for line in r.iter_lines():
            if line:
                out.append(line.removeprefix("data: "))


def test_sigterm_drains_then_a_second_signal_aborts_and_the_exit_status_is_0(tmp_path):
    server = ServerProc(tmp_path, "--drain-timeout", "120")
    try:
        short, long = [], []
        threads = [
            threading.Thread(target=read_stream, args=(server.url, n, out)) for n, out in ((100, short), (480, long))
        ]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(short) < 2 or len(long) < 2:  # both are generating
            assert time.monotonic() < deadline, (short, long)
            time.sleep(0.05)
        server.proc.send_signal(signal.SIGTERM)
        r = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
        assert is_error_body(r, 503, "draining") and int(r.headers["retry-after"]) >= 1
        is_error_body(httpx.get(f"{server.url}/health"), 503, "draining")
        threads[0].join(timeout=60)
        assert short[0] == 200 and short[-1] == "[DONE]"  # the in-flight request ran to its end
        assert json.loads(short[-2])["choices"][0]["finish_reason"] == "length"
        assert "".join(json.loads(e)["choices"][0]["text"] for e in short[1:-1])
        server.proc.send_signal(signal.SIGTERM)  # the second signal: stop waiting
        threads[1].join(timeout=60)
        assert long[-1] == "[DONE]"
        last = json.loads(long[-2])
        if "error" in last:  # aborted cleanly (it had not finished when the second signal came)
            assert last["error"]["code"] == "aborted"
        else:
            assert last["choices"][0]["finish_reason"] == "length"
        assert server.proc.wait(timeout=60) == 0
        log = server.log.read_text()
        assert "draining:" in log and "Traceback" not in log
    finally:
        server.stop()


def test_drain_timeout_aborts_what_is_still_running_then_exits_0(tmp_path):
    server = ServerProc(tmp_path, "--drain-timeout", "0.5")
    try:
        streams = [[] for _ in range(4)]  # 4 x 480 greedy tokens: seconds of work, far more than the 0.5 s allowed
        threads = [threading.Thread(target=read_stream, args=(server.url, 480, out)) for out in streams]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while any(len(out) < 2 for out in streams):  # all are generating
            assert time.monotonic() < deadline, streams
            time.sleep(0.05)
        server.proc.send_signal(signal.SIGTERM)  # one signal: the drain deadline, not a second signal, ends it
        for t in threads:
            t.join(timeout=60)
        for out in streams:
            assert out[0] == 200 and out[-1] == "[DONE]"  # every stream still ends well-formed
            assert json.loads(out[-2])["error"]["code"] == "aborted"
        assert server.proc.wait(timeout=60) == 0
        log = server.log.read_text()
        assert "drain timeout (0.5s): aborting the 4 requests still in flight" in log and "Traceback" not in log
    finally:
        server.stop()


# ---- bad SAE files are refused at start-up ---------------------------------------------------------------------


def truncated(tmp: Path) -> tuple[Path, str]:
    d = tmp / "truncated" / "layer_1"
    d.mkdir(parents=True)
    (d / "cfg.json").write_text((DEMO_SAES / "layer_1" / "cfg.json").read_text())
    data = (DEMO_SAES / "layer_1" / "sae_weights.safetensors").read_bytes()
    (d / "sae_weights.safetensors").write_bytes(data[: len(data) // 2])
    return d, str(d / "sae_weights.safetensors")


def narrow(tmp: Path) -> tuple[Path, str]:
    """A well-formed SAE whose d_in (64) is not the model's hidden size (256)."""
    d = tmp / "narrow" / "layer_1"
    cfg = SAEConfig(d_in=64, d_sae=32, architecture="standard", hook_name="blocks.1.hook_resid_post")
    SAE(
        cfg,
        {
            "W_enc": torch.zeros(64, 32),
            "b_enc": torch.zeros(32),
            "W_dec": torch.zeros(32, 64),
            "b_dec": torch.zeros(64),
        },
    ).save(d)
    return d, str(d)


def mismatched_cfg(tmp: Path) -> tuple[Path, str]:
    """The shipped weights with a cfg.json that claims another d_sae."""
    d = tmp / "mismatched" / "layer_2"
    d.mkdir(parents=True)
    cfg = json.loads((DEMO_SAES / "layer_2" / "cfg.json").read_text())
    (d / "cfg.json").write_text(json.dumps(cfg | {"d_sae": 1000}))
    (d / "sae_weights.safetensors").write_bytes((DEMO_SAES / "layer_2" / "sae_weights.safetensors").read_bytes())
    return d, str(d / "sae_weights.safetensors")


def test_a_bad_sae_file_stops_start_up_naming_it(tmp_path):
    cases = [make(tmp_path) for make in (truncated, narrow, mismatched_cfg)]

    def serve(sae_dir: Path):
        cmd = [sys.executable, "-m", "functok_vllm.cli", "serve", "--model", str(DEMO_MODEL), "--sae", str(sae_dir)]
        cmd += ["--port", "1"]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(serve, [d for d, _ in cases]))
    for (_, named), r in zip(cases, results, strict=True):
        assert r.returncode == 2, r.stderr
        assert named in r.stderr and "Traceback" not in r.stderr + r.stdout, r.stderr
    assert "cannot be read as safetensors" in results[0].stderr
    assert "d_in 64 does not match the model's hidden size 256" in results[1].stderr


def test_a_bad_function_token_file_stops_start_up_naming_the_file_and_field(tmp_path):
    good = json.loads(DEMO_FUNCTION_TOKENS.read_text())
    no_token = good | {"tokens": [{"id": t["id"]} for t in good["tokens"]]}
    negative = good | {"tokens": [{"id": -1, "token": ","}]}
    cases = {  # file body, the field the message must name, engine
        "no_token": (json.dumps(no_token), "tokens[0].token: missing", "hf"),
        "no_token_vllm": (json.dumps(no_token), "tokens[0].token: missing", "vllm"),
        "negative": (json.dumps(negative), "tokens[0].id: must be a non-negative integer", "hf"),
        "no_tokens": (json.dumps({"coverage": 0.4}), "tokens: missing", "hf"),
        "not_json": ("{not json", "cannot be read as JSON", "hf"),
    }

    def serve(name: str):
        body, _, engine = cases[name]
        path = tmp_path / f"{name}.json"
        path.write_text(body)
        cmd = [sys.executable, "-m", "functok_vllm.cli", "serve", "--model", str(DEMO_MODEL)]
        cmd += ["--function-tokens", str(path), "--engine", engine]
        return path, subprocess.run(cmd + ["--port", "1"], capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(len(cases)) as pool:
        results = dict(zip(cases, pool.map(serve, cases), strict=True))
    for name, (path, r) in results.items():
        assert r.returncode == 2, (name, r.stderr)
        assert "Traceback" not in r.stderr + r.stdout, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and str(path) in lines[0] and cases[name][1] in lines[0], (name, r.stderr)
