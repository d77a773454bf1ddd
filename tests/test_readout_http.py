"""Readouts of chosen features and vectors over HTTP on a real `functok serve` (transformers engine), with the official
openai client: every value equals an independent reference (a plain transformers forward with hooks, sae-lens's
`encode`, a numpy projection), for steered and unsteered choices decoded in one batch, before and after the edits;
the server's monitors reach /metrics with exactly the crossings the reference's activations give, both ways; bad
readouts are 400s naming the field. One server for the module."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
import torch
from helpers import PROMPTS, ServerProc, metric, openai_client, wait_idle
from reference import eager_model, load_lens, logprobs

from functok_vllm.activation_capture import read_capture
from functok_vllm.engines.vllm.available import vllm_status
from functok_vllm.paths import DEMO_MODEL, DEMO_SAES

KEY, ADMIN = "sk-user-r34d", "sk-admin-r34d"
MODEL = "functok-tiny"
ADD_LAYER = 3  # no SAE there: --steer-layers
POINTS = {L: (L, "resid_post") for L in (0, 1, 2, ADD_LAYER)}  # every demo SAE reads resid_post
MAX_READOUTS = 6
HOT, COLD = 2.0, 1e6  # thresholds of the monitors on the steered feature: one it crosses, one it never reaches
NO_VLLM = None if vllm_status().ok else vllm_status().line()


@pytest.fixture(scope="module")
def feature(logit_lens_feature):
    return logit_lens_feature[:2]  # (layer 2, a feature a strength of 15 visibly steers)


@pytest.fixture(scope="module")
def server(tmp_path_factory, feature):
    layer, f = feature
    flags = ["--api-key", KEY, "--admin-api-key", ADMIN, "--steer-layers", str(ADD_LAYER)]
    flags += ["--data-dir", str(tmp_path_factory.mktemp("library")), "--max-readouts", str(MAX_READOUTS)]
    flags += ["--monitor", f"hot={layer}:{f}:{HOT}", "--monitor", f"cold={layer}:{f}:{COLD}", "--monitor", "l0=0:3"]
    proc = ServerProc(tmp_path_factory.mktemp("serve"), *flags)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server.url, KEY)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def probe(server):
    """A vector "probe" in the library at layers 1 and 3 (the add-only layer), random directions of norms 3 and 7."""
    g = torch.Generator().manual_seed(7)
    dirs = {1: torch.randn(256, generator=g) * 3 / 16, ADD_LAYER: torch.randn(256, generator=g) * 7 / 16}
    admin = openai_client(server.url, ADMIN)
    body = {"name": "probe", "directions": {str(k): v.tolist() for k, v in dirs.items()}}
    admin.post("/steering/vectors", body=body, cast_to=object)
    return dirs


@pytest.fixture(scope="module")
def ref():
    """The independent reference: an eager transformers model and sae-lens's SAEs."""
    return eager_model(DEMO_MODEL), {L: load_lens(DEMO_SAES / f"layer_{L}") for L in (0, 1, 2)}


def grab(ref, ids: list[int], n_prompt: int, spec=None, before: bool = False) -> dict[int, torch.Tensor]:
    """{layer: (seq, d_model)} the reference's stream at each layer's hook point after `spec`'s edits there (`before`:
    before them, the edits upstream applied)."""
    model, lenses = ref
    out, pre = {}, {}
    logprobs(model, lenses, POINTS, ids, n_prompt, spec, grab=out, before=pre)
    return pre if before else out


def want_series(ref, stream: dict, label: dict, dirs: dict) -> np.ndarray:
    """The reference's values of one series over all positions: sae-lens's encode, or the projection on the unit
    direction (numpy, float64)."""
    h = stream[label["layer"]]
    if "feature" in label:
        with torch.no_grad():
            return ref[1][label["layer"]].encode(h.float())[:, label["feature"]].double().numpy()
    d = dirs[label["layer"]].double().numpy()
    return h.double().numpy() @ (d / np.linalg.norm(d))


