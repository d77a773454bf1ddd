"""Findings beside their nulls: a statistic, what chance (frequency, position) alone gives, an interval, and a verdict
decided against that null that can come out either way.

Every analysis result that the report calls a finding is a `Finding`. Its verdict is one of `VERDICTS`, chosen by
`decide` from the statistic's interval and the null (a value, optionally with its own spread, e.g. the 2.5-97.5
percentiles of frequency-matched random token sets):

- "supports": the statistic's interval lies wholly beyond the null's upper edge, in the direction the hypothesis
  predicts, and the point estimate exceeds the null by at least `margin` (the smallest effect worth a claim);
- "does not support": the interval lies wholly within `margin` of the null or on its other side (the effect is
  absent or reversed, and the data are precise enough to say so);
- "inconclusive": anything else (the interval straddles the null and is wider than the margin).

A verdict computed on planted data where the answer is known must come out both ways (tests/test_verdicts.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

SUPPORTS, DOES_NOT_SUPPORT, INCONCLUSIVE = "supports", "does not support", "inconclusive"
VERDICTS = (SUPPORTS, DOES_NOT_SUPPORT, INCONCLUSIVE)
N_BOOT = 1000  # bootstrap resamples: the 95% percentile interval moves by < 1% of its width beyond this
ALPHA = 0.05


@dataclass(frozen=True)
class Finding:
    """One finding: `statistic` with its `interval`, beside `null` (what frequency, position or chance alone gives,
    with `null_interval` when the null is a distribution), and the `verdict` decided from them."""

    name: str
    statistic: float
    interval: tuple[float, float]
    null: float
    verdict: str
    null_interval: tuple[float, float] | None = None
    what: str = ""  # the statistic and its null in words, for the report

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict {self.verdict!r} is not one of {VERDICTS}")

    def to_json(self) -> dict:
        """The form `summary.json` carries per finding and layer."""
        out = {
            "statistic": _num(self.statistic),
            "null": _num(self.null),
            "interval": [_num(x) for x in self.interval],
            "verdict": self.verdict,
        }
        if self.null_interval is not None:
            out["null_interval"] = [_num(x) for x in self.null_interval]
        if self.what:
            out["what"] = self.what
        return out


def _num(x: float) -> float | None:
    """JSON has no NaN: an undefined number is null."""
    return None if x is None or not math.isfinite(x) else float(x)


def decide(
    interval: tuple[float, float],
    null: float,
    *,
    statistic: float | None = None,
    null_interval: tuple[float, float] | None = None,
    margin: float = 0.0,
    higher: bool = True,
) -> str:
    """The verdict for a statistic whose 95% interval is `interval`, against `null` (and its spread
    `null_interval`). `higher`: the hypothesis predicts a statistic above the null (else below). `margin`: the
    smallest difference from the null that counts as an effect."""
    lo, hi = interval
    n_lo, n_hi = null_interval if null_interval is not None else (null, null)
    if not higher:  # mirror everything so that "above" is always the hypothesis's side
        lo, hi, n_lo, n_hi, null = -hi, -lo, -n_hi, -n_lo, -null
        statistic = None if statistic is None else -statistic
    if any(not math.isfinite(x) for x in (lo, hi, n_lo, n_hi, null)):
        return INCONCLUSIVE
    point = (lo + hi) / 2 if statistic is None else statistic
    if lo > n_hi and point - null >= margin:
        return SUPPORTS
    if hi <= n_hi + margin:
        return DOES_NOT_SUPPORT
    return INCONCLUSIVE


def finding(
    name: str,
    statistic: float,
    interval: tuple[float, float],
    null: float,
    *,
    null_interval: tuple[float, float] | None = None,
    margin: float = 0.0,
    higher: bool = True,
    what: str = "",
) -> Finding:
    """A Finding with its verdict decided by `decide`."""
    v = decide(interval, null, statistic=statistic, null_interval=null_interval, margin=margin, higher=higher)
    return Finding(name, statistic, tuple(interval), null, v, tuple(null_interval) if null_interval else None, what)


def bootstrap(
    units: np.ndarray,
    stat: Callable[[np.ndarray], float] = np.mean,
    n_boot: int = N_BOOT,
    seed: int = 0,
    alpha: float = ALPHA,
) -> tuple[float, float]:
    """Percentile interval of `stat` over resamples of `units` (rows: the independent units, e.g. prompts).
    One unit gives (nan, nan): no interval can be claimed from it."""
    units = np.asarray(units)
    n = len(units)
    if n < 2:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))  # (n_boot, n)
    draws = np.array([stat(units[i]) for i in idx])
    lo, hi = np.nanquantile(draws, [alpha / 2, 1 - alpha / 2])
    return (float(lo), float(hi))


def percentile_interval(draws, alpha: float = ALPHA) -> tuple[float, float]:
    """The central 1 - alpha range of a null's draws (e.g. coverage of random token sets)."""
    lo, hi = np.quantile(np.asarray(draws, dtype=float), [alpha / 2, 1 - alpha / 2])
    return (float(lo), float(hi))


def empirical_p(value: float, draws, higher: bool = True) -> float:
    """One-sided permutation p-value of `value` among the null's `draws`, with the +1 correction."""
    d = np.asarray(draws, dtype=float)
    beyond = (d >= value) if higher else (d <= value)
    return float((beyond.sum() + 1) / (len(d) + 1))


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a proportion k / n (nan, nan for n = 0)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))
