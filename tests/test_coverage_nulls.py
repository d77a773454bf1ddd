"""The coverage verdict can come out both ways: planted SAEs on functok-tiny, where the answer is known.

An SAE read at `blocks.0.hook_resid_pre` sees only the token embeddings, so which tokens a feature fires at can be
planted exactly. World 1: every feature fires at every position (W_enc = 0, b_enc above the threshold): function
tokens reach every feature, and so does any random set of content tokens; the verdict must not be "supports". World
2: feature i fires only at function token t_i (encoder row = t_i's unit embedding, threshold between t_i's projection
and every other token's): random content sets reach nothing; the verdict must be "supports". Each SAE is saved in the
SAELens on-disk format and loaded through the project's loader, as a user's SAE would be.
"""

import pytest
import torch

from functok_vllm.analysis import coverage, coverage_null, render_findings
from functok_vllm.analysis.data import token_stream
from functok_vllm.analysis.model import HFAnalysisModel, load_saes
from functok_vllm.analysis.verdict import DOES_NOT_SUPPORT, SUPPORTS
from functok_vllm.core import SAE, SAEConfig

torch.set_num_threads(2)
NULLS = coverage_null.NullConfig(n_random=100, n_boot=200, min_firings=(1, 5))


def save_sae(path, W_enc, b_enc, threshold):
    d_in, d_sae = W_enc.shape
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture="jumprelu", hook_name="blocks.0.hook_resid_pre")
    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": torch.eye(d_sae, d_in), "b_dec": torch.zeros(d_in)}
    SAE(cfg, tensors | {"threshold": threshold}).save(path / "layer_0")
    return load_saes(path)


def function_only(emb: torch.Tensor, fn_ids: list[int], n: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Encoder rows = unit embeddings of n function tokens that project onto their own direction above every other
    token; threshold halfway. -> W_enc (d_in, n), threshold (n,), the tokens."""
    u = emb[fn_ids] / emb[fn_ids].norm(dim=-1, keepdim=True)  # (k, d_in)
    proj = emb @ u.t()  # (vocab, k)
    own = proj[fn_ids, torch.arange(len(fn_ids))]  # (k,)
    proj[fn_ids, torch.arange(len(fn_ids))] = -torch.inf
    other = proj.max(0).values  # (k,)
    keep = (own > other + 0.1).nonzero().flatten()[:n]
    return u[keep].t().contiguous(), ((own + other) / 2)[keep], [fn_ids[i] for i in keep.tolist()]


@pytest.fixture(scope="module")
def setup(demo_model, demo_tokenizer, demo_function_tokens):
    mask = demo_function_tokens.mask(demo_model.get_output_embeddings().weight.shape[0])
    am = HFAnalysisModel(demo_model, demo_tokenizer, {}, mask, demo_function_tokens)
    stream = token_stream(am.encode, am.eos_id, None, 6144)
    return am, stream


def run(am, stream, saes):
    am = HFAnalysisModel(am.model, am.tokenizer, saes, am.fn_mask, am.function_tokens)
    cfg = coverage.CoverageConfig(seq_len=128, batch_size=8, nulls=NULLS)
    graphs = coverage.build_graphs(am, stream, cfg, progress=False)
    return graphs[0], coverage.summarize(graphs, am.fn_mask, am.decode, NULLS)


def test_features_firing_everywhere_do_not_support_the_hypothesis(setup, tmp_path):
    am, stream = setup
    d_in, d_sae = am.model.config.hidden_size, 16
    saes = save_sae(tmp_path, torch.zeros(d_in, d_sae), torch.ones(d_sae), torch.full((d_sae,), 0.5))
    g, s = run(am, stream, saes)
    nl = s["nulls"][0]
    assert g.n_sinks >= len(stream) // 128  # the first position of every window is left out
    assert int(g.feature_count.min()) == nl["positions"] == int(g.token_count.sum())  # every feature, every position
    b = nl["by_m"][1]
    assert b["function_coverage"] == 1.0 and b["random_mean"] == 1.0  # saturated: chance gives the same
    assert b["analytic"] == pytest.approx(1.0)
    for name in ("coverage_m1", "coverage_m5", "enrichment"):
        assert nl["findings"][name].verdict == DOES_NOT_SUPPORT, (name, nl["findings"][name])
    assert nl["enrichment"]["share_enriched"] == 0.0  # every feature's share on function positions is their share
    text, notes = render_findings.coverage_markdown(s, coverage.milestone_rows(s["table"]))
    assert "the data **does not support** the claim that function tokens reach more" in notes[0]
    assert "**supports**" not in "".join(notes)


def test_features_firing_only_at_function_tokens_support_it(setup, tmp_path):
    am, stream = setup
    emb = am.model.get_input_embeddings().weight.detach().float()
    present = set(stream.tolist())
    fn_ids = [t for t in am.function_tokens.ids if t in present]
    W_enc, threshold, tokens = function_only(emb, fn_ids, 24)
    assert len(tokens) >= 10
    saes = save_sae(tmp_path, W_enc, torch.zeros(len(tokens)), threshold)
    g, s = run(am, stream, saes)
    t, f, _ = g.pairs()
    fired = sorted(set(zip(f.tolist(), t.tolist(), strict=True)))
    assert fired == [(i, tok) for i, tok in enumerate(tokens) if g.token_count[tok]]
    nl = s["nulls"][0]
    b = nl["by_m"][1]
    assert b["function_coverage"] == 1.0 and b["random_mean"] == 0.0
    assert b["p_value"] == pytest.approx(1 / (NULLS.n_random + 1))
    for name in ("coverage_m1", "coverage_m5", "enrichment"):
        assert nl["findings"][name].verdict == SUPPORTS, (name, nl["findings"][name])
    # the analytic level ignores which token a feature fires at: for these frequent features it is ~100% too
    assert b["analytic"] > 0.95
    text, notes = render_findings.coverage_markdown(s, coverage.milestone_rows(s["table"]))
    assert "the data **supports** the claim that function tokens reach more" in notes[0]
    assert s["nulls"][0]["findings"]["coverage_m1"].to_json()["verdict"] == SUPPORTS
