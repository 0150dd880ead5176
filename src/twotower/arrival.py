"""A deadline for each HTTP request to arrive, headers and body, under uvicorn.

uvicorn closes a keep-alive connection that stays idle between requests, but waits
without limit for a connection's first bytes and for the rest of a request that has
begun: a client sending half a body holds a connection, a task and its buffers for as
long as it likes, and a few thousand such clients exhaust the server. This protocol
starts a timer when a connection opens or a request begins and stops it once the request
has fully arrived; if it fires first, the client gets a 408 and the connection is closed.
Answering takes its own, separate limit (``Limits.timeout_s``).

Imported only by :func:`twotower.serve.serve`; it needs uvicorn with httptools
(``uvicorn[standard]``, in ``twotower[serve]``).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["arrival_deadline_protocol"]

_MESSAGE = b"the request did not arrive in time\n"
_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_MESSAGE), _MESSAGE))


def arrival_deadline_protocol(seconds: float) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol, closing requests not received within ``seconds``."""

    class ArrivalDeadline(HttpToolsProtocol):
        _deadline: asyncio.TimerHandle | None = None

        def _start(self) -> None:
            if self._deadline is None:
                self._deadline = self.loop.call_later(seconds, self._expire)

        def _stop(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            if self.cycle is None or not self.cycle.response_started:
                self.transport.write(_TIMEOUT)
            self.transport.close()  # the app, if waiting for the body, sees a disconnect

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._start()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._start()

        def on_message_complete(self) -> None:
            self._stop()
            super().on_message_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop()
            super().connection_lost(exc)

    return ArrivalDeadline
