"""Micro-batching: encoder calls from concurrent requests are gathered into one batch.

A request hands its input to `MicroBatcher.submit` and awaits the result. One worker thread
takes whatever is waiting and, only while other requests are still on their way (`active()`
counts requests in the handlers), waits up to `wait_ms` for them (up to `max_batch`); then it
runs the encoder once on all of them and hands each request its row. A lone request never
waits. The event loop never runs the encoder itself.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np


class MicroBatcher:
    def __init__(self, encode: Callable[[list[Any]], np.ndarray], wait_ms: float = 2.0, max_batch: int = 32,
                 name: str = "encoder", on_batch: Callable[[int], None] | None = None,
                 active: Callable[[], int] | None = None):
        self.encode, self.wait, self.max_batch = encode, wait_ms / 1000, max_batch
        self.on_batch = on_batch
        self.active = active or (lambda: 1 << 30)
        self.jobs: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    async def submit(self, item: Any) -> np.ndarray:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        self.jobs.put((item, fut, loop))
        return await fut

    def close(self) -> None:
        """Stop the worker after the requests already queued."""
        self.jobs.put(None)

    def _run(self) -> None:
        while True:
            first = self.jobs.get()
            if first is None:
                return
            batch = [first]
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
            try:
                out = self.encode([b[0] for b in batch])
                results = [(fut, loop, out[i], None) for i, (_, fut, loop) in enumerate(batch)]
            except Exception as e:  # noqa: BLE001 - handed to each waiting request
                results = [(fut, loop, None, e) for _, fut, loop in batch]
            if self.on_batch:
                self.on_batch(len(batch))
            for fut, loop, value, error in results:
                try:
                    loop.call_soon_threadsafe(_settle, fut, value, error)
                except RuntimeError:  # that request's event loop is closed: nobody is waiting
                    pass


def _settle(fut: asyncio.Future, value, error) -> None:
    if fut.done():  # the request went away
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(value)
