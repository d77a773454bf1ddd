"""Conditional edits (`when`) over HTTP on a real `functok serve` (transformers engine, the demo model, a library with
a vector at an SAE layer and at an add-only layer): the canonical form is echoed and steers the same when sent back,
a condition that always holds steers like the plain edit and one that never holds like no steering, and every bad
field of a condition is a 400 naming it (`steering.edits[i].when.above`), the server serving on. `steered_positions`
counts where the conditions held, against an independent count (`acted_count`: a plain transformers forward reading
each condition with sae-lens), 0 for a condition that never holds and the plain edit's count for one that always
does."""

import json
import math

import httpx
import pytest
import torch
from helpers import PROMPTS, ServerProc
from reference import eager_model, load_lens, logprobs
from test_conditional import conditions

from functok_vllm.core import SAE
from functok_vllm.paths import DEMO_MODEL, DEMO_SAES

KEY, ADMIN = "sk-user-c25", "sk-admin-c25"
MODEL = "functok-tiny"
D_MODEL = 256
ADD_LAYER = 3  # no SAE there: --steer-layers
LIMITS = {"max_edits": 4, "max_abs_strength": 100, "max_conditions": 2, "max_condition_columns": 4}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    flags = ["--api-key", KEY, "--admin-api-key", ADMIN, "--data-dir", str(tmp / "lib"), "--steer-layers", "3"]
    proc = ServerProc(tmp, *flags, config={"limits": LIMITS})
    try:
        torch.manual_seed(0)
        for name, layers in (("mood", [2]), ("wide", [2, ADD_LAYER])):
            body = {"name": name, "directions": {str(L): (3.0 * torch.randn(D_MODEL)).tolist() for L in layers}}
            r = httpx.post(f"{proc.url}/v1/steering/vectors", json=body, headers={"Authorization": f"Bearer {ADMIN}"})
            assert r.status_code == 201, r.text
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c


def complete(http, steering=None, prompt=PROMPTS[0]) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0, "return_token_ids": True}
    r = http.post("/v1/completions", json=body | ({"steering": steering} if steering is not None else {}))
    assert r.status_code == 200, r.text
    return r.json()


def ids(r: dict) -> list[int]:
    return r["choices"][0]["token_ids"]


def demo_reference() -> tuple:
    """(model, {layer: sae-lens SAE}, {layer: (layer index, site)}) of the demo model and its SAEs, loaded with
    transformers and sae-lens only: the independent side of `acted_count`."""
    paths = {SAE.load(p).layer: p for p in sorted(DEMO_SAES.glob("layer_*"))}
    points = {L: (SAE.load(p).cfg.hook.layer, SAE.load(p).cfg.hook.site) for L, p in paths.items()}
    return eager_model(DEMO_MODEL), {L: load_lens(p) for L, p in paths.items()}, points


def acted_count(ref: tuple, seq: list[int], n_prompt: int, edits: list[dict]) -> int:
    """Positions of `seq` (prompt then generated tokens) where some of `edits` (positions "all") acted: every token
    for an edit without `when`, else where its condition held, read by a plain forward without KV cache with the
    edits written out in hooks. The last generated token is never fed back, so it is not counted."""
    model, lenses, points = ref
    acted = torch.zeros(len(seq), dtype=torch.bool)
    logprobs(model, lenses, points, seq, n_prompt, {"edits": edits, "positions": "all"}, acted=acted)
    return int(acted[:-1].sum())


def gated_edits(ref: tuple, prompt_ids: list[int]) -> list[dict]:
    """Two adds gated by the features of layers 1 and 2 that fire at about half the prompt's unsteered tokens (each
    condition holds at some tokens and not at others; `steered_positions` counts their union)."""
    cond = conditions(*ref[:2], ref[2], [prompt_ids])
    (f1, t1), (f2, t2) = cond[1], cond[2]
    return [
        ADD | {"when": {"feature": f1, "above": t1}},
        {"layer": 2, "feature": 10, "strength": 5.0, "when": {"feature": f2, "above": t2}},
    ]


ADD = {"layer": 1, "feature": 77, "strength": 12.0}


