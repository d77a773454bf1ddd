"""The vLLM worker's feature readout on its own (no engine): the positions it plans across chunked prefill, decode
steps and a recomputation after preemption, each read exactly once, with values from sae-lens's `encode` of the
rows it was given, and what the API process takes from it (once, in order, prompt and generated)."""

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
