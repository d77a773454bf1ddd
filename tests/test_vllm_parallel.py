"""vLLM's own parallelism carries the steering: `functok serve --engine vllm` at tensor-parallel 2 and at pipeline-
parallel 2 (two CPU ranks, one core each) answers a mixed batch (unsteered, add on function tokens, clamp on every
position, add at the last function token, a vector by name, per-token features, log-probabilities) with the same greedy
tokens as the transformers engine, and log-probabilities within 1e-4, in vLLM's compiled mode (the default; with
`enforce_eager` vLLM 0.32's CPU runner fails at pipeline-parallel 2 before any plugin code runs:
`sync_and_gather_intermediate_tensors` asserts that no intermediate tensors were allocated). Skipped, with the reason,
where vLLM cannot run."""

import concurrent.futures as cf
import os

import httpx
import pytest
from helpers import ServerProc

from functok_vllm.engines.vllm.available import vllm_status
from functok_vllm.engines.vllm.settings import cpu_binding

NO_VLLM = None if vllm_status().ok else vllm_status().line()
pytestmark = [pytest.mark.vllm, pytest.mark.skipif(NO_VLLM is not None, reason=str(NO_VLLM))]

KEY = "parallel-admin"
PROMPT = "The old soldier walked slowly along the river towards the town, thinking of the war and of his"
VECTOR = {"name": "mix", "layer": 2, "features": [{"feature": 1493, "strength": 60.0}, {"feature": 7, "strength": 9.0}]}
BODIES = [
    {},
    {"steering": {"edits": [{"layer": 2, "feature": 1493, "strength": 150.0}], "positions": "last_function"}},
    {"steering": {"edits": [{"layer": 1, "feature": 77, "mode": "clamp", "value": 3.0}], "positions": "all"}},
    {"steering": {"edits": [{"layer": 0, "feature": 9, "strength": 20.0}], "positions": "function"}},
    {"steering": {"edits": [{"vector": "mix", "strength": 1.0}], "positions": "function"}},
    {"features": {"layers": [1, 2], "top_k": 3}},
]


def answers(url: str) -> list[dict]:
    """Every body at once (one batch), greedy, 8 tokens with their log-probabilities."""
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(url + "/v1/steering/vectors", json=VECTOR, headers=auth, timeout=60)
    assert r.status_code in (200, 201), r.text
    base = {"model": "functok-tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 1}

    def one(body):
        r = httpx.post(
            url + "/v1/completions", json=base | body | {"return_token_ids": True}, headers=auth, timeout=600
        )
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]

    with cf.ThreadPoolExecutor(len(BODIES)) as pool:
        return list(pool.map(one, BODIES))


def serve(tmp, *flags, env=None):
    return ServerProc(tmp, "--admin-api-key", KEY, "--api-key", KEY, "--data-dir", str(tmp / "lib"), *flags, env=env)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    srv = serve(tmp_path_factory.mktemp("hf"))
    try:
        yield answers(srv.url)
    finally:
        srv.stop()


@pytest.mark.parametrize("flag", ["--tensor-parallel-size", "--pipeline-parallel-size"])
def test_two_ranks_answer_as_one(tmp_path, reference, flag):
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_OMP_THREADS_BIND"}  # the server's own binding
    srv = serve(tmp_path, "--engine", "vllm", flag, "2", env=env)
    try:
        got = answers(srv.url)
    finally:
        srv.stop()
    for i, (g, ref) in enumerate(zip(got, reference, strict=True)):
        assert g["token_ids"] == ref["token_ids"], (i, BODIES[i])
        diff = max(
            abs(a - b) for a, b in zip(g["logprobs"]["token_logprobs"], ref["logprobs"]["token_logprobs"], strict=True)
        )
        assert diff < 1e-4, (i, diff)
        assert (g.get("steering") or {}).get("steered_positions") == (ref.get("steering") or {}).get(
            "steered_positions"
        )
    assert sum(g["token_ids"] != got[0]["token_ids"] for g in got[1:5]) >= 3  # the steering changed the answers
    top1 = lambda entries: [{k: v[0][0] for k, v in e["layers"].items() if v} for e in entries]  # noqa: E731
    assert top1(got[-1]["features"]) == top1(reference[-1]["features"])


def test_cpu_binding_splits_the_cores():
    assert cpu_binding([0, 1], 2) == "0|1"
    assert cpu_binding([0, 1, 2, 3, 4, 5, 6, 7], 2) == "0,1,2,3|4,5,6,7"
    with pytest.raises(ValueError, match="need at least 2 cores"):
        cpu_binding([3], 2)
