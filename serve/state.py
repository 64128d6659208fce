"""What the app holds while it runs: the bundle, the index, the encoders' batchers, caches, gates.

Searches read `self.index` once and use that object to the end, so swapping in a new index
(after a compaction, or when another process rebuilt the folder) is one assignment and needs
no lock. Writes, compactions and reloads run one at a time on their own thread, never on the
thread pool the searches use.
"""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from dsmd.bundle import Bundle, RuntimeOptions
from dsmd.errors import UserError
from dsmd.images import UPLOAD_FORMATS, open_image
from dsmd.index.search import SearchIndex
from dsmd.serve.admission import Gate
from dsmd.serve.batcher import MicroBatcher
from dsmd.serve.cache import LRU
from dsmd.serve.memory import limit_malloc, resident_bytes
from dsmd.serve.metrics import Metrics
from dsmd.serve.settings import Settings


def check_backend(s: Settings) -> None:
    """Refuse --backend when the index searches its vectors elsewhere (before anything loads)."""
    from dsmd.artifacts import read_manifest

    m = read_manifest(Path(s.index))
    held = ((m or {}).get("backend") or {}).get("name", "faiss")
    if m is not None and s.backend and s.backend != held:
        raise UserError(f"--backend {s.backend}: the index at {s.index} searches its vectors with {held}; "
                        f"build it with dsmd index build --backend {s.backend}")


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
        reject = lambda gate: m.rejected.labels(gate).inc()  # noqa: E731
        moved = lambda gate, n: m.in_flight.labels(gate).set(n)  # noqa: E731
        self.gates = {"text": Gate("text", s.max_text_requests, reject, moved),
                      "image": Gate("image", s.max_image_requests, reject, moved),
                      "write": Gate("write", s.max_write_requests, reject, moved),
                      "thumbnail": Gate("thumbnail", s.max_text_requests, reject, moved)}
        self.decode_slots = threading.BoundedSemaphore(s.decode_slots)  # held by the decoding thread itself
        self.texts = MicroBatcher(self._text_work, s.batch_wait_ms, s.max_batch, "text encoder",
                                  lambda n: m.batches.labels("text").observe(n), lambda: self.gates["text"].inside,
                                  s.max_queue, lambda n: m.dropped.labels("text").inc(n), s.encode_delay_ms)
        self.images = MicroBatcher(self._image_work, s.batch_wait_ms, s.max_batch,
                                   "image encoder", lambda n: m.batches.labels("image").observe(n),
                                   lambda: self.gates["image"].inside, s.max_queue,
                                   lambda n: m.dropped.labels("image").inc(n), s.encode_delay_ms)
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="index-writer")
        self.compacting = False
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

    def _text_work(self, jobs: list[tuple[str, int, str]]) -> list[tuple[np.ndarray, bool, list]]:
        """(text, k, target) jobs -> (vector, whether the text was cut, hits) each."""
        vectors, cut = self.bundle.encode_texts_and_cuts([j[0] for j in jobs])
        index = self.index
        return [(v, c, search_here(index, v, k, target)) for v, c, (_, k, target) in zip(vectors, cut, jobs)]

    def _image_work(self, jobs: list[tuple[np.ndarray, int, str]]) -> list[tuple[np.ndarray, list]]:
        """(pixels, k, target) jobs -> (vector, hits) each."""
        vectors = self.bundle.encode_pixels(np.stack([j[0] for j in jobs]))
        index = self.index
        return [(v, search_here(index, v, k, target)) for v, (_, k, target) in zip(vectors, jobs)]

    def decode(self, data: bytes) -> np.ndarray:
        """Model input of an upload: only the accepted formats, decoded at about twice the model's size,
        at most `decode_slots` at a time (a thread that gave up waiting still holds its slot until done).

        Raises:
            BadImage: not an accepted image, or over the pixel limit.
        """
        with self.decode_slots:
            img = open_image(data, max_pixels=self.settings.max_pixels, formats=UPLOAD_FORMATS,
                             min_side=2 * self.bundle.preprocess.size)
            return self.bundle.transform(img)

    def thumbnail(self, uri: str) -> bytes:
        """A JPEG thumbnail of an indexed file (raises BadImage when it cannot be read)."""
        with self.decode_slots:
            img = open_image(uri, min_side=self.settings.thumb_size)
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

    # -- on the writer thread

    def swap(self, fresh: SearchIndex) -> None:
        fresh.check_bundle(self.bundle)
        self.index = fresh  # searches in flight finish on the old object; it is freed when they drop it
        with self.thumbs.lock:
            self.thumbs.clear()
        self.refresh_gauges()

    def reload_if_changed(self) -> bool:
        """Open the index again if another process wrote a new manifest (e.g. `dsmd index build`)."""
        if not self.index.changed_on_disk():
            return False
        self.swap(SearchIndex(self.settings.index, readonly=True if not self.writes else None,
                              milvus_uri=self.settings.milvus_uri))
        return True

    def compact_if_due(self) -> bool:
        """Rebuild the index once live changes pass its threshold (searches go on meanwhile)."""
        if not self.writes or not self.index.needs_compaction():
            return False
        self.swap(self.index.compact(self.bundle))
        return True

    def upload_dir(self) -> Path | None:
        return Path(self.settings.upload_dir) if self.settings.upload_dir else None

    def close(self) -> None:
        self.texts.close()
        self.images.close()
        self.writer.shutdown(wait=True, cancel_futures=True)
        self.index.close()


def search_here(index: SearchIndex, vector: np.ndarray, k: int, target: str) -> list:
    """One query, on whatever thread calls it. OpenMP's thread count is per thread: set it here, in
    the thread that searches, or every thread starts a team on every core and concurrent searches
    spin against each other (see BENCHMARKS.md, "Serving under load")."""
    import faiss

    faiss.omp_set_num_threads(1)
    return index.search(vector[None], k, target)[0]
