"""Steering on vLLM is never claimed unless applied: the worker counts what it steered, a full clamp pool makes a
request wait (not run unsteered), and the engine honours ignore_eos and refuses work after shutdown (the vLLM tests
skip, with the reason, only where `vllm_status()` says vLLM cannot run)."""

import asyncio
import itertools
import os
from collections import Counter

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import batch_state  # noqa: E402

from functok_vllm.engines.base import EngineStopped, GenerateRequest, RequestError, SamplingParams  # noqa: E402
from functok_vllm.engines.hf.engine import HFEngine, HFEngineConfig  # noqa: E402
from functok_vllm.engines.placement import residual_hooks  # noqa: E402
from functok_vllm.engines.vllm.available import vllm_status  # noqa: E402
from functok_vllm.engines.vllm.batch_state import TAG, BatchSteering  # noqa: E402
from functok_vllm.engines.vllm.engine import ClampBudget  # noqa: E402
from functok_vllm.paths import DEMO_FUNCTION_TOKENS, DEMO_MODEL, DEMO_SAES  # noqa: E402
from functok_vllm.steering import (
    SteeringLimits,  # noqa: E402
    SteeringSpec,  # noqa: E402
)

NO_VLLM = None if vllm_status().ok else vllm_status().line()
needs_vllm = [pytest.mark.vllm, pytest.mark.skipif(NO_VLLM is not None, reason=str(NO_VLLM))]

SAE_DIRS = sorted(DEMO_SAES.glob("layer_*"))
PROMPT = "The old soldier walked slowly along the river towards the town, thinking of the war"
EOS_PROMPT = "War is"  # greedy, functok-tiny ends it with EOS after 13 tokens
LONG = (  # 38 tokens: a full 32-token KV block for the prefix cache to keep
    "Once upon a time, there was a little girl who lived in a village near the forest. Every day she walked to "
    "the river and sat on the old stone bridge, watching the water"
)
BLOCK = 32
POOL = 2  # clamp columns a layer in the engine below (max_clamps = max_edits = 2)


def spec(*edits, positions="all") -> SteeringSpec:
    return SteeringSpec.from_dict({"edits": list(edits), "positions": positions})


def clamp2(f1: int, f2: int) -> SteeringSpec:
    """Two clamp columns at layer 1: a whole pool of POOL."""
    return spec(
        {"layer": 1, "feature": f1, "mode": "clamp", "value": 30.0}, {"layer": 1, "feature": f2, "mode": "ablate"}
    )


# ---- the worker's counters, on their own ----------------------------------------------------------------------------


@pytest.fixture()
def state(demo_saes, demo_function_tokens):
    return batch_state(demo_saes, demo_function_tokens, max_clamps=POOL)


def step(st: BatchSteering, chunks: list[tuple[str, list[int], int]]) -> dict[str, list[int]]:
    """One forward of chunks (request id, token ids, first position) in row order, plus 2 padding tokens: what the
    worker does around it (no model runs: these specs have no `when`, so nothing inside it marks `applied`)."""
    ids = [t for _, toks, _ in chunks for t in toks] + [0, 0]
    pos = [p for _, toks, s in chunks for p in range(s, s + len(toks))] + [0, 0]
    qsl = torch.tensor(list(itertools.accumulate([0] + [len(t) for _, t, _ in chunks])), dtype=torch.int32)
    st.prepare([rid for rid, _, _ in chunks], torch.tensor(ids, dtype=torch.int32), torch.tensor(pos), qsl)
    st.count_applied()
    got, out, i = st.table.slot_index[: len(ids)].tolist(), {}, 0
    for rid, toks, _ in chunks:
        out[rid], i = got[i : i + len(toks)], i + len(toks)
    return out


def test_worker_never_counts_a_request_the_full_table_left_unsteered(state, demo_tokenizer):
    ids = demo_tokenizer.encode(PROMPT)
    full, late = clamp2(1, 2), spec({"layer": 1, "feature": 3, "mode": "ablate"})
    state.add_request("vllm-a", ids, {"steering": full.key(), TAG: "a"})
    state.add_request("vllm-b", ids, {"steering": late.key(), TAG: "b"})
    state.add_request("vllm-u", ids, None)
    first = step(state, [("vllm-a", ids[:5], 0), ("vllm-u", ids[:5], 0)])  # a takes the whole pool
    second = step(state, [("vllm-a", ids[5:], 5), ("vllm-b", ids, 0), ("vllm-u", ids[5:], 5)])
    assert all(first["vllm-a"] + second["vllm-a"]) and not any(second["vllm-b"])
    assert state.stats()["slots_full"] == 1  # stock `vllm serve`: b ran unsteered, logged, and counts nothing
    assert state.applied("a") == len(ids) and state.applied("u") is None  # read while a runs
    state.finish(["vllm-a", "vllm-b"])
    assert state.stats()["applied_kept"] == 1  # b's count, not read yet; a's was read
    assert state.applied("b") == 0 and state.applied("b") is None  # a finished count is read once
    assert state.stats()["applied_kept"] == 0


