"""Known answers on a hand-built model whose residual stream is the one-hot embedding of the token.

The model has one identity decoder layer (hooked by the real `residual_hooks`) and an unembedding W_U, so the logits
at a position are W_U[:, token]. Its SAE fires feature f exactly on token f, plus feature 8 on tokens 1 (value 1) and
3 (value 2). Function tokens: {1, 2}. Every expected value below follows from that construction.
"""

import math
from types import SimpleNamespace

import pytest
import torch

from functok_vllm.analysis import coverage, features, loss_split, reactivation, steer_sweep
from functok_vllm.analysis.model import HFAnalysisModel
from functok_vllm.core import SAE, SAEConfig
from functok_vllm.errors import CLIError

torch.set_num_threads(1)
V = 8  # vocab = d_model = letters a..h
NEXT = {0: 1, 1: 5, 2: 3, 3: 6, 4: 7, 5: 0, 6: 0, 7: 0}  # the token each token predicts


class OneHotLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(max_position_embeddings=12, num_hidden_layers=1)
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList([torch.nn.Identity()])
        self.lm_head = torch.nn.Linear(V, V, bias=False)
        w = torch.zeros(V, V)
        for t, n in NEXT.items():
            w[n, t] = 1.0
        self.lm_head.weight.data = w  # (vocab, d_model): logits = h @ w.T

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, logits_to_keep=0):
        h = torch.nn.functional.one_hot(input_ids, V).float()
        for layer in self.model.layers:
            h = layer(h)
        return SimpleNamespace(logits=self.lm_head(h))


class Letters:
    eos_token_id = None

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [ord(c) - ord("a") for c in text]}

    def decode(self, ids):
        return "".join(chr(ord("a") + i) for i in ids)


def synthetic_sae() -> SAE:
    W_enc = torch.zeros(V, V + 1)
    W_enc[:, :V] = torch.eye(V)
    W_enc[1, V], W_enc[3, V] = 1.0, 2.0
    W_dec = torch.eye(V + 1, V)
    W_dec[1] = torch.eye(V)[3]  # feature 1 reads as token 3's column: lens top token NEXT[3] = 6
    W_dec[V] = torch.eye(V)[1]  # feature 8 reads as token 1's column: lens top token NEXT[1] = 5
    cfg = SAEConfig(d_in=V, d_sae=V + 1, architecture="jumprelu", hook_name="blocks.0.hook_resid_post")
    return SAE(
        cfg,
        {
            "W_enc": W_enc,
            "b_enc": torch.zeros(V + 1),
            "W_dec": W_dec,
            "b_dec": torch.zeros(V),
            "threshold": torch.full((V + 1,), 0.5),
        },
    )


@pytest.fixture
def am():
    fn = torch.zeros(V, dtype=torch.bool)
    fn[[1, 2]] = True
    return HFAnalysisModel(OneHotLM(), Letters(), {0: synthetic_sae()}, fn)


def test_coverage_graph_and_table(am):
    stream = torch.tensor([1, 1, 1, 2, 2, 3, 0])  # counts 1:3 2:2 3:1 0:1, so rank order 1, 2, 0, 3
    # two windows and a tail of one token; sinks kept here (this test is the edge arithmetic; see the next one)
    cfg = coverage.CoverageConfig(seq_len=3, batch_size=1, exclude_sinks=False)
    graphs = coverage.build_graphs(am, stream, cfg, progress=False)
    g = graphs[0]
    edges = {(int(t), int(f)) for t in g.token_of for f in g.rows(t[None])[0].nonzero().flatten()}
    assert edges == {(1, 1), (1, 8), (2, 2), (3, 3), (3, 8), (0, 0)}
    s = coverage.summarize(graphs, am.fn_mask, am.decode)
    layer = s["layers"][0]
    assert (layer["token_nodes"], layer["feature_nodes"], layer["edges"]) == (4, 5, 6)
    assert layer["dictionary_reached_share"] == 5 / 9
    assert layer["function_tokens_coverage"] == 3 / 5  # tokens 1, 2 reach features 1, 8, 2
    assert layer["next_k_coverage"] == 3 / 5  # ranks 3-4: tokens 0, 3 reach features 0, 3, 8
    assert [r["token"] for r in s["table"]] == ["b", "c", "a", "d"]
    assert [r["coverage_L0"] for r in s["table"]] == [2 / 5, 3 / 5, 4 / 5, 5 / 5]
    assert [r["degree_L0"] for r in s["table"]] == [2, 1, 1, 2]
    assert [r["is_function"] for r in s["table"]] == [True, True, False, False]


