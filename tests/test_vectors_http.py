"""The steering library over HTTP on a real `functok serve` (transformers engine), driven with the official openai
client: vectors from SAE features steer exactly like the same inline edits; a control-vector GGUF written by the
`gguf` package in llama.cpp's layout steers like the same direction sent raw and like a plain transformers forward
with that direction added by a hook; a stream keeps the vector it started with when the vector is deleted and
replaced under it; presets name vectors; every bad input is a 4xx naming the problem and the server keeps serving;
a restarted server serves the same library. One server for the module (the restart is the last test)."""

import io

import httpx
import numpy as np
import openai
import pytest
import torch
from helpers import PROMPTS, ServerProc, is_error_body, metric, openai_client, write_gguf

from functok_vllm.engines.placement import residual_hooks

KEY, ADMIN = "sk-user-5c1", "sk-admin-9d2"
MODEL = "functok-tiny"
D_MODEL = 256
ADD_LAYER = 3  # no SAE there: --steer-layers
MAX_VECTORS = 8
MAX_VECTOR_BYTES = 48 * 1024
CONFIG = {"presets": {"calm": {"edits": [{"layer": 1, "feature": 77, "mode": "clamp", "value": 4.0}]}}}


def serve(tmp, data_dir, *extra) -> ServerProc:
    flags = ["--api-key", KEY, "--data-dir", str(data_dir), "--steer-layers", str(ADD_LAYER)]
    flags += ["--max-vectors", str(MAX_VECTORS), "--max-vector-bytes", str(MAX_VECTOR_BYTES)]
    return ServerProc(tmp, *flags, *extra, config=CONFIG)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("library")


@pytest.fixture(scope="module")
def server(tmp_path_factory, data_dir):
    proc = serve(tmp_path_factory.mktemp("serve"), data_dir, "--admin-api-key", ADMIN)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server.url, KEY)


@pytest.fixture(scope="module")
def admin(server):
    """The official client with the admin key: the library's routes through its generic `post`/`put`/`delete`."""
    return openai_client(server.url, ADMIN)


def create(admin, body=None, files=None, method="post", path="/steering/vectors") -> dict:
    opts = {"headers": {"Content-Type": "multipart/form-data"}} if files else {}
    return getattr(admin, method)(path, body=body, files=files, cast_to=object, options=opts)


def gguf_bytes(tmp_path, directions: dict[int, np.ndarray], arch="controlvector") -> bytes:
    return write_gguf(tmp_path / "v.gguf", directions, arch)


def complete(client, prompt, steering=None, max_tokens=16, **extra) -> openai.types.Completion:
    body = {"return_token_ids": True, **extra} | ({"steering": steering} if steering is not None else {})
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body=body)


def ids(r) -> list[int]:
    return r.choices[0].token_ids


def direction(seed: int, norm: float) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(D_MODEL).astype(np.float32)
    return (v * (norm / np.linalg.norm(v))).astype(np.float32)


def reference_greedy(model, tokenizer, prompt: str, adds: dict[int, torch.Tensor], n: int) -> list[int]:
    """Greedy tokens of a plain transformers forward of the whole sequence (no KV cache), `adds[layer]` added to the
    output of decoder layer `layer` at every position by a forward hook: what `positions: "all"` means."""
    seq = tokenizer.encode(prompt)
    out = []
    fns = {layer: (lambda h, a=a: h + a) for layer, a in adds.items()}
    with torch.no_grad(), residual_hooks(model, fns):
        for _ in range(n):
            nxt = int(model(torch.tensor([seq + out]), use_cache=False).logits[0, -1].argmax())
            out.append(nxt)
    return out


def test_a_vector_from_features_steers_exactly_like_the_inline_edits(admin, client, logit_lens_feature):
    layer, feature, _ = logit_lens_feature
    features = [{"feature": feature, "strength": 9.0}, {"feature": 5, "strength": -3.5}]
    card = create(admin, {"name": "lens", "layer": layer, "features": features, "description": "a logit-lens word"})
    assert card["name"] == "lens" and [x["layer"] for x in card["layers"]] == [layer] and card["steerable"]
    assert card["source"] == {"kind": "features", "layer": layer, "features": features}
    plain = complete(client, PROMPTS[0])
    for strength in (1.0, 2.0):  # 2.0: a power of two, so strength * (sum) == the sum of the doubled edits, exactly
        inline = [{"layer": layer, "feature": f["feature"], "strength": strength * f["strength"]} for f in features]
        for positions in ("function", "all"):
            by_name = complete(
                client, PROMPTS[0], {"edits": [{"vector": "lens", "strength": strength}], "positions": positions}
            )
            assert ids(by_name) == ids(complete(client, PROMPTS[0], {"edits": inline, "positions": positions}))
            assert ids(by_name) != ids(plain)
            report = by_name.steering["edits"][0]
            assert report == {"mode": "add", "vector": "lens", "version": card["version"], "strength": strength}
            assert by_name.steering["steered_positions"] > 0
    chat = {"model": MODEL, "messages": [{"role": "user", "content": PROMPTS[2]}], "max_tokens": 12, "temperature": 0}
    steer = {"steering": {"edits": [{"vector": "lens", "strength": 1.0}]}}
    chunks = list(client.chat.completions.create(stream=True, extra_body=steer, **chat))
    whole = client.chat.completions.create(extra_body=steer, **chat).choices[0].message.content
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole


