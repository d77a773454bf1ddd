"""Per-token readout of SAE features: the k most active features of each row of a tensor at an SAE's hook point.

Both engines call `top_features` on the rows a request asked for (the transformers engine in its hooks, the vLLM
worker in its capture op), so one implementation decides what "the features that fired" are: the SAE's own `encode`
of the tensor the model carried there, its k largest activations in descending order. `rows_to_lists` turns one
layer's result into the per-position lists the API returns, dropping features that did not fire (activation 0).
"""

from __future__ import annotations

import torch

from functok_vllm.core.capture import chunk_rows
from functok_vllm.core.sae import SAE


@torch.no_grad()
def top_features(sae: SAE, h: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """h (rows, d_in) -> (values, feature ids), each (rows, k), largest first; in row chunks so that a wide SAE's
    (rows, d_sae) activations stay under `capture.CHUNK_BYTES`."""
    h = h.reshape(-1, h.shape[-1]).to(sae.W_dec.dtype)
    step = chunk_rows(sae)
    if h.shape[0] <= step:
        return sae.encode(h).topk(k, dim=-1)
    vals, ids = zip(*(sae.encode(h[s : s + step]).topk(k, dim=-1) for s in range(0, h.shape[0], step)), strict=True)
    return torch.cat(vals), torch.cat(ids)


def rows_to_lists(values: torch.Tensor, ids: torch.Tensor) -> list[list[list]]:
    """(rows, k) values and ids -> per row [[feature, activation], ...] of the features that fired (one host copy)."""
    out = []
    for vs, fs in zip(values.float().tolist(), ids.tolist(), strict=True):
        out.append([[f, v] for f, v in zip(fs, vs, strict=True) if v > 0])
    return out
