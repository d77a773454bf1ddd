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

MAX_CHUNK_ELEMS = 1 << 25  # (rows, d_sae) activations of one chunk stay under 128 MiB in float32
_BIT = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)  # (8,)
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int32)  # (256,)


def encode_chunks(
    sae: SAE, h: torch.Tensor, max_elems: int = MAX_CHUNK_ELEMS, active_only: bool = False
) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, (rows, d_sae) activations) over row chunks of h (tokens, d_in), so a d_sae of 2^20 fits in memory;
    with active_only, (rows, d_sae) bool `activations > 0` instead (cheaper: no activation values are formed)."""
    rows = max(1, max_elems // sae.d_sae)
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
    """The token-feature bipartite graph of one SAE layer as packed bits, (tokens seen) x d_sae, on the device.

    Rows are assigned to token ids in order of first sight (`row_of[token_id]`, -1 if unseen), so memory grows with the
    distinct tokens seen, one bit per (token, feature). Also counts token occurrences, feature firings, and the firings
    of each edge (sparse: `pair_key` = row * d_sae + feature, sorted, with `pair_n` firings; memory grows with the
    edges, not with tokens x d_sae), which give any token set's firing counts, edges needing m firings and the
    nulls of random token sets. Per window (a unit to bootstrap over): the features fired at function positions and
    at any position, packed (`add_window`), and the sink positions left out (`n_sinks`).
    """

    def __init__(self, d_sae: int, vocab_size: int, device="cpu", capacity: int = 256):
        self.d_sae, self.vocab_size, self.device = d_sae, vocab_size, torch.device(device)
        self.n_bytes = (d_sae + 7) // 8
        self.row_of = torch.full((vocab_size,), -1, dtype=torch.long, device=device)  # (vocab,)
        self.token_of = torch.empty(0, dtype=torch.long, device=device)  # (rows,)
        self.bits = torch.zeros(capacity, self.n_bytes, dtype=torch.uint8, device=device)  # (capacity, bytes)
        self.token_count = torch.zeros(vocab_size, dtype=torch.long, device=device)  # (vocab,)
        self.feature_count = torch.zeros(d_sae, dtype=torch.long, device=device)  # (d_sae,) positions active
        self.pair_key = torch.empty(0, dtype=torch.long, device=device)  # (edges,) row * d_sae + feature, sorted
        self.pair_n = torch.empty(0, dtype=torch.long, device=device)  # (edges,) firings of each edge
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # batches' pairs not yet merged into pair_key
        self._pending_len = 0
        self.win_fn: list[torch.Tensor] = []  # (bytes,) per window: features fired at its function positions
        self.win_all: list[torch.Tensor] = []  # (bytes,) per window: features fired at any of its positions
        self.n_sinks = 0  # positions left out as attention sinks

    @property
    def n_rows(self) -> int:
        return self.token_of.shape[0]

    def _rows(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Row of each token id, assigning rows to ids not seen before. (tokens,) -> (tokens,)"""
        new = torch.unique(token_ids[self.row_of[token_ids] < 0])
        if len(new):
            need = self.n_rows + len(new)
            if need > self.bits.shape[0]:
                cap = max(need, 2 * self.bits.shape[0])
                grown = torch.zeros(cap, self.n_bytes, dtype=torch.uint8, device=self.device)
                grown[: self.n_rows] = self.bits[: self.n_rows]
                self.bits = grown
            self.row_of[new] = torch.arange(self.n_rows, need, device=self.device)
            self.token_of = torch.cat([self.token_of, new])
        return self.row_of[token_ids]

    @torch.no_grad()
    def add(self, token_ids: torch.Tensor, active: torch.Tensor) -> None:
        """Record the edges of one batch: token_ids (tokens,), active (tokens, d_sae) bool."""
        token_ids = token_ids.to(self.device)
        rows = self._rows(token_ids)
        self.token_count += torch.bincount(token_ids, minlength=self.vocab_size)
        pos, feat = active.nonzero(as_tuple=True)
        self.feature_count += torch.bincount(feat, minlength=self.d_sae)  # a bool sum over tokens is far slower
        pair, n = torch.unique(rows[pos] * self.d_sae + feat, return_counts=True)  # distinct (row, feature)
        self._pending.append((pair, n))
        self._pending_len += len(pair)
        if self._pending_len > max(len(self.pair_key), 1 << 20):  # merge when the pending pairs outgrow the merged ones
            self._merge()
        row, feat = pair // self.d_sae, pair % self.d_sae
        byte = row * self.n_bytes + feat // 8
        byte_ids, inv = torch.unique(byte, return_inverse=True)
        bits = torch.zeros(len(byte_ids), dtype=torch.long, device=self.device)
        bits.index_add_(0, inv, (1 << (feat % 8)).long())  # a sum of distinct powers of two is their OR
        flat = self.bits.view(-1)
        flat[byte_ids] |= bits.to(torch.uint8)

    def _merge(self) -> None:
        if not self._pending:
            return
        keys = torch.cat([self.pair_key, *(k for k, _ in self._pending)])
        ns = torch.cat([self.pair_n, *(n for _, n in self._pending)])
        self.pair_key, inv = torch.unique(keys, return_inverse=True)
        self.pair_n = torch.zeros(len(self.pair_key), dtype=torch.long, device=self.device).index_add_(0, inv, ns)
        self._pending, self._pending_len = [], 0

    def add_window(self, fn_any: torch.Tensor, all_any: torch.Tensor) -> None:
        """Record windows: fn_any, all_any (windows, d_sae) bool, features fired at function / any positions."""
        self.win_fn += list(pack_bits(fn_any.to(self.device)))
        self.win_all += list(pack_bits(all_any.to(self.device)))

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every edge as (token ids (edges,), features (edges,), firings (edges,))."""
        self._merge()
        return self.token_of[self.pair_key // self.d_sae], self.pair_key % self.d_sae, self.pair_n

    def windows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(windows, bytes) uint8 packed features fired at function positions, and at any position, per window."""
        empty = torch.zeros(0, self.n_bytes, dtype=torch.uint8, device=self.device)
        fn = torch.stack(self.win_fn) if self.win_fn else empty
        return fn, torch.stack(self.win_all) if self.win_all else empty

    def state(self) -> dict[str, torch.Tensor]:
        """The graph as CPU tensors (what `from_state` reads back): safetensors-ready, for handing between processes."""
        self._merge()
        win_fn, win_all = self.windows()
        return {
            "bits": self.bits[: self.n_rows].cpu().contiguous(),  # (rows, bytes)
            "token_of": self.token_of.cpu().contiguous(),  # (rows,)
            "token_count": self.token_count.cpu().contiguous(),  # (vocab,)
            "feature_count": self.feature_count.cpu().contiguous(),  # (d_sae,)
            "pair_key": self.pair_key.cpu().contiguous(),  # (edges,)
            "pair_n": self.pair_n.cpu().contiguous(),  # (edges,)
            "win_fn": win_fn.cpu().contiguous(),  # (windows, bytes)
            "win_all": win_all.cpu().contiguous(),  # (windows, bytes)
            "n_sinks": torch.tensor(self.n_sinks),
            "d_sae": torch.tensor(self.d_sae),
        }

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], device="cpu") -> EdgeBits:
        vocab, d_sae = state["token_count"].shape[0], int(state["d_sae"])
        g = cls(d_sae, vocab, device=device, capacity=max(1, state["bits"].shape[0]))
        g.token_of = state["token_of"].to(device)
        g.bits[: g.n_rows] = state["bits"].to(device)
        g.row_of[g.token_of] = torch.arange(g.n_rows, device=g.device)
        g.token_count = state["token_count"].to(device)
        g.feature_count = state["feature_count"].to(device)
        if "pair_key" in state:
            g.pair_key, g.pair_n = state["pair_key"].to(device), state["pair_n"].to(device)
            g.win_fn, g.win_all = list(state["win_fn"].to(device)), list(state["win_all"].to(device))
            g.n_sinks = int(state["n_sinks"])
        return g

    def rows(self, token_ids: torch.Tensor) -> torch.Tensor:
        """(n,) token ids -> (n, d_sae) bool edge rows (all False for a token never seen)."""
        r = self.row_of[token_ids.to(self.device)]
        out = unpack_bits(self.bits[r.clamp(min=0)], self.d_sae)
        return out & (r >= 0)[:, None]

    def degree(self, chunk_rows: int = 1024) -> torch.Tensor:
        """(vocab,) number of features each token reaches (0 for unseen tokens)."""
        deg = torch.zeros(self.vocab_size, dtype=torch.long, device=self.device)
        pop = _POPCOUNT.to(self.device)
        for s in range(0, self.n_rows, chunk_rows):
            e = min(s + chunk_rows, self.n_rows)
            deg[self.token_of[s:e]] = pop[self.bits[s:e].long()].sum(1).long()
        return deg

    @property
    def n_edges(self) -> int:
        return int(self.degree().sum())

    def first_rank(self, order: torch.Tensor, chunk_rows: int = 256) -> torch.Tensor:
        """(d_sae,) 1-based rank in `order` (token ids, best first) of the first token reaching a feature; 0: none."""
        n = len(order)
        best = torch.full((self.d_sae,), n + 1, dtype=torch.long, device=self.device)
        order = order.to(self.device)
        for s in range(0, n, chunk_rows):
            edges = self.rows(order[s : s + chunk_rows])  # (chunk, d_sae)
            rank = torch.arange(s + 1, s + 1 + edges.shape[0], device=self.device)[:, None]
            best = torch.minimum(best, torch.where(edges, rank, n + 1).min(0).values)
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
    ):
        self.saes, self.skip_id, self.bos_id = saes, skip_id, bos_id
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
        fn_any = torch.zeros(n_win, sae.d_sae, device=h.device)  # (windows, d_sae) firings at function positions
        all_any = torch.zeros(n_win, sae.d_sae, device=h.device)  # (windows, d_sae) firings anywhere
        for start, active in encode_chunks(sae, h.to(sae.W_enc.dtype), active_only=True):  # (rows, d_sae) bool
            sl = slice(start, start + active.shape[0])
            k = keep[sl]
            graph.add(token_ids[sl][k], active[k])
            onehot = torch.nn.functional.one_hot(window[sl], n_win).t().float()  # (windows, rows)
            act = active.float()
            all_any += onehot @ (act * k[:, None])
            fn_any += onehot @ (act * fn_pos[sl][:, None])
        graph.add_window(fn_any > 0, all_any > 0)

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
