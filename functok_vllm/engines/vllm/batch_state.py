"""Per-step steering state of one vLLM worker: which request holds which slot, and each step's per-token slot index.

Torch and the steering core only (no vllm import), so it is tested without an engine. The model runner calls

- `add_request` when the scheduler first sends a request (its spec is parsed and its metadata cached: policy,
  ORIGINAL prompt length, last function position of the prompt),
- `finish` for the scheduler's finished request ids,
- `prepare` right before every forward, with the persistent batch's row order, the step's (padded) token ids and
  absolute positions, and `query_start_loc` (row r owns tokens [qsl[r], qsl[r+1]); tokens past qsl[rows] are padding).

A request holds a slot of the `SteeringTable` while it is a row of the persistent batch (at most `max_num_seqs`
rows, so `max_num_seqs + 1` slots always suffice); slots are acquired and released only when the row list changes,
and the per-row tensors are rebuilt only then. Each step is then a handful of tensor ops (the core's
`build_slot_index`) and one in-place copy into the table's `slot_index`, which the compiled graph reads. A batch
with no steered row costs nothing: the index is zeroed once and left alone.

Correctness: positions are absolute, so a chunked prefill selects the same tokens as a whole one (`last_function`
may fall in any chunk); a preempted request that is recomputed compares its positions with its original prompt
length, so tokens it generated before preemption stay "generated".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from functok_vllm.core import POLICY_CODES, SlotsFull, SteeringSpec, SteeringTable, StepIndex, build_slot_index
from functok_vllm.core.batch import last_function_position

log = logging.getLogger("functok.vllm")


@dataclass
class ReqMeta:
    spec: SteeringSpec
    policy: int
    prompt_len: int
    last_fn: int
    slot: int = 0
    joins: int = 0  # times it became a row of the batch (more than once: preempted or not scheduled for a step)
    warned: bool = False


class BatchSteering:
    def __init__(self, table: SteeringTable, fn_mask: torch.Tensor, parse_spec):
        self.table, self.fn_mask = table, fn_mask
        self.fn_mask_cpu = fn_mask.cpu()  # for the once-per-request prompt scan, without a device sync
        self.parse_spec = parse_spec  # extra_args value -> SteeringSpec | None; raises ValueError/TypeError if bad
        self.device = table.slot_index.device
        self.meta: dict[str, ReqMeta] = {}  # steered requests the worker knows, by request id
        self.members: set[str] = set()  # steered requests that are rows of the persistent batch (hold a slot)
        self._rows: list[str] | None = None  # row order the per-row tensors were built for
        self._per_row: tuple[torch.Tensor, ...] = ()  # slot, policy, prompt_len, last_fn: (rows + 1,) each
        self._active = False  # does any row hold a slot?
        self._dirty = 0  # slot_index[:_dirty] may be non-zero
        self._arange = torch.arange(table.slot_index.shape[0], dtype=torch.int32, device=self.device)
        self.steered_tokens = torch.zeros((), dtype=torch.long, device=self.device)  # forwarded tokens steered
        self.bad_specs = 0
        self.slots_full = 0
        self.rejoins = 0
        self.resumed = 0  # requests the scheduler resumed after preemption (recomputed from scratch)

    # ---- request lifetime --------------------------------------------------------------------------------------

    def add_request(self, req_id: str, prompt_ids: list[int] | None, extra_args: dict | None) -> None:
        """Cache a new request's steering metadata. A spec the worker cannot apply is logged and left unsteered."""
        self.finish([req_id])  # a streamed-input update of a known request: start over with its new prompt
        given = (extra_args or {}).get("steering")
        if given is None or prompt_ids is None:
            return
        try:
            spec = self.parse_spec(given)
        except (ValueError, TypeError, KeyError) as e:
            self.bad_specs += 1
            log.error("request %s: steering spec cannot be applied, running it unsteered: %s", req_id, e)
            return
        if spec is None:
            return
        policy = POLICY_CODES[spec.positions]
        last_fn = -1
        if spec.positions == "last_function":
            last_fn = last_function_position(prompt_ids, self.fn_mask_cpu)
        self.meta[req_id] = ReqMeta(spec, policy, len(prompt_ids), last_fn)
        self._rows = None  # a row re-added at the same index (a streamed-input update) must be rebuilt too

    def finish(self, req_ids) -> None:
        for rid in req_ids:
            m = self.meta.pop(rid, None)
            if m is not None and rid in self.members:
                self._leave(m)
                self.members.discard(rid)
                self._rows = None

    # ---- per step ----------------------------------------------------------------------------------------------

    def prepare(
        self, rows: list[str], input_ids: torch.Tensor, positions: torch.Tensor, query_start_loc: torch.Tensor
    ) -> None:
        """Write this step's (tokens,) slot numbers into the table's `slot_index` (padding tokens get slot 0)."""
        if rows != self._rows:
            self._sync(rows)
        n = input_ids.shape[0]
        if not self._active:
            self.clear()
            return
        slot, policy, prompt_len, last_fn = self._per_row
        cu = query_start_loc[1 : len(rows) + 1]  # (rows,) end of each row's tokens
        req = torch.searchsorted(cu, self._arange[:n].to(cu.dtype), right=True)  # (tokens,) row, padding -> rows
        step = StepIndex(input_ids[:n].long(), positions[:n], req, slot, policy, prompt_len, last_fn)
        slots = build_slot_index(step, self.fn_mask)  # (tokens,)
        self.table.set_slot_index(slots)
        self._dirty = max(self._dirty, n)
        self.steered_tokens += (slots != 0).sum()

    def clear(self) -> None:
        """Leave every token of the next forward unsteered (the batch membership is unchanged)."""
        if self._dirty:
            self.table.slot_index[: self._dirty].zero_()
            self._dirty = 0

    def _sync(self, rows: list[str]) -> None:
        now = {rid for rid in rows if rid in self.meta}
        for rid in self.members - now:
            self._leave(self.meta[rid])
        for rid in now - self.members:
            self._enter(rid, self.meta[rid])
        self.members = now
        self._rows = list(rows)
        metas = [self.meta.get(rid) for rid in rows]
        self._active = any(m is not None and m.slot for m in metas)
        if not self._active:
            return
        cols = [(m.slot, m.policy, m.prompt_len, m.last_fn) if m is not None else (0, 0, 0, -1) for m in metas]
        cols.append((0, 0, 0, -1))  # the padding row
        t = torch.tensor(cols, dtype=torch.long).T.contiguous().to(self.device)  # (4, rows + 1)
        self._per_row = tuple(t)

    def _enter(self, rid: str, m: ReqMeta) -> None:
        m.joins += 1
        self.rejoins += m.joins > 1
        try:
            m.slot = self.table.acquire(m.spec)
        except SlotsFull as e:
            self.slots_full += 1
            if not m.warned:
                m.warned = True
                log.error("request %s runs unsteered while the steering table is full: %s", rid, e)
            m.slot = 0

    def _leave(self, m: ReqMeta) -> None:
        if m.slot:
            self.table.release(m.spec)
            m.slot = 0

    def stats(self) -> dict[str, int]:
        return {
            "steered_tokens": int(self.steered_tokens),
            "known_steered_requests": len(self.meta),
            "slots_in_use": self.table.slots_in_use,
            "bad_specs": self.bad_specs,
            "slots_full": self.slots_full,
            "rejoins": self.rejoins,
            "resumed": self.resumed,
        }
