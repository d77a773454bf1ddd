"""POST /v1/analysis/reactivation on a real server: the same scores as `score_prompts` in-process, 4xx for bad input,
429 when its queue is full, and generation next to it unchanged."""

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from helpers import ServerProc, is_error_body

from functok_vllm.analysis.model import HFAnalysisModel
from functok_vllm.analysis.reactivation import ReactivationConfig, score_prompts

PATH = "/v1/analysis/reactivation"
PROMPTS = [
    "The king said to his son, and the queen was there.",
    "Once upon a time, there was a man who lived in a house by the sea.",
    "War is",
]
LONG = [f"In the year {i}, the people of the city went to the market, and " * 10 for i in range(4)]  # ~160 tokens each


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ServerProc(
        tmp_path_factory.mktemp("reactivation"), "--max-analysis-prompts", "4", "--max-analysis-waiting", "0"
    )
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def in_process(demo_model, demo_tokenizer, demo_saes, demo_function_tokens):
    mask = demo_function_tokens.mask(demo_model.config.vocab_size)
    return HFAnalysisModel(demo_model, demo_tokenizer, demo_saes, mask, demo_function_tokens)


def as_json(results: list[dict]) -> list[dict]:
    """What the endpoint sends for these `score_prompts` results: layer keys as strings, through JSON."""
    return json.loads(json.dumps([r | {"layers": {str(k): v for k, v in r["layers"].items()}} for r in results]))


def test_http_scores_equal_in_process_scores(http, in_process):
    r = http.post(PATH, json={"model": "functok-tiny", "prompts": PROMPTS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "functok_vllm.analysis.reactivation" and body["layers"] == [0, 1, 2]
    assert body["results"] == as_json(score_prompts(in_process, PROMPTS))
    assert body["results"][0]["positions"] and set(body["results"][0]["layers"]) == {"0", "1", "2"}
    r = http.post(PATH, json={"prompts": PROMPTS[:2], "layers": [2, 0], "top_frac": 0.05, "detail": False})
    assert r.status_code == 200, r.text
    expected = score_prompts(in_process, PROMPTS[:2], ReactivationConfig((2, 0), 0.05, detail=False))
    assert r.json()["results"] == as_json(expected) and r.json()["layers"] == [2, 0]


BAD = [  # (body, status, param, text the message must show)
    ({"prompts": []}, 400, "prompts", "at least 1"),
    ({"prompts": "War is"}, 400, "prompts", "list"),
    ({"prompts": [1, 2]}, 400, "prompts[0]", "string"),
    ({"prompts": ["a"] * 5}, 400, "prompts", "at most 4"),
    ({"prompts": [""]}, 400, "prompts", "empty"),
    ({"prompts": ["word " * 600]}, 400, "prompts", "context"),
    ({"prompts": ["a"], "layers": [3]}, 400, "layers", "no SAE at layer 3"),
    ({"prompts": ["a"], "layers": [-1]}, 400, "layers", "no SAE at layer -1"),
    ({"prompts": ["a"], "layers": [1, 1]}, 400, "layers", "twice"),
    ({"prompts": ["a"], "layers": []}, 400, "layers", "at least 1"),
    ({"prompts": ["a"], "layers": ["1"]}, 400, "layers[0]", "integer"),
    ({"prompts": ["a"], "top_frac": 0}, 400, "top_frac", "greater than 0"),
    ({"prompts": ["a"], "top_frac": float("nan")}, 400, "top_frac", "finite"),
    ({"prompts": ["a"], "top_k": 5}, 400, "top_k", "unknown"),
    ({"prompts": ["a"], "model": "gpt-4"}, 404, "model", "gpt-4"),
]


@pytest.mark.parametrize("body,status,param,shows", BAD, ids=[f"{b[2]}:{b[3]}" for b in BAD])
def test_bad_input_is_a_4xx_naming_the_field(http, body, status, param, shows):
    r = http.post(PATH, content=json.dumps(body), headers={"content-type": "application/json"})  # NaN as a literal
    err = is_error_body(r, status)
    assert err["param"] == param and shows in err["message"], err


def test_malformed_json_is_a_400(http):
    r = http.post(PATH, content=b'{"prompts": ["a"', headers={"content-type": "application/json"})
    assert "not valid JSON" in is_error_body(r, 400, "invalid_json")["message"]


def test_a_full_queue_answers_429_and_generation_alongside_is_unchanged(http, in_process):
    body = {"model": "functok-tiny", "prompt": PROMPTS[1], "max_tokens": 48, "temperature": 0, "ignore_eos": True}
    alone = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    start = threading.Barrier(4)

    def analyse(_):  # one runs (seconds of work), the others find the queue full (max_analysis_waiting 0)
        start.wait()
        return http.post(PATH, json={"prompts": LONG, "detail": False})

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(analyse, i) for i in range(3)]
        start.wait()
        beside = [http.post("/v1/completions", json=body).json()["choices"][0]["text"] for _ in range(3)]
        answers = [f.result() for f in futures]
    assert beside == [alone] * 3  # the analysis forwards never touch the engine's batch
    codes = sorted(r.status_code for r in answers)
    assert codes[0] == 200 and codes[-1] == 429 and set(codes) <= {200, 429}, codes
    for r in answers:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1 and is_error_body(r, 429, "server_full")
        else:
            expected = score_prompts(in_process, LONG, ReactivationConfig(detail=False))
            assert r.json()["results"] == as_json(expected)  # and generation never touched the analysis
