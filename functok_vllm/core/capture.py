"""Capture-mode reductions over SAE activations: token-feature edges and counts, first-reach ranks, re-activation sets.

The steering core's counterpart for reading instead of writing: the same residual hooks feed these ops, which run on
the device in batches and never hold activations for more than one batch. Attention-sink positions (`core/sinks.py`)
are left out of every count by default. torch only.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from functok_vllm.core.sae import SAE
from functok_vllm.core.sinks import SINK_NORM_RATIO, sink_mask

# Bytes of (rows, d_sae) intermediates one encode chunk may hold; rows per chunk = this / (d_sae x bytes per element).
# At d_sae = 2^20 in bfloat16 that is 512 rows: the encoder GEMM then does 512 flops per byte of encoder it reads,
# above an H100's ~295 (989 TFLOP/s over 3.35 TB/s), so it is compute-bound, by arithmetic (a fixed 2^25 elements
# gave 32 rows: 16x the reads). A 16k-wide SAE takes a whole batch. `--chunk-mb` sets it; `analysis/plan.py` counts it.
CHUNK_BYTES = 2 << 30
_BIT = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)  # (8,)
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int32)  # (256,)


def element_bytes(sae: SAE, active_only: bool) -> int:
    """Bytes per (row, feature) one chunk's encode holds at its peak: the pre-activations in the SAE's dtype and two
    bool masks (active_only), or the pre-activations, their relu, the product and a mask (encode); a gated SAE's
    magnitude path doubles it."""
    size = sae.W_enc.element_size()
    per = size + 2 if active_only else 3 * size + 1
    return 2 * per if sae.cfg.architecture == "gated" else per


def chunk_rows(sae: SAE, chunk_bytes: int = CHUNK_BYTES, active_only: bool = False) -> int:
    """Rows per encode chunk so that its (rows, d_sae) intermediates stay under chunk_bytes (at least one row)."""
    return max(1, chunk_bytes // (sae.d_sae * element_bytes(sae, active_only)))


def encode_chunks(
    sae: SAE, h: torch.Tensor, chunk_bytes: int = CHUNK_BYTES, active_only: bool = False
) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, (rows, d_sae) activations) over row chunks of h (tokens, d_in) sized by `chunk_rows`, so a d_sae of
    2^20 fits in memory; with active_only, (rows, d_sae) bool `activations > 0` instead (no activation values)."""
    rows = chunk_rows(sae, chunk_bytes, active_only)
    fn = sae.active if active_only else sae.encode
    for start in range(0, h.shape[0], rows):
        yield start, fn(h[start : start + rows])


