"""Steering on vLLM: the worker's per-step batch state, the API-process admission hook, and vLLM's greedy tokens
against the transformers engine's, in eager and compiled mode, alone and in mixed batches, under chunked prefill,
preemption and prefix caching (skipped, with the reason, only where `vllm_status()` says vLLM cannot run)."""

import asyncio
import itertools
import json
import os

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import batch_state, steering_llm, worker_stats  # noqa: E402

from functok_vllm.core import POSITIONS, SpecError, Vector  # noqa: E402
from functok_vllm.core.batch import last_function_position  # noqa: E402
from functok_vllm.core.vector import encode_payloads  # noqa: E402
from functok_vllm.engines.base import GenerateRequest, RequestError, SamplingParams  # noqa: E402
from functok_vllm.engines.hf.engine import HFEngine, HFEngineConfig  # noqa: E402
from functok_vllm.engines.placement import residual_hooks  # noqa: E402
from functok_vllm.engines.vllm.admission import PARAM, cache_salt, steering_context  # noqa: E402
from functok_vllm.engines.vllm.available import vllm_status  # noqa: E402
from functok_vllm.engines.vllm.batch_state import BatchSteering  # noqa: E402
from functok_vllm.engines.vllm.settings import VECTORS, from_additional_config  # noqa: E402
from functok_vllm.paths import DEMO_FUNCTION_TOKENS, DEMO_MODEL, DEMO_SAES  # noqa: E402
from functok_vllm.steering import SteeringSpec, parse_steering  # noqa: E402

NO_VLLM = None if vllm_status().ok else vllm_status().line()
needs_vllm = [pytest.mark.vllm, pytest.mark.skipif(NO_VLLM is not None, reason=str(NO_VLLM))]

SAE_DIRS = sorted(DEMO_SAES.glob("layer_*"))
PROMPTS = [
    # 38 tokens, its last function token at 36: 32-token chunks split the prefill before it
    "Once upon a time, there was a little girl who lived in a village near the forest. Every day she walked to "
    "the river and sat on the old stone bridge, watching the water",
    # 26 tokens: decoding crosses into a second 32-token KV block, which a full cache must preempt for
    "The old soldier walked slowly along the river towards the town, thinking of the war and of his son who had gone "
    "to the army",
    "War is",
]
MAX_TOKENS = 10
CHUNK = 32  # the eager engine's max_num_batched_tokens and KV block size


def spec(*edits, positions="function") -> SteeringSpec:
    return SteeringSpec.from_dict({"edits": list(edits), "positions": positions})


def wire(*edits, positions="function") -> str:
    """`extra_args["steering"]` as a client of `vllm serve` writes it: the steering object's JSON text."""
    return json.dumps({"edits": list(edits), "positions": positions})


def xarg(s: SteeringSpec) -> str:
    return json.dumps(s.user_form())


def parse_user_spec(given, cfg):
    """What the admission hook does with a client's spec."""
    return parse_steering(given, PARAM, steering_context(cfg))


# ---- the worker's batch state, on its own ---------------------------------------------------------------------------


@pytest.fixture()
def state(demo_saes, demo_function_tokens):
    return batch_state(demo_saes, demo_function_tokens, max_clamps=8)


def run_step(st: BatchSteering, chunks: list[tuple[str, list[int], int]], pad: int = 3) -> dict[str, list[int]]:
    """One forward: chunks (request id, token ids, first absolute position) in row order, then `pad` padding
    tokens. Returns each row's slot numbers and, under "pad", the padding tokens'."""
    ids = [t for _, toks, _ in chunks for t in toks] + [0] * pad
    pos = [p for _, toks, s in chunks for p in range(s, s + len(toks))] + [0] * pad
    qsl = torch.tensor(list(itertools.accumulate([0] + [len(t) for _, t, _ in chunks])), dtype=torch.int32)
    st.prepare([rid for rid, _, _ in chunks], torch.tensor(ids, dtype=torch.int32), torch.tensor(pos), qsl)
    st.count_applied()  # what the worker does after the forward (none runs here: no spec has `when`)
    got = st.table.slot_index[: len(ids)].tolist()
    out, i = {}, 0
    for rid, toks, _ in chunks:
        out[rid], i = got[i : i + len(toks)], i + len(toks)
    out["pad"] = got[i:]
    return out


