"""Steering through stock `vllm serve` (worker extension + plugin) and through `functok serve --engine vllm`, each a
real process on loopback driven with the openai client; the spec travels as `vllm_xargs.steering` (a JSON string).
Both serve a steering library (the same data directory, with an add-only layer 3): a named vector gives the
transformers engine's greedy tokens on both."""

import asyncio
import json
import os
import subprocess
import sys

import httpx
import openai
import pytest
from helpers import openai_client
from test_conditional_http import acted_count, demo_reference, gated_edits

from functok_vllm.engines.vllm.available import vllm_status
from functok_vllm.engines.vllm.settings import EXTENSION
from functok_vllm.launch import Server, ServerStartError
from functok_vllm.launch import start as launch_start
from functok_vllm.paths import DEMO_MODEL, DEMO_SAES

NO_VLLM = None if vllm_status().ok else vllm_status().line()
pytestmark = [pytest.mark.vllm, pytest.mark.skipif(NO_VLLM is not None, reason=str(NO_VLLM))]

ENV = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1"}
PROMPT = "The king said to his son, and the"
SPEC = {"edits": [{"layer": 2, "feature": 5, "strength": 20.0}], "positions": "all"}
NAMED = {"edits": [{"vector": "mix", "strength": 1.0}], "positions": "function"}  # layer 2 (an SAE's) and 3 (add-only)
ADD_LAYER, ADMIN = 3, "sk-admin-vllm"
BAD = {  # spec -> the field the 400 names
    '{"edits": [{"layer": 9, "feature": 1, "strength": 1.0}]}': "edits[0].layer",
    '{"edits": [{"layer": 2, "feature": 2048, "strength": 1.0}]}': "edits[0].feature",
    '{"edits": [{"layer": 2, "feature": 1, "strength": 1.0}': "not a valid JSON object",
    '{"edits": [{"layer": 2, "feature": 1, "strenght": 1.0}]}': "strenght",
    '{"edits": [{"layer": 2, "feature": 1, "mode": "clamp"}]}': "needs 'value'",
    '{"edits": [{"layer": 2, "feature": 1, "strength": 1.0}], "positions": {"token_ids": [1, 9000]}}': (
        "steering.positions.token_ids[1]: token id 9000 is outside the vocabulary"
    ),
    '{"edits": [{"layer": 2, "feature": 1, "strength": 1.0}], "positions": {"roles": ["user"]}}': (
        "stock vllm serve does not: use functok serve"
    ),
}
CHAT = [{"role": "system", "content": "Speak as a king."}, {"role": "user", "content": "Tell me of the war."}]


def start(cmd: list[str], log_path, env: dict) -> tuple[subprocess.Popen, str]:
    try:
        srv = launch_start(cmd, log_path, env, timeout_s=300)
    except ServerStartError as e:
        pytest.fail(str(e))
    return srv.proc, srv.url


def stop(proc: subprocess.Popen) -> None:
    Server(proc, "", None).stop()


def complete(client: openai.OpenAI, spec: dict | None, model: str) -> str:
    extra = {"vllm_xargs": {"steering": json.dumps(spec)}} if spec else None
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0, extra_body=extra)
    return r.choices[0].text


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """A steering library directory holding "mix": random directions at layers 2 and 3 (written by the store)."""
    import torch

    from functok_vllm.core.vector import Vector
    from functok_vllm.library.store import Library

    root = tmp_path_factory.mktemp("library")
    g = torch.Generator().manual_seed(0)
    hooks = ("blocks.2.hook_resid_post", "blocks.3.hook_resid_post")
    mix = Vector.make({h: torch.nn.functional.normalize(torch.randn(256, generator=g), dim=0) * 40 for h in hooks})
    Library(root, 256, writer=True).put_vector("mix", mix, {"kind": "directions"})
    return root


