"""The token-feature bipartite graph of the paper: edges, degrees and the cumulative feature coverage by frequency rank.

Edge (token t, feature f) at an SAE layer when f is active (encoder output > 0, JumpReLU threshold included) at some
position holding t. Coverage of the top-k tokens: the share of the reached features (those with at least one edge)
that at least one of the k most frequent tokens reaches. Attention-sink positions (`core/sinks.py`) are left out by
default; each coverage stands beside its nulls (`coverage_null.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from functok_vllm.analysis import coverage_null
from functok_vllm.analysis.data import check_corpus, n_batches, sequences, token_stream
from functok_vllm.analysis.io import figure, out_dir, save_figure, write_csv, write_json
from functok_vllm.core.capture import CHUNK_BYTES, EdgeBits
from functok_vllm.errors import CLIError

MILESTONES = (1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


@dataclass
class CoverageConfig:
    layers: tuple[int, ...] | None = None  # None: every layer with an SAE
    max_tokens: int | None = None  # None: the whole corpus
    seq_len: int = 256
    batch_size: int = 8
    table_rows: int = 100  # rows of the coverage table kept in the JSON (the CSV has every rank)
    exclude_sinks: bool = True  # leave attention-sink positions out (core/sinks.py): they carry no context
    nulls: coverage_null.NullConfig | None = None  # None: the defaults

    def __post_init__(self):
        if self.seq_len < 2 or self.batch_size < 1 or self.table_rows < 1:
            raise ValueError("seq_len must be >= 2, batch_size and table_rows >= 1")


def build_graphs(am, stream: torch.Tensor, cfg: CoverageConfig, progress: bool = True) -> dict[int, EdgeBits]:
    """{layer: EdgeBits} over the token stream cut into windows of seq_len tokens, each window one sequence; EOS
    positions (document separators) add no edges. The engine runs the forwards (`am.capture_edges`): the
    transformers engine in batches of batch_size windows, vLLM with its own scheduler."""
    layers = list(cfg.layers) if cfg.layers is not None else sorted(am.saes)
    if cfg.seq_len > am.max_len:
        raise CLIError(f"--seq-len {cfg.seq_len} is longer than the model's context ({am.max_len} tokens)")
    batches = sequences(stream, cfg.seq_len, cfg.batch_size)
    total = n_batches(stream, cfg.seq_len, cfg.batch_size)
    return am.capture_edges(batches, layers, total, progress, exclude_sinks=cfg.exclude_sinks)


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 with ties sharing their mean rank. (n,) -> (n,) float64"""
    ranks = torch.empty(len(x), dtype=torch.float64)
    ranks[torch.argsort(x, stable=True)] = torch.arange(len(x), dtype=torch.float64)
    _, inv = torch.unique(x, return_inverse=True)
    return (torch.bincount(inv, weights=ranks) / torch.bincount(inv).double())[inv]


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    rx, ry = average_ranks(x.cpu()), average_ranks(y.cpu())
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = (rx.norm() * ry.norm()).item()
    return float((rx @ ry).item() / den) if den > 0 else float("nan")


def _share(curve: torch.Tensor, reached: int) -> float:
    return float(curve[-1]) / reached if reached and len(curve) else 0.0


