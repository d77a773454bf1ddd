"""The case study's pieces on the demo model (whose chat template is the bare text): the country word's own features
and their re-activation against a plain forward's SAE codes, the steer positions, and a clear refusal when the model
answers no capital question correctly (the demo model knows none)."""

import numpy as np
import pytest
import torch

from functok_vllm.analysis import case_study as cs
from functok_vllm.analysis.model import HFAnalysisModel
from functok_vllm.analysis.steer_sweep import Steerer

torch.set_num_threads(1)
LAYER = 1


@pytest.fixture(scope="module")
def am(demo_model, demo_tokenizer, demo_saes, demo_function_tokens):
    fn = demo_function_tokens.mask(demo_model.get_output_embeddings().weight.shape[0])
    return HFAnalysisModel(demo_model, demo_tokenizer, demo_saes, fn, demo_function_tokens)


def codes(am, ids: list[int]) -> torch.Tensor:
    """(tokens, d_sae) SAE codes of the layer's output from an unhooked forward (`output_hidden_states`)."""
    with torch.no_grad():
        h = am.model(input_ids=torch.tensor(ids)[None], output_hidden_states=True).hidden_states[LAYER + 1][0]
    return am.saes[LAYER].encode(h.float())


def test_country_features_and_their_reactivation_match_a_plain_forward(am):
    st = Steerer(am, [LAYER])
    c = cs.pair_study(am, st, cs.CaseConfig(LAYER, features=1), "France", "Russia", 60.0, np.random.default_rng(0))
    a_ids, b_ids = cs.chat_ids(am, "France"), cs.chat_ids(am, "Russia")
    ca, cb = codes(am, a_ids), codes(am, b_ids)
    p = c["position"]
    assert a_ids[:p] == b_ids[:p] and a_ids[p] != b_ids[p] and a_ids[p + 1 :] == b_ids[p + 1 :]
    mine = (ca[p] > 0) & (cb[p] <= 0)
    assert abs(c["n_features"] - int(mine.sum())) <= 1  # hooked and plain forwards may differ at the threshold
    assert c["n_features"] > 0
    for f, act in c["features"]:
        assert bool(mine[f]) and act == pytest.approx(float(ca[p, f]), rel=1e-3)
    q = [pos for pos, _ in c["later"]]
    assert q and min(q) > p  # the question mark after the country is a function token
    want_a = [int(((ca[j] > 0) & mine).sum()) for j in q]
    want_b = [int(((cb[j] > 0) & mine).sum()) for j in q]
    assert np.abs(np.subtract(c["reactivated"], want_a)).max() <= 1
    assert np.abs(np.subtract(c["reactivated_in_twin"], want_b)).max() <= 1
    positions = cs.steer_positions(am, a_ids)
    assert am.decode([a_ids[positions["last_function"]]]) == "?" and positions["last"] == len(a_ids) - 1
    assert c["last"]["tries"] == 1 * len(cs.MULTIPLES)
    assert c["last"]["changed"] >= c["last"]["flips"]
    f = cs.paired(np.array([c["share"]] * 2), np.array([c["null_share"]] * 2), "re", 0.02, "")
    md = cs.markdown({"layer": LAYER, "norm": 60.0, "answers": {}, "cases": [c], "findings": [f]})
    assert "| France / Russia |" in md and "| re |" in md


def test_a_model_that_knows_no_capital_is_refused_clearly(am):
    with pytest.raises(ValueError, match="answers fewer than one pair"):
        cs.run(am, cs.CaseConfig(LAYER))
