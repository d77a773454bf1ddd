"""The batched steer op and its slot tables: two gather-adds and two small column matmuls per steered layer.

Every request in a batch owns a *slot* (row) of a preallocated table; equal specs share a slot and row 0 is the
zero vector for unsteered requests. Before each forward an engine writes one slot number per token into
`slot_index` (the position policy is folded in: a token the policy does not select gets slot 0). The op reads only
buffers that are updated in place, so one compiled graph (Inductor, CUDA graphs) serves every mix of requests, and
its cost does not depend on how many distinct specs share the batch.

Edits at one layer are all computed from the tensor h at its SAE's hook point as it arrives there, then summed:
plain adds (`add_table`), adds in units of the token's norm |h| (`norm_add_table`, unit directions), clamp columns
(one SAE feature's activation each) and projection columns (a unit direction v with an interval [lo, hi]: the
projection p = h . v is moved to clamp(p, lo, hi); project_out is [0, 0], set is [value, value]). A layer without an
SAE (`functok serve --steer-layers`) has no clamp columns: it adds and projects steering vectors only.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from functok_vllm.core.hookpoint import HookPoint
from functok_vllm.core.sae import SAE, normalize
from functok_vllm.core.spec import CLAMPS, PROJECTIONS, Spec


def column_needs(spec: Spec) -> tuple[dict, dict]:
    """({layer: clamp columns}, {layer: projection columns}) that `spec` takes in a `SteeringTable` (and in vLLM's
    `ClampBudget`): a clamp/ablate edit one clamp column at its layer, a projection edit one projection column at its
    layer (a vector's: at each of its layers)."""
    clamps, proj = Counter(), Counter()
    for e in spec.features:
        if e.mode in CLAMPS:
            clamps[e.layer] += 1
        elif e.mode in PROJECTIONS:
            proj[e.layer] += 1
    for v in spec.vectors:
        if v.mode in PROJECTIONS:
            proj.update(v.at.keys())
    return dict(clamps), dict(proj)


class SlotsFull(RuntimeError):
    """No free slot or clamp column right now: the engine keeps the request waiting until one is released."""


class SteeringLayer(torch.nn.Module):
    """Steering tables of one layer. `delta(h)` is what steering adds at this layer, h being the tensor its SAE reads
    (its hook point, `sae.cfg.hook`). With `sae=None`, an add-only layer at `hook` (d_model wide, no clamp columns)."""

    def __init__(
        self,
        sae: SAE | None,
        slot_index: torch.Tensor,
        max_slots: int,
        max_clamps: int,
        dtype,
        device,
        hook: HookPoint | None = None,
        d_model: int | None = None,
        max_projections: int = 64,
    ):
        super().__init__()
        d = sae.d_in if sae is not None else d_model
        max_clamps = max_clamps if sae is not None else 0
        z = lambda *shape: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        self.hook = sae.cfg.hook if sae is not None else hook  # where the engine applies `delta`
        self.norm = sae.cfg.normalize_activations if sae is not None else "none"  # static: the graph is built for it
        self.max_clamps, self.max_projections = max_clamps, max_projections
        self.register_buffer("slot_index", slot_index, persistent=False)  # (max_tokens,) shared by all layers
        self.register_buffer("add_table", z(max_slots, d), persistent=False)  # (slots, d_model); row 0 stays zero
        self.register_buffer("norm_add_table", z(max_slots, d), persistent=False)  # (slots, d_model), times |h|
        b_dec = sae.b_dec if sae is not None and sae.cfg.apply_b_dec_to_input else z(d)
        self.register_buffer("b_dec", b_dec.to(device=device, dtype=dtype).clone(), persistent=False)  # (d_model,)
        # Clamp columns: a flat pool of (slot, feature) pairs; column j belongs to slot clamp_owner[j] (-1: free).
        # act_j = relu(sae_in @ W_mag[:, j] + b_mag[j]) * (sae_in @ W_gate[:, j] + b_gate[j] > threshold[j]), the
        # magnitude path being the gate's except for gated SAEs (`sae_arch.ClampColumns`).
        self.register_buffer("clamp_W_gate", z(d, max_clamps), persistent=False)  # (d_model, clamps)
        self.register_buffer("clamp_b_gate", z(max_clamps), persistent=False)
        self.register_buffer("clamp_threshold", z(max_clamps), persistent=False)  # 0 for ReLU SAEs
        two = sae is not None and sae.cfg.arch.magnitude_path
        self.register_buffer("clamp_W_mag", z(d, max_clamps) if two else None, persistent=False)
        self.register_buffer("clamp_b_mag", z(max_clamps) if two else None, persistent=False)
        self.register_buffer("clamp_W_dec", z(max_clamps, d), persistent=False)  # (clamps, d_model)
        self.register_buffer("clamp_value", z(max_clamps), persistent=False)
        owner = torch.full((max_clamps,), -1, dtype=torch.long, device=device)
        self.register_buffer("clamp_owner", owner, persistent=False)
        # Projection columns: a flat pool of unit directions; column j belongs to slot proj_owner[j] (-1: free) and
        # moves p = h . proj_dir[j] to clamp(p, proj_lo[j], proj_hi[j]) (bounds may be -inf/inf: a one-sided cap).
        self.register_buffer("proj_dir", z(max_projections, d), persistent=False)  # (projections, d_model)
        self.register_buffer("proj_lo", z(max_projections), persistent=False)
        self.register_buffer("proj_hi", z(max_projections), persistent=False)
        owner = torch.full((max_projections,), -1, dtype=torch.long, device=device)
        self.register_buffer("proj_owner", owner, persistent=False)
        self.sae = sae.to(device=device, dtype=dtype) if sae is not None else None

    def tables(self) -> tuple:
        """What `steer_delta` reads, in its argument order after h."""
        return (
            self.slot_index,
            self.add_table,
            self.norm_add_table,
            self.b_dec,
            self.clamp_W_gate,
            self.clamp_b_gate,
            self.clamp_threshold,
            self.clamp_W_mag,
            self.clamp_b_mag,
            self.clamp_W_dec,
            self.clamp_value,
            self.clamp_owner,
            self.proj_dir,
            self.proj_lo,
            self.proj_hi,
            self.proj_owner,
            self.norm,
        )

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        """(tokens, d_model) tensor at the hook point -> (tokens, d_model) update. No checks, no Python loops."""
        return steer_delta(h, *self.tables())

    def steered_hidden(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """For a module output that is the pair (hidden, residual) summing to the tensor h the SAE reads (or one
        tensor h, residual None): hidden plus `delta(h)`, in one opaque custom op (`functok::steered_hidden`: why)."""
        return torch.ops.functok.steered_hidden(hidden, residual, *self.tables())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.delta(h)


def steer_delta(
    h,
    slot_index,
    add_table,
    norm_add_table,
    b_dec,
    W_gate,
    b_gate,
    threshold,
    W_mag,
    b_mag,
    W_dec,
    value,
    owner,
    proj_dir,
    proj_lo,
    proj_hi,
    proj_owner,
    norm: str,
) -> torch.Tensor:
    """(tokens, d_model) tensor the SAE reads -> (tokens, d_model) update: the token's slot row of the add table, plus
    its row of the norm-relative table times |h|, plus for each projection column its slot owns (clamp(p, lo, hi) - p)
    times the column's unit direction (p = h . direction), plus for each clamp column its slot owns (value -
    activation) times that feature's decoder row, mapped back through the SAE's per-token output normalisation (adds
    and projections are taken as given, in the model's space). Every term reads h as it arrived."""
    slot = slot_index[: h.shape[0]]  # (tokens,)
    out = add_table[slot] + h.norm(dim=-1, keepdim=True) * norm_add_table[slot]  # (tokens, d_model)
    p = h @ proj_dir.T  # (tokens, projections)
    moved = torch.minimum(torch.maximum(p, proj_lo), proj_hi) - p
    mine = slot[:, None] == proj_owner[None, :]  # (tokens, projections)
    out = out + torch.where(mine, moved, 0) @ proj_dir  # `where`: a column's inf bound never meets another's 0
    if W_dec.shape[0] == 0:  # an add-only layer (a static shape: one branch per graph, not per token)
        return out
    x, scale, _ = normalize(h, norm)
    sae_in = x - b_dec
    gate = sae_in @ W_gate + b_gate  # (tokens, clamps)
    mag = gate if W_mag is None else sae_in @ W_mag + b_mag
    act = mag.relu() * (gate > threshold)
    mine = slot[:, None] == owner[None, :]  # (tokens, clamps)
    clamp = torch.where(mine, value - act, 0) @ W_dec  # (tokens, d_model); `where`: a NaN of a zero padding row
    # under per-token normalisation stays out of every column it does not own
    return out + (clamp if scale is None else clamp * scale)


@torch.library.custom_op("functok::steered_hidden", mutates_args=())
def steered_hidden(
    hidden: torch.Tensor,
    residual: torch.Tensor | None,
    slot_index: torch.Tensor,
    add_table: torch.Tensor,
    norm_add_table: torch.Tensor,
    b_dec: torch.Tensor,
    clamp_W_gate: torch.Tensor,
    clamp_b_gate: torch.Tensor,
    clamp_threshold: torch.Tensor,
    clamp_W_mag: torch.Tensor | None,
    clamp_b_mag: torch.Tensor | None,
    clamp_W_dec: torch.Tensor,
    clamp_value: torch.Tensor,
    clamp_owner: torch.Tensor,
    proj_dir: torch.Tensor,
    proj_lo: torch.Tensor,
    proj_hi: torch.Tensor,
    proj_owner: torch.Tensor,
    norm: str,
) -> torch.Tensor:
    """hidden + steer_delta(hidden + residual, ...): THE ADD of the vLLM path, as one op a compiler cannot see into.

    Why opaque: traced as plain ops, Inductor (torch 2.13, vLLM 0.32's CPU backend) fused the read of the MLP's output
    in `hidden + residual` into a kernel scheduled before the `_C.onednn_mm` call that writes that output, so every
    request, steered or not, was computed from a stale buffer (issue 12). An opaque op is scheduled after its inputs
    exist, whatever the compiler fuses around it. (..., d_model) in and out; never aliases an input.
    """
    h = hidden if residual is None else hidden + residual  # the SAE's tensor, maybe (1, tokens, d_model): vLLM's
    h = h.reshape(-1, hidden.shape[-1])  # Transformers backend keeps a batch dim; (tokens, d_model) from here
    delta = steer_delta(
        h,
        slot_index,
        add_table,
        norm_add_table,
        b_dec,
        clamp_W_gate,
        clamp_b_gate,
        clamp_threshold,
        clamp_W_mag,
        clamp_b_mag,
        clamp_W_dec,
        clamp_value,
        clamp_owner,
        proj_dir,
        proj_lo,
        proj_hi,
        proj_owner,
        norm,
    )
    return hidden + delta.view(hidden.shape)


@steered_hidden.register_fake
def _(hidden, residual, *tables):
    return torch.empty_like(hidden)


@dataclass
class _Slot:
    slot: int
    refs: int
    clamp_cols: dict  # layer -> list of clamp columns
    proj_cols: dict  # layer -> list of projection columns


class SteeringTable:
    """The steering layers of one model plus the slot allocator that fills their tables.

    `saes` give the SAE layers (at their hook points); `add_layers` ({layer: hook point}, `d_model` wide) the add-only
    layers where vectors can go without an SAE (`--steer-layers`, at `resid_post`).
    """

    def __init__(
        self,
        saes: dict[int, SAE],
        max_slots: int = 64,
        max_clamps: int = 64,
        max_tokens: int = 8192,
        dtype=torch.float32,
        device="cpu",
        add_layers: dict[int, HookPoint] | None = None,
        d_model: int | None = None,
        max_projections: int = 64,
    ):
        if max_slots < 2:
            raise ValueError("max_slots must be at least 2 (row 0 is the unsteered row)")
        if add_layers and d_model is None:
            raise ValueError("add-only layers need d_model")
        self.max_slots, self.max_clamps, self.dtype, self.device = max_slots, max_clamps, dtype, torch.device(device)
        self.max_projections = max_projections
        self.slot_index = torch.zeros(max_tokens, dtype=torch.long, device=device)
        P = max_projections
        layers = {
            layer: SteeringLayer(sae, self.slot_index, max_slots, max_clamps, dtype, device, max_projections=P)
            for layer, sae in saes.items()
        }
        for layer, hook in (add_layers or {}).items():
            if layer in layers:
                raise ValueError(f"layer {layer} has an SAE already; it cannot be an add-only layer too")
            layers[layer] = SteeringLayer(None, self.slot_index, max_slots, 0, dtype, device, hook, d_model, P)
        self.layers = dict(sorted(layers.items()))
        self._by_key: dict[str, _Slot] = {}
        self._free = list(range(max_slots - 1, 0, -1))
        self._free_cols = {layer: list(range(op.max_clamps - 1, -1, -1)) for layer, op in self.layers.items()}
        self._free_proj = {layer: list(range(P - 1, -1, -1)) for layer in self.layers}

    @property
    def slots_in_use(self) -> int:
        return len(self._by_key)

    def acquire(self, spec: Spec | None) -> int:
        """The slot holding `spec`'s vectors, written now unless an equal spec already holds one. 0 for no steering."""
        if spec is None or spec.is_noop:
            return 0
        key = spec.key()
        if key in self._by_key:
            self._by_key[key].refs += 1
            return self._by_key[key].slot
        need, need_proj = column_needs(spec)
        if (
            not self._free
            or any(len(self._free_cols[layer]) < n for layer, n in need.items())
            or any(len(self._free_proj[layer]) < n for layer, n in need_proj.items())
        ):
            raise SlotsFull(
                f"steering table full ({self.max_slots - 1} slots, {self.max_clamps} clamp and "
                f"{self.max_projections} projection columns a layer)"
            )
        slot = self._free.pop()
        cols = {layer: [self._free_cols[layer].pop() for _ in range(n)] for layer, n in need.items()}
        proj = {layer: [self._free_proj[layer].pop() for _ in range(n)] for layer, n in need_proj.items()}
        self._write(slot, spec, cols, proj)
        self._by_key[key] = _Slot(slot, 1, cols, proj)
        return slot

    def release(self, spec: Spec | None) -> None:
        if spec is None or spec.is_noop:
            return
        key = spec.key()
        entry = self._by_key[key]
        entry.refs -= 1
        if entry.refs:
            return
        del self._by_key[key]
        for layer, cols in entry.clamp_cols.items():
            self.layers[layer].clamp_owner[cols] = -1
            self._free_cols[layer].extend(cols)
        for layer, cols in entry.proj_cols.items():
            self.layers[layer].proj_owner[cols] = -1
            self._free_proj[layer].extend(cols)
        for op in self.layers.values():
            op.add_table[entry.slot].zero_()
            op.norm_add_table[entry.slot].zero_()
        self._free.append(entry.slot)

    @torch.no_grad()
    def _write(self, slot: int, spec: Spec, cols: dict, proj: dict) -> None:
        """Write `spec` into `slot`'s rows and into the columns given to it."""
        used = {layer: iter(c) for layer, c in cols.items()}
        used_proj = {layer: iter(c) for layer, c in proj.items()}

        def direct(layer, e, row):  # one edit's direction at one layer: an add or a projection column
            op = self.layers[layer]
            row = row.to(device=op.add_table.device, dtype=op.add_table.dtype)
            unit = row / row.norm().clamp_min(torch.finfo(row.dtype).tiny)  # a zero direction stays zero: a no-op
            if e.mode == "add" and e.per_norm:
                op.norm_add_table[slot] += e.strength * unit
            elif e.mode == "add":  # the same arithmetic for features and vectors: strength * row, into the slot's row
                op.add_table[slot] += e.strength * row
            else:
                j = next(used_proj[layer])
                op.proj_dir[j], (op.proj_lo[j], op.proj_hi[j]) = unit, e.bounds
                op.proj_owner[j] = slot

        for v in spec.vectors:
            for layer, direction in v.at.items():
                direct(layer, v, direction)
        for e in spec.features:
            op = self.layers[e.layer]
            sae = op.sae
            if e.mode not in CLAMPS:
                direct(e.layer, e, sae.W_dec[e.feature])
                continue
            j = next(used[e.layer])
            c = sae.cfg.arch.clamp_columns(sae, e.feature)
            op.clamp_W_gate[:, j], op.clamp_b_gate[j], op.clamp_threshold[j] = c.w_gate, c.b_gate, c.threshold
            if op.clamp_W_mag is not None:
                op.clamp_W_mag[:, j], op.clamp_b_mag[j] = c.w_mag, c.b_mag
            op.clamp_W_dec[j] = sae.W_dec[e.feature]
            op.clamp_value[j] = e.clamp_value
            op.clamp_owner[j] = slot

    def set_slot_index(self, slot_per_token: torch.Tensor) -> None:
        """Copy this step's (tokens,) slot numbers into the shared buffer the layers read."""
        n = slot_per_token.shape[0]
        if n > self.slot_index.shape[0]:  # transformers engine only: vLLM sizes the buffer to max_num_batched_tokens
            self.slot_index = torch.zeros(max(n, 2 * self.slot_index.shape[0]), dtype=torch.long, device=self.device)
            for op in self.layers.values():
                op.slot_index = self.slot_index
        self.slot_index[:n].copy_(slot_per_token)