def summarize(
    graphs: dict[int, EdgeBits], fn_mask: torch.Tensor, decode, nulls: coverage_null.NullConfig | None = None
) -> dict:
    """Node/edge counts, reach, degrees, the coverage table by frequency rank (most frequent first), and each layer's
    nulls and findings (`coverage_null.layer_nulls`) under "nulls"."""
    first = next(iter(graphs.values()))
    count = first.token_count.cpu()  # (vocab,) identical at every layer
    n_seen = int((count > 0).sum())
    order = torch.argsort(-count, stable=True)[:n_seen]  # token ids by frequency, ties by id
    fn = fn_mask.cpu()
    fn_seen = order[fn[order]]
    layers, curves, degrees, null = {}, {}, {}, {}
    for layer, g in graphs.items():
        null[layer] = coverage_null.layer_nulls(g, fn, nulls or coverage_null.NullConfig())
        b1 = null[layer]["by_m"][min(null[layer]["by_m"])]
        curve = g.coverage_curve(order).cpu()  # (n_seen,)
        deg = g.degree().cpu()  # (vocab,)
        reached = int(curve[-1])
        n_fn_cover = int(g.coverage_curve(fn_seen)[-1]) if len(fn_seen) else 0
        k = min(len(fn_seen), n_seen)
        content = order[~fn[order]]
        layers[layer] = {
            "d_sae": g.d_sae,
            "token_nodes": n_seen,
            "feature_nodes": reached,
            "edges": int(deg.sum()),
            "dictionary_reached_share": reached / g.d_sae,
            "function_tokens_seen": len(fn_seen),
            "function_tokens_coverage": n_fn_cover / reached if reached else 0.0,
            "top_k_coverage_at_k_function": float(curve[k - 1]) / reached if reached and k else 0.0,
            "next_k_coverage": _share(g.coverage_curve(order[k : 2 * k]), reached),  # ranks k+1..2k, a baseline
            "mean_degree_function": float(deg[fn_seen].double().mean()) if len(fn_seen) else 0.0,
            "mean_degree_content": float(deg[content].double().mean()) if len(content) else 0.0,
            "spearman_degree_frequency": spearman(count[order].double(), deg[order].double()),
            "features_active_per_token": float(g.feature_count.sum()) / float(count.sum()),
            "sinks_excluded": g.n_sinks,
            "function_share_of_positions": null[layer]["function_share"],
            "random_sets_coverage": b1["random_mean"],
            "analytic_chance_coverage": b1["analytic"],
        }
        curves[layer], degrees[layer] = curve, deg
    rows = []
    for r, t in enumerate(order.tolist()):
        row = {"rank": r + 1, "id": t, "token": decode([t]), "count": int(count[t]), "is_function": bool(fn[t])}
        for layer in graphs:
            row[f"degree_L{layer}"] = int(degrees[layer][t])
        for layer in graphs:
            reached = layers[layer]["feature_nodes"]
            row[f"coverage_L{layer}"] = float(curves[layer][r]) / reached if reached else 0.0
        rows.append(row)
    return {"tokens": int(count.sum()), "distinct_tokens": n_seen, "layers": layers, "table": rows, "nulls": null}


def milestone_rows(table: list[dict]) -> list[dict]:
    """The table rows at ranks 1, 2, 3, 5, 10, ... and the last rank, as the paper's coverage table shows them."""
    n = len(table)
    keep = sorted({m for m in MILESTONES if m <= n} | {n})
    return [table[k - 1] for k in keep]


def plot(summary: dict, n_function: int, out: Path) -> list[Path]:
    table, layers = summary["table"], list(summary["layers"])
    fig, axes = figure(len(layers))
    count = torch.tensor([r["count"] for r in table], dtype=torch.float64)
    is_fn = torch.tensor([r["is_function"] for r in table])
    for ax, layer in zip(axes, layers, strict=True):
        deg = torch.tensor([r[f"degree_L{layer}"] for r in table], dtype=torch.float64)
        keep = deg > 0
        ax.scatter(count[keep & ~is_fn], deg[keep & ~is_fn], s=3, alpha=0.4, label="content")
        ax.scatter(count[keep & is_fn], deg[keep & is_fn], s=8, color="C3", label="function")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("token frequency")
        ax.set_ylabel("features reached (degree)")
        ax.legend(fontsize=7)
    p1 = save_figure(fig, out / "degree_vs_frequency.png")
    fig, (ax,) = figure(1, width=5.0)
    ranks = torch.arange(1, len(table) + 1)
    for layer in layers:
        ax.plot(ranks, [r[f"coverage_L{layer}"] for r in table], label=f"layer {layer}")
    if n_function:
        ax.axvline(n_function, color="gray", ls="--", lw=1, label=f"{n_function} function tokens")
    ax.set_xscale("log")
    ax.set_xlabel("top-k most frequent tokens")
    ax.set_ylabel("share of reached features covered")
    ax.legend(fontsize=7)
    p2 = save_figure(fig, out / "coverage_vs_rank.png")
    return [p1, p2]