@pytest.mark.parametrize("policy", POSITIONS)
def test_chunked_prefill_steers_the_tokens_a_whole_prefill_does(state, demo_tokenizer, policy):
    prompt = demo_tokenizer.encode(PROMPTS[0])
    extra = {"steering": wire({"layer": 2, "feature": 3, "strength": 1.0}, positions=policy)}
    for rid in ("whole", "chunked"):
        state.add_request(rid, prompt, extra)
    state.add_request("plain", prompt, None)
    whole = run_step(state, [("plain", prompt[:5], 0), ("whole", prompt, 0)])
    first = run_step(state, [("chunked", prompt[:CHUNK], 0), ("plain", prompt[5:9], 5)])
    second = run_step(state, [("plain", prompt[9:12], 9), ("chunked", prompt[CHUNK:], CHUNK)])
    assert first["chunked"] + second["chunked"] == whole["whole"]
    assert not any(whole["plain"] + first["plain"] + second["plain"] + whole["pad"] + second["pad"])
    if policy != "generated":
        assert any(whole["whole"])


@pytest.mark.parametrize("policy", ["prompt", "generated", "last_function", "function"])
def test_recomputation_after_preemption_keeps_generated_tokens_generated(state, demo_tokenizer, policy):
    prompt = demo_tokenizer.encode(PROMPTS[1])
    generated = demo_tokenizer.encode(" and the, of a")
    extra = {"steering": wire({"layer": 1, "feature": 9, "strength": 2.0}, positions=policy)}
    state.add_request("r", prompt, extra)
    history = run_step(state, [("r", prompt, 0)])["r"]
    for k, tok in enumerate(generated):  # decode steps: one token each at its absolute position
        history += run_step(state, [("r", [tok], len(prompt) + k)])["r"]
    run_step(state, [])  # preempted: out of the batch, its slot released
    assert state.table.slots_in_use == 0
    recomputed = run_step(state, [("r", prompt + generated, 0)])["r"]  # resumed: prompt and output in one go
    assert recomputed == history
    n, steered = len(prompt), [bool(s) for s in history]
    if policy == "prompt":
        assert all(steered[:n]) and not any(steered[n:])
    if policy == "generated":
        assert not any(steered[:n]) and all(steered[n:])
    if policy == "last_function":
        assert steered.index(True) == last_function_position(prompt, state.fn_mask) and sum(steered) == 1


def test_slots_follow_batch_membership_and_equal_specs_share(state, demo_tokenizer):
    ids = demo_tokenizer.encode(PROMPTS[1])
    a = {"steering": wire({"layer": 0, "feature": 1, "strength": 3.0}, positions="all")}
    b = {"steering": wire({"layer": 1, "feature": 2, "mode": "ablate"}, positions="all")}
    for rid, extra in (("a1", a), ("a2", a), ("b", b), ("u", None)):
        state.add_request(rid, ids, extra)
    out = run_step(state, [("a1", ids[:4], 0), ("u", ids[:4], 0), ("a2", ids[:4], 0), ("b", ids[:4], 0)])
    assert out["a1"] == out["a2"] and len(set(out["a1"])) == 1 and out["a1"][0] != 0
    assert set(out["b"]) == {out["b"][0]} and out["b"][0] not in (0, out["a1"][0])
    assert not any(out["u"] + out["pad"])
    assert state.table.slots_in_use == 2
    state.finish(["a1"])
    run_step(state, [("a2", ids[4:5], 4), ("b", ids[4:5], 4)])
    assert state.table.slots_in_use == 2  # a2 still holds the shared slot
    run_step(state, [("u", ids[4:6], 4)])  # a2 and b not scheduled this step: rows gone, slots released
    assert state.table.slots_in_use == 0 and not state.table.slot_index.any()
    run_step(state, [("b", ids[5:6], 5)])
    assert state.table.slots_in_use == 1 and state.stats()["rejoins"] == 1