@pytest.fixture(scope="module")
def texts(library) -> dict[str, str]:
    """The transformers engine's (unsteered, steered, steered by the named vector) greedy text for PROMPT: what both
    vLLM servers must return."""
    from functok_vllm.engines.base import GenerateRequest, SamplingParams
    from functok_vllm.engines.hf.engine import HFEngine, HFEngineConfig
    from functok_vllm.library.store import Library
    from functok_vllm.paths import DEMO_FUNCTION_TOKENS
    from functok_vllm.steering import SteeringContext, SteeringLimits, SteeringSpec, parse_steering

    async def run() -> dict[str, str]:
        saes = sorted(DEMO_SAES.glob("layer_*"))
        hf = HFEngine(HFEngineConfig(DEMO_MODEL, saes, DEMO_FUNCTION_TOKENS, steer_layers=[ADD_LAYER], warmup=False))
        await hf.start()
        ctx = SteeringContext(hf.steering_info(), SteeringLimits(), Library(library).resolve)
        named = parse_steering(NAMED, "steering", ctx)
        out = {}
        for name, spec in (("plain", None), ("steered", SteeringSpec.from_dict(SPEC)), ("named", named)):
            req = GenerateRequest(name, hf.encode(PROMPT), SamplingParams(0, max_tokens=10), spec)
            out[name] = "".join([d.text async for d in hf.generate(req)])
        await hf.shutdown()
        return out

    out = asyncio.run(run())
    assert len({out["plain"], out["steered"], out["named"]}) == 3
    return out


@pytest.fixture(scope="class")
def stock(tmp_path_factory, library):
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(DEMO_MODEL), "--host", "127.0.0.1"]
    cmd += ["--worker-extension-cls", EXTENSION, "--dtype", "float32", "--max-model-len", "256", "--enforce-eager"]
    cmd += ["--served-model-name", "tiny", "--max-num-seqs", "8"]
    cmd += ["--additional-config", json.dumps({"functok": {"library": str(library), "steer_layers": [ADD_LAYER]}})]
    proc, url = start(cmd, tmp_path_factory.mktemp("vllm") / "serve.log", os.environ | ENV)
    yield openai_client(url, timeout=600)
    stop(proc)


class TestStockVLLMServe:
    def test_steering_changes_the_output_and_leaves_unsteered_requests_alone(self, stock, texts):
        plain = complete(stock, None, "tiny")
        steered = complete(stock, SPEC, "tiny")
        assert steered != plain
        assert complete(stock, None, "tiny") == plain  # same prompt again, after a steered run (prefix cache on)
        assert complete(stock, SPEC, "tiny") == steered
        assert {"plain": plain, "steered": steered} == {k: texts[k] for k in ("plain", "steered")}

    def test_a_named_vector_from_the_library_steers_as_on_the_transformers_engine(self, stock, texts):
        assert complete(stock, NAMED, "tiny") == texts["named"]
        with pytest.raises(openai.BadRequestError, match="no vector named 'nope' \\(vectors: mix\\)"):
            complete(stock, {"edits": [{"vector": "nope", "strength": 1.0}]}, "tiny")
        with pytest.raises(openai.BadRequestError, match="functok_vectors comes with a steering spec only"):
            stock.completions.create(
                model="tiny", prompt=PROMPT, max_tokens=2, extra_body={"vllm_xargs": {"functok_vectors": "{}"}}
            )

    @pytest.mark.parametrize("bad", BAD)
    def test_a_bad_spec_is_a_400_naming_the_problem(self, stock, bad):
        with pytest.raises(openai.BadRequestError) as e:
            stock.completions.create(
                model="tiny", prompt=PROMPT, max_tokens=4, extra_body={"vllm_xargs": {"steering": bad}}
            )
        assert BAD[bad] in str(e.value)

    def test_logprobs_of_a_steered_prompt_are_the_reference_s(self, stock, demo_tokenizer):
        """What vLLM's own protocol carries works for steered requests: echo + logprobs scores the steered model."""
        from reference import eager_model, load_lens, logprobs

        extra = {"vllm_xargs": {"steering": json.dumps(SPEC)}}
        r = stock.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=4, temperature=0, echo=True, logprobs=1, extra_body=extra
        )
        ch = r.choices[0]
        ids = demo_tokenizer.encode(ch.text)
        assert demo_tokenizer.decode(ids) == ch.text and len(ids) == len(ch.logprobs.tokens)
        lenses = {2: load_lens(DEMO_SAES / "layer_2")}
        n = len(demo_tokenizer.encode(PROMPT))
        rows = logprobs(eager_model(DEMO_MODEL), lenses, {2: (2, "resid_post")}, ids, n, SPEC)
        want = rows[range(len(ids) - 1), ids[1:]]
        assert max(abs(g - float(w)) for g, w in zip(ch.logprobs.token_logprobs[1:], want, strict=True)) < 1e-3

    def test_features_are_refused_saying_where_they_work(self, stock):
        with pytest.raises(openai.BadRequestError, match="functok serve --engine vllm"):
            stock.completions.create(
                model="tiny",
                prompt=PROMPT,
                max_tokens=4,
                extra_body={"vllm_xargs": {"functok_features": json.dumps({"layers": [2], "top_k": 3})}},
            )

    def test_chat_completions_are_steered_too(self, stock):
        msgs = [{"role": "user", "content": "Tell me about the king."}]
        out = [
            stock.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0, extra_body=extra)
            .choices[0]
            .message.content
            for extra in ({"ignore_eos": True}, {"ignore_eos": True, "vllm_xargs": {"steering": json.dumps(SPEC)}})
        ]
        assert out[0] != out[1]


