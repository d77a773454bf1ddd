"""Coverage beside its nulls: what token frequency alone gives, and the coverage verdict decided against it.

The paper's coverage (share of the reached features that the function tokens reach) saturates whenever features fire
often: a feature that fires n times at positions that do not depend on the token misses a token set holding a share
q of the positions with probability (1 - q)^n. So every coverage figure here stands beside:

- the analytic chance level, mean over reached features of P(Binomial(n_f, q) >= m) (for m = 1: 1 - (1 - q)^n_f);
- frequency-matched random sets: content tokens in random order, taken until they hold the function tokens' share of
  positions (`n_random` draws); where the function tokens fall among them (percentile, empirical p);
- rarefaction: the expected number of distinct features reached after s positions drawn without replacement from the
  function positions, and from the content positions (Hurlbert's formula, exact from the firing counts);
- per-feature enrichment (share of a feature's firings on function positions / their share of positions; 1 is
  chance) against binomial thinning of the same firing counts.

A token set reaches a feature at level m when the feature fires at >= m of the set's positions (m = 1 is the paper's
edge). The verdict: "supports" only when the function tokens' coverage (its interval a bootstrap over windows) lies
above the random sets' 97.5th percentile, and exceeds their mean by at least `margin`. The random sets are the null
that decides: they hold the same share of positions and keep each feature's real dependence on its tokens. The
analytic level stands beside it, not in the decision: it assumes firing ignores the token, so it is ~100% for any
feature that fires often, also for a feature firing at function tokens only (tests/test_coverage_nulls.py plants
both worlds).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from functok_vllm.analysis.verdict import empirical_p, finding, percentile_interval
from functok_vllm.core.capture import _POPCOUNT, EdgeBits


@dataclass
class NullConfig:
    n_random: int = 200  # random content-token sets; the issue asks for >= 100, 200 keeps the 95% band steady
    min_firings: tuple[int, ...] = (1, 10)  # m: a set reaches a feature at >= m firings on its positions
    n_boot: int = 500  # window resamples for the statistic's interval (each an OR over ~200 packed windows)
    margin: float = 0.02  # 2 points of coverage above the null's band: the smallest effect worth a claim
    min_count: int = 10  # features firing fewer times have too noisy an enrichment to show
    seed: int = 0
    rare_points: int = 40  # points of each rarefaction curve


def random_content_sets(count: torch.Tensor, fn_mask: torch.Tensor, n: int, seed: int = 0) -> list[torch.Tensor]:
    """n (vocab,) bool masks: content tokens in a random order, taken until they hold as many positions as the
    function tokens (the prefix whose total is closest); all content tokens if they hold fewer."""
    count, fn = count.cpu(), fn_mask.cpu()
    content = ((count > 0) & ~fn).nonzero().flatten()
    target = int(count[fn].sum())
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        perm = content[torch.randperm(len(content), generator=gen)]
        cum = count[perm].cumsum(0)
        k = int(torch.searchsorted(cum, torch.tensor(target)))
        if k < len(cum) and k > 0 and target - int(cum[k - 1]) < int(cum[k]) - target:
            k -= 1
        mask = torch.zeros_like(fn)
        mask[perm[: k + 1]] = True
        out.append(mask)
    return out


def set_firings(g: EdgeBits, masks: torch.Tensor, pairs=None, chunk: int = 64) -> torch.Tensor:
    """(sets, d_sae) firings of each feature at the positions holding a token of each set; masks (sets, vocab) bool;
    `pairs`: g.pairs(), reused. One sparse (d_sae, vocab) @ dense (vocab, sets) product per `chunk` sets (float64:
    exact for counts below 2^53), not a gather and a bincount per set (100x slower at 200 sets, 2M edges)."""
    tokens, feats, n = g.pairs() if pairs is None else pairs
    ij = torch.stack([feats, tokens])
    A = torch.sparse_coo_tensor(ij, n.double(), (g.d_sae, masks.shape[1]), check_invariants=True)  # (d_sae, vocab)
    out = [torch.sparse.mm(A, m.T.double()).T for m in masks.cpu().split(chunk)]  # (chunk, d_sae) each
    return torch.cat(out).round().long()


def coverage_at(firings: torch.Tensor, total: torch.Tensor, m: int) -> float:
    """Share of the features firing >= m times in all that fire >= m times on the set's positions."""
    reached = total >= m
    return float((firings[reached] >= m).sum()) / max(1, int(reached.sum()))


def analytic(total: torch.Tensor, q: float, m: int) -> float:
    """Mean over features with n_f >= m of P(Binomial(n_f, q) >= m): coverage if firing ignored the token."""
    n = total[total >= m].double()
    if not len(n) or q <= 0:
        return 0.0
    if q >= 1:
        return 1.0
    j = torch.arange(m, dtype=torch.float64)[:, None]  # (m, 1)
    logc = torch.lgamma(n + 1) - torch.lgamma(j + 1) - torch.lgamma(n - j + 1)  # (m, features)
    below = (logc + j * np.log(q) + (n - j) * np.log1p(-q)).exp().sum(0)  # P(X < m)
    return float((1 - below).clamp(0, 1).mean())