def test_a_gguf_control_vector_steers_like_the_same_direction_raw_and_a_plain_forward(
    admin, client, tmp_path, demo_model, demo_tokenizer
):
    dirs = {1: direction(1, 30.0), ADD_LAYER: direction(3, 45.0)}
    data = gguf_bytes(tmp_path, dirs)
    card = create(admin, {"name": "cv", "description": "from llama.cpp"}, files=[("file", ("cv.gguf", data))])
    assert [(x["layer"], x["hook"]) for x in card["layers"]] == [
        (1, "blocks.1.hook_resid_post"),
        (3, "blocks.3.hook_resid_post"),
    ]
    assert card["source"] == {
        "kind": "gguf",
        "filename": "cv.gguf",
        "model_hint": "llama",
        "layer_count": 2,
        "layers": [1, 3],
    }
    raw = create(admin, {"name": "cv-raw", "directions": {str(k): v.tolist() for k, v in dirs.items()}})
    assert raw["version"] == card["version"]  # the same content, so the same version
    got = http_get(admin, "/steering/vectors/cv")
    assert {k: np.array(v, np.float32).tobytes() for k, v in got["directions"].items()} == {
        str(k): v.tobytes() for k, v in dirs.items()
    }
    spec = lambda name: {"edits": [{"vector": name, "strength": 1.0}], "positions": "all"}  # noqa: E731
    steered = ids(complete(client, PROMPTS[1], spec("cv"), max_tokens=12))
    assert steered == ids(complete(client, PROMPTS[1], spec("cv-raw"), max_tokens=12))
    assert steered != ids(complete(client, PROMPTS[1], max_tokens=12))
    adds = {k: torch.from_numpy(v) for k, v in dirs.items()}
    assert steered == reference_greedy(demo_model, demo_tokenizer, PROMPTS[1], adds, 12)
    with pytest.raises(openai.BadRequestError, match="layers=1,3"):  # a layer outside the steerable ones
        create(admin, {"name": "cv-all"}, files=[("file", ("x.gguf", gguf_bytes(tmp_path, dirs | {5: dirs[1]})))])
    picked = create(admin, {"name": "cv-one", "layers": "3"}, files=[("file", ("x.gguf", data))])
    assert [x["layer"] for x in picked["layers"]] == [3]
    for name in ("cv-raw", "cv-one"):
        admin.delete(f"/steering/vectors/{name}", cast_to=object)


def http_get(c: openai.OpenAI, path: str) -> dict:
    return c.get(path, cast_to=object)


def test_deleting_and_replacing_a_vector_under_a_running_stream_keeps_its_version(server, admin, client):
    first = create(admin, {"name": "fading", "directions": {str(ADD_LAYER): direction(7, 40.0).tolist()}})
    spec = {"edits": [{"vector": "fading", "strength": 1.0}], "positions": "all"}
    n = 160
    whole = ids(complete(client, PROMPTS[4], spec, max_tokens=n, ignore_eos=True))
    stream = client.completions.create(
        model=MODEL,
        prompt=PROMPTS[4],
        max_tokens=n,
        temperature=0,
        stream=True,
        extra_body={"steering": spec, "return_token_ids": True, "ignore_eos": True},
    )
    got, last = [], None
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}) as http:
        for chunk in stream:
            got += chunk.choices[0].token_ids or [] if chunk.choices else []
            if len(got) == 1:
                admin.delete("/steering/vectors/fading", cast_to=object)
                new = create(
                    admin,
                    {"directions": {str(ADD_LAYER): direction(8, 40.0).tolist()}},
                    method="put",
                    path="/steering/vectors/fading",
                )
                running = metric(http, "functok:num_requests_running")
            last = chunk
    assert running == 1  # the stream was still generating when its vector was deleted and replaced
    assert got == whole and len(got) == n  # ... and it finished with the version it started with
    assert last.steering["edits"][0]["version"] == first["version"] != new["version"]
    after = complete(client, PROMPTS[4], spec, max_tokens=n, ignore_eos=True)
    assert after.steering["edits"][0]["version"] == new["version"] and ids(after) != whole