def test_a_request_re_added_at_the_same_row_gets_its_new_spec(state, demo_tokenizer):
    ids = demo_tokenizer.encode(PROMPTS[1])
    state.add_request("r", ids, None)
    assert not any(run_step(state, [("r", ids[:4], 0)])["r"])  # unsteered, same rows as the next step
    steer = {"steering": wire({"layer": 0, "feature": 1, "strength": 3.0}, positions="all")}
    state.add_request("r", ids, steer)  # vLLM re-adds it at the same index (a streamed-input update)
    assert all(run_step(state, [("r", ids, 0)])["r"])


def test_a_spec_the_worker_cannot_apply_runs_unsteered(state, demo_tokenizer):
    ids = demo_tokenizer.encode(PROMPTS[2])
    for rid, bad in (("json", "{not json"), ("layer", wire({"layer": 3, "feature": 1, "strength": 1.0}))):
        state.add_request(rid, ids, {"steering": bad})
        assert not any(run_step(state, [(rid, ids, 0)])[rid])
    assert state.stats()["bad_specs"] == 2


# ---- the API-process side: validation and prefix-cache salt ---------------------------------------------------------


@pytest.mark.parametrize(
    "given, field",
    [
        ("{not json", "vllm_xargs.steering"),
        ('{"edits": [{"layer": 7, "feature": 1, "strength": 1}]}', "vllm_xargs.steering.edits[0].layer"),
        ('{"edits": [{"layer": 2, "feature": 99999, "strength": 1}]}', "vllm_xargs.steering.edits[0].feature"),
        ('{"edits": [{"layer": 2, "feature": 1, "strenght": 1}]}', "vllm_xargs.steering.edits[0].strenght"),
        ('{"edits": [], "positions": "everywhere"}', "vllm_xargs.steering.positions"),
        ('{"edits": [{"layer": 2, "feature": 1, "mode": "cap"}]}', "vllm_xargs.steering.edits[0].max"),
        (
            '{"edits": [{"layer": 2, "feature": 1, "mode": "project_out", "value": 1}]}',
            "vllm_xargs.steering.edits[0].value",
        ),
        (
            '{"edits": [{"layer": 2, "feature": 1, "strength": 1, "strength_unit": "x"}]}',
            "vllm_xargs.steering.edits[0].strength_unit",
        ),
        ("[1, 2]", "vllm_xargs.steering"),
    ],
)
def test_admission_rejects_bad_specs_naming_the_field(given, field):
    with pytest.raises(SpecError) as e:
        parse_user_spec(given, from_additional_config({}, str(DEMO_MODEL)))
    assert e.value.field.startswith(field)


def test_admission_canonicalises_and_drops_empty_specs():
    cfg = from_additional_config({}, str(DEMO_MODEL))
    s = parse_user_spec('{"positions": "all", "edits": [{"strength": 2, "feature": 5, "layer": 1}]}', cfg)
    assert s == spec({"layer": 1, "feature": 5, "strength": 2.0}, positions="all")
    assert parse_user_spec(s.key(), cfg) == s  # the wire form parses back to the same spec
    clamp = spec(
        {"layer": 1, "feature": 5, "mode": "clamp", "value": 3.0}, {"layer": 0, "feature": 2, "mode": "ablate"}
    )
    assert parse_user_spec(xarg(clamp), cfg) == clamp
    assert parse_user_spec({"edits": []}, cfg) is None


