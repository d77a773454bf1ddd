"""Attention-sink positions, which the analysis leaves out of every count by default: one rule, stated here.

A position is a sink when it is the first position of its sequence (every window of the analysis starts one), holds
the BOS token, or carries a residual whose norm is more than `SINK_NORM_RATIO` times its sequence's median norm at
the layer read. Sinks carry no context (the model parks attention there: SmolLM2's first position has ~70x the
median norm at layers 15 and 22) yet fire many SAE features, which would add edges to whatever token sits there and
"re-activations" to every later position.
"""

from __future__ import annotations

import torch

SINK_NORM_RATIO = 10.0  # a residual this many times its sequence's median norm is an outlier (sinks: ~70x)


def sink_mask(
    ids: torch.Tensor, norms: torch.Tensor | None = None, bos_id: int | None = None, ratio: float = SINK_NORM_RATIO
) -> torch.Tensor:
    """(batch, seq) or (seq,) token ids and residual norms at the layer read -> bool mask of sink positions."""
    squeeze = ids.dim() == 1
    ids2 = ids[None] if squeeze else ids  # (batch, seq)
    mask = torch.zeros(ids2.shape, dtype=torch.bool, device=ids2.device)
    mask[:, 0] = True
    if bos_id is not None and bos_id >= 0:
        mask |= ids2 == bos_id
    if norms is not None:
        n = (norms[None] if squeeze else norms).float()  # (batch, seq)
        med = n.median(dim=-1, keepdim=True).values  # (batch, 1)
        mask |= n > ratio * med
    return mask[0] if squeeze else mask