def test_a_conditional_edit_is_echoed_and_its_conditions_flip_it_both_ways(http):
    plain, unsteered = complete(http, {"edits": [ADD], "positions": "all"}), complete(http)
    assert ids(plain) != ids(unsteered)  # the edit moves the text: the two checks below can fail
    always = complete(http, {"edits": [ADD | {"when": {"feature": 9, "above": -1.0}}], "positions": "all"})
    never = complete(http, {"edits": [ADD | {"when": {"feature": 9, "below": 0.0}}], "positions": "all"})
    assert ids(always) == ids(plain) and ids(never) == ids(unsteered)
    fed = plain["usage"]["prompt_tokens"] + plain["usage"]["completion_tokens"] - 1  # every token forwarded
    assert plain["steering"]["steered_positions"] == always["steering"]["steered_positions"] == fed, plain
    assert never["steering"]["steered_positions"] == 0, never["steering"]
    steer = {
        "edits": [{"vector": "wide", "strength": 4.0, "when": {"vector": "wide", "above": 0.5}}],
        "positions": "all",
    }
    r = complete(http, steer)
    echoed = r["steering"]["edits"][0]
    assert echoed["when"]["vector"] == "wide" and echoed["when"]["version"] == echoed["version"], echoed
    again = complete(http, {k: r["steering"][k] for k in ("edits", "positions")})  # the echo is a valid request
    assert ids(again) == ids(r)


W = {"layer": 2, "feature": 10, "strength": 5.0}
BAD = [  # (the edit, the field the 400 names, text its message shows)
    (W | {"when": {"feature": 3, "above": math.nan}}, "steering.edits[0].when.above", "finite"),
    (W | {"when": {"feature": 3, "below": math.inf}}, "steering.edits[0].when.below", "finite"),
    (W | {"when": {"feature": 3, "above": 1e6}}, "steering.edits[0].when.above", "exceeds"),
    (W | {"when": {"feature": 3, "above": "0.5"}}, "steering.edits[0].when.above", "number"),
    (W | {"when": {"feature": 3, "above": 0.5, "abov": 1.0}}, "steering.edits[0].when.abov", "unknown"),
    (W | {"when": {"above": 0.5}}, "steering.edits[0].when.feature", "one 'feature' or one 'vector'"),
    (W | {"when": {"feature": 3, "vector": "mood", "above": 0.5}}, "steering.edits[0].when.feature", "one"),
    (W | {"when": {"feature": 3}}, "steering.edits[0].when.above", "'above' or 'below'"),
    (W | {"when": {"feature": 3, "above": 2.0, "below": 1.0}}, "steering.edits[0].when.above", "above < below"),
    (W | {"when": {"feature": 5000, "above": 0.5}}, "steering.edits[0].when.feature", "5000"),
    (W | {"when": {"feature": 3, "version": "x", "above": 0.5}}, "steering.edits[0].when.version", "vector"),
    (W | {"when": {"vector": "nope", "above": 0.5}}, "steering.edits[0].when.vector", "nope"),
    (W | {"when": "feature 3"}, "steering.edits[0].when", "feature 3"),
    ({"layer": 1, "feature": 10, "strength": 5.0, "when": {"vector": "mood", "above": 0.5}}, "when.vector", "layer 1"),
    ({"vector": "wide", "strength": 1.0, "when": {"feature": 3, "above": 0.5}}, "when.feature", "no SAE"),
]


@pytest.mark.parametrize("edit,field,shows", BAD, ids=[f"{b[1]}:{b[2]}" for b in BAD])
def test_bad_conditions_are_400s_naming_the_field(http, edit, field, shows):
    body = {"model": MODEL, "prompt": "The king", "max_tokens": 2, "steering": {"edits": [edit]}}
    headers = {"content-type": "application/json"}
    r = http.post("/v1/completions", content=json.dumps(body), headers=headers)  # NaN / Infinity written as-is
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"].endswith(field) and err["param"].startswith("steering.edits[0]"), err
    assert shows in err["message"], err


def test_conditions_per_request_are_limited(http):
    many = [W | {"feature": f, "when": {"feature": 3, "above": 0.5}} for f in (10, 11, 12)]
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "The king", "steering": {"edits": many}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "steering.edits", r.text
    assert "max_conditions" in r.json()["error"]["message"]
    assert complete(http, {"edits": many[:2]})["choices"][0]["text"]  # two fit, and the server serves on


def test_steered_positions_count_where_the_conditions_held(http, demo_tokenizer):
    ref = demo_reference()
    prompt = demo_tokenizer.encode(PROMPTS[0])
    edits = gated_edits(ref, prompt)
    r = complete(http, {"edits": edits, "positions": "all"})
    assert r["usage"]["prompt_tokens"] == len(prompt), r["usage"]
    seq = prompt + ids(r)
    want = acted_count(ref, seq, len(prompt), edits)
    assert 0 < want < len(seq) - 1  # neither none nor every position: counting the selector would fail
    assert r["steering"]["steered_positions"] == want, (r["steering"], want)
