"""Admission of requests that take table columns on vLLM: a per-layer budget of clamp, projection and condition
columns that never exceeds the worker's pools.

`VLLMEngine` makes a request whose clamp/ablate, project_out/cap/set or conditional edits do not fit WAIT here (first
come, first served) instead of letting the worker run it unsteered; a request that could never fit is refused
(RequestError, HTTP 400).
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque

from functok_vllm.core.slots import column_needs
from functok_vllm.engines.base import EngineStopped, RequestError
from functok_vllm.steering import SteeringSpec

KINDS = {
    "clamp": ("clamp/ablate", "max_clamps"),
    "projection": ("project_out/cap/set", "max_projections"),
    "condition": ("condition ('when')", "max_condition_columns"),
}


class ClampBudget:
    """Columns per (kind, layer) that admitted requests hold, never more than the worker's pool of that kind
    (`capacity` clamp columns, `projections` projection columns, `conditions` condition columns; kinds: "clamp",
    "projection", "condition").

    Each request counts its own columns although equal specs share them in the worker, so this never admits more than
    fits. First come, first served: a request waits until every earlier waiting one has been admitted.
    """

    def __init__(self, capacity: int, projections: int | None = None, conditions: int | None = None):
        self.capacity = {
            "clamp": capacity,
            "projection": capacity if projections is None else projections,
            "condition": capacity if conditions is None else conditions,
        }
        self.used: Counter[int] = Counter()
        self.queue: deque[tuple[Counter, asyncio.Future]] = deque()
        self.closed = False

    @staticmethod
    def need(spec: SteeringSpec | None) -> Counter:
        """(kind, layer) -> columns the spec takes there (what `SteeringTable.acquire` takes for it)."""
        if spec is None:
            return Counter()
        kinds = zip(("clamp", "projection", "condition"), column_needs(spec), strict=True)
        return Counter({(kind, k): n for kind, cols in kinds for k, n in cols.items()})

    def check(self, need: Counter) -> None:
        """RequestError if the request could never be admitted."""
        for (kind, layer), n in sorted(need.items()):
            if n > self.capacity[kind]:
                what, flag = KINDS[kind]
                raise RequestError(
                    "steering.edits",
                    f"{n} {what} columns at layer {layer}, but this engine's pool holds {self.capacity[kind]} a layer "
                    f"({flag}), so the request could never run",
                )

    def _fits(self, need: Counter) -> bool:
        return all(self.used[key] + n <= self.capacity[key[0]] for key, n in need.items())

    async def acquire(self, need: Counter) -> None:
        """Take `need`'s columns, waiting for earlier requests and for room; EngineStopped if closed meanwhile."""
        if self.closed:
            raise EngineStopped("the engine is shutting down")
        if not self.queue and self._fits(need):
            self.used.update(need)
            return
        entry = (need, asyncio.get_running_loop().create_future())
        self.queue.append(entry)
        try:
            await entry[1]
        except BaseException:  # cancelled (timeout, client gone) or closed: give back whatever was granted
            fut = entry[1]
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release(need)
            elif entry in self.queue:
                self.queue.remove(entry)
                self._grant()
            raise

    def release(self, need: Counter) -> None:
        self.used.subtract(need)
        self._grant()

    def close(self) -> None:
        """Fail every waiting request with EngineStopped; no more are admitted."""
        self.closed = True
        while self.queue:
            _, fut = self.queue.popleft()
            if not fut.done():
                fut.set_exception(EngineStopped("the engine is shutting down"))

    def _grant(self) -> None:
        while self.queue and self._fits(self.queue[0][0]):
            need, fut = self.queue.popleft()
            if not fut.done():
                self.used.update(need)
                fut.set_result(None)

    @property
    def waiting(self) -> int:
        return len(self.queue)
