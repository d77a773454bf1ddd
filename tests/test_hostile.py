"""Issue 24's ten defects, each against a real `functok serve` on loopback (demo model, API and admin keys, a data
directory): hostile GGUF files (huge declared counts, many fields, bad layer counts, oversized metadata), token ids
outside the vocabulary with echo, nested JSON, vectors whose norm overflows, non-finite log-probabilities, a preset
created and deleted under a listing, slow clients; and the Host allow-list. Every case bounds its own time."""

import json
import math
import socket
import struct
import threading
import time

import gguf
import httpx
import numpy as np
import pytest
import torch
from helpers import ServerProc, is_error_body

from functok_vllm.server.finite import dumps, logprob

KEY, ADMIN = "sk-user-24", "sk-admin-24"
USER, ROOT = {"Authorization": f"Bearer {KEY}"}, {"Authorization": f"Bearer {ADMIN}"}
MODEL, D_MODEL, ADD_LAYER = "functok-tiny", 256, 3
HEADER_TIMEOUT, BODY_TIMEOUT = 2, 2
SCORED = 2000  # --max-prompt-logprob-values
GOOD = {"model": MODEL, "prompt": "The king", "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    flags = ["--api-key", KEY, "--admin-api-key", ADMIN, "--steer-layers", str(ADD_LAYER)]
    flags += ["--data-dir", str(tmp_path_factory.mktemp("library"))]
    flags += ["--header-timeout", str(HEADER_TIMEOUT), "--body-timeout", str(BODY_TIMEOUT)]
    flags += ["--max-prompt-logprob-values", str(SCORED)]
    proc = ServerProc(tmp_path_factory.mktemp("hostile"), *flags)
    yield proc
    proc.stop()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, headers=USER, timeout=30) as c:
        yield c


def upload(server, data: bytes, name: str = "cv", timeout: float = 30) -> httpx.Response:
    files = {"file": ("v.gguf", data)}
    return httpx.post(
        f"{server.url}/v1/steering/vectors", data={"name": name}, files=files, headers=ROOT, timeout=timeout
    )


def health_while(server, work) -> tuple[object, float]:
    """(work()'s result, the slowest /health answer while it ran): the event loop's responsiveness during it."""
    worst, done = [0.0], threading.Event()

    def poll():
        with httpx.Client(timeout=30) as c:
            while not done.is_set():
                t0 = time.monotonic()
                c.get(f"{server.url}/health")
                worst[0] = max(worst[0], time.monotonic() - t0)
                time.sleep(0.05)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    try:
        result = work()
    finally:
        done.set()
        t.join(35)
    return result, worst[0]


def gguf_header(n_tensors: int, kvs: list[bytes]) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(kvs)) + b"".join(kvs)


def gguf_key(key: str) -> bytes:
    return struct.pack("<Q", len(key)) + key.encode()


def gguf_array_claiming(count: int) -> bytes:
    """A GGUF whose one metadata array declares `count` uint8 elements and then ends (65 bytes for 2**63)."""
    return gguf_header(0, [gguf_key("controlvector.xyz") + struct.pack("<IIQ", 9, 0, count)])


