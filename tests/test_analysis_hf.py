"""The analysis on the transformers engine with the shipped model: coverage numbers against an independent dense
computation (the model's own `output_hidden_states`), batch-size invariance, and steering through the core."""

import pytest
import torch

from functok_vllm.analysis import coverage, steer_sweep
from functok_vllm.analysis.model import HFAnalysisModel

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def am(demo_model, demo_tokenizer, demo_saes, demo_function_tokens):
    fn = demo_function_tokens.mask(demo_model.get_output_embeddings().weight.shape[0])
    return HFAnalysisModel(demo_model, demo_tokenizer, demo_saes, fn, demo_function_tokens)


@pytest.fixture(scope="module")
def stream(am):
    text = (
        "The old prince was sitting in his study, and he said to his daughter that the letter from Moscow had come. "
        "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. First Citizen: You are all "
        "resolved rather to die than to famish? Pierre looked at Natasha and smiled, and then he went to the window."
    )
    ids = am.encode(text)
    return torch.tensor(ids + [am.eos_id] + ids[:40])  # an EOS inside, and a tail shorter than a window


def dense_edges(am, stream, layer, seq_len):
    """Edges from one unhooked forward per window, read from `output_hidden_states` (output of decoder layer L is
    hidden_states[L + 1]), encoded densely: {(token, feature)}. Sinks left out as the report states the rule: the
    first position of each window, and residuals over 10x their window's median norm. -> (edges, sinks)"""
    edges, sinks = set(), 0
    for s in range(0, len(stream), seq_len):
        x = stream[s : s + seq_len]
        with torch.no_grad():
            hs = am.model(input_ids=x[None], output_hidden_states=True).hidden_states[layer + 1][0]
        active = am.saes[layer].encode(hs) > 0  # (tokens, d_sae)
        norms = hs.norm(dim=-1)
        big = norms > 10 * norms.median()
        for i, (t, row) in enumerate(zip(x.tolist(), active, strict=True)):
            if t != am.eos_id and (i == 0 or big[i]):
                sinks += 1
            elif t != am.eos_id:
                edges |= {(t, int(f)) for f in row.nonzero().flatten()}
    return edges, sinks


def test_coverage_edges_match_a_dense_recomputation(am, stream):
    cfg = coverage.CoverageConfig(seq_len=32, batch_size=3)
    graphs = coverage.build_graphs(am, stream, cfg, progress=False)
    for layer, g in graphs.items():
        rows = g.rows(g.token_of)
        got = {(int(t), int(f)) for t, row in zip(g.token_of, rows, strict=True) for f in row.nonzero().flatten()}
        want, sinks = dense_edges(am, stream, layer, cfg.seq_len)
        assert g.n_sinks == sinks
        # the hooked batch and the plain forward may sum in another order: allow features at the threshold's edge
        assert len(got ^ want) <= 0.002 * len(want), (layer, len(got ^ want))
        assert len(want) > 100
    s = coverage.summarize(graphs, am.fn_mask, am.decode)
    n_sinks = graphs[max(graphs)].n_sinks
    assert s["tokens"] == len(stream) - 1 - n_sinks  # the EOS is no node, sinks are left out
    for layer, st in s["layers"].items():
        assert st["edges"] == graphs[layer].n_edges
        assert 0 < st["function_tokens_coverage"] <= 1
        assert s["table"][-1][f"coverage_L{layer}"] == 1.0


def test_coverage_does_not_depend_on_the_batch_size(am, stream):
    one = coverage.build_graphs(am, stream, coverage.CoverageConfig(seq_len=32, batch_size=1), progress=False)
    many = coverage.build_graphs(am, stream, coverage.CoverageConfig(seq_len=32, batch_size=4), progress=False)
    for layer in one:
        a, b = one[layer], many[layer]
        diff = (a.rows(a.token_of) ^ b.rows(a.token_of)).sum()
        assert int(diff) <= 0.002 * a.n_edges
        assert torch.equal(a.token_count, b.token_count)


def test_steering_on_the_real_model_is_causal_and_zero_safe(am):
    st = steer_sweep.Steerer(am, [1])
    ids = torch.tensor(am.encode("The old prince said to his daughter that the letter had come and the"))
    lf = int(steer_sweep.last_fn_position(ids, am.fn_mask))
    lc = steer_sweep.last_content_position(ids, am.fn_mask)
    assert 0 <= lc < lf == len(ids) - 1
    base = st.logits(ids, None, "all", len(ids))
    zero = st.logits(ids, steer_sweep.spec_for(1, 7, 0.0, "last_function"), "last_function", len(ids))
    torch.testing.assert_close(zero, base)
    pushed = st.logits(ids, steer_sweep.spec_for(1, 7, 60.0, "last_content"), "last_content", len(ids))
    torch.testing.assert_close(pushed[:lc], base[:lc])  # positions before the steered one cannot change
    assert (pushed[lc] - base[lc]).abs().max() > 1.0
