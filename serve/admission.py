"""Admission: how many requests may be inside, how long each may wait and take, what bodies may cost.

Every gate counts the requests inside it on the event loop (one thread, so no lock). Past its
limit a request waits in a short FIFO queue, for at most a share of its deadline; when the queue
is full, or no slot came free in time, it gets a 503 with Retry-After. Waiting costs no thread and
no memory beyond what the request already holds: a burst just above capacity is served a few
milliseconds later instead of refused, and overload past the queue is still refused at once.

Upload bodies are read before a request takes an image or write slot (the gates are for decoding,
encoding and writing), under a budget of bytes held by all bodies together (past it, a fast 503)
and a minimum transfer rate after a grace period (below it, a 408): a client that sends slowly
holds bytes it has sent, never a slot that other clients need.

Inside, a request waits for its encoder result only until its deadline or until its client
disconnects, whichever comes first; then its job is cancelled and the encoder skips it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TypeVar

from fastapi import HTTPException, Request
from starlette.types import Message, Receive

RETRY_AFTER = {"Retry-After": "1"}
T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before its answer was ready (logged as 499, nothing is sent)."""


def busy(detail: str) -> HTTPException:
    """A 503 that tells the client to retry after a second: overload is brief, refusing is cheap."""
    return HTTPException(503, detail, headers=RETRY_AFTER)


class Gate:
    """At most `limit` requests inside at once, and at most `queue` waiting for a slot (first come,
    first served); `on_reject` counts the refused, `on_change` and `on_queue` follow the counts."""

    def __init__(self, name: str, limit: int, on_reject: Callable[[str], None] | None = None,
                 on_change: Callable[[str, int], None] | None = None, queue: int = 0,
                 on_queue: Callable[[str, int], None] | None = None):
        self.name, self.limit, self.queue, self.inside = name, limit, queue, 0
        self.waiting: deque[asyncio.Future] = deque()
        self.on_reject, self.on_change, self.on_queue = on_reject, on_change, on_queue

    @contextlib.asynccontextmanager
    async def admit(self, wait_s: float) -> AsyncIterator[Gate]:
        """Inside the gate for the block: at once if a slot is free, else after waiting at most
        `wait_s` in the queue. Raises the 503 when the queue is full or the wait runs out."""
        await self._enter(wait_s)
        try:
            yield self
        finally:
            self._leave()

    async def _enter(self, wait_s: float) -> None:
        if self.inside < self.limit:
            self.inside += 1
            self._changed()
            return
        if len(self.waiting) >= self.queue or wait_s <= 0:
            self._refuse(f"the server is at capacity ({self.limit} {self.name} requests at once, "
                         f"{len(self.waiting)} waiting); retry shortly")
        slot = asyncio.get_running_loop().create_future()  # its result: a slot handed over by _leave
        self.waiting.append(slot)
        self._queued()
        try:
            await asyncio.wait({slot}, timeout=wait_s)
        except BaseException:  # cancelled while waiting (the client's task ended)
            if slot.done() and not slot.cancelled():
                self._leave()  # a slot was handed over just before: pass it on
            slot.cancel()
            raise
        finally:
            with contextlib.suppress(ValueError):
                self.waiting.remove(slot)
            self._queued()
        if not slot.done():
            slot.cancel()
            self._refuse(f"the server is at capacity: no {self.name} slot came free within {wait_s:.2g} s "
                         f"({self.limit} {self.name} requests at once); retry shortly")

    def _leave(self) -> None:
        while self.waiting:  # hand the slot to the first waiter still waiting: `inside` stays as it is
            slot = self.waiting.popleft()
            if not slot.done():
                slot.set_result(None)
                self._queued()
                return
        self.inside -= 1
        self._changed()

    def _refuse(self, detail: str) -> None:
        if self.on_reject:
            self.on_reject(self.name)
        raise busy(detail)

    def _changed(self) -> None:
        if self.on_change:
            self.on_change(self.name, self.inside)

    def _queued(self) -> None:
        if self.on_queue:
            self.on_queue(self.name, len(self.waiting))


class BodyBudget:
    """Bytes of upload bodies held at once, all requests together: charged as the bytes arrive, given
    back when the request ends. `reading` counts the bodies still arriving."""

    def __init__(self, limit: int, on_reject: Callable[[str], None] | None = None,
                 on_change: Callable[[int, int], None] | None = None):
        self.limit, self.used, self.reading = limit, 0, 0
        self.on_reject, self.on_change = on_reject, on_change

    def refuse(self) -> HTTPException:
        if self.on_reject:
            self.on_reject("body")
        return busy(f"the server is at capacity (uploads being received hold its {self.limit:,}-byte budget for "
                    f"bodies); retry shortly")

    def fits(self, n: int) -> bool:
        return self.used + n <= self.limit

    @contextlib.contextmanager
    def hold(self) -> Iterator[BodyHold]:
        """A request's share of the budget for the block: what it charges is given back at the end."""
        held = BodyHold(self)
        try:
            yield held
        finally:
            self.used -= held.bytes
            self.reading -= held.reading
            held.bytes = held.reading = 0
            self._changed()

    def _changed(self) -> None:
        if self.on_change:
            self.on_change(self.reading, self.used)


class BodyHold:
    """One request's bytes in a BodyBudget."""

    def __init__(self, budget: BodyBudget):
        self.budget, self.bytes, self.reading = budget, 0, 0

    def charge(self, n: int) -> None:
        """Count `n` more bytes held, or raise the budget's 503."""
        if not self.budget.fits(n):
            raise self.budget.refuse()
        self.budget.used += n
        self.bytes += n
        self.budget._changed()

    def reading_body(self, on: bool) -> None:
        d = (1 if on else 0) - self.reading
        self.reading += d
        self.budget.reading += d
        self.budget._changed()

    def metered(self, receive: Receive, grace_s: float, min_rate: float) -> Receive:
        """`receive` that charges each chunk of the body to the budget and gives up with a 408 once the
        body is behind `grace_s + received / min_rate` seconds from its start (Apache's mod_reqtimeout
        rule: a client sending at least `min_rate` bytes a second is never cut off)."""
        loop = asyncio.get_running_loop()
        start, received = loop.time(), 0
        self.reading_body(True)

        async def receive_metered() -> Message:
            nonlocal received
            left = start + grace_s + received / min_rate - loop.time()
            try:
                if left <= 0:
                    raise asyncio.TimeoutError
                message = await asyncio.wait_for(receive(), timeout=left)
            except asyncio.TimeoutError:
                self.reading_body(False)
                raise HTTPException(408, f"the upload arrived too slowly: after {grace_s:g} s a body must arrive "
                                         f"at {min_rate:,.0f} bytes a second or more; send it again",
                                    headers={"Connection": "close"}) from None
            if message["type"] == "http.request":
                body = message.get("body", b"")
                received += len(body)
                self.charge(len(body))
                if not message.get("more_body", False):
                    self.reading_body(False)
            else:
                self.reading_body(False)
            return message

        return receive_metered


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
