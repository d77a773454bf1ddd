"""Per-token slot numbers for one forward step, from requests, token ranges, positions and position policies."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from functok_vllm.core.spec import POSITIONS

POLICY_CODES = {name: i for i, name in enumerate(POSITIONS)}


def last_function_position(prompt_ids: list[int] | torch.Tensor, fn_mask: torch.Tensor) -> int:
    """Index of the last function token of a prompt, -1 if it has none (computed once, when a request arrives)."""
    ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=fn_mask.device)
    hits = fn_mask[ids].nonzero()
    return int(hits[-1]) if len(hits) else -1


@dataclass
class StepIndex:
    """What one forward step holds, flattened over the batch: token t belongs to request `req[t]`.

    Per token (tokens,): `input_ids`, `positions` (index of the token within its own sequence), `req`.
    Per request (requests,): `slot`, `policy` (POLICY_CODES), `prompt_len`, `last_fn` (-1: none).
    Padding tokens of a padded batch point at a request whose slot is 0.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    req: torch.Tensor
    slot: torch.Tensor
    policy: torch.Tensor
    prompt_len: torch.Tensor
    last_fn: torch.Tensor


def build_slot_index(step: StepIndex, fn_mask: torch.Tensor) -> torch.Tensor:
    """(tokens,) slot to apply at each token: the request's slot where its policy selects the token, else 0."""
    is_fn = fn_mask[step.input_ids]  # (tokens,)
    pos = step.positions
    is_prompt = pos < step.prompt_len[step.req]
    selected = torch.stack(
        [  # (policies, tokens), rows in POSITIONS order
            is_fn,
            pos == step.last_fn[step.req],
            ~is_fn,
            is_prompt,
            ~is_prompt,
            torch.ones_like(is_fn),
        ]
    )
    pick = selected.gather(0, step.policy[step.req][None, :])[0]  # (tokens,)
    return torch.where(pick, step.slot[step.req], 0)
