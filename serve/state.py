"""What the app holds while it runs: the bundle, the index, the encoders' batchers, caches, gates.

Searches read `self.index` once and use that object to the end, so swapping in a new index
(after a compaction, or when another process rebuilt the folder) is one assignment and needs
no lock. Writes and reloads run one at a time on the writer thread, compactions on a thread of
their own (a rebuild must not hold up writes; no reload meanwhile), never on the thread pool the
searches use. A reload that fails (the folder rebuilt with another bundle) is
logged once and the index in hand goes on being served; it is tried again only when the
manifest changes again.

Thumbnails are made once per item however many ask at the same moment (one render, the others
wait for it), by at most `max_thumbnail_requests` worker threads, and kept across index swaps
(the cache is keyed by the item's id and the sha256 of its file).
"""

from __future__ import annotations

import asyncio
import contextlib
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

from dsmd.bundle import Bundle, RuntimeOptions
from dsmd.errors import UserError
from dsmd.images import FILE_FORMATS, UPLOAD_FORMATS, BadImage, open_image
from dsmd.index.filtered import Answer, Ask, answer
from dsmd.index.search import SearchIndex
from dsmd.serve.admission import BodyBudget, Deadline, Gate, within
from dsmd.serve.batcher import MicroBatcher
from dsmd.serve.cache import LRU
from dsmd.serve.memory import limit_malloc, resident_bytes
from dsmd.serve.metrics import Metrics
from dsmd.serve.settings import Settings

log = logging.getLogger("dsmd.serve")