@pytest.fixture(scope="class")
def functok_vllm(tmp_path_factory, library):
    cmd = [sys.executable, "-m", "functok_vllm.cli", "serve", "--model", str(DEMO_MODEL), "--engine", "vllm"]
    cmd += ["--max-model-len", "256"]
    cmd += ["--data-dir", str(library), "--steer-layers", str(ADD_LAYER), "--admin-api-key", ADMIN]
    env = os.environ | ENV | {"FUNCTOK_VLLM_ARGS": json.dumps({"enforce_eager": True, "max_num_seqs": 8})}
    proc, url = start(cmd, tmp_path_factory.mktemp("functok") / "serve.log", env)
    yield openai_client(url, timeout=600), url
    stop(proc)


class TestFunctokServeVLLM:
    def test_same_text_as_stock_vllm_and_reports_steered_positions(self, functok_vllm, texts):
        client, url = functok_vllm
        plain = complete(client, None, "functok-tiny")
        steered = complete(client, SPEC, "functok-tiny")
        assert steered != plain
        assert {"plain": plain, "steered": steered} == {k: texts[k] for k in ("plain", "steered")}  # and stock's
        body = {"model": "functok-tiny", "prompt": PROMPT, "max_tokens": 10, "temperature": 0, "steering": SPEC}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
        assert r["choices"][0]["text"] == steered
        n = r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"]
        assert r["steering"]["steered_positions"] == n - 1  # "all": every token that went through the model

    def test_steered_positions_count_where_the_conditions_held(self, functok_vllm, demo_tokenizer):
        """What the worker applied (`functok_applied`) for conditional edits: where a condition held (the same
        independent count as the transformers engine's test), 0 for one that never holds."""
        _, url = functok_vllm
        ref = demo_reference()
        prompt = demo_tokenizer.encode(PROMPT)
        edits = gated_edits(ref, prompt)
        never = [e | {"when": {"feature": 9, "below": 0.0}} for e in edits]  # an activation is never below 0
        got = []
        for steer in (edits, never):
            body = {"model": "functok-tiny", "prompt": PROMPT, "max_tokens": 10, "temperature": 0}
            body |= {"return_token_ids": True, "steering": {"edits": steer, "positions": "all"}}
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
            assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(prompt), r.text
            got.append(r.json())
        seq = prompt + got[0]["choices"][0]["token_ids"]
        want = acted_count(ref, seq, len(prompt), edits)
        assert 0 < want < len(seq) - 1  # neither none nor every position: counting the selector would fail
        assert got[0]["steering"]["steered_positions"] == want, (got[0]["steering"], want)
        assert got[1]["steering"]["steered_positions"] == 0, got[1]["steering"]

    def test_a_condition_that_never_holds_is_unsteered_and_one_that_always_holds_is_the_edit(self, functok_vllm):
        """Exactly, log-probabilities included: a gate that is all zeros adds nothing, one that is all ones adds
        what the plain edit adds (requests one at a time, so each runs in a batch of the same shape)."""
        _, url = functok_vllm
        add = {"layer": 1, "feature": 100, "strength": 8.0}
        runs = {}
        for name, edit in {
            "unsteered": None,
            "plain": add,
            "always": add | {"when": {"feature": 9, "above": -1.0}},  # an activation is never below 0
            "never": add | {"when": {"feature": 9, "below": 0.0}},
        }.items():
            body = {"model": "functok-tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 1}
            body |= {"return_token_ids": True} | ({"steering": {"edits": [edit], "positions": "all"}} if edit else {})
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            c = r.json()["choices"][0]
            runs[name] = (c["token_ids"], c["logprobs"]["token_logprobs"])
        assert runs["never"] == runs["unsteered"] and runs["always"] == runs["plain"]
        assert runs["plain"] != runs["unsteered"]  # the edit moves the model: the two equalities say something

    def test_named_vectors_steer_as_on_the_transformers_engine_and_as_their_inline_edits(self, functok_vllm, texts):
        client, url = functok_vllm
        assert complete(client, NAMED, "functok-tiny") == texts["named"]
        features = [{"feature": 5, "strength": 20.0}]
        r = httpx.post(
            f"{url}/v1/steering/vectors",
            json={"name": "five", "layer": 2, "features": features},
            headers={"Authorization": f"Bearer {ADMIN}"},
            timeout=60,
        )
        assert r.status_code == 201, r.text
        assert (
            complete(client, {"edits": [{"vector": "five", "strength": 1.0}], "positions": "all"}, "functok-tiny")
            == texts["steered"]
        )

    def test_a_bad_spec_is_a_400(self, functok_vllm):
        client, _ = functok_vllm
        with pytest.raises(openai.BadRequestError, match="layer"):
            client.completions.create(
                model="functok-tiny",
                prompt=PROMPT,
                max_tokens=4,
                extra_body={"vllm_xargs": {"steering": next(iter(BAD))}},
            )

    def test_chat_roles_steer_exactly_the_user_s_tokens_and_the_assistant_s(self, functok_vllm, demo_tokenizer):
        """The server's role codes reach the vLLM worker (`extra_args["functok_roles"]`): steered_positions counts the
        user's content tokens, found here as its own tokens in the rendered prompt, or every generated token fed."""
        _, url = functok_vllm
        ids = demo_tokenizer.encode(
            demo_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
        )
        user = demo_tokenizer.encode(CHAT[1]["content"])
        assert any(ids[s : s + len(user)] == user for s in range(len(ids))) and len(user) < len(ids)
        for roles in (["user"], ["assistant"]):
            steering = {"edits": SPEC["edits"], "positions": {"roles": roles}}
            body = {"model": "functok-tiny", "messages": CHAT, "max_tokens": 6, "temperature": 0, "steering": steering}
            r = httpx.post(f"{url}/v1/chat/completions", json={**body, "ignore_eos": True}, timeout=60)
            assert r.status_code == 200, r.text
            want = len(user) if roles == ["user"] else r.json()["usage"]["completion_tokens"] - 1
            assert r.json()["steering"]["steered_positions"] == want, (roles, r.json()["steering"])

    def test_reactivation_scoring_is_a_501_that_says_where_it_runs(self, functok_vllm):
        _, url = functok_vllm
        r = httpx.post(f"{url}/v1/analysis/reactivation", json={"prompts": ["The king said"]}, timeout=60)
        assert r.status_code == 501
        err = r.json()["error"]
        assert err["code"] == "not_implemented" and err["type"] == "not_implemented_error"
        assert "transformers" in err["message"]
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200  # and the server is still serving
