"""The vLLM worker's feature readout on its own (no engine): the positions it plans across chunked prefill, decode
steps and a recomputation after preemption, each read exactly once, with values from sae-lens's `encode` of the
rows it was given, and what the API process takes from it (once, in order, prompt and generated); a "stop"
monitor's per-delta read and trigger over it."""

import numpy as np
import torch
from reference import load_lens

from functok_vllm.engines.vllm.feature_op import XFEAT, FeatureReadout
from functok_vllm.feature_request import FeatureRequest
from functok_vllm.paths import DEMO_SAES


def step(ro: FeatureReadout, rows: list[tuple[str, int, torch.Tensor]]) -> None:
    """One forward: rows (request id, first position, its (tokens, d) stream there) in row order, then padding."""
    starts = np.array([s for _, s, _ in rows])
    qsl = np.cumsum([0] + [h.shape[0] for _, _, h in rows])
    hidden = torch.cat([h for _, _, h in rows] + [torch.full((3, rows[0][2].shape[1]), 99.0)])  # padding tokens
    ro.prepare([rid for rid, _, _ in rows], starts, qsl)
    if ro.plan is not None:
        for layer in ro.saes:
            ro.observe(layer, hidden, None)  # what the op in the model does with the readout its forward carries
    ro.end_step()


def test_chunked_prefill_decode_and_recomputation_read_each_position_once(demo_saes):
    g = torch.Generator().manual_seed(0)
    stream = {rid: torch.randn(40, 256, generator=g) * 3 for rid in ("a", "b")}  # (positions, d) of each request
    saes = {L: demo_saes[L] for L in (1, 2)}
    ro = FeatureReadout(saes, "cpu")
    a_req, b_req = FeatureRequest((2, 1), 5, prompt=True), FeatureRequest((1,), 3)
    ro.add_request("a", 20, {XFEAT: a_req.to_dict()}, "A")
    ro.add_request("b", 12, {XFEAT: b_req.to_dict()}, "B")
    ro.add_request("c", 9, None, "C")  # no features: never planned
    s = stream
    step(ro, [("a", 0, s["a"][0:16]), ("c", 0, torch.zeros(9, 256)), ("b", 0, s["b"][0:12])])  # a: first chunk
    step(ro, [("a", 16, s["a"][16:20]), ("b", 12, s["b"][12:13])])  # a: last chunk; b: first decode
    step(ro, [("a", 20, s["a"][20:21]), ("b", 13, s["b"][13:14])])
    step(ro, [("b", 0, s["b"][0:15])])  # b preempted and recomputed: prompt + generated so far, in one forward
    step(ro, [("a", 21, s["a"][21:22]), ("b", 15, s["b"][15:16])])
    got = ro.take({"A": [3, True], "B": [5, True]})
    lenses = {L: load_lens(DEMO_SAES / f"layer_{L}") for L in (1, 2)}

    def want(rid, positions, layer, k):
        with torch.no_grad():
            acts = lenses[layer].encode(s[rid][positions])
        v, i = acts.topk(k)
        return [[[int(f), float(x)] for f, x in zip(fi, vi, strict=True) if x > 0] for fi, vi in zip(i, v, strict=True)]

    def close(rows, ref):
        assert [[f for f, _ in r] for r in rows] == [[f for f, _ in r] for r in ref]
        assert np.allclose([a for r in rows for _, a in r], [a for r in ref for _, a in r], rtol=1e-4)

    a, b = got["A"], got["B"]
    assert len(a["prompt"]) == 20 and len(a["generated"]) == 3  # positions 19, 20, 21
    assert set(a["prompt"][0]) == {"1", "2"} and "prompt" not in b  # b did not ask for the prompt
    for layer in (1, 2):
        close([e[str(layer)] for e in a["prompt"]], want("a", list(range(20)), layer, 5))
        close([e[str(layer)] for e in a["generated"]], want("a", [19, 20, 21], layer, 5))
    assert len(b["generated"]) == 5  # positions 11 .. 15: the recomputation read 14 only, once
    close([e["1"] for e in b["generated"]], want("b", list(range(11, 16)), 1, 3))
    assert ro.take({"A": [3, True], "B": [5, True]}) == {"A": {"generated": []}, "B": {"generated": []}}
    ro.finish(["a", "b", "c"])
    assert ro.take({"A": [4, True]}) == {"A": {"generated": []}}  # a's 4th token was never read: nothing to add
    assert ro.take({"B": [5, False]}) == {"B": {"generated": []}} and ro.take({"B": [5, False]}) == {}  # forgotten


