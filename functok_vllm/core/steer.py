"""The batched steer op and one layer's tables: two gather-adds and a few small column matmuls per steered layer.

Every request in a batch owns a *slot* (row) of a preallocated table (`core.slots` allocates them); equal specs share a
slot and row 0 is the zero vector for unsteered requests. Before each forward an engine writes one slot number per token
into `slot_index` (the position policy is folded in: a token the policy does not select gets slot 0). The op reads only
buffers that are updated in place, so one compiled graph (Inductor, CUDA graphs) serves every mix of requests, and
its cost does not depend on how many distinct specs share the batch.

Edits at one layer are all computed from the tensor h at its SAE's hook point as it arrives there, then summed:
plain adds (`add_table`), adds in units of the token's norm |h| (`norm_add_table`, unit directions), clamp columns
(one SAE feature's activation each) and projection columns (a unit direction v with an interval [lo, hi]: the
projection p = h . v is moved to clamp(p, lo, hi); project_out is [0, 0], set is [value, value]). A layer without an
SAE (`functok serve --steer-layers`) has no clamp columns: it adds and projects steering vectors only.

A conditional edit (`when`) takes a condition column at each layer where it acts (`core.condition`): the layer reads
every condition once per step into a (tokens, conditions) mask that gates the edit's own column (its clamp or
projection column, or for an add the condition column's direction), so unconditional edits keep their slot row and
ungated columns.
"""

from __future__ import annotations

import torch

