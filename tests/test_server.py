"""`functok serve` as a real process on loopback, driven with the official openai client (and httpx for raw bodies)."""

import json
import math
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from helpers import PROMPTS, ServerProc, metric, openai_client, wait_idle

from functok_vllm.engines.placement import residual_hooks
from functok_vllm.paths import DEMO_MODEL

KEY = "sk-test-6f1c0de"
MODEL = "functok-tiny"
SECRET_PROMPT = "Zanzibar quokka marmalade"  # must never reach the server's log
LIMITS = {"max_edits": 4, "max_abs_strength": 100, "max_tokens": 400, "max_running": 8, "max_waiting": 2}
LIMITS["max_body_bytes"] = 32 * 1024
PRESET = {"edits": [{"layer": 1, "feature": 77, "mode": "clamp", "value": 4.0}], "positions": "all"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base url, log path) of one server for the whole module."""
    proc = ServerProc(
        tmp_path_factory.mktemp("serve"), "--api-key", KEY, config={"limits": LIMITS, "presets": {"calm": PRESET}}
    )
    yield proc.url, proc.log
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server[0], KEY)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server[0], headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c


def complete(client, prompt, steering=None, max_tokens=16, **extra):
    body = {"return_token_ids": True, **extra}
    if steering is not None:
        body["steering"] = steering
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body=body)
    return r


def ids_of(r) -> list[int]:
    return r.choices[0].token_ids


def test_health_models_and_steering_info(server, client, http):
    assert httpx.get(f"{server[0]}/health").json() == {"status": "ok"}  # no key needed
    assert [m.id for m in client.models.list().data] == [MODEL]
    info = http.get("/v1/steering").json()
    assert [(x["layer"], x["d_sae"]) for x in info["layers"]] == [(0, 2048), (1, 2048), (2, 2048)]
    assert info["function_tokens"]["count"] == len(info["function_tokens"]["ids"]) > 0
    assert info["presets"]["calm"]["edits"][0]["value"] == 4.0
    assert "last_function" in info["positions"] and info["limits"]["max_edits"] == 4


def test_greedy_is_deterministic_and_steering_changes_it(client, demo_tokenizer, logit_lens_feature):
    layer, feature, _ = logit_lens_feature
    a, b = complete(client, PROMPTS[0]), complete(client, PROMPTS[0])
    assert ids_of(a) == ids_of(b) and a.choices[0].text == b.choices[0].text
    n_prompt = len(demo_tokenizer.encode(PROMPTS[0]))
    assert (a.usage.prompt_tokens, a.usage.completion_tokens, a.usage.total_tokens) == (n_prompt, 16, n_prompt + 16)
    assert a.steering is None
    steer = {"edits": [{"layer": layer, "feature": feature, "strength": 15.0}], "positions": "function"}
    s = complete(client, PROMPTS[0], steer)
    assert ids_of(s) != ids_of(a)
    assert s.steering["edits"][0]["feature"] == feature and s.steering["steered_positions"] > 0
    last = complete(
        client,
        PROMPTS[4],
        {"edits": [{"layer": 2, "feature": feature, "strength": 20.0}], "positions": "last_function"},
    )
    assert last.steering["steered_positions"] == 1


def test_chat_and_streaming(client, logit_lens_feature):
    layer, feature, _ = logit_lens_feature
    steer = {"edits": [{"layer": layer, "feature": feature, "strength": 10.0}]}
    messages = [{"role": "user", "content": PROMPTS[2]}]
    kw = {"model": MODEL, "messages": messages, "max_tokens": 20, "temperature": 0, "extra_body": {"steering": steer}}
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 20
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish[0].choices[0].finish_reason == "length" and finish[0].steering["steered_positions"] > 0
    plain = list(client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=8, temperature=0, stream=True))
    once = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=8, temperature=0)
    assert "".join(c.choices[0].text for c in plain) == once.choices[0].text


def test_concurrent_requests_return_what_they_return_alone(client, http, logit_lens_feature):
    layer, feature, _ = logit_lens_feature
    cases = [
        None,
        {"edits": [{"layer": layer, "feature": feature, "strength": 15.0}]},
        {"edits": [{"layer": 1, "feature": 77, "mode": "clamp", "value": 3.0}], "positions": "all"},
        None,
        {"edits": [{"layer": 2, "feature": 5, "strength": 20.0}], "positions": "last_function"},
        {"edits": [{"layer": 0, "feature": 9, "mode": "ablate"}, {"layer": 2, "feature": feature, "strength": -8.0}]},
    ]
    lengths = [16, 24, 12, 20, 16, 24]
    alone = [ids_of(complete(client, p, s, n)) for p, s, n in zip(PROMPTS, cases, lengths, strict=True)]
    rows, steps = metric(http, "functok:engine_decode_rows_total"), metric(http, "functok:engine_decode_steps_total")
    start = threading.Barrier(len(cases))

    def one(args):
        start.wait()
        return ids_of(complete(client, *args))

    with ThreadPoolExecutor(len(cases)) as pool:
        together = list(pool.map(one, zip(PROMPTS, cases, lengths, strict=True)))
    assert together == alone
    rows = metric(http, "functok:engine_decode_rows_total") - rows
    steps = metric(http, "functok:engine_decode_steps_total") - steps
    assert rows > steps  # the requests really shared decode steps


def silent_feature(model, tokenizer, sae, text: str) -> int:
    """A layer-1 feature whose pre-activation stays furthest below its threshold over the whole text."""
    out = {}
    with torch.no_grad(), residual_hooks(model, {sae.layer: lambda h: out.setdefault("h", h.clone())}):
        model(torch.tensor([tokenizer.encode(text)]))
    pre = (out["h"] - sae.b_dec) @ sae.W_enc + sae.b_enc  # (tokens, d_sae)
    return int((pre - sae.threshold).max(0).values.argmin())


def test_add_zero_and_clamp_to_own_value_change_nothing(client, demo_model, demo_tokenizer, demo_saes):
    base = complete(client, PROMPTS[3], max_tokens=20)
    zero = complete(
        client, PROMPTS[3], {"edits": [{"layer": 2, "feature": 11, "strength": 0.0}], "positions": "all"}, 20
    )
    assert ids_of(zero) == ids_of(base) and zero.steering["steered_positions"] > 0
    f = silent_feature(demo_model, demo_tokenizer, demo_saes[1], PROMPTS[3] + base.choices[0].text)
    clamp = {"edits": [{"layer": 1, "feature": f, "mode": "clamp", "value": 0.0}], "positions": "all"}
    same = complete(client, PROMPTS[3], clamp, 20)
    assert ids_of(same) == ids_of(base) and same.steering["steered_positions"] > 0


def test_vllm_xargs_and_presets_steer_like_steering(client, logit_lens_feature):
    layer, feature, _ = logit_lens_feature
    steer = {"edits": [{"layer": layer, "feature": feature, "strength": 12.0}], "positions": "function"}
    direct = complete(client, PROMPTS[1], steer)
    via_xargs = complete(client, PROMPTS[1], vllm_xargs={"steering": json.dumps(steer)})
    assert ids_of(via_xargs) == ids_of(direct) and via_xargs.steering["source"] == "vllm_xargs.steering"
    echoed = {k: direct.steering[k] for k in ("edits", "positions")}  # the response's report is a valid request
    assert ids_of(complete(client, PROMPTS[1], echoed)) == ids_of(direct)
    preset = complete(client, PROMPTS[1], "calm")
    assert ids_of(preset) == ids_of(complete(client, PROMPTS[1], PRESET))
    assert preset.steering["preset"] == "calm" and ids_of(preset) != ids_of(complete(client, PROMPTS[1]))
    assert ids_of(complete(client, PROMPTS[1], vllm_xargs={"steering": "calm"})) == ids_of(preset)


GOOD = {"model": MODEL, "prompt": "The king", "max_tokens": 4, "temperature": 0}
EDIT = {"layer": 2, "feature": 10, "strength": 5.0}
BAD = [  # (change to GOOD, status, param, text the message must show)
    ({"steering": {"edits": [EDIT | {"layer": 7}]}}, 400, "steering.edits[0].layer", "7"),
    ({"steering": {"edits": [EDIT | {"feature": 5000}]}}, 400, "steering.edits[0].feature", "5000"),
    ({"steering": {"edits": [EDIT | {"feature": -1}]}}, 400, "steering.edits[0].feature", "-1"),
    ({"steering": {"edits": [EDIT | {"strength": 1e6}]}}, 400, "steering.edits[0].strength", "1000000"),
    ({"steering": {"edits": [EDIT | {"strength": math.nan}]}}, 400, "steering.edits[0].strength", "finite"),
    ({"steering": {"edits": [EDIT | {"strength": math.inf}]}}, 400, "steering.edits[0].strength", "finite"),
    ({"steering": {"edits": [EDIT] * 5}}, 400, "steering.edits", "5 edits"),
    ({"steering": {"edits": [EDIT | {"mode": "push"}]}}, 400, "steering.edits[0].mode", "push"),
    (
        {"steering": {"edits": [{"layer": 2, "feature": 1, "strenght": 5.0}]}},
        400,
        "steering.edits[0].strenght",
        "unknown",
    ),
    ({"steering": {"edits": [EDIT], "positions": "middle"}}, 400, "steering.positions", "middle"),
    ({"steering": {"edits": [EDIT | {"mode": "project_out"}]}}, 400, "steering.edits[0].strength", "takes no"),
    ({"steering": {"edits": [{"layer": 2, "feature": 1, "mode": "cap"}]}}, 400, "steering.edits[0].max", "'min' or"),
    (
        {"steering": {"edits": [{"layer": 2, "feature": 1, "mode": "cap", "min": 2.0, "max": 1.0}]}},
        400,
        "steering.edits[0].min",
        "min <= max",
    ),
    ({"steering": {"edits": [{"layer": 2, "feature": 1, "mode": "set"}]}}, 400, "steering.edits[0].value", "needs"),
    ({"steering": {"edits": [EDIT | {"strength_unit": "furlong"}]}}, 400, "steering.edits[0].strength_unit", "furlong"),
    (
        {
            "steering": {
                "edits": [{"layer": 2, "feature": 1, "mode": "set", "value": 1.0, "strength_unit": "token_norm"}]
            }
        },
        400,
        "steering.edits[0].strength_unit",
        "takes no",
    ),
    ({"steering": {"edits": [{"vector": "calm", "mode": "ablate"}]}}, 400, "steering.edits[0]", "cannot ablate"),
    ({"steering": {"edits": [EDIT], "where": "all"}}, 400, "steering.where", "unknown"),
    ({"steering": "no-such-preset"}, 400, "steering", "no-such-preset"),
    ({"vllm_xargs": {"steering": "{not json"}}, 400, "vllm_xargs.steering", "JSON"),
    (
        {"vllm_xargs": {"steering": '{"edits": [{"layer": 2, "feature": 1, "strength": NaN}]}'}},
        400,
        "vllm_xargs.steering",
        "NaN",
    ),
    ({"vllm_xargs": {"steerin": "calm"}}, 400, "vllm_xargs", "steerin"),
    ({"steering": "calm", "vllm_xargs": {"steering": "calm"}}, 400, "steering", "both"),
    ({"temperature": 5}, 400, "temperature", "5"),
    ({"temperature": math.nan}, 400, "temperature", "finite"),
    ({"max_tokens": 0}, 400, "max_tokens", "0"),
    ({"max_tokens": 401}, 400, "max_tokens", "401"),
    ({"prompt": "word " * 600}, 400, "prompt", "context"),
    ({"prompt": [1, 2, 99999]}, 400, "prompt", "99999"),
    ({"n": 0}, 400, "n", "0"),
    ({"n": 65}, 400, "n", "65 choices"),  # over max_choices
    ({"bogus_field": 1}, 400, "bogus_field", "unknown"),
    ({"model": "gpt-4"}, 404, "model", "gpt-4"),
]


@pytest.mark.parametrize("change,status,param,shows", BAD, ids=[b[2] + ":" + b[3] for b in BAD])
def test_bad_input_is_a_4xx_naming_the_field(http, change, status, param, shows):
    body = json.dumps({**GOOD, **change, "user": SECRET_PROMPT})  # Python writes NaN / Infinity literals as-is
    r = http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and shows in err["message"], err
    assert set(err) == {"message", "type", "param", "code"}


def test_malformed_json_oversized_body_and_api_key(server, http, client):
    r = http.post(
        "/v1/completions", content=b'{"model": "functok-tiny", "prompt": ', headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = http.post("/v1/completions", json={**GOOD, "prompt": SECRET_PROMPT * 2000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": KEY}):
        r = httpx.post(f"{server[0]}/v1/completions", json=GOOD, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai_client(server[0], "nope").models.list()
    with pytest.raises(openai.BadRequestError, match="steering.edits"):
        complete(client, SECRET_PROMPT, {"edits": [EDIT | {"layer": 9}]})
    assert complete(client, SECRET_PROMPT).choices[0].finish_reason == "length"  # still serving


def test_client_disconnect_mid_stream_aborts(http):
    aborted = metric(http, "functok:request_finished_total", finish_reason="abort", steered="true")
    body = {**GOOD, "max_tokens": 400, "stream": True, "ignore_eos": True, "steering": {"edits": [EDIT]}}
    with http.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert metric(http, "functok:num_requests_running") == 1
    wait_idle(http)
    assert metric(http, "functok:request_finished_total", finish_reason="abort", steered="true") == aborted + 1


def test_client_disconnect_without_streaming_aborts(server, http):
    aborted = metric(http, "functok:request_finished_total", finish_reason="abort", steered="false")
    body = {**GOOD, "max_tokens": 400, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection mid-generation
        httpx.post(f"{server[0]}/v1/completions", json=body, headers=headers, timeout=httpx.Timeout(5, read=0.3))
    wait_idle(http)
    assert metric(http, "functok:request_finished_total", finish_reason="abort", steered="false") == aborted + 1


def test_full_server_answers_429_with_retry_after(server, http):
    stop = threading.Event()
    total = LIMITS["max_running"] + LIMITS["max_waiting"]

    def hold():  # a stream that stays open until told to stop
        with httpx.Client(base_url=server[0], headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
            with c.stream(
                "POST", "/v1/completions", json={**GOOD, "max_tokens": 400, "stream": True, "ignore_eos": True}
            ) as r:
                for _ in r.iter_lines():
                    if stop.is_set():
                        return

    threads = [threading.Thread(target=hold) for _ in range(total)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            running, waiting = (
                metric(http, "functok:num_requests_running"),
                metric(http, "functok:num_requests_waiting"),
            )
            if (running, waiting) == (LIMITS["max_running"], LIMITS["max_waiting"]):
                break  # (a request just submitted counts as waiting until the worker's next step admits it)
            time.sleep(0.1)
        assert (running, waiting) == (LIMITS["max_running"], LIMITS["max_waiting"])
        refused = metric(http, "functok:requests_total", endpoint="completions", status="429", steered="false")
        r = http.post("/v1/completions", json=GOOD)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error"
        assert (
            metric(http, "functok:requests_total", endpoint="completions", status="429", steered="false") == refused + 1
        )
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    wait_idle(http)
    assert http.post("/v1/completions", json=GOOD).status_code == 200


def test_serve_refuses_bad_setup_with_exit_2(tmp_path):
    run = lambda *args: subprocess.run(
        [sys.executable, "-m", "functok_vllm.cli", "serve", "--model", str(DEMO_MODEL), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )  # noqa: E731
    r = run("--model", str(tmp_path))  # the last --model wins
    assert r.returncode == 2 and "no config.json" in r.stderr
    r = run("--sae", str(tmp_path / "nowhere"))
    assert r.returncode == 2 and "nowhere" in r.stderr
    bad = {"presets": {"loud": {"edits": [{"layer": 2, "feature": 4096, "strength": 5.0}]}}}
    (tmp_path / "c.json").write_text(json.dumps(bad))
    r = run("--config", str(tmp_path / "c.json"), "--port", "1")
    assert r.returncode == 2 and "presets.loud.edits[0].feature" in r.stderr and "4096" in r.stderr
    (tmp_path / "latin1.json").write_bytes('{"presets": {"caf\u00e9": {}}}'.encode("latin-1"))  # not UTF-8
    r = run("--config", str(tmp_path / "latin1.json"), "--port", "1")
    assert r.returncode == 2 and "latin1.json is not valid JSON" in r.stderr and "Traceback" not in r.stderr


def test_metrics_and_a_log_without_secrets(server, http):
    ok = metric(http, "functok:requests_total", endpoint="completions", status="200", steered="true")
    bad = metric(http, "functok:requests_total", endpoint="completions", status="400", steered="unknown")
    assert http.post("/v1/completions", json={**GOOD, "steering": {"edits": [EDIT]}}).status_code == 200
    assert http.post("/v1/completions", json={**GOOD, "temperature": -1}).status_code == 400
    assert metric(http, "functok:requests_total", endpoint="completions", status="200", steered="true") == ok + 1
    assert metric(http, "functok:requests_total", endpoint="completions", status="400", steered="unknown") == bad + 1
    text = http.get("/metrics").text
    assert metric(http, "functok:prompt_tokens_total") > 0 and metric(http, "functok:generation_tokens_total") > 0
    assert "functok:time_to_first_token_seconds_bucket" in text and "functok:e2e_request_latency_seconds_count" in text
    log = server[1].read_text()
    assert "Uvicorn running" in log or "Application startup complete" in log
    assert KEY not in log and SECRET_PROMPT not in log and "Zanzibar" not in log