def check_backend(s: Settings) -> None:
    """Refuse --backend when the index searches its vectors elsewhere (before anything loads)."""
    from dsmd.artifacts import read_manifest

    m = read_manifest(Path(s.index))
    held = ((m or {}).get("backend") or {}).get("name", "faiss")
    if m is not None and s.backend and s.backend != held:
        raise UserError(f"--backend {s.backend}: the index at {s.index} searches its vectors with {held}; "
                        f"build it with dsmd index build --backend {s.backend}")


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
        self.bundle = Bundle(s.bundle, s.variant, RuntimeOptions(threads=s.threads, image_spinning=s.image_spinning,
                                                                   text_spinning=s.text_spinning))
        check_backend(s)
        self.index = SearchIndex(s.index, readonly=True if not s.writes else None, milvus_uri=s.milvus_uri)
        self.index.check_bundle(self.bundle)
        self.writes = s.writes and not self.index.readonly
        self.text_cache = LRU(s.text_cache)
        self.thumbs = LRU(s.thumb_cache)
        self.verified = LRU(4096)  # files whose sha256 matched their row: (path, inode, mtime, size)
        self._thumb_flights: dict[Hashable, asyncio.Future] = {}
        self.reload_error: str | None = None
        self._failed_manifest: tuple | None = None  # the manifest (its stat) a reload failed on
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
        self.texts = MicroBatcher(self._text_work, s.batch_wait_ms, s.max_batch, "text encoder",
                                  lambda n: m.batches.labels("text").observe(n), lambda: self.gates["text"].inside,
                                  s.max_queue, lambda n: m.dropped.labels("text").inc(n), s.encode_delay_ms)
        self.images = MicroBatcher(self._image_work, s.batch_wait_ms, s.max_batch,
                                   "image encoder", lambda n: m.batches.labels("image").observe(n),
                                   lambda: self.gates["image"].inside, s.max_queue,
                                   lambda n: m.dropped.labels("image").inc(n), s.encode_delay_ms)
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="index-writer")
        # a compaction rebuilds the whole index: on its own thread, so writes go on meanwhile
        self.compactor = ThreadPoolExecutor(1, thread_name_prefix="index-compactor")
        self.compacting = False  # reloads wait: the compaction's own new manifest is not another process's
        x["compacting"].set_function(lambda: float(self.compacting))
        # warm-up: the first real query must not pay for lazy initialisation
        self.bundle.encode_texts(["warm up"])
        size = self.bundle.preprocess.size
        self.bundle.encode_pixels(np.zeros((1, 3, size, size), np.float32))
        self.started = time.time()
        self.baseline_bytes = resident_bytes()
        self.budget_bytes = settings.memory_budget_bytes()
        self.refresh_gauges()

    @property
    def ready(self) -> bool:
        return self.texts.healthy and self.images.healthy

    # -- on the encoder threads: encode a batch, then search each query right there (one thread
    #    hand-off per request instead of two; see BENCHMARKS.md, "Serving under load")

    def _text_work(self, jobs: list[tuple[str, Ask | None]]) -> list[tuple[np.ndarray, bool, Answer | None]]:
        """(text, ask) jobs -> (vector, whether the text was cut, answer) each; no search for ask None."""
        vectors, cut = self.bundle.encode_texts_and_cuts([j[0] for j in jobs])
        index = self.index
        return [(v, c, settled(search_here, index, v, ask)) for v, c, (_, ask) in zip(vectors, cut, jobs)]

    def _image_work(self, jobs: list[tuple[np.ndarray, Ask | None]]) -> list[tuple[np.ndarray, Answer | None]]:
        """(pixels, ask) jobs -> (vector, answer) each; no search for ask None."""
        vectors = self.bundle.encode_pixels(np.stack([j[0] for j in jobs]))
        index = self.index
        return [(v, settled(search_here, index, v, ask)) for v, (_, ask) in zip(vectors, jobs)]

    def decode(self, data: bytes, until: float | None = None) -> np.ndarray:
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
                             min_side=2 * self.bundle.preprocess.size)
            return self.bundle.transform(img)
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

    async def _render(self, key: tuple[int, str], locate: Callable[[], Path], deadline: Deadline) -> bytes:
        """One render: it holds its thumbnail slot until its thread is done, not until a deadline, so a
        stalled file never lets more threads pile up behind the slots."""
        async with self.gates["thumbnail"].admit(self.settings.queue_wait_s(deadline.left())):
            data = await run_in_threadpool(self._thumbnail_file, locate, key[1])
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

    def refresh_gauges(self) -> None:
        index = self.index
        for part in ("images", "texts"):
            self.metrics.items.labels(part).set(index.count(part))
        self.metrics.generation.set(index.generation)

    # -- on the writer thread (reloads) and the compactor thread (compactions)

    def swap(self, fresh: SearchIndex) -> None:
        fresh.check_bundle(self.bundle)
        self.index = fresh  # searches in flight finish on the old object; it is freed when they drop it
        self.refresh_gauges()  # thumbnails stay cached: keyed by (id, sha256), an item that changed misses

    def reload_if_changed(self) -> bool:
        """Open the index again if another process wrote a new manifest (e.g. `dsmd index build`). A
        manifest that cannot be served is reported once (log, /info, /readyz) and not tried again."""
        self.extra["reload_checks"].inc()
        if self.compacting:
            return False
        stat = _manifest_stat(Path(self.settings.index))
        if not self.index.changed_on_disk():
            if self._failed_manifest is not None and stat != self._failed_manifest:  # back to the one served
                self._failed_manifest = self.reload_error = None
            return False
        if stat is not None and stat == self._failed_manifest:
            return False
        fresh = None
        try:
            fresh = SearchIndex(self.settings.index, readonly=True if not self.writes else None,
                                milvus_uri=self.settings.milvus_uri)
            fresh.check_bundle(self.bundle)
        except Exception as e:  # whatever it was, the index in hand goes on being served
            if fresh is not None:
                with contextlib.suppress(Exception):
                    fresh.close()  # its SQLite connections and its Milvus client: nothing leaks per attempt
            self._failed_manifest = stat
            self.reload_error = (f"cannot reload the index at {self.settings.index}: {e}; serving generation "
                                 f"{self.index.generation} until its manifest changes again")
            log.error(self.reload_error)
            return False
        self._failed_manifest = self.reload_error = None
        self.swap(fresh)
        return True

    def compact_if_due(self) -> bool:
        """Rebuild the index once live changes pass its threshold, on the compactor thread: searches
        and writes go on meanwhile (writes made through the old object are passed on to the new one)."""
        if not self.writes or not self.index.needs_compaction():
            return False
        self.compacting = True
        try:
            time.sleep(self.settings.compact_delay_ms / 1000)
            self.swap(self.index.compact(self.bundle))
        finally:
            self.compacting = False
        return True

    def upload_dir(self) -> Path | None:
        return Path(self.settings.upload_dir) if self.settings.upload_dir else None

    def close(self) -> None:
        self.texts.close()
        self.images.close()
        self.compactor.shutdown(wait=True, cancel_futures=True)
        self.writer.shutdown(wait=True, cancel_futures=True)
        self.index.close()


def _manifest_stat(index: Path) -> tuple | None:
    try:
        st = os.stat(index / "manifest.json")
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


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


def settled(fn, *args):
    """fn's answer, or the exception it raised: one query's failure (its filter, a busy database) is
    that query's answer, never its whole batch's (the routes raise it: common.settle)."""
    try:
        return fn(*args)
    except Exception as e:
        return e


def search_here(index: SearchIndex, vector: np.ndarray, ask: Ask | None) -> Answer | None:
    """One query, on whatever thread calls it. OpenMP's thread count is per thread: set it here, in
    the thread that searches, or every thread starts a team on every core and concurrent searches
    spin against each other (see BENCHMARKS.md, "Serving under load")."""
    import faiss

    faiss.omp_set_num_threads(1)
    return None if ask is None else answer(index, vector, ask)