from functok_vllm.core import condition
from functok_vllm.core.hookpoint import HookPoint
from functok_vllm.core.sae import SAE, normalize


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
        max_conditions: int = 32,
    ):
        super().__init__()
        d = sae.d_in if sae is not None else d_model
        max_clamps = max_clamps if sae is not None else 0
        z = lambda *shape: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        self.hook = sae.cfg.hook if sae is not None else hook  # where the engine applies `delta`
        self.norm = sae.cfg.normalize_activations if sae is not None else "none"  # static: the graph is built for it
        self.max_clamps, self.max_projections, self.max_conditions = max_clamps, max_projections, max_conditions
        self.register_buffer("slot_index", slot_index, persistent=False)  # (max_tokens,) shared by all layers
        applied = torch.zeros(slot_index.shape, dtype=torch.bool, device=device)  # the table shares one
        self.register_buffer("applied", applied, persistent=False)  # (max_tokens,) steered_hidden marks it
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
        condition.register(self, self.sae, d, max_conditions, max_clamps, max_projections, dtype, device)

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
            self.cond_W_gate,
            self.cond_b_gate,
            self.cond_threshold,
            self.cond_W_mag,
            self.cond_b_mag,
            self.cond_is_feature,
            self.cond_dir,
            self.cond_above,
            self.cond_below,
            self.cond_owner,
            self.cond_add,
            self.cond_per_norm,
            self.clamp_cond,
            self.proj_cond,
            self.norm,
        )

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        """(tokens, d_model) tensor at the hook point -> (tokens, d_model) update. No checks, no Python loops."""
        return steer_delta(h, *self.tables())

    def steered_hidden(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """For a module output that is the pair (hidden, residual) summing to the tensor h the SAE reads (or one
        tensor h, residual None): hidden plus `delta(h)`, in one opaque custom op (`functok::steered_hidden`: why).
        It also marks in `applied` (shared by the table's layers) the tokens where a conditional edit's condition
        held here, so the engine can count the positions actually steered."""
        return torch.ops.functok.steered_hidden(hidden, residual, self.applied, *self.tables())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.delta(h)


def steer_delta(h, *tables) -> torch.Tensor:
    """(tokens, d_model) tensor the SAE reads -> (tokens, d_model) update (`steer_terms` without the mask)."""
    return steer_terms(h, *tables)[0]


def steer_terms(
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
    cond_W_gate,
    cond_b_gate,
    cond_threshold,
    cond_W_mag,
    cond_b_mag,
    cond_is_feature,
    cond_dir,
    cond_above,
    cond_below,
    cond_owner,
    cond_add,
    cond_per_norm,
    clamp_cond,
    proj_cond,
    norm: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, d_model) tensor the SAE reads -> ((tokens, d_model) update, (tokens,) bool: some conditional edit's
    condition held at that token). The update is the token's slot row of the add table, plus
    its row of the norm-relative table times |h|, plus each conditional add its slot owns where its condition holds,
    plus for each projection column its slot owns (and whose condition holds) (clamp(p, lo, hi) - p) times the
    column's unit direction (p = h . direction), plus for each clamp column likewise (value - activation) times that
    feature's decoder row, mapped back through the SAE's per-token output normalisation (adds and projections are
    taken as given, in the model's space). Every term and every condition reads h as it arrived."""
    slot = slot_index[: h.shape[0]]  # (tokens,)
    h_norm = h.norm(dim=-1, keepdim=True)  # (tokens, 1)
    out = add_table[slot] + h_norm * norm_add_table[slot]  # (tokens, d_model)
    sae_in, scale = None, None
    if W_dec.shape[0] > 0:  # an SAE layer (a static shape: one branch per graph, not per token)
        x, scale, _ = normalize(h, norm)
        sae_in = x - b_dec
    gates = condition.holds(
        h,
        sae_in,
        slot,
        cond_W_gate,
        cond_b_gate,
        cond_threshold,
        cond_W_mag,
        cond_b_mag,
        cond_is_feature,
        cond_dir,
        cond_above,
        cond_below,
        cond_owner,
    )  # (tokens, conditions + 1), the last column true
    weight = gates[:, :-1].to(h.dtype) * torch.where(cond_per_norm, h_norm, 1.0)  # (tokens, conditions)
    out = out + weight @ cond_add
    p = h @ proj_dir.T  # (tokens, projections)
    moved = torch.minimum(torch.maximum(p, proj_lo), proj_hi) - p
    mine = (slot[:, None] == proj_owner[None, :]) & gates[:, proj_cond]  # (tokens, projections)
    out = out + torch.where(mine, moved, 0) @ proj_dir  # `where`: a column's inf bound never meets another's 0
    held = gates[:, :-1].any(dim=1)  # (tokens,) only a column its own slot owns can hold
    if sae_in is None:  # an add-only layer
        return out, held
    gate = sae_in @ W_gate + b_gate  # (tokens, clamps)
    mag = gate if W_mag is None else sae_in @ W_mag + b_mag
    act = mag.relu() * (gate > threshold)
    mine = (slot[:, None] == owner[None, :]) & gates[:, clamp_cond]  # (tokens, clamps)
    clamp = torch.where(mine, value - act, 0) @ W_dec  # (tokens, d_model); `where`: a NaN of a zero padding row
    # under per-token normalisation stays out of every column it does not own
    return out + (clamp if scale is None else clamp * scale), held


@torch.library.custom_op("functok::steered_hidden", mutates_args=("applied",))
def steered_hidden(
    hidden: torch.Tensor,
    residual: torch.Tensor | None,
    applied: torch.Tensor,
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
    cond_W_gate: torch.Tensor,
    cond_b_gate: torch.Tensor,
    cond_threshold: torch.Tensor,
    cond_W_mag: torch.Tensor | None,
    cond_b_mag: torch.Tensor | None,
    cond_is_feature: torch.Tensor,
    cond_dir: torch.Tensor,
    cond_above: torch.Tensor,
    cond_below: torch.Tensor,
    cond_owner: torch.Tensor,
    cond_add: torch.Tensor,
    cond_per_norm: torch.Tensor,
    clamp_cond: torch.Tensor,
    proj_cond: torch.Tensor,
    norm: str,
) -> torch.Tensor:
    """hidden + steer_delta(hidden + residual, ...): THE ADD of the vLLM path, as one op a compiler cannot see into.

    Why opaque: traced as plain ops, Inductor (torch 2.13, vLLM 0.32's CPU backend) fused the read of the MLP's output
    in `hidden + residual` into a kernel scheduled before the `_C.onednn_mm` call that writes that output, so every
    request, steered or not, was computed from a stale buffer (issue 12). An opaque op is scheduled after its inputs
    exist, whatever the compiler fuses around it. (..., d_model) in and out; never aliases an input. `applied`
    (max_tokens,) bool: the tokens where a conditional edit's condition held are set in place (it declares that
    mutation, so the compiler keeps it and orders it; the engine seeds it per step, `SteeringTable.set_slot_index`).
    """
    h = hidden if residual is None else hidden + residual  # the SAE's tensor, maybe (1, tokens, d_model): vLLM's
    h = h.reshape(-1, hidden.shape[-1])  # Transformers backend keeps a batch dim; (tokens, d_model) from here
    delta, held = steer_terms(
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
        cond_W_gate,
        cond_b_gate,
        cond_threshold,
        cond_W_mag,
        cond_b_mag,
        cond_is_feature,
        cond_dir,
        cond_above,
        cond_below,
        cond_owner,
        cond_add,
        cond_per_norm,
        clamp_cond,
        proj_cond,
        norm,
    )
    applied[: held.shape[0]] |= held
    return hidden + delta.view(hidden.shape)


@steered_hidden.register_fake
def _(hidden, residual, applied, *tables):
    return torch.empty_like(hidden)
