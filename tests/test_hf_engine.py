"""The transformers engine in-process: greedy output, steering, isolation inside the dynamic batch, sampling, abort."""

import asyncio
import time
from dataclasses import dataclass

import pytest
import torch
from helpers import PROMPTS

from functok_vllm.core import POLICY_CODES, SteeringTable, StepIndex, build_slot_index
from functok_vllm.engines.base import Delta, EngineFull, EngineStopped, GenerateRequest, RequestError, SamplingParams
from functok_vllm.engines.hf.engine import HFEngine, HFEngineConfig
from functok_vllm.engines.placement import decoder_layers, residual_hooks
from functok_vllm.paths import DEMO_FUNCTION_TOKENS, DEMO_MODEL, DEMO_SAES
from functok_vllm.steering import SteeringSpec

SAE_DIRS = sorted(DEMO_SAES.glob("layer_*"))


@pytest.fixture(scope="module")
def engine():
    eng = HFEngine(HFEngineConfig(DEMO_MODEL, SAE_DIRS, DEMO_FUNCTION_TOKENS, max_running=8))
    asyncio.run(eng.start())
    yield eng
    asyncio.run(eng.shutdown())


@dataclass
class Out:
    ids: list[int]
    text: str
    last: Delta


_n = 0


async def agenerate(engine, prompt, spec=None, **sampling) -> Out:
    global _n
    _n += 1
    params = SamplingParams(**({"temperature": 0, "max_tokens": 20} | sampling))
    ids, text, last = [], "", None
    async for d in engine.generate(GenerateRequest(f"t{_n}", engine.encode(prompt), params, spec)):
        ids, text, last = ids + d.token_ids, text + d.text, d
    return Out(ids, text, last)


def generate(engine, prompt, spec=None, **sampling) -> Out:
    return asyncio.run(agenerate(engine, prompt, spec, **sampling))


def spec(*edits, positions="function") -> SteeringSpec:
    return SteeringSpec.from_dict({"edits": list(edits), "positions": positions})


def hf_generate(model, tokenizer, prompt, n=20) -> list[int]:
    ids = torch.tensor([tokenizer.encode(prompt)])
    out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return out[0, ids.shape[1] :].tolist()


def test_unsteered_greedy_matches_model_generate(engine, demo_model, demo_tokenizer):
    for prompt in PROMPTS[:3]:
        out = generate(engine, prompt)
        assert out.ids == hf_generate(demo_model, demo_tokenizer, prompt)
        assert out.text == demo_tokenizer.decode(out.ids, skip_special_tokens=True)
        assert (
            out.last.finish_reason == "length" and out.last.completion_tokens == 20 and out.last.steered_positions == 0
        )


def test_steered_matches_generate_with_a_global_hook(
    engine, demo_model, demo_tokenizer, demo_saes, demo_function_tokens, logit_lens_feature
):
    """The research path (model.generate + one global hook, slots from the core's build_slot_index) agrees."""
    layer, feature, _ = logit_lens_feature
    s = spec({"layer": layer, "feature": feature, "strength": 15.0})
    prompt = PROMPTS[0]
    n = len(demo_tokenizer.encode(prompt))
    fn_mask = demo_function_tokens.mask(len(demo_tokenizer))
    table = SteeringTable({layer: demo_saes[layer]}, max_slots=2, max_clamps=1, max_tokens=64)
    slot = table.acquire(s)
    seen = [0]

    def set_slots(_module, _args, kwargs):  # before each forward of generate: slots for the tokens it holds
        ids = kwargs["input_ids"][0]
        step = StepIndex(
            input_ids=ids,
            positions=torch.arange(seen[0], seen[0] + len(ids)),
            req=torch.zeros(len(ids), dtype=torch.long),
            slot=torch.tensor([slot]),
            policy=torch.tensor([POLICY_CODES["function"]]),
            prompt_len=torch.tensor([n]),
            last_fn=torch.tensor([-1]),
        )
        table.set_slot_index(build_slot_index(step, fn_mask))
        seen[0] += len(ids)

    handle = demo_model.register_forward_pre_hook(set_slots, with_kwargs=True)
    try:
        with residual_hooks(demo_model, {layer: table.layers[layer]}):
            want = hf_generate(demo_model, demo_tokenizer, prompt)
    finally:
        handle.remove()
    out = generate(engine, prompt, s)
    assert out.ids == want
    assert out.ids != generate(engine, prompt).ids


