"""The generation API (issue 15) on a real `functok serve`, with each engine (transformers; vLLM, eager), driven with
the official openai client as a user would: logprobs and prompt scores against the independent reference
(`reference.py`: a plain transformers forward with the edits applied by hooks), a list of specs against the same specs
one at a time, n with seed, the features that fired against sae-lens's own `encode` of the tensor at each hook point,
vLLM's sampling extensions against independent references, bad values, and `vllm bench serve`.

Compiled vLLM and other families (every hook point, four architectures) are covered in test_vllm_hook_points.py and
test_hook_points.py.
"""

import json
import subprocess
import sys

import httpx
import pytest
import torch
from helpers import ServerProc, is_error_body, openai_client
from reference import check_features, eager_model, load_lens, logprobs

from functok_vllm.core import SAE
from functok_vllm.engines.vllm.available import vllm_status
from functok_vllm.paths import DEMO_MODEL, DEMO_SAES

MODEL = "functok-tiny"
PROMPTS = [
    "At the levee Prince Andrew stood among the Austrian officers, and the Emperor merely nodded to him with his",
    "The old soldier walked slowly along the river towards the town, thinking of the war and of his son",
]
TOL = 1e-3  # float32 log-probabilities against the reference (measured: ~1e-5)
ADD = {"edits": [{"layer": 2, "feature": 1493, "strength": 40.0}], "positions": "all"}
CLAMP = {"edits": [{"layer": 1, "feature": 77, "mode": "clamp", "value": 6.0}], "positions": "all"}
BOTH = {"edits": ADD["edits"] + CLAMP["edits"], "positions": "all"}
FLAGS = ["--max-choices", "16", "--max-feature-values", "40000", "--max-model-len", "256"]
NO_VLLM = None if vllm_status().ok else vllm_status().line()


@pytest.fixture(scope="module", params=["hf", "vllm"])
def server(request, tmp_path_factory):
    if request.param == "vllm" and NO_VLLM:
        pytest.skip(NO_VLLM)
    args = FLAGS if request.param == "hf" else [*FLAGS, "--engine", "vllm"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_TARGET_DEVICE", "cpu")
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        mp.setenv("FUNCTOK_VLLM_ARGS", json.dumps({"enforce_eager": True, "max_num_seqs": 8}))
        proc = ServerProc(tmp_path_factory.mktemp(request.param), *args)
    proc.engine = request.param
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server.url)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def ref():
    """(model, {layer: sae-lens SAE}, {layer: hook point}) of the independent reference."""
    lenses = {L: load_lens(DEMO_SAES / f"layer_{L}") for L in (0, 1, 2)}
    return eager_model(DEMO_MODEL), lenses, {L: (L, "resid_post") for L in lenses}


def ref_rows(ref, ids, n_prompt, spec, grab=None) -> torch.Tensor:
    model, lenses, points = ref
    return logprobs(model, lenses, points, ids, n_prompt, spec, grab)


def extra(choice, key):
    return choice.model_extra[key]


def close(got: list[float], rows: torch.Tensor, ids: list[int]) -> float:
    want = rows[torch.arange(len(ids)), torch.tensor(ids)]
    err = float((torch.tensor(got) - want).abs().max())
    assert err <= TOL, err
    print(f"logprobs of {len(ids)} tokens vs the reference: max |d| {err:.1e}")
    return err