def control_vector(tmp_path, layer_count=None, hint="llama") -> bytes:
    """A one-layer control vector as `gguf.GGUFWriter` writes it, with a chosen layer_count value (int, str, float)."""
    w = gguf.GGUFWriter(str(tmp_path / "cv.gguf"), "controlvector")
    w.add_string("controlvector.model_hint", hint)
    if isinstance(layer_count, str):  # add_string skips an empty string; add_key_value writes it
        w.add_key_value("controlvector.layer_count", layer_count, gguf.GGUFValueType.STRING)
    elif isinstance(layer_count, float):
        w.add_float32("controlvector.layer_count", layer_count)
    w.add_tensor("direction.3", np.ones(D_MODEL, np.float32) / 16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return (tmp_path / "cv.gguf").read_bytes()


# 1. a GGUF whose metadata array declares more elements than the file holds
@pytest.mark.parametrize("count", [10**6, 2**63])
def test_1_a_gguf_declaring_a_huge_array_is_refused_at_once(server, count):
    r, worst = health_while(server, lambda: upload(server, gguf_array_claiming(count), timeout=15))
    assert worst < 1.0, f"/health took {worst:.2f} s during the upload"
    err = is_error_body(r, 400)
    assert "controlvector.xyz" in err["message"] and "bytes" in err["message"], err


# 2. parsing an upload must not block the event loop (here: a file of 400,000 metadata fields)
def test_2_a_gguf_of_many_fields_neither_blocks_nor_is_parsed_whole(server):
    kvs = [gguf_key(f"k{i}") + struct.pack("<IB", 0, 1) for i in range(400_000)]
    data = gguf_header(0, kvs)
    assert len(data) > 6 << 20
    r, worst = health_while(server, lambda: upload(server, data, timeout=30))
    assert worst < 1.0, f"/health took {worst:.2f} s during the upload"
    err = is_error_body(r, 400)
    assert "metadata" in err["message"], err


# 3. a layer_count that is not a whole number
@pytest.mark.parametrize("value", ["", float("nan"), float("inf")], ids=["empty", "nan", "inf"])
def test_3_a_layer_count_that_is_not_an_integer_is_a_400(server, tmp_path, value):
    err = is_error_body(upload(server, control_vector(tmp_path, value)), 400)
    assert "controlvector.layer_count" in err["message"], err


# 4. token ids outside the vocabulary with echo, one prompt or a batch
@pytest.mark.parametrize("prompt", [[-1], [2**40], [[1, 2], [-1]]], ids=["negative", "huge", "batch"])
def test_4_token_ids_outside_the_vocabulary_with_echo_are_a_400(http, prompt):
    r = http.post("/v1/completions", json=GOOD | {"prompt": prompt, "echo": True, "max_tokens": 1})
    err = is_error_body(r, 400)
    assert err["param"] == "prompt" and "vocabulary" in err["message"], err


# 5. a deeply nested vllm_xargs.steering string
@pytest.mark.parametrize("text", ['{"edits": ' + "[" * 100_000, '{"edits": ' * 50_000], ids=["lists", "objects"])
def test_5_deeply_nested_steering_json_is_a_400(http, text):
    err = is_error_body(http.post("/v1/completions", json=GOOD | {"vllm_xargs": {"steering": text}}), 400)
    assert err["param"] == "vllm_xargs.steering" or err["param"] == "steering", err


# 6. a vector whose norm overflows: refused at entry, and the library stays listable
@pytest.mark.parametrize("value", [3e38, 1e20])
def test_6_a_vector_whose_norm_overflows_is_refused_and_listing_still_works(server, http, value):
    body = {"name": "huge", "directions": {str(ADD_LAYER): [value] * D_MODEL}}
    err = is_error_body(httpx.post(f"{server.url}/v1/steering/vectors", json=body, headers=ROOT, timeout=30), 400)
    assert "norm" in err["message"], err
    listed = http.get("/v1/steering/vectors")
    assert listed.status_code == 200 and "huge" not in {v["name"] for v in listed.json()["data"]}, listed.text
    assert http.get("/v1/steering").status_code == 200


# 7. non-finite log-probabilities: a copy of the demo model whose embedding of token POISON is inf (planted: the
# start-up probe never reads it), so every log-probability after it is NaN; without it they are finite
POISON = 8000


@pytest.fixture(scope="module")
def overflowing(tmp_path_factory):
    from safetensors.torch import load_file, save_file

    from functok_vllm.paths import DEMO_MODEL

    model = tmp_path_factory.mktemp("broken") / "functok-tiny"
    model.mkdir()
    for f in DEMO_MODEL.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            (model / f.name).symlink_to(f)
    weights = load_file(DEMO_MODEL / "model.safetensors")
    weights["model.embed_tokens.weight"][POISON] = math.inf
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    proc = ServerProc(tmp_path_factory.mktemp("broken-serve"), "--model", str(model), "--api-key", KEY)
    yield proc
    proc.stop()


def strict(text: str):
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in {text[:300]}"))


def test_7_non_finite_logprobs_never_reach_json(overflowing):
    http = httpx.Client(base_url=overflowing.url, headers=USER, timeout=60)
    req = GOOD | {"logprobs": 2, "echo": True, "max_tokens": 2}
    for prompt, finite in (([300, 301, 302], True), ([POISON, 301, 302], False)):
        r = http.post("/v1/completions", json=req | {"prompt": prompt})
        assert r.status_code == 200, r.text
        lps = strict(r.text)["choices"][0]["logprobs"]["token_logprobs"][1:]
        assert len(lps) >= 3 and all((v is not None and -1e4 <= v <= 0) == finite for v in lps), (prompt, lps)
        with http.stream("POST", "/v1/completions", json=req | {"prompt": prompt, "stream": True}) as s:
            events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and len(events) > 1, events
        for e in events[:-1]:
            strict(e)
    from transformers import AutoTokenizer

    from functok_vllm.paths import DEMO_MODEL

    text = "Hello " + AutoTokenizer.from_pretrained(DEMO_MODEL).decode([POISON])
    chat = {"model": MODEL, "max_tokens": 2, "logprobs": True, "top_logprobs": 2}
    r = http.post("/v1/chat/completions", json=chat | {"messages": [{"role": "user", "content": text}]})
    assert r.status_code == 200, r.text
    content = strict(r.text)["choices"][0]["logprobs"]["content"]
    assert content and all(t["logprob"] is None for t in content), content


def test_logprobs_are_written_finite_or_null():
    assert [logprob(v) for v in (-1.5, 0.0, -1e6, -math.inf, math.nan, math.inf)] == [
        -1.5,
        0.0,
        -9999.0,
        -9999.0,
        None,
        None,
    ]
    assert json.loads(dumps({"a": [1.0, math.nan, {"b": -math.inf}]})) == {"a": [1.0, None, {"b": None}]}


# 8. presets listed while one is created and deleted in a loop
def test_8_preset_listing_is_consistent_under_concurrent_writes(server, http):
    stop, errors = threading.Event(), []

    def churn():
        with httpx.Client(base_url=server.url, headers=ROOT, timeout=30) as c:
            while not stop.is_set():
                steering = {"edits": [{"layer": 2, "feature": 1, "strength": 1.0}]}
                c.put("/v1/steering/presets/flicker", json={"steering": steering})
                c.delete("/v1/steering/presets/flicker")

    t = threading.Thread(target=churn, daemon=True)
    t.start()
    deadline, reads = time.monotonic() + 8, 0
    try:
        while time.monotonic() < deadline:
            for path in ("/v1/steering/presets", "/v1/steering"):
                r = http.get(path)
                reads += 1
                if r.status_code != 200:
                    errors.append(r.text[:200])
    finally:
        stop.set()
        t.join(30)
    assert reads > 50 and not errors, (reads, errors[:3])


# 9. GGUF metadata kept in the index is bounded
def test_9_an_oversized_model_hint_is_refused(server, tmp_path, http):
    err = is_error_body(upload(server, control_vector(tmp_path, hint="x" * 100_000), name="hinted"), 400)
    assert "model_hint" in err["message"], err
    ok = upload(server, control_vector(tmp_path, hint="llama"), name="hinted")
    assert ok.status_code == 201 and ok.json()["source"]["model_hint"] == "llama", ok.text


# 10. slow clients are timed out: headers dripped, a body that never comes
def test_10_a_client_dripping_headers_is_disconnected(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=1) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        t0, closed = time.monotonic(), False
        while time.monotonic() - t0 < HEADER_TIMEOUT + 6:
            try:
                s.sendall(b"X-a: b\r\n")
                if s.recv(1024) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except OSError:  # reset by the server
                closed = True
                break
        assert closed, "the server kept a connection dripping headers open"
        assert time.monotonic() - t0 < HEADER_TIMEOUT + 4


def test_10_a_body_that_never_comes_gets_a_408(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=HEADER_TIMEOUT + BODY_TIMEOUT + 6) as s:
        head = f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
        s.sendall((head + "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{").encode())
        t0 = time.monotonic()
        answer = s.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert time.monotonic() - t0 < BODY_TIMEOUT + 3


def test_the_host_header_is_checked_on_a_loopback_server(server, http):
    r = http.get("/v1/models", headers={"Host": "attacker.example"})
    assert is_error_body(r, 400, "invalid_host")["param"] is None
    for host in (f"localhost:{server.port}", f"127.0.0.1:{server.port}", "[::1]"):
        assert http.get("/v1/models", headers={"Host": host}).status_code == 200, host
    assert http.post("/v1/completions", json=GOOD).status_code == 200


# prompt scoring: a budget checked before work starts, and chunked scoring equal to a plain transformers forward
def test_prompt_scoring_has_a_budget_and_chunks_match_a_plain_forward(http, demo_model):
    ids = list(range(300, 700))  # 400 positions: two chunks of scoring.CHUNK = 256
    body = GOOD | {"prompt": ids, "echo": True, "max_tokens": 1}
    err = is_error_body(http.post("/v1/completions", json=body | {"logprobs": 5}), 400)  # 400 x 6 > SCORED
    assert err["param"] == "logprobs" and "max_prompt_logprob_values" in err["message"], err
    r = http.post("/v1/completions", json=body | {"logprobs": 1})  # 400 x 2 <= SCORED
    assert r.status_code == 200, r.text
    got = torch.tensor(r.json()["choices"][0]["logprobs"]["token_logprobs"][1 : len(ids)])
    with torch.no_grad():
        logits = demo_model(torch.tensor([ids])).logits[0].float()  # (400, vocab)
    want = logits.log_softmax(-1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert got.shape == want.shape and (got - want).abs().max() < 1e-3, (got - want).abs().max()


def test_the_host_allow_list_defaults_to_loopback_names_only_on_loopback():
    from functok_vllm.server.main import LOOPBACK, allowed_hosts

    assert allowed_hosts(None, "127.0.0.1") == LOOPBACK and allowed_hosts(None, "::1") == LOOPBACK
    assert allowed_hosts(None, "0.0.0.0") is None and allowed_hosts("*", "127.0.0.1") is None
    assert allowed_hosts("A.example, [::1]", "0.0.0.0") == ("::1", "a.example")