def write(summary: dict, out: Path, table_rows: int = 100) -> list[Path]:
    out = out_dir(out)
    short = {**summary, "table": summary["table"][:table_rows], "milestones": milestone_rows(summary["table"])}
    short["nulls"] = coverage_null.compact(summary["nulls"])
    n_fn = next(iter(summary["layers"].values()))["function_tokens_seen"]
    return [
        write_json(out / "coverage.json", short),
        write_csv(out / "coverage.csv", summary["table"]),
        *plot(summary, n_fn, out),
        coverage_null.plot(summary["nulls"], out / "coverage_null.png"),
    ]


def config_from_args(args) -> CoverageConfig:
    return CoverageConfig(
        tuple(args.layers) if args.layers else None,
        args.max_tokens,
        args.seq_len,
        args.batch_size,
        exclude_sinks=not args.keep_sinks,
    )


def open_engine(args, layers: list[int] | None):
    """The analysis model `args.engine` names, with the SAE encoders of `layers` (None: all)."""
    from functok_vllm.analysis.model import load_hf
    from functok_vllm.analysis.vllm_model import load_vllm

    sae_dtype = getattr(args, "sae_dtype", "float32")
    if getattr(args, "engine", "transformers") == "vllm":
        from functok_vllm.engines.vllm.settings import offline_in_process

        offline_in_process(args.tensor_parallel_size)
        dtype = getattr(args, "model_dtype", "float32")
        am = load_vllm(args.model, args.saes, args.function_tokens, layers, args.tensor_parallel_size, sae_dtype, dtype)
        print(f"vLLM workers hold {am.sae_bytes():,} bytes of SAE weights (encoders only, {sae_dtype})")
        return am
    chunk = getattr(args, "chunk_mb", CHUNK_BYTES >> 20) << 20
    return load_hf(args.model, args.saes, args.function_tokens, layers, True, getattr(torch, sae_dtype), chunk)


def main(args) -> int:
    check_corpus(args.corpus)
    if getattr(args, "plan", False):
        from functok_vllm.analysis.plan import plan_from_args, render

        print(render(*plan_from_args(args)))
        return 0

    cfg = config_from_args(args)
    layers = cfg.layers and list(cfg.layers)
    if getattr(args, "data_parallel_size", 1) > 1:
        from functok_vllm.analysis import coverage_dp

        am, layers = coverage_dp.open_tokenizer(args)
        stream = token_stream(am.encode, am.eos_id, args.corpus, cfg.max_tokens)
        graphs = coverage_dp.build_graphs(args, layers, stream, cfg.seq_len)
    else:
        am = open_engine(args, layers)
        stream = token_stream(am.encode, am.eos_id, args.corpus, cfg.max_tokens)
        graphs = build_graphs(am, stream, cfg)
    summary = summarize(graphs, am.fn_mask, am.decode, cfg.nulls)
    paths = write(summary, Path(args.out), cfg.table_rows)
    for layer, s in summary["layers"].items():
        print(
            f"layer {layer}: {s['token_nodes']} tokens, {s['feature_nodes']}/{s['d_sae']} features reached, "
            f"{s['edges']} edges; function tokens cover {s['function_tokens_coverage']:.1%} of reached features "
            f"(random sets of the same share {s['random_sets_coverage']:.1%}, analytic chance "
            f"{s['analytic_chance_coverage']:.1%}; {s['sinks_excluded']} sink positions left out)"
        )
        for name, f in summary["nulls"][layer]["findings"].items():
            print(f"  {name}: {f.statistic:.3f} vs null {f.null:.3f} -> {f.verdict}")
    print("wrote " + ", ".join(map(str, paths)))
    return 0