def close(got, want) -> float:
    """Relative error of a series: ||got - want|| / ||want|| (0 when both are all zero: a feature that never fired)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if not want.any():
        return float(np.abs(got).max())
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.fixture(scope="module")
def busy(ref, demo_tokenizer) -> dict[int, int]:
    """{layer: the feature firing at the most positions of PROMPTS[1]} for layers 0 and 1, by the reference."""
    ids = demo_tokenizer.encode(PROMPTS[1])
    stream = grab(ref, ids, len(ids))
    out = {}
    for L in (0, 1):
        with torch.no_grad():
            acts = ref[1][L].encode(stream[L])  # (seq, d_sae)
        out[L] = int(((acts > 0).sum(0) * 1e6 + acts.sum(0)).argmax())
    return out


def test_readouts_equal_the_reference_for_steered_and_plain_choices_of_one_batch(
    client, ref, probe, feature, busy, demo_tokenizer
):
    layer, f = feature
    steered = {"edits": [{"layer": layer, "feature": f, "strength": 15.0}, {"layer": 0, "feature": 3, "strength": -4}]}
    specs = [None, steered | {"positions": "all"}]
    feats = [{"layer": layer, "feature": f}, {"layer": 0, "feature": busy[0]}, {"layer": 1, "feature": busy[1]}]
    readout = {"features": feats, "vectors": ["probe"]}
    r = client.completions.create(
        model=MODEL,
        prompt=PROMPTS[1],
        max_tokens=6,
        temperature=0,
        extra_body={"steering": specs, "return_token_ids": True, "readout": readout | {"prompt": True}},
    )
    prompt = demo_tokenizer.encode(PROMPTS[1])
    assert r.choices[0].token_ids != r.choices[1].token_ids  # the edits changed the text
    for choice, spec in zip(r.choices, specs, strict=True):
        got = choice.readout
        forwarded = prompt + choice.token_ids[:-1]  # the last generated token is never fed back
        assert got["positions"] == list(range(len(forwarded))) and got["token_ids"] == forwarded
        labels = feats + [{"vector": "probe", "layer": 1}, {"vector": "probe", "layer": ADD_LAYER}]
        assert [{k: s[k] for k in s if k not in ("values", "pooled")} for s in got["series"]] == labels
        stream = grab(ref, forwarded, len(prompt), spec)
        for s in got["series"]:
            want = want_series(ref, stream, s, probe)
            assert close(s["values"], want) <= 1e-5, s
            assert "vector" in s or s["layer"] == layer or (want > 0).sum() >= 3  # busy: not a vacuous match
            v = np.array(s["values"])
            assert s["pooled"] == pytest.approx({"mean": v.mean(), "max": v.max(), "last": v[-1]}, rel=1e-9)
    plain, steered = (c.readout["series"][0]["values"] for c in r.choices)
    assert max(plain) < HOT < min(steered)  # the edit at `layer` made its feature fire at every position


def test_readout_before_the_edits_reads_only_the_edits_upstream(client, ref, feature, demo_tokenizer):
    layer, f = feature
    edits = [{"layer": layer, "feature": f, "strength": 15.0}, {"layer": 0, "feature": 3, "strength": -4.0}]
    prompt = demo_tokenizer.encode(PROMPTS[3])
    got = {}
    for when in ("before", "after"):
        body = {"steering": {"edits": edits, "positions": "all"}, "return_token_ids": True}
        body["readout"] = {"features": [{"layer": layer, "feature": f}], "edits": when, "pool": ["max"]}
        r = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=5, temperature=0, extra_body=body)
        got[when] = r.choices[0].readout["series"][0]
    forwarded = prompt + r.choices[0].token_ids[:-1]
    n = len(prompt) - 1  # without `prompt`: from the last prompt position on
    upstream = grab(ref, forwarded, len(prompt), {"edits": edits[1:], "positions": "all"})
    steered = grab(ref, forwarded, len(prompt), {"edits": edits, "positions": "all"})
    label = {"layer": layer, "feature": f}
    assert close(got["before"]["values"], want_series(ref, upstream, label, {})[n:]) <= 1e-5
    assert close(got["after"]["values"], want_series(ref, steered, label, {})[n:]) <= 1e-5
    assert set(got["before"]["pooled"]) == {"max"}
    assert max(got["before"]["values"]) < HOT < min(got["after"]["values"])  # the two readings differ: can flip


def test_stop_when_stops_at_the_token_the_reference_says_and_flag_reports_it(http, ref, busy, demo_tokenizer):
    """A monitor on a busy layer-0 feature, 2 positions in a row above a threshold chosen from the reference: "flag"
    runs to max_tokens and reports the generated token where it triggers; "stop" ends at exactly that token, with
    the same tokens up to it; both read the values the reference gives (sae-lens encode). A threshold nothing
    reaches never triggers: the verdict flips."""
    label = {"layer": 0, "feature": busy[0]}
    prompt = demo_tokenizer.encode(PROMPTS[1])
    base = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 12, "temperature": 0, "return_token_ids": True}

    def run(stop_when: dict) -> dict:
        r = http.post("/v1/completions", json=base | {"stop_when": stop_when})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]

    probe = run({"feature": label, "above": -1e9, "action": "flag"})
    forwarded = prompt + probe["token_ids"][:-1]
    want = want_series(ref, grab(ref, forwarded, len(prompt)), label, {})[len(prompt) - 1 :]  # (generated,)
    assert close(probe["monitor"]["values"], want) <= 1e-5 and probe["monitor"]["token_index"] == 0
    pairs = np.minimum(want[:-2], want[1:-1])  # the smaller value of each two in a row, ending before the last token
    thr = float(pairs.max()) - 1e-3 * (1 + abs(float(pairs.max())))
    held = want > thr
    expect = next(i for i in range(1, len(want)) if held[i - 1] and held[i])
    assert expect < len(want) - 1
    flag = run({"feature": label, "above": thr, "tokens": 2, "action": "flag"})
    assert flag["finish_reason"] == "length" and len(flag["token_ids"]) == 12
    assert flag["monitor"]["triggered"] and flag["monitor"]["token_index"] == expect
    assert flag["monitor"]["position"] == len(prompt) - 1 + expect
    stop = run({"feature": label, "above": thr, "tokens": 2, "action": "stop"})
    assert stop["finish_reason"] == "stop" and stop["token_ids"] == flag["token_ids"][: expect + 1]
    assert stop["monitor"]["triggered"] and stop["monitor"]["token_index"] == expect
    never = run({"feature": label, "above": float(want.max()) + 1.0, "action": "stop"})
    assert never["finish_reason"] == "length" and not never["monitor"]["triggered"]
    assert never["token_ids"] == flag["token_ids"]


@pytest.mark.parametrize(
    "stop_when, field",
    [
        ({"feature": {"layer": 9, "feature": 0}, "above": 1.0}, "stop_when.feature.layer"),
        ({"feature": {"layer": 0, "feature": 10**6}, "above": 1.0}, "stop_when.feature.feature"),
        ({"above": 1.0}, "stop_when.feature"),
        ({"feature": {"layer": 0, "feature": 1}}, "stop_when.above"),
        ({"feature": {"layer": 0, "feature": 1}, "above": 1.0, "tokens": 0}, "stop_when.tokens"),
        ({"feature": {"layer": 0, "feature": 1}, "above": 1.0, "action": "explode"}, "stop_when.action"),
        ({"vector": "nope", "above": 1.0}, "stop_when.vector"),
    ],
)
def test_bad_stop_when_is_refused_naming_the_field(http, stop_when, field):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, "stop_when": stop_when})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field, r.json()


def test_a_streamed_readout_comes_whole_on_the_finishing_chunk(client, probe, feature):
    layer, f = feature
    body = {"readout": {"features": [{"layer": layer, "feature": f}], "vectors": ["probe"], "pool": ["last"]}}
    kw = dict(model=MODEL, prompt=PROMPTS[5], max_tokens=5, temperature=0, extra_body=body)
    whole = client.completions.create(**kw).choices[0].readout
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **kw) if c.choices]
    assert all(getattr(c, "readout", None) is None for c in chunks if c.finish_reason is None)
    assert [c.readout for c in chunks if c.finish_reason is not None] == [whole]
    assert len(whole["positions"]) == 5 and whole["series"][0]["pooled"] == {"last": whole["series"][0]["values"][-1]}


def test_monitors_count_exactly_the_crossings_of_the_reference(client, http, ref, feature, demo_tokenizer):
    """Planted both ways: the steered request's tokens all cross the `hot` threshold, the plain one's none; `cold`
    is never crossed; the histogram observes one value per generated token."""
    layer, f = feature
    wait_idle(http)
    before = {m: metric(http, "functok:monitor_activation_count", monitor=m) for m in ("hot", "cold", "l0")}
    crossed = {m: metric(http, "functok:monitor_threshold_crossings_total", monitor=m) for m in ("hot", "cold")}
    spec = {"edits": [{"layer": layer, "feature": f, "strength": 15.0}], "positions": "all"}
    r = client.completions.create(
        model=MODEL,
        prompt=PROMPTS[4],
        max_tokens=5,
        temperature=0,
        extra_body={"steering": [None, spec], "return_token_ids": True},
    )
    prompt = demo_tokenizer.encode(PROMPTS[4])
    n = len(prompt) - 1
    want_hot, tokens = 0, 0
    for choice, s in zip(r.choices, [None, spec], strict=True):
        assert not hasattr(choice, "readout") or choice.readout is None  # monitors are not shown in the response
        g = len(choice.token_ids)
        stream = grab(ref, prompt + choice.token_ids[:-1], len(prompt), s)
        vals = want_series(ref, stream, {"layer": layer, "feature": f}, {})
        vals = vals[n : n + g]  # one per generated token: the position that predicted it
        assert (vals > HOT).all() if s else not (vals > HOT).any()
        want_hot += int((vals > HOT).sum())
        tokens += g
    assert metric(http, "functok:monitor_threshold_crossings_total", monitor="hot") - crossed["hot"] == want_hot > 0
    assert metric(http, "functok:monitor_threshold_crossings_total", monitor="cold") == crossed["cold"]
    for m in ("hot", "cold", "l0"):
        assert metric(http, "functok:monitor_activation_count", monitor=m) - before[m] == tokens
    monitors = http.get("/v1/steering").json()["monitors"]
    assert [m["name"] for m in monitors] == ["hot", "cold", "l0"] and monitors[2]["threshold"] is None


@pytest.mark.parametrize(
    "readout, field",
    [
        ({"features": [{"layer": 5, "feature": 1}]}, "readout.features[0].layer"),
        ({"features": [{"layer": 2, "feature": 1 << 20}]}, "readout.features[0].feature"),
        ({"features": [{"layer": 2}]}, "readout.features[0].feature"),
        ({"vectors": ["nope"]}, "readout.vectors[0]"),
        ({"vectors": ["probe"], "pool": ["median"]}, "readout.pool[0]"),
        ({"vectors": ["probe"], "edits": "during"}, "readout.edits"),
        ({"vectors": ["probe"], "extra": 1}, "readout.extra"),
        ({}, "readout"),
        ([1], "readout"),
        ({"features": [{"layer": 2, "feature": i} for i in range(MAX_READOUTS - 1)], "vectors": ["probe"]}, "readout"),
    ],
)
def test_bad_readouts_are_refused_naming_the_field(client, probe, readout, field):
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=3, extra_body={"readout": readout})
    assert e.value.status_code == 400 and e.value.body["param"] == field, e.value.body
    if field == "readout" and "features" in readout:
        assert "max_readouts" in e.value.body["message"]
    assert client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=2).choices  # still serving


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory, feature):
    if NO_VLLM:
        pytest.skip(NO_VLLM)
    layer, f = feature
    flags = ["--engine", "vllm", "--max-model-len", "256", "--steer-layers", str(ADD_LAYER), "--admin-api-key", ADMIN]
    flags += ["--data-dir", str(tmp_path_factory.mktemp("vlib")), "--monitor", f"hot={layer}:{f}:{HOT}"]
    env = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1"}
    env["FUNCTOK_VLLM_ARGS"] = json.dumps({"enforce_eager": True, "max_num_seqs": 8})
    proc = ServerProc(tmp_path_factory.mktemp("vserve"), *flags, env=os.environ | env)
    yield proc
    proc.stop()


@pytest.mark.vllm
def test_vllm_readouts_and_monitors_equal_the_reference(vllm_server, ref, feature, busy, demo_tokenizer):
    """The same readout through `functok serve --engine vllm` (the worker's side channel): a mixed batch, steered and
    plain, equals the reference after the edits; the monitor counts the reference's crossings."""
    layer, f = feature
    admin, client = openai_client(vllm_server.url, ADMIN), openai_client(vllm_server.url, timeout=600)
    g = torch.Generator().manual_seed(11)
    dirs = {1: torch.randn(256, generator=g), ADD_LAYER: torch.randn(256, generator=g)}
    body = {"name": "probe", "directions": {str(k): v.tolist() for k, v in dirs.items()}}
    admin.post("/steering/vectors", body=body, cast_to=object)
    spec = {"edits": [{"layer": layer, "feature": f, "strength": 15.0}], "positions": "all"}
    feats = [{"layer": layer, "feature": f}, {"layer": 1, "feature": busy[1]}]
    readout = {"features": feats, "vectors": ["probe"], "prompt": True}
    with httpx.Client(base_url=vllm_server.url, timeout=60) as http:
        crossed = metric(http, "functok:monitor_threshold_crossings_total", monitor="hot")
        r = client.completions.create(
            model=MODEL,
            prompt=PROMPTS[1],
            max_tokens=6,
            temperature=0,
            extra_body={"steering": [None, spec], "return_token_ids": True, "readout": readout},
        )
        prompt, want_hot = demo_tokenizer.encode(PROMPTS[1]), 0
        for choice, s in zip(r.choices, [None, spec], strict=True):
            forwarded = prompt + choice.token_ids[:-1]
            assert choice.readout["positions"] == list(range(len(forwarded)))
            assert choice.readout["token_ids"] == forwarded
            stream = grab(ref, forwarded, len(prompt), s)
            for series in choice.readout["series"]:
                assert close(series["values"], want_series(ref, stream, series, dirs)) <= 1e-5, series
            hot = want_series(ref, stream, {"layer": layer, "feature": f}, {})[len(prompt) - 1 :] > HOT
            want_hot += int(hot.sum())
        assert want_hot > 0 and metric(http, "functok:monitor_threshold_crossings_total", monitor="hot") == (
            crossed + want_hot
        )


def same_monitor(a: dict, b: dict) -> bool:
    """Two `monitor` objects agree: every field equal, the values within float32 batching noise (rel 1e-5)."""
    rest = lambda m: {k: v for k, v in m.items() if k not in ("values", "value")}  # noqa: E731
    return rest(a) == rest(b) and close(a["values"], b["values"]) <= 1e-5 and close([a["value"]], [b["value"]]) <= 1e-5


@pytest.mark.vllm
def test_vllm_stops_where_the_reference_says_as_the_transformers_engine(vllm_server, http, ref, busy, demo_tokenizer):
    """A "stop" monitor on vLLM (its series read per delta from the workers): a flag request's values equal the
    reference's (sae-lens encode of a plain forward), and a threshold chosen from them (2 in a row above it) gives a
    trigger index computed here; in one batch beside a plain request and one whose threshold is never reached, the
    stopped request's tokens are the unstopped run cut at that index (streamed too: nothing past it reaches the
    client), and its text, tokens, log-probs and `monitor` equal the transformers engine's; the other two run to
    max_tokens unchanged."""
    label = {"layer": 0, "feature": busy[0]}
    base = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 12, "temperature": 0, "return_token_ids": True}
    base["logprobs"] = 2
    prompt = demo_tokenizer.encode(PROMPTS[1])
    with httpx.Client(base_url=vllm_server.url, timeout=600) as vh:

        def run(client, stop_when: dict | None, stream: bool = False) -> dict:
            body = base | ({"stop_when": stop_when} if stop_when else {})
            if not stream:
                r = client.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]
            got = {"token_ids": [], "text": "", "finish_reason": None}
            with client.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        c = json.loads(line[6:])["choices"][0]
                        got["token_ids"] += c.get("token_ids") or []
                        got["text"] += c["text"]
                        got["finish_reason"] = c["finish_reason"] or got["finish_reason"]
                        got["monitor"] = c.get("monitor", got.get("monitor"))
            return got

        flag = run(vh, {"feature": label, "above": -1e9, "action": "flag"})
        forwarded = prompt + flag["token_ids"][:-1]
        want = want_series(ref, grab(ref, forwarded, len(prompt)), label, {})[len(prompt) - 1 :]  # (generated,)
        assert flag["finish_reason"] == "length" and close(flag["monitor"]["values"], want) <= 1e-5
        pairs = np.minimum(want[:-2], want[1:-1])  # each two in a row, ending before the last token
        thr = float(pairs.max()) - 1e-3 * (1 + abs(float(pairs.max())))
        held = want > thr
        expect = next(i for i in range(1, len(want)) if held[i - 1] and held[i])
        assert expect < len(want) - 1  # a cut that drops tokens
        stop = {"feature": label, "above": thr, "tokens": 2, "action": "stop"}
        never = stop | {"above": float(want.max()) + 1.0}
        with ThreadPoolExecutor(4) as pool:  # one batch: stopped, streamed stopped, plain, never triggered
            jobs = [
                pool.submit(run, vh, s, st) for s, st in ((stop, False), (stop, True), (None, False), (never, False))
            ]
            got_stop, got_streamed, got_plain, got_never = (j.result() for j in jobs)
        cut = flag["token_ids"][: expect + 1]
        assert got_stop["finish_reason"] == got_streamed["finish_reason"] == "stop"
        assert got_stop["token_ids"] == got_streamed["token_ids"] == cut
        assert got_stop["text"] == got_streamed["text"] == demo_tokenizer.decode(cut)
        assert same_monitor(got_stop["monitor"], got_streamed["monitor"])
        m = got_stop["monitor"]
        assert m["triggered"] and m["token_index"] == expect and m["position"] == len(prompt) - 1 + expect
        assert close(m["values"], want[: expect + 1]) <= 1e-5
        assert len(got_stop["logprobs"]["token_logprobs"]) == expect + 1
        for other in (got_plain, got_never):
            assert other["finish_reason"] == "length" and other["token_ids"] == flag["token_ids"]
            assert other["text"] == flag["text"]
        assert not got_never["monitor"]["triggered"] and close(got_never["monitor"]["values"], want) <= 1e-5
        last = {"stop_when": stop, "capture": {"layers": [1], "positions": "last"}}  # its row may lie past the stop
        r = vh.post("/v1/completions", json=base | last)
        assert r.status_code == 400 and r.json()["error"]["param"] == "capture.positions", r.text
    hf = run(http, stop)  # the transformers engine, same request
    assert (hf["finish_reason"], hf["token_ids"], hf["text"]) == ("stop", got_stop["token_ids"], got_stop["text"])
    assert same_monitor(m, hf["monitor"])
    np.testing.assert_allclose(got_stop["logprobs"]["token_logprobs"], hf["logprobs"]["token_logprobs"], atol=1e-4)
    assert got_stop["logprobs"]["tokens"] == hf["logprobs"]["tokens"]