def test_presets_name_vectors_and_have_crud(admin, client):
    steering = {"edits": [{"vector": "lens", "strength": 2.0}], "positions": "function"}
    card = create(admin, {"name": "lens2", "steering": steering, "description": "twice"}, path="/steering/presets")
    assert card["source"] == "api" and card["steering"] == steering
    by_preset = complete(client, PROMPTS[3], "lens2")
    assert ids(by_preset) == ids(complete(client, PROMPTS[3], steering)) and by_preset.steering["preset"] == "lens2"
    listed = {p["name"]: p["source"] for p in http_get(client, "/steering/presets")["data"]}
    assert listed == {"calm": "config", "lens2": "api"}
    with pytest.raises(openai.ConflictError, match="used by presets lens2"):
        admin.delete("/steering/vectors/lens", cast_to=object)
    with pytest.raises(openai.ConflictError, match="--config file"):
        create(admin, {"steering": steering}, method="put", path="/steering/presets/calm")
    halved = steering | {"edits": [{"vector": "lens", "strength": 0.5}]}
    assert create(admin, {"steering": halved}, method="put", path="/steering/presets/lens2")["steering"] == halved
    assert ids(complete(client, PROMPTS[3], "lens2")) == ids(complete(client, PROMPTS[3], halved))
    assert "lens2" in client.get("/steering", cast_to=object)["presets"]


BAD_NAME = "1-64 characters: letters, digits, '.', '_' and '-', starting with a letter or a digit"


def bad_inputs(tmp_path):
    """(what, request, status, text the error must show): every bad input of the issue."""
    ok = direction(0, 1.0).tolist()
    nan_body = '{"name": "n", "directions": {"3": [NaN' + ", 0.0" * (D_MODEL - 1) + "]}}"
    big = gguf_bytes(tmp_path, {n: direction(n, 1.0) for n in range(1, 4)}) + b"\0" * MAX_VECTOR_BYTES
    return [
        (
            "dimension",
            {"json": {"name": "w", "directions": {"3": ok[:-1]}}},
            400,
            "255 values; this model's d_model is 256",
        ),
        (
            "gguf dimension",
            {"gguf": {1: direction(0, 1.0)[:128]}},
            400,
            "direction.1 has 128 values; this model's d_model is 256",
        ),
        ("NaN", {"content": nan_body}, 400, "directions.3[0]: Input should be a finite number"),
        ("Inf in a file", {"gguf": {1: np.full(D_MODEL, np.inf, np.float32)}}, 400, "direction.1 holds NaN or Inf"),
        (
            "unknown layer",
            {"json": {"name": "u", "directions": {"2": ok, "7": ok}}},
            400,
            "layer 7 is not steerable here; steerable layers: 0 (blocks.0.hook_resid_post), 1",
        ),
        (
            "no SAE there",
            {"json": {"name": "u", "layer": 3, "features": [{"feature": 1, "strength": 1.0}]}},
            400,
            "no SAE is loaded at layer 3",
        ),
        (
            "feature",
            {"json": {"name": "u", "layer": 2, "features": [{"feature": 2048, "strength": 1.0}]}},
            400,
            "2048 is outside [0, 2048)",
        ),
        ("taken", {"json": {"name": "lens", "directions": {"3": ok}}}, 409, "a vector named 'lens' exists already"),
        ("bad name", {"json": {"name": "no spaces!", "directions": {"3": ok}}}, 400, BAD_NAME),
        ("long name", {"json": {"name": "n" * 65, "directions": {"3": ok}}}, 400, BAD_NAME),
        ("not a control vector", {"gguf": {1: direction(0, 1.0)}, "arch": "llama"}, 400, "not 'controlvector'"),
        (
            "not a file we read",
            {"file": b"%PDF-1.4 not a vector"},
            400,
            "neither a GGUF control vector nor a safetensors",
        ),
        ("too large", {"file": big}, 413, f"the limit is {MAX_VECTOR_BYTES} (--max-vector-bytes)"),
        (
            "both sources",
            {"json": {"name": "b", "layer": 2, "features": [{"feature": 1, "strength": 1.0}], "directions": {"3": ok}}},
            400,
            "give either",
        ),
        (
            "unknown vector",
            {"complete": {"edits": [{"vector": "nope", "strength": 1.0}]}},
            400,
            "no vector named 'nope' (vectors: cv, fading, lens)",
        ),
        (
            "old version",
            {"complete": {"edits": [{"vector": "lens", "strength": 1.0, "version": "0" * 32}]}},
            400,
            "is at version",
        ),
        (
            "vector with a layer",
            {"complete": {"edits": [{"vector": "lens", "strength": 1.0, "layer": 2}]}},
            400,
            "a vector edit takes no 'layer'",
        ),
        (
            "vector strength",
            {"complete": {"edits": [{"vector": "lens", "strength": 1e6}]}},
            400,
            "exceeds the limit of 1000",
        ),
    ]


