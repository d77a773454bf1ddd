"""Condition columns of one steering layer: at which tokens each conditional edit (`when`) acts, as one mask.

A layer holds a flat pool of condition columns; column j belongs to slot `cond_owner[j]` (-1: free) and reads, at
every token, either one SAE feature's activation (the SAE's own encoding of that feature, `sae_arch.ClampColumns`:
relu(sae_in . w_mag + b_mag) * (sae_in . w_gate + b_gate > threshold)) or the projection h . v onto a unit direction
v, and holds where above < reading < below. `holds` turns the pool into one (tokens, conditions + 1) mask per layer
per step; its last column is always true, the gate of every unconditional clamp and projection column. A conditional
add keeps its direction in its condition column (`cond_add`, times |h| where `cond_per_norm`), so it never touches the
slot's add row; a conditional clamp or projection column names its condition column (`clamp_cond`, `proj_cond`).
"""

from __future__ import annotations

import torch


def register(op: torch.nn.Module, sae, d: int, n: int, n_clamps: int, n_proj: int, dtype, device) -> None:
    """Add the condition pool's buffers (n columns, d_model = d) to the steering layer `op`. Feature readings need an
    SAE: at an add-only layer (sae None) their matrices are zero wide and `holds` reads projections only."""
    z = lambda *shape: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
    nf = n if sae is not None else 0
    two = sae is not None and sae.cfg.arch.magnitude_path
    buf = lambda name, t: op.register_buffer(name, t, persistent=False)  # noqa: E731
    buf("cond_W_gate", z(d, nf))  # (d_model, conditions) a feature's gate column (zero for a vector condition)
    buf("cond_b_gate", z(nf))
    buf("cond_threshold", z(nf))
    buf("cond_W_mag", z(d, nf) if two else None)  # gated SAEs only: the magnitude path
    buf("cond_b_mag", z(nf) if two else None)
    buf("cond_is_feature", torch.zeros(n, dtype=torch.bool, device=device))  # (conditions,) else a projection
    buf("cond_dir", z(n, d))  # (conditions, d_model) a vector condition's unit direction (zero for a feature)
    buf("cond_above", z(n))
    buf("cond_below", z(n))
    buf("cond_owner", torch.full((n,), -1, dtype=torch.long, device=device))
    buf("cond_add", z(n, d))  # (conditions, d_model) a conditional add's strength * direction (else zero)
    buf("cond_per_norm", torch.zeros(n, dtype=torch.bool, device=device))  # that add is times |h| per token
    buf("clamp_cond", torch.full((n_clamps,), n, dtype=torch.long, device=device))  # n: the always-true column
    buf("proj_cond", torch.full((n_proj,), n, dtype=torch.long, device=device))


def holds(h, sae_in, slot, W_gate, b_gate, threshold, W_mag, b_mag, is_feature, cond_dir, above, below, owner):
    """(tokens, conditions + 1) bool: does condition column j hold at each token of the slot that owns it? h
    (tokens, d_model) as it arrived, sae_in the SAE's input (None at an add-only layer); the last column is true."""
    read = h @ cond_dir.T  # (tokens, conditions) projections onto the unit directions
    if sae_in is not None and W_gate.shape[1] > 0:
        gate = sae_in @ W_gate + b_gate
        mag = gate if W_mag is None else sae_in @ W_mag + b_mag
        read = torch.where(is_feature, mag.relu() * (gate > threshold), read)
    ok = (read > above) & (read < below) & (slot[:, None] == owner[None, :])  # a NaN reading never holds
    return torch.cat([ok, ok.new_ones(ok.shape[0], 1)], dim=1)


@torch.no_grad()
def write(op: torch.nn.Module, j: int, when, layer: int, slot: int) -> None:
    """Condition column j of `op` := `when` (a `steering.Condition`) at `layer`, owned by `slot`."""
    op.cond_above[j], op.cond_below[j] = when.bounds
    op.cond_owner[j] = slot
    op.cond_add[j].zero_()
    op.cond_per_norm[j] = False
    if when.feature is not None:
        c = op.sae.cfg.arch.clamp_columns(op.sae, when.feature)
        op.cond_W_gate[:, j], op.cond_b_gate[j], op.cond_threshold[j] = c.w_gate, c.b_gate, c.threshold
        if op.cond_W_mag is not None:
            op.cond_W_mag[:, j], op.cond_b_mag[j] = c.w_mag, c.b_mag
        op.cond_is_feature[j] = True
        op.cond_dir[j].zero_()
        return
    d = when.at[layer].to(device=op.cond_dir.device, dtype=op.cond_dir.dtype)
    op.cond_dir[j] = d / d.norm()  # parsing refused a zero direction
    op.cond_is_feature[j] = False
    if op.cond_W_gate.shape[1] > 0:
        op.cond_W_gate[:, j] = 0