def test_worker_counts_each_position_once_across_recomputation_and_prefix_cache(state, demo_tokenizer):
    ids, gen = demo_tokenizer.encode(PROMPT), demo_tokenizer.encode(" and the, of a")
    function = spec({"layer": 0, "feature": 4, "strength": 2.0}, positions="function")
    state.add_request("r", ids, {"steering": function.key()})
    history = step(state, [("r", ids, 0)])["r"]
    for k, tok in enumerate(gen):
        history += step(state, [("r", [tok], len(ids) + k)])["r"]
    step(state, [])  # preempted
    assert step(state, [("r", ids + gen, 0)])["r"] == history  # recomputed: steered again, not counted again
    want = sum(map(bool, history))
    assert 0 < want < len(history) and state.applied("r") == want
    state.add_request("hit", ids, {"steering": function.key()}, num_cached=16)  # 16 prompt tokens from the cache
    rest = step(state, [("hit", ids[16:], 16)])["hit"]
    assert state.applied("hit") == sum(map(bool, history[: len(ids)])) and sum(map(bool, rest)) < state.applied("hit")


def test_clamp_budget_admits_in_order_within_the_pool_and_refuses_what_never_fits():
    b = ClampBudget(POOL)
    two, one, other = ClampBudget.need(clamp2(1, 2)), Counter({("clamp", 1): 1}), Counter({("clamp", 0): 1})
    with pytest.raises(RequestError, match="3 clamp/ablate columns at layer 1.*holds 2"):
        b.check(ClampBudget.need(spec(*({"layer": 1, "feature": f, "mode": "ablate"} for f in range(3)))))
    assert ClampBudget.need(spec({"layer": 2, "feature": 1, "strength": 1.0})) == {}  # adds take no column
    projections = spec(*({"layer": 1, "feature": f, "mode": "project_out"} for f in range(3)))
    assert ClampBudget.need(projections) == {("projection", 1): 3}  # a pool of their own
    with pytest.raises(RequestError, match="3 project_out/cap/set columns at layer 1.*(max_projections)"):
        b.check(ClampBudget.need(projections))

    async def go():
        await b.acquire(two)
        waits = [asyncio.ensure_future(b.acquire(n)) for n in (one, other, one)]
        await asyncio.sleep(0.01)
        assert b.waiting == 3 and not any(w.done() for w in waits)  # "other" fits, but waits its turn
        waits[0].cancel()  # a waiter that times out leaves the line
        await asyncio.sleep(0.01)
        assert waits[1].done() and not waits[2].done()  # layer 0 is free; layer 1 still full
        b.release(two)
        await asyncio.sleep(0.01)
        assert waits[2].done() and b.used == {("clamp", 0): 1, ("clamp", 1): 1}
        late = asyncio.ensure_future(b.acquire(two))
        await asyncio.sleep(0.01)
        b.close()
        with pytest.raises(EngineStopped):
            await late
        assert b.used == {("clamp", 0): 1, ("clamp", 1): 1}

    asyncio.run(go())


# ---- functok's vLLM engine with a clamp pool of 2 -------------------------------------------------------------------


@pytest.fixture(scope="module")
def loop():
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


async def collect(engine, rid, ids, s, **sampling):
    toks, last = [], None
    params = SamplingParams(0, **({"max_tokens": 10} | sampling))
    async for d in engine.generate(GenerateRequest(rid, ids, params, s)):
        toks, last = toks + d.token_ids, d
    return toks, last.steered_positions, last.finish_reason


@pytest.fixture(scope="module")
def hf(loop):
    """The transformers engine, for references: each request run alone."""
    engine = HFEngine(HFEngineConfig(DEMO_MODEL, SAE_DIRS, DEMO_FUNCTION_TOKENS, warmup=False))
    loop.run_until_complete(engine.start())
    yield engine
    loop.run_until_complete(engine.shutdown())


@pytest.fixture(scope="module")
def small(loop):
    from functok_vllm.engines.vllm.engine import VLLMEngine, VLLMEngineConfig

    cfg = VLLMEngineConfig(
        DEMO_MODEL,
        SAE_DIRS,
        DEMO_FUNCTION_TOKENS,
        max_running=8,
        steering=SteeringLimits(max_edits=POOL, max_clamps=POOL),
        enforce_eager=True,
        max_model_len=256,
        engine_args={"block_size": BLOCK, "enable_prefix_caching": True},
    )
    engine = VLLMEngine(cfg)
    loop.run_until_complete(engine.start())
    yield engine
    loop.run_until_complete(engine.shutdown())


@pytest.fixture(scope="module")
def active(demo_model, demo_tokenizer, demo_saes):
    """Layer-1 features most active on PROMPT, most active first: clamping them changes the output."""
    acts = {}
    with torch.no_grad(), residual_hooks(demo_model, {1: lambda h: acts.__setitem__(1, h.clone())}):
        demo_model(torch.tensor([demo_tokenizer.encode(PROMPT)]))
    return demo_saes[1].encode(acts[1]).mean(0).argsort(descending=True).tolist()