# ---- logprobs and prompt scoring ----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [None, BOTH], ids=["unsteered", "steered"])
def test_completion_logprobs_with_echo_match_the_reference(client, ref, spec):
    r = client.completions.create(
        model=MODEL,
        prompt=PROMPTS[0],
        max_tokens=6,
        temperature=0,
        logprobs=5,
        echo=True,
        extra_body={"steering": spec, "return_token_ids": True},
    )
    ch = r.choices[0]
    prompt, out = extra(ch, "prompt_token_ids"), extra(ch, "token_ids")
    ids, lp = prompt + out, ch.logprobs
    assert ch.text.startswith(PROMPTS[0]) and len(lp.tokens) == len(ids) == len(lp.text_offset)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    rows = ref_rows(ref, ids, len(prompt), spec)  # (seq - 1, vocab): row t predicts ids[t + 1]
    close(lp.token_logprobs[1:], rows, ids[1:])
    for t in range(1, len(ids)):  # the 5 most likely (plus the chosen one when it is not among them)
        top = sorted(lp.top_logprobs[t].values(), reverse=True)[:5]
        assert torch.allclose(torch.tensor(top), rows[t - 1].topk(5).values, atol=TOL), t
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == len(out) == 6
    if spec is not None:
        assert extra(ch, "steering")["steered_positions"] == len(ids) - 1
        assert float((rows[-1] - ref_rows(ref, ids, len(prompt), None)[-1]).abs().max()) > 0.1  # it moved


def test_chat_logprobs_match_the_reference(client, ref, demo_tokenizer):
    messages = [{"role": "user", "content": PROMPTS[1]}]
    r = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"steering": ADD, "return_token_ids": True},
    )
    ch = r.choices[0]
    text = demo_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt, out = demo_tokenizer.encode(text, add_special_tokens=False), extra(ch, "token_ids")
    rows = ref_rows(ref, prompt + out, len(prompt), ADD)[len(prompt) - 1 :]
    content = ch.logprobs.content
    assert [c.token for c in content] == [demo_tokenizer.decode([t]) for t in out]
    assert [bytes(c.bytes).decode() for c in content] == [c.token for c in content]
    close([c.logprob for c in content], rows, out)
    for c, row in zip(content, rows, strict=True):
        assert len(c.top_logprobs) == 3
        assert torch.allclose(torch.tensor([t.logprob for t in c.top_logprobs]), row.topk(3).values, atol=TOL)


def test_prompt_scoring_of_a_batch_steered_and_not(client, http, ref, demo_tokenizer):
    """max_tokens 0 with echo: the prompt's own log-probabilities, one choice per prompt (strings or token ids), and
    with a list of specs one choice per (prompt, spec)."""
    r = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=0, echo=True, logprobs=0)
    assert [c.index for c in r.choices] == [0, 1] and [c.text for c in r.choices] == PROMPTS
    for c, p in zip(r.choices, PROMPTS, strict=True):
        ids = demo_tokenizer.encode(p)
        close(c.logprobs.token_logprobs[1:], ref_rows(ref, ids, len(ids), None), ids[1:])
        assert c.finish_reason == "length"
    assert r.usage.completion_tokens == 0
    batch = [demo_tokenizer.encode(p) for p in PROMPTS]
    body = {"model": MODEL, "prompt": batch, "max_tokens": 0, "echo": True, "logprobs": 1, "steering": [None, BOTH]}
    got = http.post("/v1/completions", json=body).json()
    assert [c["index"] for c in got["choices"]] == [0, 1, 2, 3]
    for c in got["choices"]:
        ids, spec = batch[c["index"] // 2], [None, BOTH][c["index"] % 2]
        assert c["text"] == demo_tokenizer.decode(ids)
        assert (c["steering"] is None) == (spec is None)
        close(c["logprobs"]["token_logprobs"][1:], ref_rows(ref, ids, len(ids), spec), ids[1:])


# ---- several specs and samples in one request ----------------------------------------------------------------------


def test_a_list_of_specs_returns_what_each_spec_returns_alone(client, http):
    specs = [None, ADD, CLAMP, {"edits": ADD["edits"], "positions": "last_function"}]
    body = {"return_token_ids": True}
    kw = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0}
    alone = [client.completions.create(**kw, extra_body=body | {"steering": s}) for s in specs]
    both = client.completions.create(**kw, extra_body=body | {"steering": specs})
    assert [c.index for c in both.choices] == list(range(len(specs)))
    assert len({extra(c, "token_ids").__repr__() for c in both.choices}) > 1  # the specs differ
    for c, a in zip(both.choices, alone, strict=True):
        assert (c.text, extra(c, "token_ids")) == (a.choices[0].text, extra(a.choices[0], "token_ids"))
        mine, single = extra(c, "steering"), a.model_extra["steering"]
        if single is not None:  # the applied spec and its steered positions; its source names the list entry
            assert mine.pop("source") == f"steering[{c.index}]" and single.pop("source") == "steering"
        assert mine == single
    assert "steering" not in both.model_extra  # a list: each choice carries its own
    assert both.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    assert both.usage.prompt_tokens == alone[0].usage.prompt_tokens  # one prompt, counted once
    streamed: dict[int, str] = {}
    for chunk in client.completions.create(**kw, stream=True, extra_body={"steering": specs}):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert [streamed[i] for i in range(len(specs))] == [c.text for c in both.choices]


