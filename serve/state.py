"""What the app holds while it runs: its collections (serve/collections.py), the gates, the caches.

Writes and reloads run one at a time on the writer thread, compactions on a thread of their own
(a rebuild must not hold up writes; no reload of that collection meanwhile), never on the thread
pool the searches use. Both are the server's, shared by its collections.

Thumbnails are made once per item however many ask at the same moment (one render, the others
wait for it), by at most `max_thumbnail_requests` worker threads, and kept across index swaps
(the cache is keyed by the collection, the item's id and the sha256 of its file).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import os
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from prometheus_client import Counter, Gauge
from starlette.concurrency import run_in_threadpool

from dsmd.bundle import Bundle
from dsmd.images import FILE_FORMATS, UPLOAD_FORMATS, BadImage, open_image
from dsmd.serve.admission import BodyBudget, Deadline, Gate, within
from dsmd.serve.cache import LRU
from dsmd.serve.collections import Collection, Encoders, check_backend, specs
from dsmd.serve.memory import limit_malloc, resident_bytes
from dsmd.serve.metrics import Metrics
from dsmd.serve.settings import Settings

log = logging.getLogger("dsmd.serve")


class FileChanged(Exception):
    """An indexed file whose bytes are no longer the ones indexed (its sha256 differs)."""


class State:
    """Everything loaded once at start-up and shared by the requests (see the module's docstring)."""

    def __init__(self, settings: Settings):
        import faiss

        limit_malloc()
        faiss.omp_set_num_threads(1)  # one query at a time per search; the encoders take the cores
        self.settings = s = settings
        self.metrics = m = Metrics()
        check_backend(s)
        self.thumbs = LRU(s.thumb_cache)
        self.verified = LRU(4096)  # files whose sha256 matched their row: (path, inode, mtime, size)
        self._thumb_flights: dict[Hashable, asyncio.Future] = {}
        x = self.extra = _extra_metrics(m)
        reject = lambda gate: m.rejected.labels(gate).inc()  # noqa: E731
        moved = lambda gate, n: m.in_flight.labels(gate).set(n)  # noqa: E731
        waits = lambda gate, n: x["queued"].labels(gate).set(n)  # noqa: E731
        limits = {"text": s.max_text_requests, "image": s.max_image_requests, "write": s.max_write_requests,
                  "thumbnail": s.max_thumbnail_requests}
        self.gates = {name: Gate(name, n, reject, moved, s.admission_queue, waits) for name, n in limits.items()}
        self.bodies = BodyBudget(s.body_budget_bytes or 0, reject, lambda n, used: (x["reading"].set(n),
                                                                                     x["body_bytes"].set(used)))
        self.decode_slots = threading.BoundedSemaphore(s.decode_slots)  # held by the decoding thread itself
        configured = specs(s.index, s.bundle)
        self.encoders: dict[str, Encoders] = {}  # by bundle folder: collections with one bundle share it
        self.collections: dict[str, Collection] = {}
        for spec in configured:
            key = os.path.realpath(spec.bundle)
            if key not in self.encoders:
                self.encoders[key] = Encoders(spec.bundle, s, m, lambda gate: (lambda: self.gates[gate].inside))
            self.collections[spec.name] = Collection(spec, self.encoders[key], s, m, several=len(configured) > 1)
        self.default = self.collections[configured[0].name]
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="index-writer")
        # a compaction rebuilds the whole index: on its own thread, so writes go on meanwhile
        self.compactor = ThreadPoolExecutor(1, thread_name_prefix="index-compactor")
        x["compacting"].set_function(lambda: float(any(c.compacting for c in self.collections.values())))
        self.started = time.time()
        self.baseline_bytes = resident_bytes()
        self.budget_bytes = settings.memory_budget_bytes()

    @property
    def ready(self) -> bool:
        return all(all(e.healthy) for e in self.encoders.values())

    @property
    def reload_errors(self) -> dict[str, str]:
        return {c.name: c.reload_error for c in self.collections.values() if c.reload_error}

    def decode(self, data: bytes, bundle: Bundle, until: float | None = None) -> np.ndarray:
        """Model input of an upload: only the accepted formats, decoded at about twice the model's size,
        at most `decode_slots` at a time. A decode runs on in its thread when its request gives up, so
        the thread waits for a slot only until the request's deadline (`until`, on time.monotonic()) and
        then drops the upload undecoded: the work of abandoned requests never piles up behind the slots.

        Raises:
            BadImage: not an accepted image, or over the pixel limit.
            TimeoutError: no decode slot came free before the deadline.
        """
        waiting = self.extra["decode_waiting"]
        waiting.inc()
        try:
            got = self.decode_slots.acquire(timeout=None if until is None else max(until - time.monotonic(), 0.0))
        finally:
            waiting.dec()
        if not got:
            raise TimeoutError("no decode slot before the request's deadline")
        try:
            self.extra["decodes"].inc()
            img = open_image(data, max_pixels=self.settings.max_pixels, formats=UPLOAD_FORMATS,
                             min_side=2 * bundle.preprocess.size)
            return bundle.transform(img)
        finally:
            self.decode_slots.release()

    async def thumbnail(self, key: Hashable, locate: Callable[[], Path], deadline: Deadline) -> bytes:
        """A JPEG thumbnail of an indexed file (`locate()`, in a worker thread, finds it or raises): from
        the cache, or from the one render of it under way, or rendered now (raises BadImage when the
        file cannot be read, a 503 past the deadline)."""
        data = self.thumbs.lookup(key)
        if data is not None:
            return data
        flight = self._thumb_flights.get(key)
        if flight is None:
            flight = self._thumb_flights[key] = asyncio.ensure_future(self._render(key, locate, deadline))
            flight.add_done_callback(lambda f: (self._thumb_flights.pop(key, None), f.cancelled() or f.exception()))
        waiting = self.extra["thumb_waiting"]
        waiting.inc()
        try:
            return await within(deadline, asyncio.shield(flight), "make the thumbnail")
        finally:
            waiting.dec()

    async def _render(self, key: tuple[str, int, str], locate: Callable[[], Path], deadline: Deadline) -> bytes:
        """One render: it holds its thumbnail slot until its thread is done, not until a deadline, so a
        stalled file never lets more threads pile up behind the slots."""
        async with self.gates["thumbnail"].admit(self.settings.queue_wait_s(deadline.left())):
            data = await run_in_threadpool(self._thumbnail_file, locate, key[2])
        self.thumbs.put(key, data)
        return data

    def _thumbnail_file(self, locate: Callable[[], Path], sha256: str) -> bytes:
        """The thumbnail of the file `locate()` finds, read once: only if its bytes are still the ones
        indexed (`sha256`; else FileChanged), and, like an upload, only if its headers promise a decode
        in proportion to its size and pixels under the limit (else BadImage)."""
        path = locate()
        self.extra["renders"].inc()
        with self.decode_slots:
            try:
                data = path.read_bytes()
            except OSError as e:
                raise BadImage(f"{path}: cannot read ({e.strerror})") from None
            if hashlib.sha256(data).hexdigest() != sha256:
                raise FileChanged(f"{path} has changed since it was indexed")
            img = open_image(data, max_pixels=self.settings.max_pixels, min_side=self.settings.thumb_size,
                             formats=FILE_FORMATS, check_cost=True)  # a file in the index is no safer than an upload
            img.thumbnail((self.settings.thumb_size, self.settings.thumb_size))
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=85)
            return buf.getvalue()

    def ceiling_bytes(self) -> int | None:
        """Resident memory never to be passed: after start-up plus what admitted requests may add."""
        return None if self.baseline_bytes is None else self.baseline_bytes + self.budget_bytes

    def close(self) -> None:
        for e in self.encoders.values():
            e.close()
        self.compactor.shutdown(wait=True, cancel_futures=True)
        self.writer.shutdown(wait=True, cancel_futures=True)
        for c in self.collections.values():
            c.index.close()


