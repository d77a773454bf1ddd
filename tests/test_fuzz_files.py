"""Property-based fuzzing of the untrusted-file readers (`library.files`) and of the HTTP bodies: GGUF and safetensors
files mutated from valid ones (byte flips, huge counts written over the header, truncations), GGUF headers generated
field by field with hostile counts, and arbitrary JSON sent to every POST route of a real server. Each file case must
end in a result or a FileError (never another exception) within a time and memory bound; each HTTP case in a 4xx
with an OpenAI-style body or a 2xx (never a 5xx), with /health still answering."""

import json
import struct
import time
import tracemalloc

import httpx
import numpy as np
import pytest
from helpers import ServerProc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save

from functok_vllm.library.files import FileError, read_vector_file

D_MODEL = 256
CASES = 150  # per file target
HTTP_CASES = 40  # per route
SECONDS, MIB = 2.0, 64  # per case: wall time, peak traced Python/numpy allocation
FUZZ = settings(max_examples=CASES, deadline=None, derandomize=True, database=None)


def gguf_file(tmp_path_factory) -> bytes:
    import gguf

    path = tmp_path_factory.mktemp("gguf") / "cv.gguf"
    w = gguf.GGUFWriter(str(path), "controlvector")
    w.add_string("controlvector.model_hint", "llama")
    w.add_uint32("controlvector.layer_count", 2)
    for layer in (1, 2):
        w.add_tensor(f"direction.{layer}", np.full(D_MODEL, 0.1 * layer, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


@pytest.fixture(scope="module")
def valid_gguf(tmp_path_factory):
    return gguf_file(tmp_path_factory)


VALID_SAFETENSORS = save({"direction.1": np.full(D_MODEL, 0.5, np.float32), "direction.2": np.ones(D_MODEL, "<f4")})


def bounded_read(data: bytes) -> None:
    """read_vector_file(data) ends in a result or a FileError, within SECONDS and MIB of traced allocations."""
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        out, _meta = read_vector_file(data, D_MODEL)
        assert out and all(t.shape == (D_MODEL,) and bool(t.isfinite().all()) for t in out.values())
    except FileError as e:
        assert str(e)
    finally:
        took = time.monotonic() - t0
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    assert took < SECONDS and peak < MIB, (took, peak, data[:64])


HUGE = st.sampled_from([2**63, 2**64 - 1, 2**32, 10**9, 10**6, 65536, 257, 0])


@st.composite
def mutated(draw, base: bytes):
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "count", "truncate", "insert"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "count":  # a huge u64 over a header position (counts and lengths are u64 there)
            at = min(at, 200)
            data[at : at + 8] = struct.pack("<Q", draw(HUGE))
        elif kind == "truncate":
            del data[at:]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


@given(data=st.data())
@settings(FUZZ, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_mutated_gguf_files_are_read_or_refused_within_bounds(valid_gguf, data):
    bounded_read(data.draw(mutated(valid_gguf)))


@given(data=mutated(VALID_SAFETENSORS))
@FUZZ
def test_mutated_safetensors_files_are_read_or_refused_within_bounds(data):
    bounded_read(data)


@st.composite
def gguf_headers(draw):
    """A GGUF v3 header built field by field, every count and length drawn from sizes that lie."""
    kvs = []
    for i in range(draw(st.integers(0, 4))):
        key = f"controlvector.k{i}".encode()
        kind = draw(st.integers(0, 13))
        value = struct.pack("<I", kind)
        if kind == 9:  # an array: element type, declared count, some bytes
            value += struct.pack("<IQ", draw(st.integers(0, 13)), draw(HUGE | st.integers(0, 64)))
        elif kind == 8:
            value += struct.pack("<Q", draw(HUGE | st.integers(0, 64)))
        value += draw(st.binary(max_size=24))
        kvs.append(struct.pack("<Q", draw(st.sampled_from([len(key), 2**63, 0]))) + key + value)
    n_kv = draw(st.sampled_from([len(kvs), 2**63, 10**6]))
    n_tensors = draw(st.sampled_from([0, 1, 2**40]))
    tail = b""
    if n_tensors == 1:  # a tensor info with drawn dimensions
        dims = draw(st.lists(HUGE | st.integers(1, D_MODEL), min_size=0, max_size=5))
        tail = struct.pack("<Q", 11) + b"direction.1" + struct.pack("<I", len(dims))
        tail += b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", draw(st.integers(0, 40)), 0)
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + b"".join(kvs) + tail + draw(st.binary(max_size=64))


@given(data=gguf_headers())
@FUZZ
def test_generated_gguf_headers_are_refused_within_bounds(data):
    bounded_read(data)


# ---- HTTP: arbitrary JSON at every POST route of a real server --------------------------------------------------

KEY = "sk-fuzzfiles-1"
AUTH = {"Authorization": f"Bearer {KEY}"}
ROUTES = ["/v1/completions", "/v1/chat/completions", "/v1/analysis/reactivation", "/v1/steering/vectors"]
ROUTES += ["/v1/steering/presets", "/tokenize"]
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),  # NaN, Infinity included
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
FIELDS = ["model", "prompt", "messages", "steering", "vllm_xargs", "max_tokens", "logprobs", "echo", "n", "name"]
FIELDS += ["directions", "layer", "features", "prompts", "stream", "top_logprobs"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    flags = ["--api-key", KEY, "--admin-api-key", KEY, "--max-tokens", "4", "--steer-layers", "3"]
    s = ServerProc(tmp_path_factory.mktemp("fuzzjson"), *flags, "--data-dir", str(tmp_path_factory.mktemp("lib")))
    yield s
    s.stop()


def nested(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


@pytest.mark.parametrize("route", ROUTES)
def test_arbitrary_json_bodies_never_get_a_5xx(server, route):
    bodies = st.fixed_dictionaries({}, optional={f: JSON for f in FIELDS}) | JSON
    deep = st.integers(100, 20_000).map(lambda d: {"model": "functok-tiny", "prompt": "a", "steering": nested(d)})
    xargs = st.integers(100, 20_000).map(lambda d: {"model": "functok-tiny", "vllm_xargs": {"steering": nested(d)}})

    @given(body=bodies | deep | xargs)
    @settings(max_examples=HTTP_CASES, deadline=None, derandomize=True, database=None)
    def fuzz(body):
        if isinstance(body, dict) and "model" in body and not isinstance(body["model"], str):
            body["model"] = "functok-tiny"
        text = json.dumps(body)  # NaN and Infinity as the bare literals a careless client sends
        r = httpx.post(
            server.url + route, content=text, headers=AUTH | {"content-type": "application/json"}, timeout=60
        )
        assert r.status_code < 500, f"{body!r} -> {r.status_code} {r.text[:300]}"
        if r.status_code >= 400:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text

    fuzz()
    t0 = time.monotonic()
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    assert time.monotonic() - t0 < 1.0