def test_n_with_seed_is_reproducible_and_counts_every_choice(client):
    kw = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 10, "temperature": 1.0, "seed": 7}
    r = client.completions.create(**kw, n=3, extra_body={"return_token_ids": True})
    again = client.completions.create(**kw, n=3, extra_body={"return_token_ids": True})
    ids = [extra(c, "token_ids") for c in r.choices]
    assert ids == [extra(c, "token_ids") for c in again.choices] and len(set(map(tuple, ids))) > 1
    one = client.completions.create(**kw, extra_body={"return_token_ids": True})
    assert extra(one.choices[0], "token_ids") == ids[0]  # sample 0 uses the seed as given
    assert r.usage.completion_tokens == sum(map(len, ids)) and r.usage.prompt_tokens == one.usage.prompt_tokens
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "War"}], n=2, max_tokens=4, temperature=0
    )
    assert [c.index for c in chat.choices] == [0, 1]
    assert chat.choices[0].message.content == chat.choices[1].message.content  # greedy


# ---- the features that fired --------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [None, BOTH], ids=["unsteered", "steered"])
def test_features_match_sae_lens_at_every_position(client, ref, spec):
    feats = {"layers": [0, 1, 2], "top_k": 8, "prompt": True}
    kw = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0}
    body = {"steering": spec, "features": feats, "return_token_ids": True}
    r = client.completions.create(**kw, extra_body=body)
    ch = r.choices[0]
    out, pf, gf = extra(ch, "token_ids"), extra(ch, "prompt_features"), extra(ch, "features")
    n = len(pf)
    prompt = [e["token_id"] for e in pf]
    assert [e["position"] for e in pf] == list(range(n)) and [e["token_id"] for e in gf] == out
    assert [e["position"] for e in gf] == list(range(n - 1, n - 1 + len(out)))  # where each token was predicted
    assert all(list(e["layers"]) == ["0", "1", "2"] and all(len(v) <= 8 for v in e["layers"].values()) for e in gf)
    grabbed = {}
    ref_rows(ref, prompt + out, n, spec, grabbed)
    positions, top1, worst = check_features(pf + gf, grabbed, ref[1])
    assert positions == 3 * len(pf + gf)  # every position fires some feature at every layer here
    print(f"features vs sae-lens: {positions} (position, layer) pairs, top-1 agreement {top1:.4f}, rel err {worst:.1e}")
    chunks = list(client.completions.create(**kw, stream=True, extra_body=body))
    streamed = [e for c in chunks for ch in c.choices for e in ch.model_extra.get("features") or []]
    assert [e["token_id"] for e in streamed] == out
    for c in chunks:  # each chunk carries the features of its own tokens
        for ch in c.choices:
            assert len(ch.model_extra.get("features") or []) == len(ch.model_extra.get("token_ids") or [])
    for a, b in zip(streamed, gf, strict=True):
        for layer in a["layers"]:
            assert [f for f, _ in a["layers"][layer]] == [f for f, _ in b["layers"][layer]]


