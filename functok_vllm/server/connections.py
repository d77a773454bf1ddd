"""Connection limits for `functok serve`: uvicorn's settings for slow and numerous clients, and the header deadline
uvicorn lacks (its keep-alive timer restarts on every byte, so a client dripping headers was never timed out).

What each limit answers: a client still sending its request line and headers `header_timeout` seconds after it
connected (or after its previous response) is disconnected; headers over `max_header_bytes` get 400 (h11's limit);
past `max_connections` open connections, new requests get 503 (uvicorn's `limit_concurrency`); an idle keep-alive
connection is closed after `keep_alive_timeout`. The body's deadline (`body_timeout`, 408) is `middleware.Gate`'s.
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def guarded_protocol(header_timeout: float) -> type:
    """uvicorn's h11 protocol with a deadline for each request's headers."""

    class HeaderDeadline(H11Protocol):
        _timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc) -> None:
            if self._timer is not None:
                self._timer.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_later(header_timeout, self._late)

        def _late(self) -> None:
            # their_state stays IDLE until h11 has parsed a whole request line and header block
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadline


def uvicorn_options(limits) -> dict:
    """uvicorn.Config keywords for the server's `Limits`."""
    return dict(
        http=guarded_protocol(limits.header_timeout),
        timeout_keep_alive=limits.keep_alive_timeout,
        limit_concurrency=limits.max_connections,
        h11_max_incomplete_event_size=limits.max_header_bytes,
    )
