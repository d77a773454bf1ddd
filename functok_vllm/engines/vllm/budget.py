"""Admission of clamp/ablate requests on vLLM: a per-layer budget of clamp columns that never exceeds the worker's pool.

`VLLMEngine` makes a request whose clamp/ablate edits do not fit WAIT here (first come, first served) instead of
letting the worker run it unsteered; a request that could never fit is refused (RequestError, HTTP 400).
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque

from functok_vllm.engines.base import EngineStopped, RequestError
from functok_vllm.steering import SteeringSpec


class ClampBudget:
    """Clamp/ablate columns per layer that admitted requests hold, never more than `capacity` (the worker's pool).

    Each request counts its own columns although equal specs share them in the worker, so this never admits more than
    fits. First come, first served: a request waits until every earlier waiting one has been admitted.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.used: Counter[int] = Counter()
        self.queue: deque[tuple[Counter, asyncio.Future]] = deque()
        self.closed = False

    @staticmethod
    def need(spec: SteeringSpec | None) -> Counter:
        """layer -> clamp columns the spec takes there (what `SteeringTable.acquire` takes for it)."""
        return Counter(e.layer for e in spec.features if e.mode != "add") if spec is not None else Counter()

    def check(self, need: Counter) -> None:
        """RequestError if the request could never be admitted."""
        for layer, n in sorted(need.items()):
            if n > self.capacity:
                raise RequestError(
                    "steering.edits",
                    f"{n} clamp/ablate edits at layer {layer}, but this engine's clamp pool holds {self.capacity} "
                    "a layer (max_clamps), so the request could never run",
                )

    def _fits(self, need: Counter) -> bool:
        return all(self.used[layer] + n <= self.capacity for layer, n in need.items())

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
