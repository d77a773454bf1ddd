"""Per-token slot numbers for one forward step, from requests, token ranges, positions and position policies.

A request's `positions` is a name (`POSITIONS`: its policy code) or a position object, which adds a `Narrowing`
computed once when the request is admitted (`narrowing`: its id lists, and its region over the prompt's positions
as a mask, from the windows, the last k function tokens and the chat roles). Each step stacks the running requests'
narrowings (`stack_narrowings`) and `build_slot_index` applies them with tensor ops only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from functok_vllm.core.spec import POSITIONS, ROLES

POLICY_CODES = {name: i for i, name in enumerate(POSITIONS)}
ALL_GENERATED = 1 << 62  # `gen_upto` of a region that takes every generated token
ID_KEY = 1 << 32  # (request, token id) -> request * ID_KEY + id: one sorted key list for every request's ids
SENTINEL = 1 << 62  # ends every key list: larger than any key
ROLE_BITS = 2  # a chat prompt's role code per token: content role | turn role << ROLE_BITS (`role_codes`)


def last_function_position(prompt_ids: list[int] | torch.Tensor, fn_mask: torch.Tensor) -> int:
    """Index of the last function token of a prompt, -1 if it has none (computed once, when a request arrives)."""
    ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=fn_mask.device)
    hits = fn_mask[ids].nonzero()
    return int(hits[-1]) if len(hits) else -1


def policy_code(positions) -> int:
    """The POLICY_CODES entry of a spec's `positions` (a name, or a position object's `select`)."""
    return POLICY_CODES[positions if isinstance(positions, str) else positions.select]


@dataclass
class Narrowing:
    """One request's position object beyond its base selector, computed once at admission (on the CPU)."""

    allow: torch.Tensor | None  # (a,) token ids it may steer; None: any
    exclude: torch.Tensor  # (e,) token ids it never steers
    region: torch.Tensor | None  # (prompt_len,) bool: prompt positions in its region; None: no region (everything)
    gen_upto: int  # generated tokens j = position - prompt_len < gen_upto are in the region (with `region` only)


def narrowing(positions, prompt_ids, fn_mask: torch.Tensor, roles: torch.Tensor | None = None) -> Narrowing | None:
    """The `Narrowing` of a position object for one prompt (None for a position name). `roles`: (prompt_len,) codes,
    content role | turn role << ROLE_BITS (0: not a message's), needed when the object selects roles."""
    if isinstance(positions, str):
        return None
    p = positions
    ids = torch.as_tensor(prompt_ids, dtype=torch.long).cpu()  # (n,)
    n = ids.shape[0]
    as_ids = lambda v: torch.tensor(sorted(set(v)), dtype=torch.long)  # noqa: E731
    allow = as_ids(p.token_ids) if p.token_ids is not None else None
    exclude = as_ids(p.exclude_ids or ())
    if not p.has_region:
        return Narrowing(allow, exclude, None, 0)
    region = torch.zeros(n, dtype=torch.bool)
    at = torch.arange(n)
    if p.last_prompt is not None:
        region |= at >= n - p.last_prompt
    if p.last_functions is not None:
        fn = fn_mask.cpu()[ids].nonzero()[:, 0]  # (function tokens,) their positions
        region[fn[-p.last_functions :]] = True
    gen_upto = p.first_generated or 0
    if p.roles:
        if roles is None or roles.shape[0] != n:
            raise ValueError("selecting by roles needs the prompt's role codes, one per prompt token")
        codes = roles.cpu().long()
        codes = codes >> ROLE_BITS if p.template_tokens else codes & ((1 << ROLE_BITS) - 1)
        wanted = torch.tensor([ROLES.index(r) + 1 for r in p.roles])
        region |= torch.isin(codes, wanted)
        if "assistant" in p.roles:
            gen_upto = ALL_GENERATED
    return Narrowing(allow, exclude, region, gen_upto)


@dataclass
class Narrowings:
    """The running requests' narrowings, stacked. An id list is one sorted (pairs + 1,) tensor of keys
    request * ID_KEY + token id (ending with a sentinel), so a token is looked up by binary search, never compared
    with a padded (tokens, ids) block."""

    has_allow: torch.Tensor  # (requests,) bool
    allow: torch.Tensor  # (allowed pairs + 1,) long keys, sorted
    exclude: torch.Tensor  # (excluded pairs + 1,) long keys, sorted
    has_region: torch.Tensor  # (requests,) bool
    region_at: torch.Tensor  # (requests,) long: where the request's prompt mask starts in `region`
    region: torch.Tensor  # (sum of masked prompt lengths + 1,) bool, every request's prompt mask end to end
    gen_upto: torch.Tensor  # (requests,) long


def stack_narrowings(ns: list[Narrowing | None], device) -> Narrowings | None:
    """One entry per request of the step (None: a position name, or no steering); None when no request narrows."""
    if all(n is None for n in ns):
        return None
    empty = torch.zeros(0, dtype=torch.long)
    none = Narrowing(None, empty, None, 0)
    ns = [n or none for n in ns]

    def keys(lists):  # request i's sorted ids -> i * ID_KEY + id, in order, then the sentinel
        return torch.cat([*(i * ID_KEY + ids for i, ids in enumerate(lists)), torch.tensor([SENTINEL])])

    masks = [n.region if n.region is not None else torch.zeros(0, dtype=torch.bool) for n in ns]
    starts = torch.tensor([0, *(len(m) for m in masks)]).cumsum(0)[:-1]
    t = Narrowings(
        has_allow=torch.tensor([n.allow is not None for n in ns]),
        allow=keys([n.allow if n.allow is not None else empty for n in ns]),
        exclude=keys([n.exclude for n in ns]),
        has_region=torch.tensor([n.region is not None for n in ns]),
        region_at=starts,
        region=torch.cat([*masks, torch.zeros(1, dtype=torch.bool)]),
        gen_upto=torch.tensor([n.gen_upto for n in ns]),
    )
    return Narrowings(*(getattr(t, f).to(device) for f in t.__dataclass_fields__))


def _member(keys: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """(tokens,) whether each key is in the sorted `keys` (which end with the sentinel, so never empty)."""
    return keys[torch.searchsorted(keys, key).clamp_(max=keys.shape[0] - 1)] == key


@dataclass
class StepIndex:
    """What one forward step holds, flattened over the batch: token t belongs to request `req[t]`.

    Per token (tokens,): `input_ids`, `positions` (index of the token within its own sequence), `req`.
    Per request (requests,): `slot`, `policy` (POLICY_CODES), `prompt_len`, `last_fn` (-1: none), and the position
    objects' `narrow` (None: no request of the step has one). Padding tokens of a padded batch point at a request
    whose slot is 0.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    req: torch.Tensor
    slot: torch.Tensor
    policy: torch.Tensor
    prompt_len: torch.Tensor
    last_fn: torch.Tensor
    narrow: Narrowings | None = None


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
    nw = step.narrow
    if nw is not None:
        q = step.req
        key = q * ID_KEY + step.input_ids  # (tokens,) this token's (request, id) key
        pick &= ~nw.has_allow[q] | _member(nw.allow, key)
        pick &= ~_member(nw.exclude, key)
        at = (nw.region_at[q] + pos).clamp_(0, nw.region.shape[0] - 1)  # prompt tokens of a masked request: in range
        gen = pos - step.prompt_len[q] < nw.gen_upto[q]
        pick &= ~nw.has_region[q] | torch.where(is_prompt, nw.region[at], gen)
    return torch.where(pick, step.slot[step.req], 0)
