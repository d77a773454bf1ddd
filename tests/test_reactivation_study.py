"""Re-activation with controls: its verdict on planted activations where the answer is known both ways, sinks left
out, and the causal ablation against an independent plain-forward reference on the shipped demo model."""

import numpy as np
import pytest
import torch

from functok_vllm.analysis import reactivation_study as rs
from functok_vllm.analysis.model import HFAnalysisModel
from functok_vllm.analysis.steer_sweep import Steerer
from functok_vllm.analysis.verdict import DOES_NOT_SUPPORT, SUPPORTS

torch.set_num_threads(1)
T, D, N = 12, 64, 16  # positions per prompt, features, prompts
IS_FN = torch.tensor([i % 2 == 1 for i in range(T)])  # content, function, content, function, ...
NO_SINK = torch.zeros(T, dtype=torch.bool)


def verdict(actives: list[torch.Tensor], sinks=NO_SINK) -> dict:
    recs = [rs.prompt_record(a, IS_FN, sinks) for a in actives]
    masks, _ = rs.strata_masks(recs, D)
    wc = rs.within_cross(recs, masks)
    return {k: rs.paired(v[:, 0], v[:, 1], k, rs.MARGIN_SHARE, "") for k, v in wc.items()}


def topic_world() -> list[torch.Tensor]:
    """Prompt i has its own topic features {2i, 2i+1}: its content words fire them and its function tokens recall
    them, plus feature 63, which fires everywhere."""
    out = []
    for i in range(N):
        a = torch.zeros(T, D, dtype=torch.bool)
        a[:, [2 * i, 2 * i + 1]] = True
        a[:, 63] = True
        out.append(a)
    return out


def frequency_world(seed: int = 0) -> list[torch.Tensor]:
    """Features fire by token position only (the same in every prompt): nothing is specific to a prompt."""
    g = torch.Generator().manual_seed(seed)
    pattern = torch.rand(T, D, generator=g) < 0.3  # (T, D)
    return [pattern.clone() for _ in range(N)]


def test_topic_features_recalled_support_and_shared_ones_do_not():
    got = verdict(topic_world())
    assert got["all"].verdict == SUPPORTS
    assert got["all"].null < got["all"].statistic
    flat = verdict(frequency_world())
    assert flat["all"].verdict == DOES_NOT_SUPPORT
    assert flat["all"].statistic == pytest.approx(flat["all"].null)


def test_strata_separate_dense_from_rare_features():
    got = verdict(topic_world())
    # feature 63 fires at every position: dense, and "re-activated" in another prompt as often as in its own
    assert got["dense"].statistic == pytest.approx(1.0) and got["dense"].null == pytest.approx(1.0)
    assert got["dense"].verdict == DOES_NOT_SUPPORT
    assert got["middle"].verdict == SUPPORTS  # topic features fire at 1/16 of positions: the middle stratum


def test_sink_positions_are_not_contexts():
    """A feature that fires at the sink (position 0) and at function tokens is not re-activated from a context."""
    actives = []
    for _ in range(N):
        a = torch.zeros(T, D, dtype=torch.bool)
        a[0, 5] = True
        a[IS_FN, 5] = True
        a[:, 9] = True  # something active everywhere, so every counted position has an active feature
        actives.append(a)
    sinks = NO_SINK.clone()
    sinks[0] = True
    recs = [rs.prompt_record(a, IS_FN, NO_SINK) for a in actives]
    with_sink = rs.shares(recs[0], recs[1], {"all": torch.ones(D, dtype=torch.bool)})["all"][0]
    recs = [rs.prompt_record(a, IS_FN, sinks) for a in actives]
    without = rs.shares(recs[0], recs[1], {"all": torch.ones(D, dtype=torch.bool)})["all"][0]
    assert with_sink == pytest.approx(1.0)  # feature 5 counted as recalled from position 0
    assert without == pytest.approx(0.5)  # only feature 9 is; feature 5 never fired at a non-sink content position


def test_paired_interval_needs_two_prompts():
    f = rs.paired(np.array([0.5]), np.array([0.1]), "x", 0.0, "")
    assert f.verdict == "inconclusive"


@pytest.fixture(scope="module")
def am(demo_model, demo_tokenizer, demo_saes, demo_function_tokens):
    fn = demo_function_tokens.mask(demo_model.get_output_embeddings().weight.shape[0])
    return HFAnalysisModel(demo_model, demo_tokenizer, demo_saes, fn, demo_function_tokens)


def reference_drop(am, ids: list[int], layer: int, p: int, f: int) -> float:
    """Ablation with a plain forward hook on the decoder layer: subtract the feature's activation times its decoder
    row at position p, encoding with the SAE's own encode (no steering table)."""
    sae = am.saes[layer]

    def hook(module, args, out):
        h = out[0] if isinstance(out, tuple) else out  # (1, tokens, d_model)
        act = sae.encode(h[0, p : p + 1].to(sae.W_enc.dtype))[0, f]
        h = h.clone()
        h[0, p] -= (act * sae.W_dec[f]).to(h.dtype)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    x = torch.tensor(ids)[None]
    with torch.no_grad():
        base = am.model(input_ids=x).logits[0, p].float().log_softmax(-1)
        handle = am.model.model.layers[layer].register_forward_hook(hook)
        try:
            steered = am.model(input_ids=x).logits[0, p].float().log_softmax(-1)
        finally:
            handle.remove()
    t = int(base.argmax())
    return float(base[t] - steered[t])


def test_ablation_drop_matches_a_plain_forward_hook(am):
    ids = am.encode("The old prince was sitting in his study, and he said to his daughter that the")
    layer, p = 1, len(ids) - 1
    active, _, logits = rs.capture(am, ids, [layer])
    feats = active[layer][p].nonzero().flatten()[:4].tolist()
    assert len(feats) == 4
    base = logits[p].log_softmax(-1)
    got = rs.ablation_drops(Steerer(am, [layer], max_clamps=4), ids, layer, p, feats, base, int(base.argmax()))
    want = [reference_drop(am, ids, layer, p, f) for f in feats]
    assert got.tolist() == pytest.approx(want, abs=2e-4)
    assert max(abs(w) for w in want) > 1e-3  # the ablation moved something


def test_run_on_the_demo_model_gives_a_finding_per_layer_and_stratum(am):
    prompts = ["The old prince was sitting in his study, and he", "First Citizen: Before we proceed any further, hear"]
    prompts += ["Pierre looked at Natasha and smiled, and then he went to the"]
    out = rs.run(am, prompts, rs.StudyConfig(layers=(0, 2), ablate=2))
    assert sorted(out["layers"]) == [0, 2]
    assert len(out["findings"]) == 2 * 5
    for row in out["layers"].values():
        assert row["sinks"] >= 3  # at least the first position of each prompt
        assert 0 <= row["all"].null <= 1 and 0 <= row["all"].statistic <= 1
    with pytest.raises(ValueError, match="two prompts"):
        rs.run(am, prompts[:1])
    md = rs.markdown(out)
    assert "| 2 | causal |" in md
