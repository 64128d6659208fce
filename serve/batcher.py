"""Micro-batching: encoder calls from concurrent requests are gathered into one batch.

A request hands its input to `MicroBatcher.submit` and awaits the result. One worker thread
takes whatever is waiting and, only while other requests are still on their way (`active()`
counts requests in the handlers), waits up to `wait_ms` for them (up to `max_batch`); then it
runs the encoder once on all of them and hands each request its row. A lone request never
waits. The event loop never runs the encoder itself.

The queue is bounded: past `max_queue` waiting inputs, `submit` raises `Overloaded` at once
(the server answers 503), so a burst never builds a backlog that every later request waits
behind. A request that gives up (its client went away, or its deadline passed) cancels its
job, and the worker drops cancelled jobs before encoding them.

Failures are 503s that say what happened, never a 500 or a wait: an encoder call that raises is
`EncoderFailed` for each input of that batch, and `healthy` stays false (so `/readyz` says so)
until a later call succeeds; if the worker thread dies, every input it held or that was
waiting gets `EncoderStopped`, `healthy` is false for good and `submit` refuses at once.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class Overloaded(Exception):
    """The encoder's queue is full: answer 503 and let the client retry."""


class EncoderStopped(Exception):
    """The encoder's worker thread is gone: nothing more will be encoded until a restart."""


class EncoderFailed(Exception):
    """The encoder raised on the batch that held this input."""


@dataclass(eq=False)
class Job:
    item: Any
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    cancelled: bool = field(default=False)  # set on the event loop, read by the worker


class MicroBatcher:
    def __init__(self, encode: Callable[[list[Any]], np.ndarray], wait_ms: float = 2.0, max_batch: int = 32,
                 name: str = "encoder", on_batch: Callable[[int], None] | None = None,
                 active: Callable[[], int] | None = None, max_queue: int = 256,
                 on_drop: Callable[[int], None] | None = None, delay_ms: float = 0.0):
        self.encode, self.wait, self.max_batch = encode, wait_ms / 1000, max_batch
        self.on_batch, self.on_drop = on_batch, on_drop
        self.active = active or (lambda: 1 << 30)
        self.delay = delay_ms / 1000
        self.jobs: queue.Queue = queue.Queue(maxsize=max_queue)
        self.name = name
        self.failing = False  # the last encoder call raised
        self.stopped = False  # the worker is gone (set before it answers what it leaves)
        self._in_hand: list[Job] = []  # the batch being gathered or encoded
        self.thread = threading.Thread(target=self._guarded, name=name, daemon=True)
        self.thread.start()

    @property
    def healthy(self) -> bool:
        return not self.stopped and self.thread.is_alive() and not self.failing

    def queued(self) -> int:
        return self.jobs.qsize()

    def submit_nowait(self, item: Any) -> Job:
        """Queue `item`; the job's future gets its embedding. Raises Overloaded when full,
        EncoderStopped when the worker is gone."""
        if self.stopped or not self.thread.is_alive():
            raise self._stopped()
        loop = asyncio.get_running_loop()
        job = Job(item, loop.create_future(), loop)
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise Overloaded(f"the {self.name} has {self.jobs.maxsize} inputs waiting") from None
        if self.stopped:  # died while we queued: its last look at the queue may have missed this job
            raise self._stopped()
        return job

    def _stopped(self) -> EncoderStopped:
        return EncoderStopped(f"the {self.name} has stopped; the server needs a restart")

    async def submit(self, item: Any) -> np.ndarray:
        job = self.submit_nowait(item)
        try:
            return await job.future
        finally:
            job.cancelled = not job.future.done() or job.future.cancelled()

    def close(self) -> None:
        """Stop the worker after the requests already queued."""
        try:
            self.jobs.put(None, timeout=5)
        except queue.Full:
            pass

    def _guarded(self) -> None:
        try:
            self._run()
        finally:  # a dying worker must not leave anyone waiting: neither its batch nor the queue
            self.stopped = True
            stopped = self._stopped()
            for job in self._in_hand:
                _hand(job, None, stopped)
            while True:
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    _hand(job, None, stopped)

    def _take(self) -> Job | None:
        """The next job that still has someone waiting (None: close)."""
        while True:
            job = self.jobs.get()
            if job is None or not job.cancelled:
                return job
            if self.on_drop:
                self.on_drop(1)

    def _run(self) -> None:
        while True:
            first = self._take()
            if first is None:
                return
            batch = self._in_hand = [first]
            deadline = time.monotonic() + self.wait
            while len(batch) < self.max_batch:
                try:
                    nxt = self.jobs.get_nowait()
                except queue.Empty:
                    left = deadline - time.monotonic()
                    if left <= 0 or self.active() <= len(batch):  # nobody else is on the way
                        break
                    try:
                        nxt = self.jobs.get(timeout=min(left, 0.0005))
                    except queue.Empty:
                        continue
                if nxt is None:
                    self.jobs.put(None)
                    break
                batch.append(nxt)
            if self.delay:
                time.sleep(self.delay)
            live = [j for j in batch if not j.cancelled]  # given up while the batch gathered
            if self.on_drop and len(live) < len(batch):
                self.on_drop(len(batch) - len(live))
            if not live:
                continue
            try:
                out = self.encode([j.item for j in live])
                results = [(j, out[i], None) for i, j in enumerate(live)]
                self.failing = False
            except Exception as e:  # handed to each waiting request
                self.failing = True
                failed = EncoderFailed(f"the {self.name} failed: {type(e).__name__}: {e}")
                results = [(j, None, failed) for j in live]
            if self.on_batch:
                self.on_batch(len(live))
            for job, value, error in results:
                _hand(job, value, error)
            self._in_hand = []


def _hand(job: Job, value: Any, error: BaseException | None) -> None:
    try:
        job.loop.call_soon_threadsafe(_settle, job.future, value, error)
    except RuntimeError:  # that request's event loop is closed: nobody is waiting
        pass


def _settle(fut: asyncio.Future, value: Any, error: BaseException | None) -> None:
    if fut.done():  # the request went away
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(value)
