"""Admission: how many requests may be inside, how long each may take, and what a gone client costs.

Every gate counts the requests inside it on the event loop (one thread, so no lock). Past its
limit a request gets 503 with Retry-After at once, before its body is read: overload costs a
few microseconds per request and no memory, instead of a queue every later request waits in.
Inside, a request waits for its encoder result only until its deadline or until its client
disconnects, whichever comes first; then its job is cancelled and the encoder skips it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from fastapi import HTTPException, Request

RETRY_AFTER = {"Retry-After": "1"}
T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before its answer was ready (logged as 499, nothing is sent)."""


def busy(detail: str) -> HTTPException:
    """A 503 that tells the client to retry after a second: overload is brief, refusing is cheap."""
    return HTTPException(503, detail, headers=RETRY_AFTER)


class Gate:
    """At most `limit` requests inside at once; `on_reject` counts the others."""

    def __init__(self, name: str, limit: int, on_reject: Callable[[str], None] | None = None,
                 on_change: Callable[[str, int], None] | None = None):
        self.name, self.limit, self.inside = name, limit, 0
        self.on_reject, self.on_change = on_reject, on_change

    def __enter__(self) -> Gate:
        if self.inside >= self.limit:
            if self.on_reject:
                self.on_reject(self.name)
            raise busy(f"the server is at capacity ({self.limit} {self.name} requests at once); retry shortly")
        self.inside += 1
        if self.on_change:
            self.on_change(self.name, self.inside)
        return self

    def __exit__(self, *exc) -> None:
        self.inside -= 1
        if self.on_change:
            self.on_change(self.name, self.inside)


class Deadline:
    """The moment by which a request must be answered (monotonic, the event loop's clock)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.at = asyncio.get_running_loop().time() + seconds

    def left(self) -> float:
        return max(0.0, self.at - asyncio.get_running_loop().time())

    def expired(self) -> HTTPException:
        return busy(f"the server is too busy to answer within {self.seconds:g} s; retry shortly")


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the ASGI server then sends http.disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def wait_or_give_up(request: Request, future: asyncio.Future[T], deadline: Deadline,
                          on_give_up: Callable[[], None]) -> T:
    """The future's result; or, if the deadline passes or the client leaves first, `on_give_up()`
    (which cancels the job) and a 503 or ClientGone. Call only after the body has been read."""
    if future.done():
        return future.result()
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({future, watch}, timeout=deadline.left(), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if future in done:
        return future.result()
    on_give_up()
    future.cancel()
    if watch in done:
        raise ClientGone()
    raise deadline.expired()


async def within(deadline: Deadline, awaitable: Awaitable[T], what: str) -> T:
    """`awaitable` within the deadline, else a 503 (a search or decode stuck behind others)."""
    try:
        return await asyncio.wait_for(awaitable, timeout=deadline.left())
    except asyncio.TimeoutError:
        raise busy(f"the server is too busy to {what} within {deadline.seconds:g} s; retry shortly") from None