def _extra_metrics(m: Metrics) -> dict:
    """Metrics of admission, thumbnails and reloads, in the app's registry (next to serve/metrics.py's)."""
    r = m.registry
    return {"queued": Gauge("dsmd_admission_queued", "Requests waiting for a slot, per gate.", ["gate"], registry=r),
            "reading": Gauge("dsmd_upload_bodies_reading", "Upload bodies being received.", registry=r),
            "body_bytes": Gauge("dsmd_upload_body_bytes", "Bytes of upload bodies held (the body budget used).",
                                registry=r),
            "renders": Counter("dsmd_thumbnail_renders", "Thumbnails made (decodes of an item's file).", registry=r),
            "thumb_waiting": Gauge("dsmd_thumbnail_waiting", "Requests waiting for a thumbnail being made.",
                                   registry=r),
            "reload_checks": Counter("dsmd_index_reload_checks", "Looks for an index rebuilt by another process.",
                                     registry=r),
            "decode_waiting": Gauge("dsmd_decode_waiting", "Uploads waiting for a decode slot.", registry=r),
            "decodes": Counter("dsmd_upload_decodes", "Uploads decoded (a decode slot taken).", registry=r),
            "compacting": Gauge("dsmd_index_compacting", "1 while the index is being rebuilt in the background.",
                                registry=r)}