def test_coverage_leaves_out_the_first_position_of_every_window(am):
    stream = torch.tensor([1, 1, 1, 2, 2, 3, 0])  # windows start at 0 (token 1), 3 (token 2) and 6 (token 0)
    graphs = coverage.build_graphs(am, stream, coverage.CoverageConfig(seq_len=3, batch_size=1), progress=False)
    g = graphs[0]
    edges = {(int(t), int(f)) for t in g.token_of for f in g.rows(t[None])[0].nonzero().flatten()}
    assert edges == {(1, 1), (1, 8), (2, 2), (3, 3), (3, 8)}  # token 0 only ever sat at a window start
    assert g.n_sinks == 3
    assert g.token_count[[0, 1, 2, 3]].tolist() == [0, 2, 1, 1]
    tokens, feats, n = g.pairs()  # firings per edge: token 1 twice (features 1, 8), the others once
    assert sorted(zip(tokens.tolist(), feats.tolist(), n.tolist(), strict=True)) == [
        (1, 1, 2),
        (1, 8, 2),
        (2, 2, 1),
        (3, 3, 1),
        (3, 8, 1),
    ]


def test_reactivation_sets_and_predictive_features(am):
    # "dbeb" = tokens 3, 1, 4, 1: content, function, content, function
    cfg = reactivation.ReactivationConfig(top_frac=1 / V)  # k = 1: the predicted token must top the lens
    (r,) = reactivation.score_prompts(am, ["dbeb"], cfg)
    detail = [
        (d["position"], d["predicted_next"], d["active"], d["reactivated"], d["predictive"]) for d in r["positions"]
    ]
    # feature 8 fired at content position 0 (token 3) and is re-activated at both function positions; its lens tops
    # at token 5, the prediction after token 1. Feature 1 is new there and its lens (token 6) misses the prediction.
    assert detail == [(1, "f", [1, 8], [8], [8]), (3, "f", [1, 8], [8], [8])]
    fn, content = r["layers"][0]["function"], r["layers"][0]["content"]
    assert (fn["positions"], fn["active"], fn["reactivated"]) == (2, 4, 2)
    assert (fn["predictive_reactivated"], fn["predictive_other"]) == (2, 0)
    assert fn["reactivated_share"] == 0.5
    assert (fn["predictive_share_reactivated"], fn["predictive_share_other"]) == (1.0, 0.0)
    # position 2 (token 4): feature 4 only, new, and its lens tops at token 7 = the prediction after token 4
    assert (content["positions"], content["active"], content["reactivated"], content["predictive_other"]) == (
        1,
        1,
        0,
        1,
    )
    summary = reactivation.summarize([r, r])
    assert summary["layers"][0]["function"]["active"] == 8
    assert summary["layers"][0]["function"]["reactivated_share"] == 0.5


def test_prompt_longer_than_context_is_refused(am):
    with pytest.raises(CLIError, match="13 tokens, longer than the model's context of 12"):
        reactivation.score_prompts(am, ["a" * 13])


def test_loss_groups_by_hand():
    fn = torch.zeros(6, dtype=torch.bool)
    fn[[1, 2]] = True
    cur = torch.tensor([1, 1, 3, 3, 0, 1, 2])
    nxt = torch.tensor([2, 3, 1, 4, 1, 0, 1])
    ce = torch.tensor([1.0, 2.0, 3.0, 4.0, 50.0, 60.0, 5.0])  # pairs touching token 0 (EOS) are skipped
    counts, sums = loss_split.group_sums(ce, cur, nxt, fn, skip_id=0)
    s = loss_split.group_stats(counts, sums)
    assert [s[g]["tokens"] for g in loss_split.GROUPS] == [2, 1, 1, 1]
    assert [s[g]["mean_loss"] for g in loss_split.GROUPS] == [3.0, 2.0, 3.0, 4.0]
    assert [s[g]["loss_share"] for g in loss_split.GROUPS] == [6 / 15, 2 / 15, 3 / 15, 4 / 15]
    assert s["all"] == {"tokens": 5, "mean_loss": 3.0}