def rarefaction(counts: torch.Tensor, n_pos: int, points: int) -> tuple[list[int], list[float]]:
    """Expected distinct features among s positions drawn without replacement from n_pos positions at which the
    features fire counts (d_sae,) times: sum_f 1 - C(n_pos - c_f, s) / C(n_pos, s)."""
    if n_pos < 1:
        return [], []
    s = np.unique(np.geomspace(1, n_pos, points).round().astype(int))
    c = counts.double()[None, :]  # (1, d_sae)
    st = torch.tensor(s, dtype=torch.float64)[:, None]  # (points, 1)
    N = torch.tensor(float(n_pos), dtype=torch.float64)

    def lg(x):
        return torch.lgamma(x + 1)

    ok = (N - c) >= st  # else every draw of s hits the feature
    log_miss = lg(N - c) - lg(N - c - st).where(ok, torch.zeros(())) - lg(N) + lg(N - st)
    miss = torch.where(ok, log_miss.exp(), torch.zeros(()))  # (points, d_sae)
    return s.tolist(), (1 - miss).sum(1).tolist()


def window_bootstrap(g: EdgeBits, n_boot: int, seed: int) -> tuple[float, float]:
    """95% interval of the function tokens' coverage (m = 1) over resamples of the windows, re-centred on the
    estimate: a resample repeats windows, so it holds fewer distinct ones and its coverage is biased low (by ~5 points
    on 18 windows of functok-tiny); the percentile band is shifted by that bias (mean of the draws - estimate)."""
    fn, all_ = (w.cpu().numpy() for w in g.windows())
    if len(fn) < 2:
        return (float("nan"), float("nan"))
    pop = _POPCOUNT.numpy()
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        i = rng.integers(0, len(fn), len(fn))
        num, den = pop[np.bitwise_or.reduce(fn[i], 0)].sum(), pop[np.bitwise_or.reduce(all_[i], 0)].sum()
        draws.append(num / den if den else np.nan)
    draws = np.array(draws)[np.isfinite(draws)]
    full_num, full_den = pop[np.bitwise_or.reduce(fn, 0)].sum(), pop[np.bitwise_or.reduce(all_, 0)].sum()
    shift = full_num / full_den - draws.mean() if full_den else 0.0
    lo, hi = percentile_interval(draws)
    return (float(np.clip(lo + shift, 0, 1)), float(np.clip(hi + shift, 0, 1)))


def enrichment(fn_f: torch.Tensor, total: torch.Tensor, q: float, cfg: NullConfig) -> dict:
    """Per-feature enrichment e_f = (fn_f / n_f) / q over features firing >= min_count times; its median against the
    medians of binomial thinnings of the same counts (what chance alone gives)."""
    keep = total >= cfg.min_count
    n, k = total[keep].numpy(), fn_f[keep].numpy()
    if not len(n) or q <= 0:
        return {"features": 0, "values": [], "finding": None}
    e = (k / n) / q
    rng = np.random.default_rng(cfg.seed)
    null_med = np.array([np.median(rng.binomial(n, q) / n / q) for _ in range(cfg.n_random)])
    boot = rng.integers(0, len(e), (cfg.n_boot, len(e)))
    f = finding(
        "enrichment",
        float(np.median(e)),
        percentile_interval(np.median(e[boot], axis=1)),
        float(np.mean(null_med)),
        null_interval=percentile_interval(null_med),
        margin=0.1,
        what="median over features of (share of firings on function positions) / (their share of positions); "
        "null: the same firing counts split binomially",
    )
    return {"features": len(e), "values": e.tolist(), "share_enriched": float((e > 1).mean()), "finding": f}


