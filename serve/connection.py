"""A deadline for request headers, which uvicorn does not have.

uvicorn times out an idle keep-alive connection, but not one that has sent part of a request's
headers and stopped: such a connection holds its file descriptor for as long as the client
likes. A few hundred of them exhaust the process's open files, and then every new client is
accepted and closed at once (uvloop's answer to EMFILE). nginx (`client_header_timeout`) and
Apache (`mod_reqtimeout`) give headers a deadline; so do we: a request whose headers are not
complete `header_timeout_s` after its first byte gets a 408 and the connection is closed.
The body has its own limits (a minimum rate and a budget, serve/admission.py).
"""

from __future__ import annotations

import asyncio

TIMEOUT_RESPONSE = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


def with_header_deadline(base: type[asyncio.Protocol], header_timeout_s: float) -> type[asyncio.Protocol]:
    """A subclass of uvicorn's HTTP protocol class `base` (httptools or h11) that closes a connection
    whose request headers are still incomplete `header_timeout_s` after the request's first byte."""

    class HeaderDeadline(base):  # type: ignore[misc, valid-type]
        _header_timer: asyncio.TimerHandle | None = None

        def _between_requests(self) -> bool:
            cycle = getattr(self, "cycle", None)  # uvicorn's current request; None before the first
            return cycle is None or cycle.response_complete

        def data_received(self, data: bytes) -> None:
            if self._header_timer is None and self._between_requests():  # the first bytes of a request
                self._header_timer = self.loop.call_later(header_timeout_s, self._headers_late)
            super().data_received(data)
            if self._header_timer is not None and not self._between_requests():  # its headers are complete
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if self._between_requests() and not self.transport.is_closing():
                self.transport.write(TIMEOUT_RESPONSE)
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            super().connection_lost(exc)

    HeaderDeadline.__name__ = f"HeaderDeadline{base.__name__}"
    return HeaderDeadline


def http_protocol(header_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's own choice of HTTP protocol (httptools when installed, else h11), with the deadline."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol as base
    return with_header_deadline(base, header_timeout_s)