def pack_bits(x: torch.Tensor) -> torch.Tensor:
    """(rows, n_bits) bool -> (rows, ceil(n_bits / 8)) uint8, the inverse of `unpack_bits`."""
    pad = (-x.shape[1]) % 8
    x = torch.nn.functional.pad(x.to(torch.uint8), (0, pad)).view(x.shape[0], -1, 8)  # (rows, bytes, 8)
    return (x * _BIT.to(x.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n_bits: int) -> torch.Tensor:
    """(rows, bytes) uint8 -> (rows, n_bits) bool, bit j of byte b is column 8 * b + j."""
    bit = _BIT.to(packed.device)
    return ((packed[:, :, None] & bit) != 0).reshape(packed.shape[0], -1)[:, :n_bits]


class EdgeBits:
    """The token-feature bipartite graph of one SAE layer as a sparse edge set in host memory.

    Every edge (token t, feature f) is one sorted key t * d_sae + f with its firings (`pair_key`, `pair_n`), so memory
    grows with the distinct edges (16 bytes each), not with (tokens seen) x d_sae: a 1M-wide dictionary costs no
    131 kB row per token. A batch's pairs are made distinct on the device it ran on and only they cross to the host,
    where they wait in `_pending` until they outgrow the merged set (then one sort merges them: no table doubles on
    the device). Token occurrences and feature firings are counted on the device ((vocab,) and (d_sae,), fixed size).
    Per window (a unit to bootstrap over), on the host: the features fired at function positions and at any
    position, packed (`add_window`); and the sink positions left out (`n_sinks`).
    """

    def __init__(self, d_sae: int, vocab_size: int, device="cpu"):
        self.d_sae, self.vocab_size, self.device = d_sae, vocab_size, torch.device(device)
        self.n_bytes = (d_sae + 7) // 8
        self.token_count = torch.zeros(vocab_size, dtype=torch.long, device=device)  # (vocab,)
        self.feature_count = torch.zeros(d_sae, dtype=torch.long, device=device)  # (d_sae,) positions active
        self.pair_key = torch.empty(0, dtype=torch.long)  # (edges,) token * d_sae + feature, sorted, host
        self.pair_n = torch.empty(0, dtype=torch.long)  # (edges,) firings of each edge, host
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # batches' pairs not yet merged, host
        self._pending_len = 0
        self.win_fn: list[torch.Tensor] = []  # (bytes,) per window: features fired at its function positions, host
        self.win_all: list[torch.Tensor] = []  # (bytes,) per window: features fired at any of its positions, host
        self.n_sinks = 0  # positions left out as attention sinks

    @property
    def token_of(self) -> torch.Tensor:
        """(tokens seen,) the token ids with at least one counted position, ascending (host)."""
        return (self.token_count > 0).nonzero().flatten().cpu()

    @torch.no_grad()
    def add(self, token_ids: torch.Tensor, active: torch.Tensor) -> None:
        """Record the edges of one batch: token_ids (tokens,), active (tokens, d_sae) bool."""
        token_ids = token_ids.to(active.device)
        pos, feat = active.nonzero(as_tuple=True)
        self.add_firings(token_ids, token_ids[pos], feat)

    @torch.no_grad()
    def add_firings(self, counted: torch.Tensor, tokens: torch.Tensor, feat: torch.Tensor) -> None:
        """Record one batch sparsely: counted (positions,) the token ids of its counted positions; tokens, feat
        (firings,): feature feat fired at a position holding token `tokens`. All on one device."""
        self.token_count += torch.bincount(counted, minlength=self.vocab_size).to(self.device)
        self.feature_count += torch.bincount(feat, minlength=self.d_sae).to(self.device)  # a bool sum is far slower
        key, n = torch.unique(tokens * self.d_sae + feat, return_counts=True)  # distinct (token, feature)
        self._pending.append((key.cpu(), n.cpu()))
        self._pending_len += len(key)
        if self._pending_len > max(len(self.pair_key), 1 << 20):  # merge when the pending pairs outgrow the merged ones
            self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        keys = torch.cat([self.pair_key, *(k for k, _ in self._pending)])
        ns = torch.cat([self.pair_n, *(n for _, n in self._pending)])
        self._pending, self._pending_len = [], 0
        self.pair_key, inv = torch.unique(keys, return_inverse=True)
        self.pair_n = torch.zeros(len(self.pair_key), dtype=torch.long).index_add_(0, inv, ns)

    def add_window(self, fn_any: torch.Tensor, all_any: torch.Tensor) -> None:
        """Record windows: fn_any, all_any (windows, d_sae) bool, features fired at function / any positions."""
        self.win_fn += list(pack_bits(fn_any).cpu())
        self.win_all += list(pack_bits(all_any).cpu())

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every edge as (token ids (edges,), features (edges,), firings (edges,)), by token then feature (host)."""
        self._merge()
        return self.pair_key // self.d_sae, self.pair_key % self.d_sae, self.pair_n

    def windows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(windows, bytes) uint8 packed features fired at function positions, and at any position, per window."""
        empty = torch.zeros(0, self.n_bytes, dtype=torch.uint8)
        fn = torch.stack(self.win_fn) if self.win_fn else empty
        return fn, torch.stack(self.win_all) if self.win_all else empty

    def state(self) -> dict[str, torch.Tensor]:
        """The graph as CPU tensors (what `from_state` reads back): safetensors-ready, for handing between processes."""
        self._merge()
        win_fn, win_all = self.windows()
        return {
            "token_count": self.token_count.cpu().contiguous(),  # (vocab,)
            "feature_count": self.feature_count.cpu().contiguous(),  # (d_sae,)
            "pair_key": self.pair_key.contiguous(),  # (edges,)
            "pair_n": self.pair_n.contiguous(),  # (edges,)
            "win_fn": win_fn.contiguous(),  # (windows, bytes)
            "win_all": win_all.contiguous(),  # (windows, bytes)
            "n_sinks": torch.tensor(self.n_sinks),
            "d_sae": torch.tensor(self.d_sae),
        }

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], device="cpu") -> EdgeBits:
        g = cls(int(state["d_sae"]), state["token_count"].shape[0], device=device)
        g.token_count = state["token_count"].to(device)
        g.feature_count = state["feature_count"].to(device)
        g.pair_key, g.pair_n = state["pair_key"].cpu(), state["pair_n"].cpu()
        g.win_fn, g.win_all = list(state["win_fn"].cpu()), list(state["win_all"].cpu())
        g.n_sinks = int(state["n_sinks"])
        return g

    @classmethod
    def merge(cls, parts: list[EdgeBits]) -> EdgeBits:
        """One graph from the graphs of consecutive corpus shards (data-parallel capture), equal to one pass over the
        shards in order: token, feature, edge-firing and sink counts add, the edge sets unite, and the per-window
        records follow one another in shard order. ValueError when the parts disagree on d_sae or vocabulary."""
        if not parts:
            raise ValueError("no graphs to merge")
        first = parts[0]
        for g in parts[1:]:
            if (g.d_sae, g.vocab_size) != (first.d_sae, first.vocab_size):
                raise ValueError(
                    f"cannot merge a graph of d_sae {g.d_sae} over vocabulary {g.vocab_size} into one of d_sae "
                    f"{first.d_sae} over {first.vocab_size}: the shards ran different SAEs or tokenizers"
                )
        out = cls(first.d_sae, first.vocab_size, first.device)
        for g in parts:
            g._merge()
            out.token_count += g.token_count.to(out.device)
            out.feature_count += g.feature_count.to(out.device)
            out._pending.append((g.pair_key, g.pair_n))
            out.win_fn += g.win_fn
            out.win_all += g.win_all
            out.n_sinks += g.n_sinks
        out._merge()
        return out

    def rows(self, token_ids: torch.Tensor) -> torch.Tensor:
        """(n,) token ids -> (n, d_sae) bool edge rows on the host (all False for a token never seen)."""
        self._merge()
        t = token_ids.cpu().long()
        starts = torch.searchsorted(self.pair_key, t * self.d_sae)  # (n,) first edge of each token
        counts = torch.searchsorted(self.pair_key, (t + 1) * self.d_sae) - starts  # (n,) its edges
        row = torch.repeat_interleave(torch.arange(len(t)), counts)  # (hits,)
        offset = torch.arange(len(row)) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        edge = torch.repeat_interleave(starts, counts) + offset  # (hits,) index into pair_key
        out = torch.zeros(len(t), self.d_sae, dtype=torch.bool)
        out[row, self.pair_key[edge] % self.d_sae] = True
        return out

    def degree(self) -> torch.Tensor:
        """(vocab,) number of features each token reaches (0 for unseen tokens), host."""
        self._merge()
        return torch.bincount(self.pair_key // self.d_sae, minlength=self.vocab_size)

    @property
    def n_edges(self) -> int:
        self._merge()
        return len(self.pair_key)

    def first_rank(self, order: torch.Tensor) -> torch.Tensor:
        """(d_sae,) 1-based rank in `order` (token ids, best first) of the first token reaching a feature; 0: none."""
        self._merge()
        n = len(order)
        rank = torch.full((self.vocab_size,), n + 1, dtype=torch.long)
        rank[order.cpu()] = torch.arange(1, n + 1)
        best = torch.full((self.d_sae,), n + 1, dtype=torch.long)
        best.scatter_reduce_(0, self.pair_key % self.d_sae, rank[self.pair_key // self.d_sae], "amin")
        return torch.where(best > n, 0, best)

    def coverage_curve(self, order: torch.Tensor) -> torch.Tensor:
        """(len(order),) number of features reached by the top-k tokens of `order`, for k = 1..len(order)."""
        first = self.first_rank(order)
        return torch.bincount(first[first > 0] - 1, minlength=len(order))[: len(order)].cumsum(0)


class CoverageCapture:
    """Capture mode for the coverage graph: {layer: EdgeBits}, fed the residual stream at SAE layers by any engine.

    `observe(layer, ids, h, positions)` encodes h (tokens, d_model) with the layer's SAE in row chunks and records the
    edges of the positions whose token is not `skip_id` (document separators are not text) and, with
    `exclude_sinks`, that are no attention sink by `core.sinks.sink_mask` (first position of a window, BOS, or a
    residual norm over `sink_ratio` x its window's median at that layer). The transformers engine calls it from its
    residual hooks, the vLLM worker from its layer hooks: one implementation of the reduction for both.
    """

    def __init__(
        self,
        saes: dict[int, SAE],
        layers: list[int],
        vocab_size: int,
        skip_id: int = -1,
        device="cpu",
        fn_mask: torch.Tensor | None = None,  # (vocab,) bool: function tokens, for the per-window records
        bos_id: int = -1,
        exclude_sinks: bool = True,
        sink_ratio: float = SINK_NORM_RATIO,
        chunk_bytes: int = CHUNK_BYTES,  # encode chunks' (rows, d_sae) intermediates, see CHUNK_BYTES
    ):
        self.saes, self.skip_id, self.bos_id, self.chunk_bytes = saes, skip_id, bos_id, chunk_bytes
        self.exclude_sinks, self.sink_ratio = exclude_sinks, sink_ratio
        fn = torch.zeros(vocab_size, dtype=torch.bool) if fn_mask is None else fn_mask
        self.fn_mask = fn.to(device)
        self.graphs = {layer: EdgeBits(saes[layer].d_sae, vocab_size, device=device) for layer in layers}

    def sinks(self, token_ids: torch.Tensor, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(tokens,) bool sink mask of a flattened forward, window by window (a window starts where position is 0;
        a window vLLM split across forwards continues with a position > 0, which is then no sink by position)."""
        norms = h.float().norm(dim=-1)  # (tokens,)
        starts = (positions == 0).nonzero().flatten().tolist()
        bounds = sorted({0, *starts, len(token_ids)})
        out = torch.zeros(len(token_ids), dtype=torch.bool, device=h.device)
        for s, e in zip(bounds[:-1], bounds[1:], strict=True):  # one step per window, not per token
            m = sink_mask(token_ids[s:e], norms[s:e], self.bos_id, self.sink_ratio)
            if positions[s] != 0:  # a continuation: its first row is a sink only by token or norm
                m[0] = bool(token_ids[s] == self.bos_id) or bool(norms[s] > self.sink_ratio * norms[s:e].median())
            out[s:e] = m
        return out

    @torch.no_grad()
    def observe(self, layer: int, token_ids: torch.Tensor, h: torch.Tensor, positions: torch.Tensor) -> None:
        """token_ids, positions (tokens,), h (tokens, d_model): the residual stream at `layer`'s SAE hook point."""
        sae, graph = self.saes[layer], self.graphs[layer]
        token_ids, positions = token_ids.to(h.device), positions.to(h.device)
        keep = token_ids != self.skip_id
        if self.exclude_sinks:
            sink = self.sinks(token_ids, h, positions) & keep
            graph.n_sinks += int(sink.sum())
            keep &= ~sink
        window = (positions == 0).long().cumsum(0)
        window = window - window.min()  # (tokens,) window index within this forward
        n_win = int(window.max()) + 1 if len(window) else 0
        fn_pos = self.fn_mask[token_ids] & keep
        fn_any = torch.zeros(n_win + 1, sae.d_sae, dtype=torch.bool, device=h.device)  # (windows + spare, d_sae)
        all_any = torch.zeros(n_win, sae.d_sae, dtype=torch.bool, device=h.device)  # (windows, d_sae) anywhere
        spare = n_win * sae.d_sae  # fn_any's last row: where firings off function positions go
        chunks = encode_chunks(sae, h.to(sae.W_enc.dtype), self.chunk_bytes, active_only=True)
        for start, active in chunks:  # (rows, d_sae) bool, a fresh tensor
            sl = slice(start, start + active.shape[0])
            active &= keep[sl, None]  # positions not counted (separators, sinks) fire nothing
            pos, feat = active.nonzero(as_tuple=True)  # (firings,) each
            ids = token_ids[sl]
            graph.add_firings(ids[keep[sl]], ids[pos], feat)
            flat = window[sl][pos] * sae.d_sae + feat  # (firings,) index into (windows, d_sae)
            all_any.view(-1).index_fill_(0, flat, True)
            fn_any.view(-1).index_fill_(0, torch.where(fn_pos[sl][pos], flat, spare), True)
        graph.add_window(fn_any[:n_win], all_any)

    def fns(self, batch: torch.Tensor) -> dict:
        """Residual functions in capture mode (they return None: the stream is unchanged) for a forward over the
        windows `batch` (b, seq), which the engine flattens to (b * seq, d_model)."""
        ids = batch.reshape(-1)
        positions = torch.arange(batch.shape[1]).repeat(batch.shape[0])  # (b * seq,)
        return {layer: (lambda h, layer=layer: self.observe(layer, ids, h, positions)) for layer in self.graphs}


def reactivated(active: torch.Tensor, is_function: torch.Tensor) -> torch.Tensor:
    """Features active at a position that were already active at an earlier content-token position of the same
    sequence: active (tokens, d_sae) bool, is_function (tokens,) bool -> (tokens, d_sae) bool."""
    t = active.shape[0]
    pos = torch.arange(t, device=active.device)
    content = active & ~is_function[:, None]  # (tokens, d_sae)
    first = torch.where(content, pos[:, None], t).min(0).values  # (d_sae,) first content position with the feature
    return active & (first[None, :] < pos[:, None])


class RunningTopK:
    """The k largest activations seen so far of each of n features, with the global position where each occurred."""

    def __init__(self, n_features: int, k: int, device="cpu"):
        self.values = torch.full((n_features, k), -torch.inf, device=device)  # (n, k)
        self.where = torch.full((n_features, k), -1, dtype=torch.long, device=device)  # (n, k)

    @torch.no_grad()
    def add(self, acts: torch.Tensor, offset: int) -> None:
        """acts (tokens, n) for global positions offset .. offset + tokens - 1."""
        pos = torch.arange(offset, offset + acts.shape[0], device=acts.device).expand(acts.shape[1], -1)  # (n, tokens)
        vals = torch.cat([self.values, acts.t().to(self.values)], 1)
        where = torch.cat([self.where, pos.to(self.where.device)], 1)
        top = vals.topk(self.values.shape[1], dim=1)
        self.values, self.where = top.values, where.gather(1, top.indices)