def layer_nulls(g: EdgeBits, fn_mask: torch.Tensor, cfg: NullConfig) -> dict:
    """Everything beside one layer's coverage: nulls, rarefaction, enrichment, firing frequencies and the findings."""
    count = g.token_count.cpu()
    fn = fn_mask.cpu()
    total = g.feature_count.cpu()  # (d_sae,) firings at kept positions
    n_pos, n_fn = int(count.sum()), int(count[fn].sum())
    q = n_fn / n_pos if n_pos else 0.0
    pairs = g.pairs()
    sets = random_content_sets(count, fn, cfg.n_random, cfg.seed)
    fn_f, *rand_f = set_firings(g, torch.stack([fn, *sets]), pairs)  # (d_sae,) each
    out = {
        "positions": n_pos,
        "sinks_excluded": g.n_sinks,
        "function_share": q,
        "random_set_share": float(np.mean([int(count[s].sum()) / n_pos for s in sets])) if n_pos else 0.0,
        "random_set_tokens": float(np.mean([int(s.sum()) for s in sets])),
        "n_random": cfg.n_random,
        "by_m": {},
        "findings": {},
    }
    for m in cfg.min_firings:
        stat = coverage_at(fn_f, total, m)
        draws = np.array([coverage_at(r, total, m) for r in rand_f])
        chance = analytic(total, q, m)
        band = percentile_interval(draws)
        interval = window_bootstrap(g, cfg.n_boot, cfg.seed) if m == 1 else (stat, stat)
        f = finding(
            f"coverage_m{m}",
            stat,
            interval,
            float(draws.mean()),
            null_interval=band,
            margin=cfg.margin,
            what=f"share of the features firing >= {m}x that fire >= {m}x on function positions; null: random "
            f"content-token sets holding the same share of positions (analytic chance level {chance:.3f})",
        )
        out["by_m"][m] = {
            "features": int((total >= m).sum()),
            "edges": int((pairs[2] >= m).sum()),
            "function_coverage": stat,
            "interval": list(interval),
            "analytic": chance,
            "random_mean": float(draws.mean()),
            "random_band": list(band),
            "percentile": float((draws < stat).mean() * 100),
            "p_value": empirical_p(stat, draws),
            "random_draws": draws.tolist(),
        }
        out["findings"][f"coverage_m{m}"] = f
    content_f = total - fn_f
    out["rarefaction"] = {
        "function": rarefaction(fn_f, n_fn, cfg.rare_points),
        "content": rarefaction(content_f, n_pos - n_fn, cfg.rare_points),
    }
    enr = enrichment(fn_f, total, q, cfg)
    out["enrichment"] = {k: v for k, v in enr.items() if k != "finding"}
    if enr["finding"] is not None:
        out["findings"]["enrichment"] = enr["finding"]
    out["firing_frequency"] = (total[total > 0].double() / max(1, n_pos)).tolist()
    return out


def plot(nulls: dict, path) -> object:
    """One row a layer: the random sets' coverage with the function tokens and chance marked; rarefaction; the
    enrichment histogram; the feature firing-frequency histogram."""
    import matplotlib

    from functok_vllm.analysis.io import save_figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(nulls)
    fig, axes = plt.subplots(len(layers), 4, figsize=(16, 3.2 * len(layers)), squeeze=False)
    for row, layer in zip(axes, layers, strict=True):
        nl = nulls[layer]
        b = nl["by_m"][min(nl["by_m"])]
        ax = row[0]
        ax.hist(b["random_draws"], bins=30, color="C0", alpha=0.7, label="random content sets")
        ax.axvline(b["function_coverage"], color="C3", label="function tokens")
        ax.axvline(b["analytic"], color="k", ls="--", label="analytic chance")
        ax.set_title(f"layer {layer}: coverage (m = {min(nl['by_m'])})")
        ax.set_xlabel("share of reached features")
        ax.legend(fontsize=7)
        ax = row[1]
        for kind, color in (("function", "C3"), ("content", "C0")):
            s, e = nl["rarefaction"][kind]
            ax.plot(s, e, color=color, label=f"{kind} positions")
        ax.set_xscale("log")
        ax.set_xlabel("positions sampled")
        ax.set_ylabel("distinct features reached")
        ax.set_title("rarefaction (expected)")
        ax.legend(fontsize=7)
        ax = row[2]
        vals = np.array(nl["enrichment"]["values"])
        if len(vals):
            ax.hist(np.log2(np.maximum(vals, 1e-3)), bins=40, color="C2")
        ax.axvline(0, color="k", ls="--", label="chance (1)")
        ax.set_xlabel("log2 enrichment on function positions (-10: never)")
        ax.set_title("per-feature enrichment")
        ax.legend(fontsize=7)
        ax = row[3]
        freq = np.array(nl["firing_frequency"])
        if len(freq):
            ax.hist(np.log10(freq), bins=40, color="C4")
        ax.set_xlabel("log10 firing frequency (share of positions)")
        ax.set_title("feature firing frequencies")
    return save_figure(fig, path)


def compact(nulls: dict) -> dict:
    """The nulls without their long arrays, and the findings as `Finding.to_json()`: what coverage.json carries."""
    out = {}
    for layer, nl in nulls.items():
        by_m = {m: {k: v for k, v in b.items() if k != "random_draws"} for m, b in nl["by_m"].items()}
        enr = {k: v for k, v in nl["enrichment"].items() if k != "values"}
        keep = {k: v for k, v in nl.items() if k not in ("by_m", "enrichment", "firing_frequency", "findings")}
        out[layer] = {
            **keep,
            "by_m": by_m,
            "enrichment": enr,
            "findings": {k: f.to_json() for k, f in nl["findings"].items()},
        }
    return out