class TestVLLMEngine:
    pytestmark = needs_vllm

    def test_clamp_requests_beyond_the_pool_wait_and_report_what_the_worker_applied(self, hf, active, small, loop):
        ids = small.encode(PROMPT)
        specs = [clamp2(*active[2 * k : 2 * k + 2]) for k in range(4)]  # each takes the whole pool at layer 1
        specs += [
            spec({"layer": 0, "feature": 3, "mode": "clamp", "value": 30}, {"layer": 2, "feature": 5, "strength": 9}),
            spec({"layer": 2, "feature": 7, "strength": 12.0}, positions="function"),  # no column: never waits
            None,
        ]
        alone = [loop.run_until_complete(collect(hf, f"hf-{k}", ids, s)) for k, s in enumerate(specs)]
        assert all(alone[k][0] != alone[-1][0] for k in range(len(specs) - 1)), "every spec must change the output"
        seen = []

        async def all_at_once():
            async def watch():
                while True:
                    seen.append(small.budget.waiting)
                    await asyncio.sleep(0.002)

            watcher = asyncio.ensure_future(watch())
            try:
                return await asyncio.gather(*(collect(small, f"full-{k}", ids, s) for k, s in enumerate(specs)))
            finally:
                watcher.cancel()

        before = loop.run_until_complete(small.llm.collective_rpc("functok_stats"))[0]
        got = loop.run_until_complete(all_at_once())
        after = loop.run_until_complete(small.llm.collective_rpc("functok_stats"))[0]
        assert max(seen) >= 3, "the clamp requests beyond the pool should have waited"
        assert got == alone  # same tokens, and the transformers engine's own count of what it steered
        assert all(n > 0 for _, n, _ in got[:-1]) and got[-1][1] == 0
        assert after["slots_full"] == before["slots_full"] and after["resumed"] == before["resumed"]
        # no preemption, no shared prefix: what the requests report is every steered token the worker forwarded
        assert after["steered_tokens"] - before["steered_tokens"] == sum(n for _, n, _ in got)
        assert after["applied_kept"] == 0 and after["slots_in_use"] == 0 and small.budget.used.total() == 0

    def test_a_prefix_cache_hit_counts_the_cached_positions_once(self, small, hf, loop):
        ids = small.encode(LONG)
        s = spec({"layer": 2, "feature": 9, "strength": 11.0}, positions="function")
        want = loop.run_until_complete(collect(hf, "hf-cached", ids, s))
        for rid in ("fills-the-cache", "hits-the-cache"):
            before = loop.run_until_complete(small.llm.collective_rpc("functok_stats"))[0]
            assert loop.run_until_complete(collect(small, rid, ids, s)) == want
            after = loop.run_until_complete(small.llm.collective_rpc("functok_stats"))[0]
        forwarded = after["steered_tokens"] - before["steered_tokens"]
        assert 0 < forwarded < want[1]  # the first block was not forwarded again, yet its positions count

    def test_ignore_eos_runs_to_max_tokens_like_transformers(self, small, hf, loop):
        ids = small.encode(EOS_PROMPT)
        add = spec({"layer": 2, "feature": 7, "strength": 0.0})  # steered, changes nothing: the same EOS
        for rid, s in (("eos", None), ("eos-steered", add)):
            natural = loop.run_until_complete(collect(small, rid, ids, s, max_tokens=24))
            assert natural[2] == "stop" and len(natural[0]) < 24, natural
            assert natural == loop.run_until_complete(collect(hf, rid, ids, s, max_tokens=24))
            forced = loop.run_until_complete(collect(small, f"{rid}-ignored", ids, s, max_tokens=24, ignore_eos=True))
            assert forced[2] == "length" and len(forced[0]) == 24 and forced[0][: len(natural[0])] == natural[0]
            assert forced == loop.run_until_complete(collect(hf, rid, ids, s, max_tokens=24, ignore_eos=True))

    def test_shutdown_aborts_running_and_waiting_requests_then_refuses_and_is_unhealthy(self, small, active, loop):
        ids = small.encode(PROMPT)
        long = {"max_tokens": 200, "ignore_eos": True}

        async def go():
            specs = (clamp2(*active[:2]), None)
            running = [
                small.generate(GenerateRequest(f"long-{k}", ids, SamplingParams(0, **long), s))
                for k, s in enumerate(specs)
            ]
            firsts = [await anext(g) for g in running]
            waiting = asyncio.ensure_future(collect(small, "waits", ids, clamp2(*active[2:4]), **long))
            for _ in range(1000):  # at most 10 s
                if small.budget.waiting:
                    break
                await asyncio.sleep(0.01)
            assert small.is_healthy() and small.num_waiting == 1
            await small.shutdown()
            lasts = []
            for g in running:
                lasts.append([d async for d in g][-1])
            assert all(f.finish_reason is None for f in firsts)
            assert [d.finish_reason for d in lasts] == ["abort", "abort"] and (await waiting)[2] == "abort"
            with pytest.raises(EngineStopped):
                await anext(small.generate(GenerateRequest("late", ids, SamplingParams(0, max_tokens=4))))
            assert not small.is_healthy() and small.num_running == small.num_waiting == 0

        loop.run_until_complete(go())
