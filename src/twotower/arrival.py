"""A deadline for each HTTP request to arrive, headers and body, under uvicorn.

uvicorn closes a keep-alive connection that stays idle between requests, but waits
without limit for a connection's first bytes and for the rest of a request that has
begun: a client sending half a body holds a connection, a task and its buffers for as
long as it likes, and a few thousand such clients exhaust the server. This protocol
starts a timer when a connection opens or a request begins and stops it once the request
has fully arrived; if it fires first, the client gets a 408 and the connection is closed.
Answering takes its own, separate limit (``Limits.timeout_s``).

Within that time a client on a fast link could still send hundreds of megabytes of
headers, which httptools keeps in memory until the headers end: a request whose headers
pass ``max_head_bytes`` gets a 431 and the connection is closed.

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


def _too_large(limit: int) -> bytes:
    message = b"the request line and headers are over the limit of %d bytes\n" % limit
    return (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; "
            b"charset=utf-8\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
            % (len(message), message))


def arrival_deadline_protocol(seconds: float,
                              max_head_bytes: int = 32 * 1024) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol, closing requests not received within ``seconds`` or
    whose request line and headers pass ``max_head_bytes`` (give or take one read)."""
    too_large = _too_large(max_head_bytes)

    class ArrivalDeadline(HttpToolsProtocol):
        _deadline: asyncio.TimerHandle | None = None
        _in_head = False  # a request has begun and its headers have not all arrived
        _head_began = False  # ... and it began in the bytes being parsed now
        _head_bytes = 0

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
            self._in_head = self._head_began = True
            self._start()

        def on_headers_complete(self) -> None:
            self._in_head = False
            super().on_headers_complete()

        def data_received(self, data: bytes) -> None:
            self._head_began = False
            super().data_received(data)
            if not self._in_head or self.transport.is_closing():
                return
            # Bytes of a head that began in this read are not counted (part of them may
            # end the previous request): the bound is the limit plus one read.
            self._head_bytes = 0 if self._head_began else self._head_bytes + len(data)
            if self._head_bytes > max_head_bytes:
                self._stop()
                self.transport.write(too_large)
                self.transport.close()

        def on_message_complete(self) -> None:
            self._stop()
            super().on_message_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop()
            super().connection_lost(exc)

    return ArrivalDeadline