def test_isolation_mixed_steering_and_sampling(engine, logit_lens_feature):
    """Each request returns exactly the tokens it returns alone, whatever shares its decode steps."""
    layer, feature, _ = logit_lens_feature
    cases = [
        (None, {}),
        (spec({"layer": layer, "feature": feature, "strength": 15.0}), {}),
        (spec({"layer": 1, "feature": 77, "mode": "clamp", "value": 3.0}, positions="all"), {"max_tokens": 12}),
        (
            spec({"layer": 2, "feature": 5, "strength": 20.0}, positions="last_function"),
            {"temperature": 1.0, "seed": 1},
        ),
        (None, {"temperature": 0.8, "top_p": 0.9, "seed": 2, "max_tokens": 28}),
        (spec({"layer": 0, "feature": 9, "mode": "ablate"}, {"layer": 2, "feature": feature, "strength": -8.0}), {}),
    ]
    alone = [generate(engine, p, s, **kw).ids for p, (s, kw) in zip(PROMPTS, cases, strict=True)]
    before = engine.stats()

    async def together():
        return await asyncio.gather(*(agenerate(engine, p, s, **kw) for p, (s, kw) in zip(PROMPTS, cases, strict=True)))

    batched = [o.ids for o in asyncio.run(together())]
    after = engine.stats()
    assert batched == alone
    rows, steps = after["decode_rows"] - before["decode_rows"], after["decode_steps"] - before["decode_steps"]
    assert rows > steps  # some decode steps really held several requests


def test_steered_positions_per_policy_and_add_zero_changes_nothing(engine, demo_tokenizer, demo_function_tokens):
    prompt = PROMPTS[4]
    base = generate(engine, prompt)
    ids = demo_tokenizer.encode(prompt)
    fed = torch.tensor(ids + base.ids[:-1])  # every token that went through the model as an input
    is_fn = demo_function_tokens.mask(len(demo_tokenizer))[fed]
    want = {
        "function": int(is_fn.sum()),
        "content": int((~is_fn).sum()),
        "prompt": len(ids),
        "generated": len(base.ids) - 1,
        "all": len(fed),
        "last_function": 1,
    }
    for positions, n in want.items():
        out = generate(engine, prompt, spec({"layer": 2, "feature": 100, "strength": 0.0}, positions=positions))
        assert out.ids == base.ids
        assert out.last.steered_positions == n, positions


def test_top_p_tiny_is_greedy_and_seed_reproduces(engine):
    greedy = generate(engine, PROMPTS[1]).ids
    assert generate(engine, PROMPTS[1], temperature=1.0, top_p=1e-6).ids == greedy
    a = generate(engine, PROMPTS[1], temperature=1.0, seed=1234).ids
    assert generate(engine, PROMPTS[1], temperature=1.0, seed=1234).ids == a


def test_stop_string_and_max_tokens(engine):
    full = generate(engine, PROMPTS[2], max_tokens=30)
    stop = full.text.split()[4]  # a word in the middle of the completion
    cut = generate(engine, PROMPTS[2], max_tokens=30, stop=(stop, "zzzz"))
    assert cut.text == full.text[: full.text.index(stop)]
    assert cut.last.finish_reason == "stop" and cut.last.completion_tokens < 30
    short = generate(engine, PROMPTS[2], max_tokens=5)
    assert short.last.finish_reason == "length" and short.ids == full.ids[:5]


def test_requests_that_cannot_run_are_refused(engine):
    with pytest.raises(RequestError, match="context"):
        generate(engine, "word " * 600)
    with pytest.raises(RequestError, match="steering.edits\\[0\\].layer"):
        generate(engine, PROMPTS[0], spec({"layer": 3, "feature": 1, "strength": 1.0}))


def test_closing_the_stream_aborts_and_frees_the_place(engine):
    async def go():
        s = spec({"layer": 1, "feature": 3, "strength": 4.0})
        params = SamplingParams(0, max_tokens=400)
        gen = engine.generate(GenerateRequest("to-abort", engine.encode(PROMPTS[0]), params, s))
        for _ in range(3):
            await anext(gen)
        assert engine.num_running == 1
        await gen.aclose()
        deadline = time.monotonic() + 30
        while (engine.num_running or engine.batcher.table.slots_in_use) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    asyncio.run(go())
    assert engine.num_running == 0 and engine.num_waiting == 0
    assert engine.batcher.table.slots_in_use == 0


def test_full_engine_refuses_and_shutdown_removes_hooks():
    eng = HFEngine(
        HFEngineConfig(DEMO_MODEL, SAE_DIRS[:1], DEMO_FUNCTION_TOKENS, max_running=1, max_waiting=0, warmup=False)
    )

    async def go():
        await eng.start()
        params = SamplingParams(0, max_tokens=400)
        gen = eng.generate(GenerateRequest("long", eng.encode(PROMPTS[0]), params))
        await anext(gen)
        # hooks are temporary: placed for a forward that steers or reads features, removed after it (an unsteered
        # request's forwards get none)
        assert sum(len(layer._forward_hooks) for layer in decoder_layers(eng.model)) == 0
        with pytest.raises(EngineFull):
            await anext(eng.generate(GenerateRequest("second", eng.encode(PROMPTS[1]), params)))
        await eng.shutdown()
        last = None
        async for d in gen:
            last = d
        with pytest.raises(EngineStopped):
            await anext(eng.generate(GenerateRequest("late", eng.encode(PROMPTS[1]), params)))
        return last

    last = asyncio.run(go())
    assert last.finish_reason == "abort"
    assert sum(len(layer._forward_hooks) + len(layer._forward_pre_hooks) for layer in decoder_layers(eng.model)) == 0
    assert all(not layer._forward_hooks for layer in decoder_layers(eng.model))