def test_every_bad_input_is_a_4xx_naming_the_problem_and_the_server_keeps_serving(server, client, tmp_path):
    auth = {"Authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=server.url, headers=auth, timeout=60) as http:
        before = http.get("/v1/steering/vectors").json()["data"]
        for what, req, status, text in bad_inputs(tmp_path):
            if "complete" in req:
                body = {"model": MODEL, "prompt": "The king", "max_tokens": 2, "steering": req["complete"]}
                r = http.post("/v1/completions", json=body)
            elif "json" in req:
                r = http.post("/v1/steering/vectors", json=req["json"])
            elif "content" in req:
                r = http.post(
                    "/v1/steering/vectors", content=req["content"], headers={"Content-Type": "application/json"}
                )
            else:
                data = req.get("file") or gguf_bytes(tmp_path, req["gguf"], req.get("arch", "controlvector"))
                r = http.post("/v1/steering/vectors", data={"name": "f"}, files={"file": ("f.bin", io.BytesIO(data))})
            err = is_error_body(r, status)
            assert text in err["message"], (what, err)
            assert http.get("/health").status_code == 200
        assert http.get("/v1/steering/vectors").json()["data"] == before  # nothing was stored
        # too many vectors: fill the library to --max-vectors, then one more
        have = len(before)
        for i in range(MAX_VECTORS - have):
            assert (
                http.post(
                    "/v1/steering/vectors", json={"name": f"fill{i}", "directions": {"3": direction(i, 1.0).tolist()}}
                ).status_code
                == 201
            )
        err = is_error_body(
            http.post(
                "/v1/steering/vectors", json={"name": "one-more", "directions": {"3": direction(99, 1.0).tolist()}}
            ),
            409,
            "limit_reached",
        )
        assert f"holds {MAX_VECTORS} vectors, the limit (--max-vectors)" in err["message"]
        for i in range(MAX_VECTORS - have):
            assert http.delete(f"/v1/steering/vectors/fill{i}").status_code == 200
        is_error_body(http.delete("/v1/steering/vectors/fill0"), 404, "not_found")
    r = complete(client, PROMPTS[0], {"edits": [{"vector": "lens", "strength": 1.0}]}, max_tokens=4)
    assert r.choices[0].finish_reason == "length"  # and it still serves steered requests


def test_writes_need_the_admin_key_and_reads_the_user_key(server):
    body = {"name": "nobody", "directions": {"3": direction(0, 1.0).tolist()}}
    url = f"{server.url}/v1/steering/vectors"
    is_error_body(httpx.post(url, json=body), 401, "invalid_api_key")
    is_error_body(httpx.post(url, json=body, headers={"Authorization": f"Bearer {KEY}"}), 403, "admin_key_needed")
    is_error_body(httpx.delete(f"{url}/lens", headers={"Authorization": f"Bearer {KEY}"}), 403, "admin_key_needed")
    is_error_body(httpx.get(url), 401, "invalid_api_key")
    for key in (KEY, ADMIN):
        assert httpx.get(url, headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_a_restarted_server_serves_the_same_library(server, client, data_dir, tmp_path):
    """Last in the module: it stops the module's server."""
    vectors = http_get(client, "/steering/vectors")["data"]
    presets = http_get(client, "/steering/presets")["data"]
    cases = [{"edits": [{"vector": v["name"], "strength": 1.0}], "positions": "all"} for v in vectors] + ["lens2"]
    before = [ids(complete(client, PROMPTS[5], c, max_tokens=8)) for c in cases]
    server.stop()
    again = serve(tmp_path, data_dir)  # without --admin-api-key: the library is read-only now
    try:
        c2 = openai_client(again.url, KEY)
        assert http_get(c2, "/steering/vectors")["data"] == vectors and {v["name"] for v in vectors} == {
            "cv",
            "fading",
            "lens",
        }
        assert http_get(c2, "/steering/presets")["data"] == presets
        assert [ids(complete(c2, PROMPTS[5], c, max_tokens=8)) for c in cases] == before
        with pytest.raises(openai.PermissionDeniedError, match="--admin-api-key"):
            c2.delete("/steering/vectors/lens", cast_to=object)
    finally:
        again.stop()
