"""Per-step steering state of one vLLM worker: which request holds which slot, and each step's per-token slot index.

Torch and the steering core only (no vllm import), so it is tested without an engine. The model runner calls

- `add_request` when the scheduler first sends a request (its spec is parsed and its metadata cached: policy,
  ORIGINAL prompt length, last function position of the prompt, a position object's narrowing),
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

What was applied: every steered request has a counter (an index into two device tensors): the positions it was
actually steered at (where some edit acted: a selected token of a spec with an unconditional edit, or a token where
a conditional edit's condition held at some layer, as the steering op marks in the table's `applied` during the
forward; a request left unsteered by `SlotsFull` counts none) and the next position not yet counted, so a recomputed
prefix is not counted twice. After each forward (`count_applied`) one scatter-add and one scatter-max add to them,
without a host sync; `applied(tag)` reads a request's count (the API process asks for it through the
worker extension's `functok_applied` when the request ends). A finished request's count is kept, up to `KEEP_DONE`
of them, until it is read.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch

from functok_vllm.core import SlotsFull, SteeringTable, StepIndex, build_slot_index
from functok_vllm.core.batch import Narrowing, last_function_position, narrowing, policy_code, stack_narrowings
from functok_vllm.core.spec import Spec

log = logging.getLogger("functok.vllm")
ROLES_XARG = "functok_roles"  # extra_args key: a chat prompt's role codes, one per prompt token (`narrowing`)
TAG = "functok_id"  # extra_args key naming the request for `applied` (functok's VLLMEngine sets it; else the vLLM id)
KEEP_DONE = 4096  # finished requests whose applied count is kept until read (stock `vllm serve` never reads them)


@dataclass
class ReqMeta:
    spec: Spec
    policy: int
    prompt_len: int
    last_fn: int
    tag: str
    counter: int
    narrow: Narrowing | None = None  # its position object's narrowing (None: a position name)
    slot: int = 0
    joins: int = 0  # times it became a row of the batch (more than once: preempted or not scheduled for a step)
    warned: bool = False
    read: bool = False  # `applied` was asked before the worker saw it finish: no need to keep its count


class BatchSteering:
    def __init__(self, table: SteeringTable, fn_mask: torch.Tensor, parse_spec):
        self.table, self.fn_mask = table, fn_mask
        self.fn_mask_cpu = fn_mask.cpu()  # for the once-per-request prompt scan, without a device sync
        self.parse_spec = parse_spec  # (extra_args["steering"], extra_args) -> SteeringSpec | None; raises if bad
        self.device = table.slot_index.device
        self.meta: dict[str, ReqMeta] = {}  # steered requests the worker knows, by request id
        self.members: set[str] = set()  # steered requests that are rows of the persistent batch (hold a slot)
        self._rows: list[str] | None = None  # row order the per-row tensors were built for
        self._per_row: tuple[torch.Tensor, ...] = ()  # slot, policy, prompt_len, last_fn, counter: (rows + 1,) each
        self._narrow = None  # the rows' stacked narrowings (`core.batch.Narrowings`), None when no row narrows
        self._active = False  # does any row hold a slot?
        self._dirty = 0  # slot_index[:_dirty] may be non-zero
        self._step: tuple | None = None  # the prepared forward's (counter, position) per token, until counted
        self._arange = torch.arange(table.slot_index.shape[0], dtype=torch.int32, device=self.device)
        self.steered_tokens = torch.zeros((), dtype=torch.long, device=self.device)  # forwarded tokens steered
        n = 2 * table.max_slots
        self.applied_count = torch.zeros(n, dtype=torch.long, device=self.device)  # by counter; 0 is a dump
        self.counted_upto = torch.zeros(n, dtype=torch.long, device=self.device)  # next position to count
        self._free_counters = list(range(n - 1, 0, -1))
        self.by_tag: dict[str, ReqMeta] = {}
        self.done: OrderedDict[str, torch.Tensor] = OrderedDict()  # finished: tag -> () applied count
        self.bad_specs = 0
        self.slots_full = 0
        self.rejoins = 0
        self.resumed = 0  # requests the scheduler resumed after preemption (recomputed from scratch)

    # ---- request lifetime --------------------------------------------------------------------------------------

    def add_request(
        self, req_id: str, prompt_ids: list[int] | None, extra_args: dict | None, num_cached: int = 0
    ) -> None:
        """Cache a new request's steering metadata. A spec the worker cannot apply is logged and left unsteered.

        `num_cached`: prompt tokens the scheduler found in the prefix cache, which are not forwarded again. Their KV
        blocks carry this spec's salt (`admission.cache_salt`), so they were computed steered exactly so; the
        positions the policy selects among them count as applied, once, here (a spec with `when` is salted by its
        request, so it never finds any: where its conditions held is known only from its own forwards)."""
        self.finish([req_id])  # a streamed-input update of a known request: start over with its new prompt
        given = (extra_args or {}).get("steering")
        if given is None or prompt_ids is None:
            return
        try:
            spec = self.parse_spec(given, extra_args)
        except (ValueError, TypeError, KeyError) as e:
            self.bad_specs += 1
            log.error("request %s: steering spec cannot be applied, running it unsteered: %s", req_id, e)
            return
        if spec is None:
            return
        policy = policy_code(spec.positions)
        last_fn = -1
        if spec.select == "last_function":
            last_fn = last_function_position(prompt_ids, self.fn_mask_cpu)
        try:
            roles = (extra_args or {}).get(ROLES_XARG)
            narrow = narrowing(
                spec.positions, prompt_ids, self.fn_mask_cpu, None if roles is None else torch.tensor(roles)
            )
        except (ValueError, TypeError) as e:
            self.bad_specs += 1
            log.error("request %s: its positions cannot be applied, running it unsteered: %s", req_id, e)
            return
        tag = str((extra_args or {}).get(TAG, req_id))
        m = ReqMeta(spec, policy, len(prompt_ids), last_fn, tag, self._counter(), narrow)
        self.meta[req_id] = self.by_tag[tag] = m
        if num_cached > 0:  # once per request, on the CPU
            k = min(num_cached, len(prompt_ids))
            ids = torch.tensor(prompt_ids[:k], dtype=torch.long)
            per_req = (torch.tensor([v]) for v in (1, policy, len(prompt_ids), last_fn))  # slot 1: "steered"
            nw = stack_narrowings([narrow], "cpu")
            step = StepIndex(ids, torch.arange(k), torch.zeros_like(ids), *per_req, nw)
            self.applied_count[m.counter] = int(build_slot_index(step, self.fn_mask_cpu).count_nonzero())
            self.counted_upto[m.counter] = k
        self.done.pop(tag, None)
        self._rows = None  # a row re-added at the same index (a streamed-input update) must be rebuilt too

    def finish(self, req_ids) -> None:
        for rid in req_ids:
            m = self.meta.pop(rid, None)
            if m is None:
                continue
            if rid in self.members:
                self._leave(m)
                self.members.discard(rid)
                self._rows = None
            self._retire(m)

    def applied(self, tag: str) -> int | None:
        """Positions where the request named `tag` was steered (each counted once); None if this worker does not
        know it (unsteered, a spec it refused, or finished and already read or dropped). A finished one's count is
        read once."""
        m = self.by_tag.get(tag)
        if m is not None:
            m.read = True
            return int(self.applied_count[m.counter])
        n = self.done.pop(tag, None)
        return None if n is None else int(n)

    # ---- per step ----------------------------------------------------------------------------------------------

    def prepare(
        self, rows: list[str], input_ids: torch.Tensor, positions: torch.Tensor, query_start_loc: torch.Tensor
    ) -> None:
        """Write this step's (tokens,) slot numbers into the table's `slot_index` (padding tokens get slot 0)."""
        if rows != self._rows:
            self._sync(rows)
        n = input_ids.shape[0]
        self._step = None
        if not self._active:
            self.clear()
            return
        slot, policy, prompt_len, last_fn, row_counter = self._per_row
        cu = query_start_loc[1 : len(rows) + 1]  # (rows,) end of each row's tokens
        req = torch.searchsorted(cu, self._arange[:n].to(cu.dtype), right=True)  # (tokens,) row, padding -> rows
        step = StepIndex(input_ids[:n].long(), positions[:n], req, slot, policy, prompt_len, last_fn, self._narrow)
        slots = build_slot_index(step, self.fn_mask)  # (tokens,)
        self.table.set_slot_index(slots)
        self._dirty = max(self._dirty, n)
        self._step = (row_counter[req], positions[:n].long())  # (tokens,) each token's counter and position

    def count_applied(self) -> None:
        """After the forward that `prepare` set up: add to each request's count the positions where some edit acted
        there (the table's `applied`: an unconditional edit at a selected token, or a condition that held)."""
        if self._step is None:
            return
        counter, pos = self._step  # unsteered and padding rows have counter 0, the dump
        self._step = None
        steered = self.table.applied[: pos.shape[0]]
        self.steered_tokens += steered.sum()
        fresh = steered & (pos >= self.counted_upto[counter])  # not counted before (a recomputed prefix is)
        self.applied_count.index_add_(0, counter, fresh.long())
        self.counted_upto.scatter_reduce_(0, counter, pos + 1, "amax")

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
        cols = [
            (m.slot, m.policy, m.prompt_len, m.last_fn, m.counter) if m is not None else (0, 0, 0, -1, 0) for m in metas
        ]
        cols.append((0, 0, 0, -1, 0))  # the padding row
        t = torch.tensor(cols, dtype=torch.long).T.contiguous().to(self.device)  # (5, rows + 1)
        self._per_row = tuple(t)
        self._narrow = stack_narrowings(
            [m.narrow if m is not None and m.slot else None for m in metas] + [None], self.device
        )

    def _enter(self, rid: str, m: ReqMeta) -> None:
        m.joins += 1
        self.rejoins += m.joins > 1
        try:
            m.slot = self.table.acquire(m.spec)
        except SlotsFull as e:
            self.slots_full += 1
            if not m.warned:
                m.warned = True
                log.error(
                    "request %s runs unsteered while the steering table is full (not counted as steered; only "
                    "functok's VLLMEngine makes such requests wait): %s",
                    rid,
                    e,
                )
            m.slot = 0

    def _leave(self, m: ReqMeta) -> None:
        if m.slot:
            self.table.release(m.spec)
            m.slot = 0

    def _counter(self) -> int:
        """A free counter (zeroed); the counter tensors double when none is free."""
        if not self._free_counters:
            n = self.applied_count.shape[0]
            grow = lambda t: torch.cat([t, torch.zeros_like(t)])  # noqa: E731
            self.applied_count, self.counted_upto = grow(self.applied_count), grow(self.counted_upto)
            self._free_counters = list(range(2 * n - 1, n - 1, -1))
        return self._free_counters.pop()

    def _retire(self, m: ReqMeta) -> None:
        """Keep a finished request's count for `applied` and free its counter (device ops only, no sync)."""
        if self.by_tag.get(m.tag) is m:
            del self.by_tag[m.tag]
        if not m.read:
            self.done[m.tag] = self.applied_count[m.counter].clone()
            while len(self.done) > KEEP_DONE:
                self.done.popitem(last=False)
        self.applied_count[m.counter] = 0
        self.counted_upto[m.counter] = 0
        self._free_counters.append(m.counter)

    def stats(self) -> dict[str, int]:
        return {
            "steered_tokens": int(self.steered_tokens),
            "known_steered_requests": len(self.meta),
            "slots_in_use": self.table.slots_in_use,
            "bad_specs": self.bad_specs,
            "slots_full": self.slots_full,
            "rejoins": self.rejoins,
            "resumed": self.resumed,
            "applied_kept": len(self.done),  # finished requests' applied counts not read yet
        }
