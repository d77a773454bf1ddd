"""The slot allocator of the steering tables: which slot (row) and which clamp, projection and condition columns each
distinct spec holds, written from the spec when it arrives and freed when its last request leaves.

Equal specs (the same `key()`) share one slot. A spec's columns come from per-layer pools (`column_needs`); a spec
that does not fit raises `SlotsFull` and the engine keeps its request waiting.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from functok_vllm.core import condition
from functok_vllm.core.hookpoint import HookPoint
from functok_vllm.core.sae import SAE
from functok_vllm.core.spec import CLAMPS, PROJECTIONS, Spec
from functok_vllm.core.steer import SteeringLayer


def column_needs(spec: Spec) -> tuple[dict, dict, dict]:
    """({layer: clamp columns}, {layer: projection columns}, {layer: condition columns}) that `spec` takes in a
    `SteeringTable` (and in vLLM's `ClampBudget`): a clamp/ablate edit one clamp column at its layer, a projection
    edit one projection column at its layer (a vector's: at each of its layers), an edit with `when` one condition
    column at each layer where it acts."""
    clamps, proj, conds = Counter(), Counter(), Counter()
    for e in spec.features:
        if e.mode in CLAMPS:
            clamps[e.layer] += 1
        elif e.mode in PROJECTIONS:
            proj[e.layer] += 1
        if e.when is not None:
            conds[e.layer] += 1
    for v in spec.vectors:
        if v.mode in PROJECTIONS:
            proj.update(v.at.keys())
        if v.when is not None:
            conds.update(v.at.keys())
    return dict(clamps), dict(proj), dict(conds)


class SlotsFull(RuntimeError):
    """No free slot or clamp column right now: the engine keeps the request waiting until one is released."""


@dataclass
class _Slot:
    slot: int
    refs: int
    clamp_cols: dict  # layer -> list of clamp columns
    proj_cols: dict  # layer -> list of projection columns
    cond_cols: dict  # layer -> list of condition columns


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
        max_conditions: int = 32,
    ):
        if max_slots < 2:
            raise ValueError("max_slots must be at least 2 (row 0 is the unsteered row)")
        if add_layers and d_model is None:
            raise ValueError("add-only layers need d_model")
        self.max_slots, self.max_clamps, self.dtype, self.device = max_slots, max_clamps, dtype, torch.device(device)
        self.max_projections, self.max_conditions = max_projections, max_conditions
        self.slot_index = torch.zeros(max_tokens, dtype=torch.long, device=device)
        P, C = max_projections, max_conditions
        layers = {
            layer: SteeringLayer(sae, self.slot_index, max_slots, max_clamps, dtype, device, None, None, P, C)
            for layer, sae in saes.items()
        }
        for layer, hook in (add_layers or {}).items():
            if layer in layers:
                raise ValueError(f"layer {layer} has an SAE already; it cannot be an add-only layer too")
            layers[layer] = SteeringLayer(None, self.slot_index, max_slots, 0, dtype, device, hook, d_model, P, C)
        self.layers = dict(sorted(layers.items()))
        # What was applied: per step, `applied[t]` is whether any edit acted at token t. `set_slot_index` seeds it
        # with its slot's `unconditional` flag (an edit without `when` at a layer held here acts at every token the
        # positions select); each layer's op then marks the tokens where a conditional edit's condition held.
        self.applied = torch.zeros(max_tokens, dtype=torch.bool, device=device)
        self.unconditional = torch.zeros(max_slots, dtype=torch.bool, device=device)  # row 0 stays False
        for op in self.layers.values():
            op.applied = self.applied
        self._by_key: dict[str, _Slot] = {}
        self._free = list(range(max_slots - 1, 0, -1))
        self._free_cols = {layer: list(range(op.max_clamps - 1, -1, -1)) for layer, op in self.layers.items()}
        self._free_proj = {layer: list(range(P - 1, -1, -1)) for layer in self.layers}
        self._free_cond = {layer: list(range(C - 1, -1, -1)) for layer in self.layers}

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
        needs = column_needs(spec)
        pools = (self._free_cols, self._free_proj, self._free_cond)
        if not self._free or any(
            len(free[layer]) < n for free, need in zip(pools, needs, strict=True) for layer, n in need.items()
        ):
            raise SlotsFull(
                f"steering table full ({self.max_slots - 1} slots, {self.max_clamps} clamp columns, "
                f"{self.max_projections} projection columns and {self.max_conditions} condition columns a layer)"
            )
        slot = self._free.pop()
        cols, proj, conds = (
            {layer: [free[layer].pop() for _ in range(n)] for layer, n in need.items()}
            for free, need in zip(pools, needs, strict=True)
        )
        self._write(slot, spec, cols, proj, conds)
        self.unconditional[slot] = self._has_unconditional(spec)
        self._by_key[key] = _Slot(slot, 1, cols, proj, conds)
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
        for layer, cols in entry.cond_cols.items():
            self.layers[layer].cond_owner[cols] = -1
            self._free_cond[layer].extend(cols)
        for op in self.layers.values():
            op.add_table[entry.slot].zero_()
            op.norm_add_table[entry.slot].zero_()
        self.unconditional[entry.slot] = False
        self._free.append(entry.slot)

    def _has_unconditional(self, spec: Spec) -> bool:
        """Whether `spec` has an edit without `when` at a layer of this table (it then acts at every selected token)."""
        feats = any(e.when is None and e.layer in self.layers for e in spec.features)
        return feats or any(v.when is None and any(L in self.layers for L in v.at) for v in spec.vectors)

    @torch.no_grad()
    def _write(self, slot: int, spec: Spec, cols: dict, proj: dict, conds: dict) -> None:
        """Write `spec` into `slot`'s rows and into the columns given to it."""
        used = {layer: iter(c) for layer, c in cols.items()}
        used_proj = {layer: iter(c) for layer, c in proj.items()}
        used_cond = {layer: iter(c) for layer, c in conds.items()}

        def gate(layer, e):  # the condition column of a conditional edit at one layer (written now), else None
            if e.when is None:
                return None
            c = next(used_cond[layer])
            condition.write(self.layers[layer], c, e.when, layer, slot)
            return c

        def direct(layer, e, row):  # one edit's direction at one layer: an add or a projection column
            op = self.layers[layer]
            row = row.to(device=op.add_table.device, dtype=op.add_table.dtype)
            unit = row / row.norm().clamp_min(torch.finfo(row.dtype).tiny)  # a zero direction stays zero: a no-op
            c = gate(layer, e)
            if e.mode == "add" and c is not None:  # a conditional add: its own row in its condition column
                op.cond_add[c], op.cond_per_norm[c] = e.strength * (unit if e.per_norm else row), e.per_norm
            elif e.mode == "add" and e.per_norm:
                op.norm_add_table[slot] += e.strength * unit
            elif e.mode == "add":  # the same arithmetic for features and vectors: strength * row, into the slot's row
                op.add_table[slot] += e.strength * row
            else:
                j = next(used_proj[layer])
                op.proj_dir[j], (op.proj_lo[j], op.proj_hi[j]) = unit, e.bounds
                op.proj_cond[j] = op.max_conditions if c is None else c
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
            col = sae.cfg.arch.clamp_columns(sae, e.feature)
            op.clamp_W_gate[:, j], op.clamp_b_gate[j], op.clamp_threshold[j] = col.w_gate, col.b_gate, col.threshold
            if op.clamp_W_mag is not None:
                op.clamp_W_mag[:, j], op.clamp_b_mag[j] = col.w_mag, col.b_mag
            op.clamp_W_dec[j] = sae.W_dec[e.feature]
            op.clamp_value[j] = e.clamp_value
            c = gate(e.layer, e)
            op.clamp_cond[j] = op.max_conditions if c is None else c  # max_conditions: the always-true column
            op.clamp_owner[j] = slot

    def set_slot_index(self, slot_per_token: torch.Tensor) -> None:
        """Copy this step's (tokens,) slot numbers into the shared buffer the layers read, and seed `applied` with
        the tokens whose slot has an unconditional edit (the layers' ops add those where a condition holds)."""
        n = slot_per_token.shape[0]
        if n > self.slot_index.shape[0]:  # transformers engine only: vLLM sizes the buffer to max_num_batched_tokens
            size = max(n, 2 * self.slot_index.shape[0])
            self.slot_index = torch.zeros(size, dtype=torch.long, device=self.device)
            self.applied = torch.zeros(size, dtype=torch.bool, device=self.device)
            for op in self.layers.values():
                op.slot_index, op.applied = self.slot_index, self.applied
        self.slot_index[:n].copy_(slot_per_token)
        self.applied[:n].copy_(self.unconditional[slot_per_token])