@pytest.mark.vllm
def test_vllm_capture_and_a_vector_from_examples_equal_the_reference(vllm_server, ref, feature, demo_tokenizer):
    """Capture through the same side channel: the transformers engine's format, equal to the reference after the
    edits for a steered and a plain choice of one batch, at every position and at function positions; a vector from
    pairs computed on vLLM is the reference's mean difference."""
    layer, f = feature
    client = openai_client(vllm_server.url, timeout=600)
    spec = {"edits": [{"layer": layer, "feature": f, "strength": 15.0}], "positions": "all"}
    r = client.completions.create(
        model=MODEL,
        prompt=PROMPTS[2],
        max_tokens=5,
        temperature=0,
        extra_body={
            "steering": [None, spec],
            "return_token_ids": True,
            "capture": {"layers": [layer, ADD_LAYER], "positions": "all"},
        },
    )
    prompt = demo_tokenizer.encode(PROMPTS[2])
    for choice, s in zip(r.choices, [None, spec], strict=True):
        got = read_capture(choice.capture)
        forwarded = prompt + choice.token_ids[:-1]
        assert got["positions"].tolist() == list(range(len(forwarded))) and got["token_ids"].tolist() == forwarded
        want = grab(ref, forwarded, len(prompt), s)
        for L in (layer, ADD_LAYER):
            t = got[f"blocks.{L}.hook_resid_post"]
            err = ((t.double() - want[L].double()).norm(dim=-1) / want[L].double().norm(dim=-1)).max()
            assert t.dtype == torch.float32 and float(err) <= 1e-5, L
    body = {"capture": {"layers": [1], "positions": "last_function"}}
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=1, temperature=0, extra_body=body)
    ids, fn = demo_tokenizer.encode(PROMPTS[0]), set(http_function_tokens(vllm_server))
    at = max(i for i, t in enumerate(ids) if t in fn)
    got = read_capture(r.choices[0].capture)
    assert got["positions"].tolist() == [at]
    want = grab(ref, ids, len(ids))[1][at]
    assert float((got["blocks.1.hook_resid_post"][0] - want).norm() / want.norm()) <= 1e-5
    pairs = [
        ("The king said to his son", "The man said to his son"),
        ("The queen walked in and", "The woman walked in and"),
    ]
    admin = openai_client(vllm_server.url, ADMIN)
    examples = {"positive": [p for p, _ in pairs], "negative": [n for _, n in pairs], "layers": [1], "position": "last"}
    admin.post("/steering/vectors", body={"name": "royal", "examples": examples}, cast_to=object)
    got = np.array(admin.get("/steering/vectors/royal", cast_to=object)["directions"]["1"], np.float64)
    reads = {t: grab(ref, demo_tokenizer.encode(t), 1)[1][-1].double().numpy() for pair in pairs for t in pair}
    want = np.mean([reads[p] - reads[n] for p, n in pairs], axis=0)
    assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)


