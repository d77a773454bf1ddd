"""Reading the model over HTTP on a real `functok serve` (transformers engine), with the official openai client:
per-request capture of the residual equals an independent plain transformers forward with hooks (`reference.py`),
for steered and unsteered choices decoded in one batch; a steering vector built from contrastive examples equals a
numpy mean difference (and first principal direction) of the reference's activations, flips sign with its examples,
and used by name steers exactly as that reference forward with the same numbers added; every bad input is a 4xx
naming the field or the limit. One server for the module."""

import base64
import json

import numpy as np
import openai
import pytest
import torch
from helpers import PROMPTS, ServerProc, openai_client
from reference import eager_model, load_lens, logprobs

from functok_vllm.activation_capture import read_capture
from functok_vllm.engines.placement import residual_hooks
from functok_vllm.paths import DEMO_MODEL, DEMO_SAES

KEY, ADMIN = "sk-user-c4p", "sk-admin-c4p"
MODEL = "functok-tiny"
D_MODEL = 256
ADD_LAYER = 3  # no SAE there: --steer-layers
MAX_CAPTURE_BYTES = 256 * 1024
POINTS = {L: (L, "resid_post") for L in (0, 1, 2, ADD_LAYER)}  # every demo SAE reads resid_post
PAIRS = [  # (positive, negative): royal against plain sentences
    ("The king said to his son", "The man said to his son"),
    ("The queen walked into the hall and", "The woman walked into the room and"),
    ("Long live the king, for he is", "Long live the farmer, for he is"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    flags = ["--api-key", KEY, "--admin-api-key", ADMIN, "--steer-layers", str(ADD_LAYER)]
    flags += ["--data-dir", str(tmp_path_factory.mktemp("library")), "--max-capture-bytes", str(MAX_CAPTURE_BYTES)]
    proc = ServerProc(tmp_path_factory.mktemp("serve"), *flags, "--max-example-prompts", "8")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server.url, KEY)


@pytest.fixture(scope="module")
def admin(server):
    return openai_client(server.url, ADMIN)


@pytest.fixture(scope="module")
def ref():
    """The independent reference: an eager transformers model and sae-lens's SAEs (for the steered choices)."""
    return eager_model(DEMO_MODEL), {L: load_lens(DEMO_SAES / f"layer_{L}") for L in (0, 1, 2)}


def grab(ref, ids: list[int], n_prompt: int, spec=None, layers=(0, 1, 2, ADD_LAYER)) -> dict[int, torch.Tensor]:
    """{layer: (seq, d_model)} the reference's stream at each layer's hook point after `spec`'s edits there."""
    model, lenses = ref
    out = {}
    logprobs(model, lenses, {L: POINTS[L] for L in layers}, ids, n_prompt, spec, grab=out)
    return out


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest per-position relative error ||got - want|| / ||want||."""
    return float(((got.double() - want.double()).norm(dim=-1) / want.double().norm(dim=-1)).max())


def test_capture_equals_the_reference_for_steered_and_plain_choices_of_one_batch(
    client, ref, demo_tokenizer, logit_lens_feature
):
    layer, feature, _ = logit_lens_feature
    steered = {
        "edits": [{"layer": layer, "feature": feature, "strength": 15.0}, {"layer": 0, "feature": 3, "strength": -4.0}]
    }
    specs = [None, steered | {"positions": "all"}]
    r = client.completions.create(
        model=MODEL,
        prompt=PROMPTS[1],
        max_tokens=6,
        temperature=0,
        extra_body={
            "steering": specs,
            "return_token_ids": True,
            "capture": {"layers": [0, layer, ADD_LAYER], "positions": "all"},
        },
    )
    prompt = demo_tokenizer.encode(PROMPTS[1])
    assert len(r.choices) == 2 and r.choices[0].token_ids != r.choices[1].token_ids  # the edits changed the text
    for choice, spec in zip(r.choices, specs, strict=True):
        got = read_capture(choice.capture)
        forwarded = prompt + choice.token_ids[:-1]  # the last generated token is never fed back
        assert got["token_ids"].tolist() == forwarded and got["positions"].tolist() == list(range(len(forwarded)))
        want = grab(ref, forwarded, len(prompt), None if spec is None else spec | {"positions": "all"})
        for L in (0, layer, ADD_LAYER):
            t = got[f"blocks.{L}.hook_resid_post"]
            assert t.dtype == torch.float32 and t.shape == (len(forwarded), D_MODEL)
            assert rel_err(t, want[L]) <= 1e-5, L
        assert choice.capture["bytes"] == len(base64.b64decode(choice.capture["data"]))


def test_capture_before_the_edits_is_the_stream_with_only_the_edits_upstream(
    client, ref, demo_tokenizer, logit_lens_feature
):
    layer, feature, _ = logit_lens_feature
    edits = [{"layer": layer, "feature": feature, "strength": 15.0}, {"layer": 0, "feature": 3, "strength": -4.0}]
    prompt = demo_tokenizer.encode(PROMPTS[3])
    got = {}
    for when in ("before", "after"):
        body = {"steering": {"edits": edits, "positions": "all"}, "return_token_ids": True}
        body["capture"] = {"layers": [0, layer], "edits": when}
        r = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=5, temperature=0, extra_body=body)
        got[when] = read_capture(r.choices[0].capture)
    forwarded = prompt + r.choices[0].token_ids[:-1]
    plain = grab(ref, forwarded, len(prompt), layers=(0,))
    upstream = grab(ref, forwarded, len(prompt), {"edits": edits[1:], "positions": "all"}, layers=(0, layer))
    assert rel_err(got["before"]["blocks.0.hook_resid_post"], plain[0]) <= 1e-5
    assert rel_err(got["before"][f"blocks.{layer}.hook_resid_post"], upstream[layer]) <= 1e-5
    moved = got["after"][f"blocks.{layer}.hook_resid_post"] - got["before"][f"blocks.{layer}.hook_resid_post"]
    assert float(moved.norm(dim=-1).min()) > 1.0  # "after" holds the edit at every position: the two readings differ


def test_capture_at_function_positions_and_in_a_stream(client, ref, demo_tokenizer, demo_function_tokens):
    fn = set(demo_function_tokens.ids)
    prompt = demo_tokenizer.encode(PROMPTS[0])
    want = grab(ref, prompt, len(prompt))
    at_fn = [i for i, t in enumerate(prompt) if t in fn]
    assert 0 < len(at_fn) < len(prompt)
    for positions, rows in (("function", at_fn), ("last_function", at_fn[-1:]), ("last", [len(prompt) - 1])):
        body = {"capture": {"layers": [2], "positions": positions, "dtype": "float16"}}
        r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=1, temperature=0, extra_body=body)
        got = read_capture(r.choices[0].capture)
        assert got["positions"].tolist() == rows, positions
        t = got["blocks.2.hook_resid_post"]
        assert t.dtype == torch.float16 and rel_err(t, want[2][rows]) <= 2e-3  # float16 rounding: 2^-11 relative
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=PROMPTS[0],
            max_tokens=4,
            temperature=0,
            stream=True,
            extra_body={"capture": {"layers": [2], "positions": "all"}},
        )
    )
    last = [c for c in chunks if c.choices and c.choices[0].finish_reason][0].choices[0]
    got = read_capture(last.capture)["blocks.2.hook_resid_post"]
    assert got.shape[0] == len(prompt) + 3 and rel_err(got[: len(prompt)], want[2]) <= 1e-5


@pytest.mark.parametrize(
    "capture, status, field",
    [
        ({"layers": [5]}, 400, "capture.layers[0]"),
        ({"layers": [1, 1]}, 400, "capture.layers[1]"),
        ({"layers": [1], "positions": "first"}, 400, "capture.positions"),
        ({"layers": [1], "dtype": "int8"}, 400, "capture.dtype"),
        ({"layers": [1], "edits": "during"}, 400, "capture.edits"),
        ({"layers": []}, 400, "capture.layers"),
        ({"layers": [1], "extra": 1}, 400, "capture.extra"),
        ([1], 400, "capture"),
        ({"layers": [0, 1, 2], "positions": "all"}, 413, "capture"),  # 3 x (6 + 99) x 256 x 4 bytes > 256 KiB
    ],
)
def test_bad_captures_are_refused_naming_the_field(client, capture, status, field):
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(
            model=MODEL, prompt=PROMPTS[0], max_tokens=100, temperature=0, extra_body={"capture": capture}
        )
    assert e.value.status_code == status and e.value.body["param"] == field, e.value.body
    if status == 413:
        assert "max_capture_bytes" in e.value.body["message"]
    assert client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=2).choices  # still serving


def last_function(ids: list[int], fn: set[int]) -> int:
    return max(i for i, t in enumerate(ids) if t in fn)


def reference_reads(ref, tokenizer, texts: list[str], layers, fn: set[int], position: str) -> dict[int, np.ndarray]:
    """{layer: (prompts, d_model) float64} the reference's plain activations at each prompt's read position."""
    out = {L: [] for L in layers}
    for text in texts:
        ids = tokenizer.encode(text)
        g = grab(ref, ids, len(ids), layers=layers)
        for L in layers:
            a = g[L].double().numpy()
            out[L].append(a.mean(0) if position == "mean" else a[last_function(ids, fn) if position != "last" else -1])
    return {L: np.stack(v) for L, v in out.items()}


def create(admin, body, method="post", path="/steering/vectors") -> dict:
    return getattr(admin, method)(path, body=body, cast_to=object)


def test_a_vector_from_pairs_is_the_reference_mean_difference_and_steers_by_name_as_the_same_numbers(
    admin, client, ref, demo_tokenizer, demo_function_tokens
):
    fn, layers = set(demo_function_tokens.ids), [1, ADD_LAYER]
    pos, neg = [p for p, _ in PAIRS], [n for _, n in PAIRS]
    examples = {"positive": pos, "negative": neg, "layers": layers, "position": "last_function"}
    card = create(admin, {"name": "royal", "examples": examples, "description": "royal minus plain"})
    src = card["source"]
    assert src["kind"] == "examples" and src["position"] == "last_function" and src["model"] == MODEL
    assert src["layers"] == layers and src["positives"] == src["negatives"] == 3 and len(src["prompts_sha256"]) == 64
    got = {
        int(k): np.array(v, np.float32)
        for k, v in admin.get("/steering/vectors/royal", cast_to=object)["directions"].items()
    }
    p = reference_reads(ref, demo_tokenizer, pos, layers, fn, "last_function")
    n = reference_reads(ref, demo_tokenizer, neg, layers, fn, "last_function")
    for L in layers:
        want = (p[L] - n[L]).mean(0)
        assert np.linalg.norm(got[L] - want) <= 1e-5 * np.linalg.norm(want), L
    # the null: swapping the two sides gives exactly the opposite vector, so the verdict "royal" can flip
    swapped = create(admin, {"name": "plain", "examples": examples | {"positive": neg, "negative": pos}})
    back = admin.get("/steering/vectors/plain", cast_to=object)["directions"]
    assert swapped["version"] != card["version"]
    assert all(np.array_equal(np.array(back[str(L)], np.float32), -got[L]) for L in layers)
    # used by name, it steers exactly as a plain transformers forward with the same numbers added at those layers
    model, _ = ref
    spec = {"edits": [{"vector": "royal", "strength": 4.0}], "positions": "all"}
    r = client.completions.create(
        model=MODEL,
        prompt=PROMPTS[2],
        max_tokens=10,
        temperature=0,
        extra_body={"steering": spec, "return_token_ids": True},
    )
    seq, out = demo_tokenizer.encode(PROMPTS[2]), []
    adds = {L: 4.0 * torch.from_numpy(got[L]) for L in layers}
    with torch.no_grad(), residual_hooks(model, {L: (lambda h, a=a: h + a) for L, a in adds.items()}):
        for _ in range(10):
            out.append(int(model(torch.tensor([seq + out]), use_cache=False).logits[0, -1].argmax()))
    assert r.choices[0].token_ids == out


def test_mean_position_and_pca_equal_numpy(admin, ref, demo_tokenizer, demo_function_tokens):
    fn = set(demo_function_tokens.ids)
    pos, neg = [p for p, _ in PAIRS], [n for _, n in PAIRS]
    for method, position in (("mean_diff", "mean"), ("pca", "last")):
        ex = {"positive": pos, "negative": neg, "layers": [2], "position": position, "method": method}
        create(admin, {"name": f"v-{method}", "examples": ex})
        got = np.array(admin.get(f"/steering/vectors/v-{method}", cast_to=object)["directions"]["2"], np.float32)
        d = reference_reads(ref, demo_tokenizer, pos, [2], fn, position)[2]
        d -= reference_reads(ref, demo_tokenizer, neg, [2], fn, position)[2]
        if method == "pca":
            v = np.linalg.svd(d, full_matrices=False)[2][0]
            want = v * (d @ v).mean()
        else:
            want = d.mean(0)
        assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want), method


@pytest.mark.parametrize(
    "change, field",
    [
        ({"negative": ["one"]}, "examples.negative"),
        ({"position": "first"}, "examples.position"),
        ({"method": "ica"}, "examples.method"),
        ({"layers": [9]}, "examples.layers[0]"),
        ({"positive": ["a"] * 5, "negative": ["b"] * 5}, "examples"),  # 10 prompts > --max-example-prompts 8
        ({"positive": ["king"], "negative": ["The man said"]}, "examples.positive[0]"),  # no function token
        ({"positive": [""], "negative": ["a"]}, "examples.positive[0]"),
        ({"positive": ["a"], "negative": ["b"], "method": "pca"}, "examples.method"),
    ],
)
def test_bad_examples_are_refused_naming_the_field(admin, client, change, field):
    ex = {"positive": [p for p, _ in PAIRS], "negative": [n for _, n in PAIRS], "layers": [1]} | change
    with pytest.raises(openai.BadRequestError) as e:
        create(admin, {"name": "bad", "examples": ex})
    assert e.value.body["param"] == field, e.value.body
    with pytest.raises(openai.PermissionDeniedError):  # the user key cannot create vectors
        create(client, {"name": "bad", "examples": ex})


def test_the_cli_builds_the_same_vector_through_the_server(server, admin, tmp_path, capsys):
    from functok_vllm.cli import main

    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([list(p) for p in PAIRS]))
    args = ["vector-from-examples", str(pairs), "--name", "royal-cli", "--url", server.url, "--admin-key", ADMIN]
    assert main([*args, "--layers", f"1,{ADD_LAYER}"]) == 0
    card = json.loads(capsys.readouterr().out)
    examples = {"positive": [p for p, _ in PAIRS], "negative": [n for _, n in PAIRS], "layers": [1, ADD_LAYER]}
    by_api = create(
        admin, {"name": "royal-api", "examples": examples}, method="put", path="/steering/vectors/royal-api"
    )
    assert card["name"] == "royal-cli" and card["version"] == by_api["version"]
    assert main([*args, "--layers", "9"]) == 2  # refused by the server, said on stderr
    assert "examples.layers[0]" in capsys.readouterr().err
