"""`analysis.verdict`: a verdict decided against its null comes out each of its three ways on data where the answer
is known, and intervals cover what they should."""

import numpy as np

from functok_vllm.analysis.verdict import (
    DOES_NOT_SUPPORT,
    INCONCLUSIVE,
    SUPPORTS,
    bootstrap,
    decide,
    empirical_p,
    finding,
    wilson,
)


def test_verdict_flips_with_the_planted_effect():
    rng = np.random.default_rng(0)
    null = 0.5
    effect = rng.normal(0.8, 0.05, size=200)  # planted: clearly above the null
    absent = rng.normal(0.5, 0.05, size=200)  # planted: no effect, precisely measured
    noisy = rng.normal(0.55, 1.0, size=8)  # too few, too noisy to tell
    assert finding("x", effect.mean(), bootstrap(effect), null, margin=0.05).verdict == SUPPORTS
    assert finding("x", absent.mean(), bootstrap(absent), null, margin=0.05).verdict == DOES_NOT_SUPPORT
    assert finding("x", noisy.mean(), bootstrap(noisy), null, margin=0.05).verdict == INCONCLUSIVE
    # the hypothesis predicting "lower" mirrors it
    assert finding("x", effect.mean(), bootstrap(effect), null, higher=False).verdict == DOES_NOT_SUPPORT


def test_a_null_with_spread_must_be_cleared_whole():
    assert decide((0.62, 0.66), 0.5, null_interval=(0.45, 0.6)) == SUPPORTS
    assert decide((0.58, 0.66), 0.5, null_interval=(0.45, 0.6)) == INCONCLUSIVE
    assert decide((0.40, 0.58), 0.5, null_interval=(0.45, 0.6)) == DOES_NOT_SUPPORT
    assert decide((float("nan"), float("nan")), 0.5) == INCONCLUSIVE


def test_json_form_and_helpers():
    f = finding("coverage", 0.9, (0.85, 0.95), 0.4, null_interval=(0.3, 0.5))
    j = f.to_json()
    assert set(j) >= {"statistic", "null", "interval", "verdict"} and j["verdict"] == SUPPORTS
    assert finding("c", float("nan"), (float("nan"),) * 2, 0.4).to_json()["statistic"] is None
    lo, hi = wilson(50, 100)
    assert lo < 0.5 < hi and 0.39 < lo and hi < 0.61
    assert empirical_p(100.0, np.arange(100)) == 1 / 101
    assert empirical_p(-1.0, np.arange(100)) == 1.0


def test_sink_rule():
    import torch

    from functok_vllm.core.sinks import sink_mask

    ids = torch.tensor([[5, 1, 7, 8, 9], [1, 2, 3, 4, 5]])
    norms = torch.tensor([[70.0, 1.0, 1.2, 0.9, 1.1], [1.0, 1.0, 30.0, 1.0, 1.0]])
    m = sink_mask(ids, norms, bos_id=1)
    assert m.tolist() == [[True, True, False, False, False], [True, False, True, False, False]]
    assert sink_mask(ids[1]).tolist() == [True, False, False, False, False]
