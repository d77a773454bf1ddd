"""Fuzzing a real server from its own OpenAPI schema (schemathesis, positive and negative cases): no 5xx, an
OpenAI-style error body on every 4xx, and a good request still answered afterwards. Plus hand-made bad inputs the
schema cannot produce (test_server.py has the first set: malformed JSON, NaN strengths, an oversized body, ...)."""

import json

import httpx
import pytest
import schemathesis
from helpers import ServerProc, is_error_body
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

KEY = "sk-fuzz-5d2a"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "functok-tiny"
# a tiny max_tokens cap keeps every valid generation short; a small analysis cap keeps every valid analysis short
FLAGS = ["--api-key", KEY, "--max-tokens", "8", "--max-analysis-prompts", "2", "--max-running", "4"]
FLAGS += ["--admin-api-key", KEY, "--steer-layers", "3"]  # the steering library's writes too
OPERATIONS = [  # (method, path, generation modes)
    ("POST", "/v1/completions", ("positive", "negative")),
    ("POST", "/v1/chat/completions", ("positive", "negative")),
    ("POST", "/v1/analysis/reactivation", ("positive", "negative")),
    ("GET", "/v1/steering", ("positive",)),
    ("POST", "/v1/steering/vectors", ("positive", "negative")),
    ("PUT", "/v1/steering/vectors/{name}", ("negative",)),
    ("POST", "/v1/steering/presets", ("positive", "negative")),
]
CASES = [(m, p, mode) for m, p, modes in OPERATIONS for mode in modes]
EXAMPLES = 30  # per operation and mode


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ServerProc(tmp_path_factory.mktemp("fuzz"), *FLAGS, "--data-dir", str(tmp_path_factory.mktemp("library")))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def schema(server):
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json", headers=AUTH, timeout=30)


def still_serving(url: str) -> None:
    body = {"model": MODEL, "prompt": "The king", "max_tokens": 4, "temperature": 0}
    r = httpx.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length", r.text


def fit(body: dict) -> None:
    """Point a valid body at the served model and within the max_tokens cap, so more cases reach the engine."""
    if "model" in body:
        body["model"] = MODEL
    if isinstance(body.get("prompt"), list) and body["prompt"] and isinstance(body["prompt"][0], str):
        body["prompt"] = body["prompt"][:1]  # one prompt per request
    if isinstance(body.get("prompts"), list):
        body["prompts"] = body["prompts"][:2]  # the analysis cap
    for name in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(name), int):
            body[name] = 1 + body[name] % 8


@pytest.mark.parametrize("method,path,mode", CASES, ids=[f"{m} {p} {mode}" for m, p, mode in CASES])
def test_schema_fuzz_never_gets_a_5xx(server, schema, method, path, mode):
    seen = {}

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,  # the same cases on every run
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=schema[path][method].as_strategy(generation_mode=GenerationMode(mode)))
    def fuzz(case):
        if mode == "positive" and isinstance(case.body, dict):
            fit(case.body)
        r = case.call(base_url=server.url, headers=AUTH, timeout=60)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, f"{case.body!r} -> {r.status_code} {r.text[:500]}"
        if r.status_code >= 400:
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"], r.text

    fuzz()
    assert sum(seen.values()) >= 1, seen
    still_serving(server.url)


GOOD = {"model": MODEL, "prompt": "The king", "max_tokens": 4, "temperature": 0}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "temperature": 0}
EDIT = {"layer": 2, "feature": 10, "strength": 5.0}
BAD = [  # (path, body or raw text, status, param) -- what test_server.py's table does not already cover
    ("/v1/completions", GOOD | {"steering": {"edits": [EDIT | {"feature": 2**64}]}}, 400, "steering.edits[0].feature"),
    ("/v1/completions", GOOD | {"steering": {"edits": [EDIT | {"layer": 3}]}}, 400, "steering.edits[0].layer"),
    ("/v1/completions", GOOD | {"steering": {"edits": [EDIT | {"layer": 2**70}]}}, 400, "steering.edits[0].layer"),
    ("/v1/completions", GOOD | {"max_tokens": -5}, 400, "max_tokens"),
    ("/v1/completions", GOOD | {"max_tokens": 10**30}, 400, "max_tokens"),
    ("/v1/completions", GOOD | {"seed": 2**70}, 400, "seed"),
    ("/v1/completions", GOOD | {"prompt": [2**70]}, 400, "prompt"),
    ("/v1/completions", GOOD | {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", GOOD | {"stop": [""]}, 400, "stop"),
    ("/v1/completions", GOOD | {"stop": ["a"] * 40}, 400, "stop"),
    ("/v1/completions", GOOD | {"top_p": 0}, 400, "top_p"),
    (
        "/v1/completions",
        '{"model": "functok-tiny", "prompt": "a", "steering": {"edits": [{"layer": 2, "feature": 1, '
        '"strength": -Infinity}]}}',
        400,
        "steering.edits[0].strength",
    ),
    ("/v1/chat/completions", CHAT | {"messages": [{"role": "user", "content": "word " * 600}]}, 400, "messages"),
    ("/v1/chat/completions", CHAT | {"max_tokens": -1}, 400, "max_tokens"),
    ("/v1/chat/completions", CHAT | {"max_completion_tokens": 10**30}, 400, "max_tokens"),
    ("/v1/chat/completions", CHAT | {"steering": {"edits": [EDIT | {"layer": 3}]}}, 400, "steering.edits[0].layer"),
    ("/v1/chat/completions", CHAT | {"steering": {"edits": [EDIT | {"strength": float("inf")}]}}, 400, None),
    ("/v1/chat/completions", CHAT | {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", CHAT | {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", '{"model": "functok-tiny", "messages": [', 400, None),
    ("/v1/chat/completions", "[1, 2, 3]", 400, None),
    ("/v1/chat/completions", "null", 400, None),
    ("/v1/analysis/reactivation", '{"prompts": ["a"], "top_frac": Infinity}', 400, "top_frac"),
]


@pytest.mark.parametrize("path,body,status,param", BAD, ids=[f"{b[0]}:{i}" for i, b in enumerate(BAD)])
def test_hand_made_bad_input_is_a_4xx(server, path, body, status, param):
    text = body if isinstance(body, str) else json.dumps(body)  # json.dumps writes inf as the literal Infinity
    r = httpx.post(server.url + path, content=text, headers=AUTH | {"content-type": "application/json"}, timeout=60)
    err = is_error_body(r, status)
    assert param is None or err["param"] == param, err


def test_wrong_key_and_oversized_body_on_every_post_route(server):
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/analysis/reactivation"):
        r = httpx.post(server.url + path, json=GOOD, headers={"Authorization": "Bearer sk-fuzz-5d2b"})
        is_error_body(r, 401, "invalid_api_key")
        r = httpx.post(server.url + path, json={"prompts": ["x" * (2 << 20)]}, headers=AUTH)
        is_error_body(r, 413, "request_too_large")
    still_serving(server.url)