def test_config_defaults_and_function_token_lookup(tmp_path):
    demo = from_additional_config({}, str(DEMO_MODEL))
    assert sorted(demo.sae_configs) == [0, 1, 2] and demo.function_tokens == DEMO_FUNCTION_TOKENS
    saes = {"saes": [str(SAE_DIRS[1])]}
    assert from_additional_config({"functok": saes}, str(DEMO_MODEL)).function_tokens.parent == DEMO_MODEL
    with pytest.raises(ValueError, match="function_tokens"):  # never the demo's tokens for someone else's SAEs
        from_additional_config({"functok": saes}, str(tmp_path))
    with pytest.raises(ValueError, match="unknown keys"):
        from_additional_config({"functok": {"sae": []}})
    with pytest.raises(ValueError, match="neither an SAE directory"):
        from_additional_config({"functok": {"saes": [str(tmp_path)], "function_tokens": str(DEMO_FUNCTION_TOKENS)}})
    assert not demo.capture_only and demo.sae_dtype is None  # a steering engine unless asked
    cap = from_additional_config({"functok": {"capture_only": True, "sae_dtype": "bfloat16"}}, str(DEMO_MODEL))
    assert cap.capture_only and cap.sae_dtype == "bfloat16"
    for bad, why in [
        ({"capture_only": "yes"}, "capture_only: true or false"),
        ({"capture_only": True, "sae_dtype": "int8"}, "sae_dtype: one of"),
        ({"sae_dtype": "bfloat16"}, "sae_dtype: only with capture_only"),  # a steering engine uses the model's
    ]:
        with pytest.raises(ValueError, match=why):
            from_additional_config({"functok": bad}, str(DEMO_MODEL))


def test_cache_salt_separates_what_is_steered_differently(demo_tokenizer, demo_function_tokens):
    mask = demo_function_tokens.mask(8192)
    long, short = demo_tokenizer.encode(PROMPTS[0]), demo_tokenizer.encode(PROMPTS[0])[:20]
    add = {"layer": 2, "feature": 1, "strength": 4.0}
    salt = lambda s, ids: cache_salt(s, ids, mask, "r")  # noqa: E731
    f = spec(add, positions="function")
    assert salt(f, long) == salt(f, short)  # token-determined: a shared prefix is steered identically
    assert salt(f, long) != salt(spec({**add, "strength": 4.5}), long)
    for policy in ("prompt", "generated", "last_function"):  # depends on the prompt beyond a shared prefix
        assert last_function_position(long, mask) != last_function_position(short, mask)
        assert salt(spec(add, positions=policy), long) != salt(spec(add, positions=policy), short)


# ---- vLLM against the transformers engine ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loop():
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


@pytest.fixture(scope="module")
def cases(demo_model, demo_tokenizer, demo_saes, logit_lens_feature):
    """(prompt ids, specs): every position policy, add/clamp/ablate, layers 0-2; clamps hit active features."""
    prompts = [demo_tokenizer.encode(p) for p in PROMPTS]
    acts = {}
    capture = {i: (lambda h, i=i: acts.__setitem__(i, h.clone())) for i in (0, 1, 2)}  # returns None: no change
    with torch.no_grad(), residual_hooks(demo_model, capture):
        demo_model(torch.tensor([prompts[0]]))
    top = {i: int(demo_saes[i].encode(acts[i]).mean(0).argmax()) for i in (0, 1, 2)}
    layer, feature, _ = logit_lens_feature
    specs = [
        None,
        spec({"layer": layer, "feature": feature, "strength": 12.0}, positions="function"),
        spec(
            {"layer": 1, "feature": 7, "strength": 10.0}, {"layer": 2, "feature": 0, "strength": 6.0}, positions="all"
        ),
        spec({"layer": 1, "feature": top[1], "mode": "clamp", "value": 40.0}, positions="prompt"),
        spec(
            {"layer": 0, "feature": top[0], "mode": "ablate"},
            {"layer": 2, "feature": 0, "strength": 9.0},
            positions="content",
        ),
        spec({"layer": 0, "feature": 11, "strength": 14.0}, positions="generated"),
        spec({"layer": 2, "feature": feature, "strength": 25.0}, positions="last_function"),
    ]
    return prompts, specs


@pytest.fixture(scope="module")
def vector_case(cases):
    """(prompt ids, spec): a steering vector at layer 2 (an SAE's) and layer 3 (add-only, `steer_layers`), bound as
    a server binds a named one."""
    g = torch.Generator().manual_seed(1)
    hooks = {"blocks.2.hook_resid_post": 2, "blocks.3.hook_resid_post": 3}
    v = Vector.make({h: torch.nn.functional.normalize(torch.randn(256, generator=g), dim=0) * 30 for h in hooks})
    named = SteeringSpec.from_dict({"edits": [{"vector": "mix", "strength": 1.5}], "positions": "all"})
    return cases[0][1], SteeringSpec(edits=(named.edits[0].bound(v, v.at(hooks)),), positions="all")  # prompt 1