def test_loss_split_pairs_stay_inside_windows(am):
    am.model.lm_head.weight.data.zero_()  # uniform next-token distribution: every loss is log V
    stream = torch.tensor([1, 2, 3, 1, 1, 4])  # windows [1 2 3] [1 1 4]: pairs 1-2, 2-3, 1-1, 1-4
    s = loss_split.loss_split(am, stream, loss_split.LossSplitConfig(seq_len=3, batch_size=1), progress=False)
    assert [s[g]["tokens"] for g in loss_split.GROUPS] == [2, 2, 0, 0]
    assert s["function->function"]["mean_loss"] == pytest.approx(math.log(V))
    assert s["content->function"]["mean_loss"] is None


def test_steering_positions_and_probabilities(am):
    ids = torch.tensor([3, 1, 4, 1])  # last function token: 3 (the last position); last content token: 2
    assert steer_sweep.slot_index("last_function", ids, 5, am.fn_mask, 4).tolist() == [0, 0, 0, 5]
    assert steer_sweep.slot_index("last_content", ids, 5, am.fn_mask, 4).tolist() == [0, 0, 5, 0]
    assert steer_sweep.slot_index("all", ids, 5, am.fn_mask, 4).tolist() == [5, 5, 5, 5]
    s = 2.0
    cfg = steer_sweep.SweepConfig(layer=0, feature=8, strengths=(0.0, s), generate=0)
    res = steer_sweep.sweep(am, "dbeb", cfg, target="f")  # feature 8 adds s * e_1: logit of token 5 += s
    rows = {(r["policy"], r["strength"]): r for r in res["rows"]}
    unsteered = math.e / (math.e + V - 1)
    steered = math.exp(1 + s) / (math.exp(1 + s) + V - 1)
    assert res["unsteered_target_prob"] == pytest.approx(unsteered)
    assert rows[("last_function", s)]["target_prob"] == pytest.approx(steered)
    assert rows[("all", s)]["target_prob"] == pytest.approx(steered)
    # no attention in this model: steering position 2 cannot reach the last position
    assert rows[("last_content", s)]["target_prob"] == pytest.approx(unsteered)
    assert rows[("last_content", s)]["kl"] == pytest.approx(0.0, abs=1e-7)
    assert rows[("last_function", 0.0)]["kl"] == pytest.approx(0.0, abs=1e-7)
    assert rows[("last_function", s)]["kl"] > 0


def test_batched_steering_rows_match_single_runs(am):
    st = steer_sweep.Steerer(am, [0])
    ids = torch.tensor([3, 1, 4, 1])
    specs = [steer_sweep.spec_for(0, f, 1.5, "all") for f in (1, 8, 4)] + [None]
    many = st.logits_many(ids, specs, "all", 4)
    for i, spec in enumerate(specs):
        torch.testing.assert_close(many[i], st.logits(ids, spec, "all", 4))
    assert st.table.slots_in_use == 0  # every slot released


def test_sweep_refuses_a_prompt_without_function_tokens(am):
    cfg = steer_sweep.SweepConfig(layer=0, feature=8, strengths=(1.0,), generate=0)
    with pytest.raises(CLIError, match="no function token"):
        steer_sweep.sweep(am, "dd", cfg)


def test_feature_contexts_frequency_and_lens(am):
    stream = torch.tensor([1, 2, 3, 1, 0, 3])
    cfg = features.FeaturesConfig(layer=0, features=(8, 2), contexts=2, window=1, seq_len=4, batch_size=1)
    freq = features.activation_frequency(am, stream, cfg)
    assert freq.tolist() == [1, 2, 1, 2, 0, 0, 0, 0, 4]
    d = features.describe(am, stream, cfg)
    f8, f2 = d["features"]
    assert sorted((c["activation"], c["position"]) for c in f8["contexts"]) == [(2.0, 2), (2.0, 5)]
    at2 = next(c for c in f8["contexts"] if c["position"] == 2)
    assert at2["context"] == "c[[d]]bad"  # one token left, three right
    assert [(c["activation"], c["position"]) for c in f2["contexts"]] == [(1.0, 1)]
    assert f8["logit_lens"][0]["token"] == "f" and f2["logit_lens"][0]["token"] == "d"