def test_a_monitor_peek_reads_each_new_position_once_and_leaves_the_readout_whole(demo_saes):
    """`SeriesReadout.peek` (a vLLM "stop" monitor's per-delta read): column `col` at the positions from `since` on
    that the forwards read, across chunked prefill, decode and a recomputation, equal to sae-lens's encode of the rows
    given; a request or column it does not read is left out; `take` afterwards still returns every position."""
    from functok_vllm.core.readout import Probe
    from functok_vllm.engines.vllm.series_op import XREAD, SeriesReadout
    from functok_vllm.readout_request import ReadoutRequest

    g = torch.Generator().manual_seed(1)
    s = {rid: torch.randn(30, 256, generator=g) * 3 for rid in ("a", "b")}  # (positions, d) of each request
    lenses = {L: load_lens(DEMO_SAES / f"layer_{L}") for L in (1, 2)}
    with torch.no_grad():
        acts = {L: lenses[L].encode(s["a"]) for L in (1, 2)}  # (positions, d_sae)
    f2, f1 = int((acts[2] > 0).sum(0).argmax()), int((acts[1] > 0).sum(0).argmax())  # busy: not a vacuous match
    sr = SeriesReadout({L: demo_saes[L] for L in (1, 2)}, {1, 2}, "cpu")
    req = ReadoutRequest((Probe(2, f2), Probe(1, f1)), ({}, {}))
    sr.add_request("a", 20, {XREAD: req.to_dict()}, "A")
    sr.add_request("b", 12, {XREAD: req.to_dict()}, "B")

    def step(rows):
        starts, qsl = np.array([st for _, st, _ in rows]), np.cumsum([0] + [h.shape[0] for _, _, h in rows])
        sr.prepare([rid for rid, _, _ in rows], starts, qsl)
        for layer in sr.plan or ():
            x = torch.cat([h for _, _, h in rows])
            sr.observe(layer, x, x, None)
        sr.end_step()

    step([("a", 0, s["a"][0:16]), ("b", 0, s["b"][0:12])])
    assert sr.peek({"A": [0, 0]}) == {"A": {"positions": [], "values": []}}  # the prompt is not read: nothing yet
    step([("a", 16, s["a"][16:20]), ("b", 12, s["b"][12:13])])
    got = sr.peek({"A": [0, 19], "B": [1, 11], "Z": [0, 0]})
    assert set(got) == {"A", "B"} and got["A"]["positions"] == [19] and got["B"]["positions"] == [11, 12]
    step([("b", 0, s["b"][0:14])])  # b recomputed after preemption: only position 13 is new
    step([("a", 20, s["a"][20:21]), ("b", 14, s["b"][14:15])])
    step([("a", 21, s["a"][21:22])])
    got = sr.peek({"A": [0, 20], "B": [1, 13]})
    assert got["A"]["positions"] == [20, 21] and got["B"]["positions"] == [13, 14]
    np.testing.assert_allclose(got["A"]["values"], acts[2][[20, 21], f2].numpy(), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        want_b = lenses[1].encode(s["b"][[13, 14]])[:, f1].numpy()
    np.testing.assert_allclose(got["B"]["values"], want_b, rtol=1e-4, atol=1e-5)
    whole = sr.peek({"A": [1, 0]})["A"]
    np.testing.assert_allclose(whole["values"], acts[1][19:22, f1].numpy(), rtol=1e-4, atol=1e-5)
    assert (acts[1][19:22, f1] > 0).any() or (acts[2][19:22, f2] > 0).any()
    sr.finish(["a"])
    taken = sr.take("A")
    assert taken["positions"] == [19, 20, 21]
    np.testing.assert_allclose([row[1] for row in taken["values"]], whole["values"], rtol=1e-6)
    assert sr.peek({"A": [0, 0]}) == {}  # taken: forgotten


def test_a_stop_monitor_triggers_where_the_values_say_whatever_the_deltas_hold(demo_saes):
    """`MonitorReader.hit` (the vLLM engine's per-delta check) over a real worker `SeriesReadout` (vLLM's
    `collective_rpc` replaced by a direct call): for deltas of 1 to 4 tokens it returns the index, within the delta,
    of the token where 2 values in a row first exceed the threshold, as the sae-lens values computed here say; a
    threshold above every value never triggers; positions the workers have not read are an error message; requests
    asking at the same moment share one call."""
    import asyncio

    from functok_vllm.core.readout import Probe
    from functok_vllm.engines.vllm.outputs import MonitorReader
    from functok_vllm.engines.vllm.series_op import XREAD, SeriesReadout
    from functok_vllm.readout_request import ReadoutRequest
    from functok_vllm.stop_when import StopWhen

    class Workers:  # vLLM's collective_rpc to one worker holding `sr`
        calls = 0

        async def collective_rpc(self, method, args=()):
            Workers.calls += 1
            return [sr.peek(*args)] if method == "functok_monitor" else [None]

    g = torch.Generator().manual_seed(2)
    h = torch.randn(40, 256, generator=g) * 3  # (positions, d)
    with torch.no_grad():
        acts = load_lens(DEMO_SAES / "layer_1").encode(h)  # (positions, d_sae)

    def trigger_at(v, thr: float) -> int | None:  # written out: the first token ending 2 values in a row above thr
        held = v > thr
        return next((i for i in range(1, len(v)) if held[i - 1] and held[i]), None)

    def latest(v) -> tuple[int, float]:  # the latest first trigger any threshold gives, and that threshold
        return max((trigger_at(v, float(x) - 1e-4) or 0, float(x) - 1e-4) for x in np.minimum(v[:-1], v[1:]))

    busy = (acts[19:31] > 0).sum(0).argsort(descending=True)[:64].tolist()
    f = next(f for f in busy if 5 <= latest(acts[19:31, f].numpy())[0] <= 10)  # inside a delta of some splits below
    v = acts[19:31, f].numpy()  # the monitor's values at positions 19 .. 30: tokens 0 .. 11
    expect, thr = latest(v)
    sr = SeriesReadout({1: demo_saes[1]}, {1}, "cpu")
    req = ReadoutRequest((Probe(1, f),), ({},))
    for tag in ("A", "B"):
        sr.add_request(tag.lower(), 20, {XREAD: req.to_dict()}, tag)
    starts, qsl = np.array([0, 0]), np.array([0, 31, 62])
    sr.prepare(["a", "b"], starts, qsl)  # one forward of 31 positions each (prompt 20 + 11 fed back)
    x = torch.cat([h[:31], h[:31]])
    sr.observe(1, x, x, None)  # no edits here: the stream before and after them is the same
    sr.end_step()
    reader = MonitorReader(Workers())

    def first_hit(watch: StopWhen, sizes: list[int]) -> int | None:
        tail, sent = [], 0
        for n in sizes:
            at = asyncio.run(reader.hit("A", watch, 19 + sent, n, tail))
            assert not isinstance(at, str), at
            if at is not None:
                return sent + at
            sent += n
        return None

    watch = StopWhen(Probe(1, f), {"layer": 1, "feature": f}, thr, float("inf"), 2, "stop", series=0)
    for sizes in ([1] * 12, [3, 1, 4, 2, 2], [4, 4, 4], [2, 3, 3, 4]):
        assert first_hit(watch, sizes) == expect, sizes
    never = StopWhen(Probe(1, f), {}, float(v.max()) + 1.0, float("inf"), 2, "stop", series=0)
    assert first_hit(never, [4, 4, 4]) is None
    assert "positions 31..32" in asyncio.run(reader.hit("A", watch, 31, 2, []))  # never read
    assert "positions" in asyncio.run(reader.hit("Z", watch, 19, 1, []))  # a request the workers do not know

    async def both():
        return await asyncio.gather(reader.hit("A", watch, 19, 12, []), reader.hit("B", watch, 19, 12, []))

    before = Workers.calls
    assert asyncio.run(both()) == [expect, expect] and Workers.calls == before + 1