@pytest.fixture(scope="module")
def reference(cases, vector_case, loop):
    """The transformers engine's (tokens, steered positions) for every (prompt, spec), one request at a time, and for
    the vector case (under "vector")."""
    cfg = HFEngineConfig(DEMO_MODEL, SAE_DIRS, DEMO_FUNCTION_TOKENS, steer_layers=[3], warmup=False)
    hf = HFEngine(cfg)
    loop.run_until_complete(hf.start())
    prompts, specs = cases
    out = {
        (i, j): loop.run_until_complete(collect(hf, f"hf-{i}-{j}", ids, s))
        for (i, ids), (j, s) in itertools.product(enumerate(prompts), enumerate(specs))
    }
    out["vector"] = loop.run_until_complete(collect(hf, "hf-vector", *vector_case))
    assert out["vector"][0] != loop.run_until_complete(collect(hf, "hf-plain", vector_case[0], None))[0]
    loop.run_until_complete(hf.shutdown())
    for j in range(1, len(specs)):  # every spec changes some prompt's output: the parity below means something
        assert any(out[i, j][0] != out[i, 0][0] for i in range(len(prompts))), f"spec {j} changes nothing"
    return out


async def collect(engine, rid, ids, s):
    toks, last = [], None
    async for d in engine.generate(GenerateRequest(rid, ids, SamplingParams(0, max_tokens=MAX_TOKENS), s)):
        toks, last = toks + d.token_ids, d
    return toks, last.steered_positions  # vLLM: what its worker applied (`functok_applied`), not a recount


@pytest.fixture(scope="class")
def eager(loop):
    """functok's vLLM engine (AsyncLLM), eager, prefix caching on; 32-token chunks and KV blocks; 9 KV blocks
    (one is vLLM's null block), so a full batch must preempt."""
    from functok_vllm.engines.vllm.engine import VLLMEngine, VLLMEngineConfig

    args = {"block_size": CHUNK, "num_gpu_blocks_override": 9, "max_num_batched_tokens": CHUNK}
    cfg = VLLMEngineConfig(
        DEMO_MODEL, SAE_DIRS, DEMO_FUNCTION_TOKENS, max_running=16, enforce_eager=True, max_model_len=256
    )
    cfg.engine_args = args | {"enable_prefix_caching": True}
    engine = VLLMEngine(cfg)
    loop.run_until_complete(engine.start())
    yield engine
    loop.run_until_complete(engine.shutdown())