@pytest.mark.vllm
def test_vllm_reads_before_and_after_the_edits_in_one_batch_as_the_reference(vllm_server, ref, feature, demo_tokenizer):
    """Three requests decoded together on vLLM: a steered one (edits at layers 0 and `layer`) and its unsteered twin
    reading and capturing *before* the edits, the same steered one *after* them. Before: at layer 0 nothing of its own
    edit, at `layer` the edit upstream at 0 but not its own, at the add-only layer both (the reference's tensor at
    each hook point as its forward went, with the edits written out in forward hooks); after: with the edits."""
    layer, f = feature
    client = openai_client(vllm_server.url, timeout=600)
    spec = {"edits": [{"layer": 0, "feature": 3, "strength": -4.0}, {"layer": layer, "feature": f, "strength": 15.0}]}
    spec["positions"] = "all"
    layers = [0, layer, ADD_LAYER]
    feats = [{"layer": layer, "feature": f}, {"layer": 0, "feature": 3}]

    def ask(steering, edits: str):
        body = {"steering": steering, "return_token_ids": True, "capture": {"layers": layers, "edits": edits}}
        body["readout"] = {"features": feats, "prompt": True, "edits": edits}
        return client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=6, temperature=0, extra_body=body)

    with ThreadPoolExecutor(2) as pool:  # submitted together: one batch on the engine
        before, after = pool.submit(ask, [None, spec], "before"), pool.submit(ask, spec, "after")
        runs = [(c, s, True) for c, s in zip(before.result().choices, [None, spec], strict=True)]
        runs.append((after.result().choices[0], spec, False))
    prompt = demo_tokenizer.encode(PROMPTS[3])
    got_at = {}
    for choice, s, pre in runs:
        forwarded = prompt + choice.token_ids[:-1]
        want = grab(ref, forwarded, len(prompt), s, before=pre)
        cap = read_capture(choice.capture)
        assert cap["positions"].tolist() == list(range(len(forwarded))) == choice.readout["positions"]
        for L in layers:
            t = cap[f"blocks.{L}.hook_resid_post"].double()
            err = ((t - want[L].double()).norm(dim=-1) / want[L].double().norm(dim=-1)).max()
            assert float(err) <= 1e-5, (s is not None, pre, L, float(err))
        for series in choice.readout["series"]:
            assert close(series["values"], want_series(ref, want, series, {})) <= 1e-5, (s is not None, pre, series)
        got_at[(s is not None, pre)] = choice.readout["series"][0]["values"], cap[f"blocks.{layer}.hook_resid_post"]
    (before, pre), (after, _), (_, plain) = (got_at[k] for k in ((True, True), (True, False), (False, True)))
    assert max(before) < HOT < min(after[1:])  # before and after its own edit (the first position, a sink, stays 0)
    n = len(prompt)  # the prompt's rows, the same tokens in both: the edit upstream at layer 0 moved `before` there
    assert float((pre[:n] - plain[:n]).norm() / plain[:n].norm()) > 1e-3


def http_function_tokens(server) -> list[int]:
    with httpx.Client(base_url=server.url, timeout=60) as http:
        return http.get("/v1/steering").json()["function_tokens"]["ids"]


def test_a_bad_monitor_stops_the_server_at_start_naming_it():
    def serve(*monitors: str):
        flags = [x for m in monitors for x in ("--monitor", m)]
        cmd = [sys.executable, "-m", "functok_vllm.cli", "serve", "--model", str(DEMO_MODEL), *flags, "--port", "1"]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    r = serve("ok=2:5", "bad=9:1")  # checked against the SAEs once they are loaded
    assert r.returncode == 2 and "--monitor bad: no SAE is loaded at layer 9" in r.stderr, r.stderr[-2000:]
    r = serve("bad=2:1:nan")  # the form, before any model loads
    assert r.returncode == 2 and "--monitor 'bad=2:1:nan'" in r.stderr and "Traceback" not in r.stderr