def test_a_clamp_reads_back_its_value_where_the_feature_fired(client, ref):
    """Clamping feature f to v moves the stream by (v - act) * w_dec[f] (the SAE's reconstruction with f at v, its
    error kept); encoding it again gives pre + (v - act) * (w_enc[f] . w_dec[f]). For a feature whose encoder and
    decoder rows agree (0.99 for the one chosen here; the demo SAEs' median is 0.49) that is about v wherever f
    fired before the clamp (pre = act), and pre + 0.99 v where it did not (pre below its threshold: 18.6-30.4 here)."""
    sae = SAE.load(DEMO_SAES / "layer_1")
    f = int((sae.W_enc.T * sae.W_dec).sum(1).argmax())
    v = 30.0
    spec = {"edits": [{"layer": 1, "feature": f, "mode": "clamp", "value": v}], "positions": "all"}
    body = {"steering": spec, "features": {"layers": [1], "top_k": 8, "prompt": True}, "return_token_ids": True}
    r = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=8, temperature=0, extra_body=body)
    ch = r.choices[0]
    entries = extra(ch, "prompt_features") + extra(ch, "features")
    read = torch.tensor([dict(map(tuple, e["layers"]["1"])).get(f, 0.0) for e in entries])
    n = len(extra(ch, "prompt_features"))
    ids = [e["token_id"] for e in extra(ch, "prompt_features")] + extra(ch, "token_ids")
    after, before = {}, {}
    ref_rows(ref, ids, n, spec, after)
    check_features(entries, after, ref[1])  # what the engine read is sae-lens's encode of the clamped stream
    ref_rows(ref, ids, n, None, before)  # layer 1 before its own clamp: the unsteered stream, same tokens
    fired = ref[1][1].encode(before[1][[e["position"] for e in entries]])[:, f] > 0
    assert fired.sum() >= 3 and (~fired).sum() >= 1
    assert ((read[fired] - v).abs() <= 0.01 * v).all(), read
    thr = float(sae.threshold[f])  # not fired: pre below the threshold, so pre + 0.99 v below v + threshold
    assert ((read[~fired] <= v + thr) & (read[~fired] > 0.5 * v)).all(), read
    print(f"clamp to {v}: read {read[fired].min():.2f}-{read[fired].max():.2f} where f fired, else", read[~fired])


# ---- sampling extensions -------------------------------------------------------------------------------------------


def greedy_reference(model, ids: list[int], n: int, rep=1.0, freq=0.0, pres=0.0) -> list[int]:
    """Greedy tokens with vLLM's penalties, computed here from a plain forward of the whole sequence each step."""
    out = []
    for _ in range(n):
        with torch.no_grad():
            x = model(torch.tensor([ids + out]), use_cache=False).logits[0, -1].float()
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=x.shape[0]).float()
        seen = torch.zeros_like(x, dtype=torch.bool)
        seen[torch.tensor(ids + out)] = True
        x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x) - freq * counts - pres * (counts > 0)
        out.append(int(x.argmax()))
    return out


def test_sampling_extensions_match_independent_references(client, ref, demo_tokenizer):
    model = ref[0]
    ids = demo_tokenizer.encode(PROMPTS[1])
    kw = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 12, "temperature": 0}

    def tokens(**extra_body):
        r = client.completions.create(**kw, extra_body={"return_token_ids": True, **extra_body})
        return extra(r.choices[0], "token_ids"), r.choices[0]

    greedy, _ = tokens()
    assert tokens(repetition_penalty=1.8)[0] == greedy_reference(model, ids, 12, rep=1.8)
    with torch.no_grad():  # transformers' own repetition penalty agrees with the formula above
        hf = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, repetition_penalty=1.8)
    assert hf[0, len(ids) :].tolist() == greedy_reference(model, ids, 12, rep=1.8)
    assert tokens(frequency_penalty=1.5, presence_penalty=0.7)[0] == greedy_reference(model, ids, 12, 1.0, 1.5, 0.7)
    sampled = client.completions.create(**kw | {"temperature": 1.0}, seed=3, extra_body={"top_k": 1})
    assert sampled.choices[0].text == tokens()[1].text  # top_k 1 is greedy
    top = client.completions.create(**kw | {"temperature": 1.0}, seed=3, extra_body={"min_p": 1.0})
    assert top.choices[0].text == sampled.choices[0].text  # so is min_p 1
    stop_id = greedy[3]
    cut, ch = tokens(stop_token_ids=[stop_id])
    assert cut == greedy[: greedy.index(stop_id) + 1] and ch.finish_reason == "stop"
    assert ch.text == demo_tokenizer.decode(cut[:-1])  # the stop token's text is left out ...
    assert tokens(stop_token_ids=[stop_id], include_stop_str_in_output=True)[1].text == demo_tokenizer.decode(cut)
    late, _ = tokens(stop_token_ids=[stop_id], min_tokens=greedy.index(stop_id) + 2)
    assert stop_id not in late[: greedy.index(stop_id) + 2] and len(late) > len(cut)  # ... and banned until min_tokens
    text = tokens()[1].text
    word = text.split()[2]
    assert tokens(stop=[word], include_stop_str_in_output=True)[1].text == text[: text.index(word) + len(word)]
    assert tokens(skip_special_tokens=False)[0] == greedy


