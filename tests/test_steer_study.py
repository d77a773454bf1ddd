"""The controlled steering study: its verdicts on planted per-prompt effects both ways, its steered forward against a
plain forward hook, its cached continuation against the core's full-recompute greedy, and a run on the demo model."""

import numpy as np
import pytest
import torch

from functok_vllm.analysis import steer_study as ss
from functok_vllm.analysis.model import HFAnalysisModel
from functok_vllm.analysis.steer_sweep import Steerer, spec_for
from functok_vllm.analysis.verdict import DOES_NOT_SUPPORT, SUPPORTS

torch.set_num_threads(1)
PROMPTS = [
    "The old prince was sitting in his study, and he said to his daughter that the",
    "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. First Citizen: You are all",
    "Pierre looked at Natasha and smiled, and then he went to the window and",
]


def planted(feature: float, random: float, content: float, n: int = 20, seed: int = 0) -> dict:
    """Per-prompt Δ log p(target) arrays (prompts, variant, direction, strength) with the given means and noise 0.2."""
    rng = np.random.default_rng(seed)
    d = np.zeros((n, 2, 2, 1))
    d[:, 0, 0, 0] = feature + 0.2 * rng.standard_normal(n)
    d[:, 0, 1, 0] = random + 0.2 * rng.standard_normal(n)
    d[:, 1, 0, 0] = content + 0.2 * rng.standard_normal(n)
    return {"dlogp": d}


def test_verdicts_flip_with_the_planted_effect():
    vs_random, vs_content = ss.findings(planted(3.0, 0.0, 1.0), (1.0,), layer=0)
    assert (vs_random.verdict, vs_content.verdict) == (SUPPORTS, SUPPORTS)
    vs_random, vs_content = ss.findings(planted(1.0, 1.0, 1.0), (1.0,), layer=0)
    assert (vs_random.verdict, vs_content.verdict) == (DOES_NOT_SUPPORT, DOES_NOT_SUPPORT)
    _, vs_content = ss.findings(planted(1.0, 0.0, 2.0), (1.0,), layer=0)
    assert vs_content.verdict == DOES_NOT_SUPPORT  # content position steers better: the hypothesis's side loses


@pytest.fixture(scope="module")
def am(demo_model, demo_tokenizer, demo_saes, demo_function_tokens):
    fn = demo_function_tokens.mask(demo_model.get_output_embeddings().weight.shape[0])
    return HFAnalysisModel(demo_model, demo_tokenizer, demo_saes, fn, demo_function_tokens)


def test_steered_forward_and_continuation_match_references(am):
    layer, f, strength = 2, 7, 60.0
    ids = torch.tensor(am.encode(PROMPTS[0]))
    assert bool(am.fn_mask[ids[-1]])  # ends on a function token: last_function steers the last position
    st = Steerer(am, [layer])
    spec = spec_for(layer, f, strength, "last_function")
    logp, cont = ss.steered_generate(st, ids, [spec], 6)

    def hook(module, args, out):  # plain reference: add strength * W_dec[f] at the last position
        h = out[0] if isinstance(out, tuple) else out
        h = h.clone()
        h[:, -1] += strength * am.saes[layer].W_dec[f].to(h.dtype)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = am.model.model.layers[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            want = am.model(input_ids=ids[None]).logits[0, -1].float().log_softmax(-1)
    finally:
        handle.remove()
    assert torch.allclose(logp[0], want, atol=1e-4)
    assert cont[0].tolist() == st.greedy(ids.tolist(), 6, spec, "last_function")  # cache == full recompute
    unsteered = ss.steered_generate(st, ids, [None], 6)[0][0]
    assert (logp[0] - unsteered).abs().max() > 0.1  # the steer moved the distribution


def test_perplexity_is_the_unsteered_models(am):
    ids = torch.tensor(am.encode(PROMPTS[1]))
    cont = torch.tensor([am.encode(" the the the")])
    with torch.no_grad():
        full = am.model(input_ids=torch.cat([ids, cont[0]])[None]).logits[0].float().log_softmax(-1)
    k = cont.shape[1]
    nll = -full[len(ids) - 1 : len(ids) - 1 + k].gather(1, cont[0][:, None])[:, 0]
    assert float(ss.perplexity(am, ids, cont)[0]) == pytest.approx(float(nll.mean().exp()), rel=1e-4)


def test_run_on_the_demo_model(am, tmp_path):
    cfg = ss.StudyConfig(layer=2, prompts=3, features=2, multiples=(0.5, 2.0), generate=3)
    out = ss.run(am, PROMPTS, cfg)
    assert out["prompts"] == 3 and len(out["findings"]) == 4
    d = out["per_prompt"]["dlogp"]  # (prompts, variant, direction, strength)
    assert np.isfinite(d).all()
    assert (d[:, :, 0, 1] > d[:, :, 0, 0]).all()  # a stronger push on the feature raises its target more
    assert "| ends_content | random | 2x" in ss.markdown(out)
    assert ss.plot(out, tmp_path / "s.png").stat().st_size > 0
    with pytest.raises(ValueError, match="two prompts"):
        ss.run(am, PROMPTS[:1], cfg)