class TestEager:
    pytestmark = needs_vllm

    def test_one_at_a_time_matches_transformers(self, eager, cases, reference, loop):
        prompts, specs = cases
        for (i, ids), (j, s) in itertools.product(enumerate(prompts), enumerate(specs)):
            got = loop.run_until_complete(collect(eager, f"one-{i}-{j}", ids, s))
            assert got == reference[i, j], (i, j, s)

    def test_mixed_batch_with_chunks_and_preemption_matches_transformers(self, eager, cases, reference, loop):
        prompts, specs = cases
        keys = list(itertools.product(range(len(prompts)), range(len(specs))))

        async def all_at_once():
            return await asyncio.gather(*(collect(eager, f"mix-{i}-{j}", prompts[i], specs[j]) for i, j in keys))

        before = loop.run_until_complete(eager.llm.collective_rpc("functok_stats"))[0]
        got = loop.run_until_complete(all_at_once())
        after = loop.run_until_complete(eager.llm.collective_rpc("functok_stats"))[0]
        assert {k: g for k, g in zip(keys, got, strict=True)} == {k: reference[k] for k in keys}
        assert after["resumed"] > before["resumed"], "the 9-block KV cache should have forced preemption"
        assert after["slots_in_use"] == 0 and after["known_steered_requests"] == 0  # all released
        assert after["bad_specs"] == 0 and after["slots_full"] == 0
        # steered_positions above is the worker's own count (functok_applied), read once for every steered request;
        # recomputed after preemption, it still counts each position once, as the transformers engine does
        assert after["applied_kept"] == 0

    def test_prefix_cache_never_mixes_steered_and_unsteered_blocks(self, eager, cases, reference, loop):
        from vllm import SamplingParams as VSP

        prompts, specs = cases
        ids = prompts[0]
        s = spec(*({**e.__dict__, "strength": e.strength + 0.25} for e in specs[1].edits))  # not run before
        assert len(ids) > CHUNK  # at least one full KV block, which prefix caching keeps

        async def run(rid, steering):
            extra = {"steering": xarg(steering)} if steering else None
            params = VSP(temperature=0, max_tokens=MAX_TOKENS, extra_args=extra)
            async for out in eager.llm.generate({"prompt_token_ids": ids}, params, rid):
                final = out
            return list(final.outputs[0].token_ids), final.num_cached_tokens

        plain1, steered1, plain2, steered2 = (
            loop.run_until_complete(run(f"cache-{k}", x)) for k, x in enumerate((None, s, None, s))
        )
        assert plain1[0] == plain2[0] == reference[0, 0][0]
        assert steered1[0] == steered2[0] != plain1[0]
        assert steered1[1] == 0  # the unsteered blocks were cached, but the salt keeps the steered request off them
        assert plain2[1] >= CHUNK and steered2[1] >= CHUNK  # each reuses its own kind's blocks

    def test_engine_rejects_specs_it_cannot_apply(self, eager, cases, loop):
        bad = spec({"layer": 3, "feature": 1, "strength": 1.0})
        with pytest.raises(RequestError, match="steering.edits\\[0\\].layer"):
            loop.run_until_complete(collect(eager, "bad", cases[0][2], bad))


@pytest.fixture(scope="class")
def compiled():
    # an add-only layer (no SAE) in the compiled graph
    llm = steering_llm(DEMO_MODEL, enable_prefix_caching=True, functok={"steer_layers": [3]})
    yield llm
    llm.llm_engine.engine_core.shutdown()


class TestCompiled:
    pytestmark = needs_vllm

    def test_compiled_matches_transformers_alone_and_mixed(self, compiled, cases, reference):
        from vllm import SamplingParams as VSP

        prompts, specs = cases
        keys = list(itertools.product(range(len(prompts)), range(len(specs))))
        xargs = [{"steering": xarg(s)} if s else None for s in specs]
        params = [VSP(temperature=0, max_tokens=MAX_TOKENS, extra_args=xargs[j]) for _, j in keys]
        for (i, j), p in zip(keys[: len(specs)], params, strict=False):  # one prompt alone with every spec
            out = compiled.generate([{"prompt_token_ids": prompts[i]}], p, use_tqdm=False)
            assert list(out[0].outputs[0].token_ids) == reference[i, j][0], (i, j)
        outs = compiled.generate([{"prompt_token_ids": prompts[i]} for i, _ in keys], params, use_tqdm=False)
        assert {k: list(o.outputs[0].token_ids) for k, o in zip(keys, outs, strict=True)} == {
            k: reference[k][0] for k in keys
        }
        stats = worker_stats(compiled)
        assert stats["steered_tokens"] > 0 and stats["slots_in_use"] == 0

    def test_a_vector_at_an_sae_layer_and_an_add_only_layer_matches_transformers(
        self, compiled, vector_case, reference
    ):
        """The directions travel with the request (`extra_args["functok_vectors"]`), alone and beside a plain one."""
        from vllm import SamplingParams as VSP

        ids, s = vector_case
        steered = VSP(
            temperature=0,
            max_tokens=MAX_TOKENS,
            extra_args={"steering": xarg(s), VECTORS: encode_payloads([s.vectors[0].content])},
        )
        plain = VSP(temperature=0, max_tokens=MAX_TOKENS)
        outs = compiled.generate([{"prompt_token_ids": ids}] * 2, [steered, plain], use_tqdm=False)
        assert list(outs[0].outputs[0].token_ids) == reference["vector"][0]
        assert list(outs[1].outputs[0].token_ids) == reference[1, 0][0]