# ---- bad values ----------------------------------------------------------------------------------------------------

EDIT = {"layer": 2, "feature": 1, "strength": 1.0}
BAD = [  # (path, change, param)
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/completions", {"logprobs": 21}, "logprobs"),
    ("/v1/completions", {"n": 0}, "n"),
    ("/v1/completions", {"n": 17}, "n"),
    ("/v1/completions", {"features": {"layers": [9]}}, "features.layers[0]"),
    ("/v1/completions", {"features": {"layers": [1], "top_k": 0}}, "features.top_k"),
    ("/v1/completions", {"features": {"layers": [1], "top_k": 65}}, "features.top_k"),
    ("/v1/completions", {"features": {"layers": [1], "topk": 3}}, "features.topk"),
    ("/v1/completions", {"features": {"layers": [0, 1, 2], "top_k": 64}, "max_tokens": 250}, "features"),
    ("/v1/completions", {"steering": [None] * 1000}, "steering"),
    ("/v1/completions", {"steering": [None, {"edits": [EDIT | {"layer": 7}]}]}, "steering[1].edits[0].layer"),
    ("/v1/completions", {"steering": []}, "steering"),
    ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"top_k": -2}, "top_k"),
    ("/v1/completions", {"min_p": 1.5}, "min_p"),
    ("/v1/completions", {"repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/completions", {"stop_token_ids": [99999]}, "stop_token_ids"),
    ("/v1/completions", {"min_tokens": 20, "max_tokens": 4}, "min_tokens"),
    ("/v1/completions", {"repetiton_penalty": 1.0}, "repetiton_penalty"),
    ("/v1/completions", {"prompt": [[1, 2], [1, 99999]]}, "prompt"),
]


@pytest.mark.parametrize("path,change,param", BAD, ids=[b[2] + ":" + json.dumps(b[1])[:40] for b in BAD])
def test_bad_values_are_400s_naming_the_field(http, path, change, param):
    base = {"model": MODEL, "max_tokens": 4}
    base |= {"messages": [{"role": "user", "content": "War"}]} if "chat" in path else {"prompt": "War is"}
    err = is_error_body(http.post(path, json=base | change), 400)
    assert err["param"] == param, err


# ---- vLLM's own load client -----------------------------------------------------------------------------------------


def test_vllm_bench_serve_runs_with_no_failed_request(server, tmp_path):
    if server.engine != "hf":
        pytest.skip("run against the transformers engine here (BENCHMARKS.md has both)")
    if NO_VLLM:
        pytest.skip(NO_VLLM)
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve", "--backend", "openai"]
    cmd += ["--base-url", server.url, "--model", MODEL, "--tokenizer", str(DEMO_MODEL), "--dataset-name", "random"]
    cmd += ["--random-input-len", "16", "--random-output-len", "8", "--num-prompts", "12", "--save-result"]
    cmd += ["--result-dir", str(tmp_path), "--result-filename", "bench.json", "--disable-tqdm"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["completed"] == 12 and result.get("failed", 0) == 0, result
