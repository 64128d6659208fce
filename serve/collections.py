"""The collections one server serves: named indexes, each searched with the bundle it was built with.

`dsmd serve --index photos=PATH --index docs=PATH` serves two; every endpoint takes
`collection=NAME` (default: the first one given) and /info lists them. Collections whose bundle is
the same folder share one loaded model (`Encoders`: its two micro-batching encoders and its cache of
text vectors), so a second collection costs its index, not a second model. What bounds the machine
is the server's and shared by all: the gates, the upload body budget, the decode slots, the writer
and compactor threads (state.py).

Each collection reloads, compacts and reports a failed reload on its own. Searches read `c.index`
once and use that object to the end, so swapping in a new index is one assignment and needs no lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np

from dsmd.bundle import Bundle, RuntimeOptions
from dsmd.errors import UserError
from dsmd.index.filtered import Answer, Ask, answer
from dsmd.index.search import SearchIndex
from dsmd.serve.batcher import MicroBatcher
from dsmd.serve.cache import LRU
from dsmd.serve.metrics import Metrics
from dsmd.serve.settings import Settings

log = logging.getLogger("dsmd.serve")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class Spec:
    """One collection as configured: its name, its index folder and its bundle folder."""

    name: str
    index: str
    bundle: str


def _entries(value: str) -> list[tuple[str | None, str]]:
    """'PATH', or comma-separated entries each 'NAME=PATH' or 'PATH' (split on commas only when one
    entry is named, so a single path may hold a comma) -> (name or None, path) each."""
    pieces = [e.strip() for e in value.split(",")]
    if not any(named_entry(e) for e in pieces):
        return [(None, value.strip())] if value.strip() else []
    return [named_entry(e) or (None, e) for e in pieces if e]


def named_entry(entry: str) -> tuple[str, str] | None:
    head, sep, tail = entry.partition("=")
    return (head, tail.strip()) if sep and NAME.fullmatch(head) else None


def specs(index: str, bundle: str) -> list[Spec]:
    """The collections of the settings' `index` and `bundle` (see _entries).

    A collection is named by its entry, else by its folder's name (a single collection whose folder
    name cannot be a URL parameter is named 'index'). Its bundle is the bundle entry of the same name,
    else the unnamed bundle entry (one is enough for all).

    Raises:
        ValueError: names clash, a name is not usable in a URL, a path is empty, a bundle names no
            collection, or a collection has no bundle.
    """
    indexes = _entries(index)
    if not indexes:
        raise ValueError("no index given: --index PATH, or --index NAME=PATH once per collection")
    named = [(name or Path(path).name, path) for name, path in indexes]
    if len(named) == 1 and not NAME.fullmatch(named[0][0]):
        named = [("index", named[0][1])]
    seen: set[str] = set()
    for name, path in named:
        if not path:
            raise ValueError(f"collection {name!r} has no index folder: --index {name}=PATH")
        if not NAME.fullmatch(name):
            raise ValueError(f"the index at {path} needs a name usable in a URL: --index NAME={path}")
        if name in seen:
            raise ValueError(f"two collections are named {name!r}: name them, --index NAME=PATH")
        seen.add(name)
    bundles = dict(_entries(bundle))
    stray = sorted(n for n in bundles if n is not None and n not in seen)
    if stray:
        raise ValueError(f"--bundle {stray[0]}=...: no collection is named {stray[0]!r} (collections: "
                         f"{', '.join(n for n, _ in named)})")
    out = []
    for name, path in named:
        own = bundles.get(name) or bundles.get(None)
        if not own:
            raise ValueError(f"collection {name!r} has no bundle: give --bundle PATH (for all) or --bundle "
                             f"{name}=PATH")
        out.append(Spec(name, path, own))
    return out


def check_backend(s: Settings) -> None:
    """Refuse --backend when an index searches its vectors elsewhere (before anything loads)."""
    from dsmd.artifacts import read_manifest

    for spec in specs(s.index, s.bundle):
        m = read_manifest(Path(spec.index))
        held = ((m or {}).get("backend") or {}).get("name", "faiss")
        if m is not None and s.backend and s.backend != held:
            raise UserError(f"--backend {s.backend}: the index at {spec.index} searches its vectors with {held}; "
                            f"build it with dsmd index build --backend {s.backend}")


class Encoders:
    """One loaded bundle: its text and image encoders behind micro-batchers, and its text vectors cache.

    A job is (input, index, ask): the encoder thread encodes the batch, then searches each job's index
    right there (one thread hand-off per request instead of two; BENCHMARKS.md, "Serving under load").
    """

    def __init__(self, path: str, s: Settings, metrics: Metrics, inside: Callable[[str], Callable[[], int]]):
        self.bundle = Bundle(path, s.variant, RuntimeOptions(threads=s.threads, image_spinning=s.image_spinning,
                                                              text_spinning=s.text_spinning))
        self.text_cache = LRU(s.text_cache)
        m = metrics
        self.texts = MicroBatcher(self._text_work, s.batch_wait_ms, s.max_batch, "text encoder",
                                  lambda n: m.batches.labels("text").observe(n), inside("text"), s.max_queue,
                                  lambda n: m.dropped.labels("text").inc(n), s.encode_delay_ms)
        self.images = MicroBatcher(self._image_work, s.batch_wait_ms, s.max_batch, "image encoder",
                                   lambda n: m.batches.labels("image").observe(n), inside("image"), s.max_queue,
                                   lambda n: m.dropped.labels("image").inc(n), s.encode_delay_ms)
        # warm-up: the first real query must not pay for lazy initialisation
        self.bundle.encode_texts(["warm up"])
        size = self.bundle.preprocess.size
        self.bundle.encode_pixels(np.zeros((1, 3, size, size), np.float32))

    @property
    def healthy(self) -> tuple[bool, bool]:
        return self.texts.healthy, self.images.healthy

    def _text_work(self, jobs: list[tuple[str, SearchIndex, Ask | None]]) -> list[tuple]:
        """(text, index, ask) jobs -> (vector, whether the text was cut, answer) each; no search for ask None."""
        vectors, cut = self.bundle.encode_texts_and_cuts([j[0] for j in jobs])
        return [(v, c, settled(search_here, index, v, ask)) for v, c, (_, index, ask) in zip(vectors, cut, jobs)]

    def _image_work(self, jobs: list[tuple[np.ndarray, SearchIndex, Ask | None]]) -> list[tuple]:
        """(pixels, index, ask) jobs -> (vector, answer) each; no search for ask None."""
        vectors = self.bundle.encode_pixels(np.stack([j[0] for j in jobs]))
        return [(v, settled(search_here, index, v, ask)) for v, (_, index, ask) in zip(vectors, jobs)]

    def close(self) -> None:
        self.texts.close()
        self.images.close()


class Collection:
    """One named index being served, with the encoders of its bundle (see the module's docstring)."""

    def __init__(self, spec: Spec, encoders: Encoders, s: Settings, metrics: Metrics, several: bool):
        self.name, self.path, self.encoders, self.bundle = spec.name, spec.index, encoders, encoders.bundle
        self.settings, self.metrics = s, metrics
        self.index = self._open(readonly=True if not s.writes else None)
        self.writes = s.writes and not self.index.readonly
        # uploads of several collections never share a folder: UPLOAD_DIR/NAME each
        self.upload_dir = None if not s.upload_dir else Path(s.upload_dir) / spec.name if several \
            else Path(s.upload_dir)
        self.links = f"?collection={quote(spec.name)}" if several else ""  # appended to its items' URLs
        self.reload_error: str | None = None
        self._failed_manifest: tuple | None = None  # the manifest (its stat) a reload failed on
        self.compacting = False  # reloads wait: the compaction's own new manifest is not another process's
        self.refresh_gauges()

    def _open(self, readonly: bool | None) -> SearchIndex:
        index = SearchIndex(self.path, readonly=readonly, milvus_uri=self.settings.milvus_uri)
        try:
            index.check_bundle(self.bundle)
        except Exception:
            with contextlib.suppress(Exception):
                index.close()  # its SQLite connections and its Milvus client: nothing leaks per attempt
            raise
        return index

    def refresh_gauges(self) -> None:
        index = self.index
        for part in ("images", "texts"):
            self.metrics.items.labels(self.name, part).set(index.count(part))
        self.metrics.generation.labels(self.name).set(index.generation)

    # -- on the writer thread (reloads) and the compactor thread (compactions)

    def swap(self, fresh: SearchIndex) -> None:
        fresh.check_bundle(self.bundle)
        self.index = fresh  # searches in flight finish on the old object; it is freed when they drop it
        self.refresh_gauges()  # thumbnails stay cached: keyed by (collection, id, sha256), a changed item misses

    def reload_if_changed(self) -> bool:
        """Open the index again if another process wrote a new manifest (e.g. `dsmd index build`). A
        manifest that cannot be served is reported once (log, /info, /readyz) and not tried again."""
        if self.compacting:
            return False
        stat = _manifest_stat(Path(self.path))
        if not self.index.changed_on_disk():
            if self._failed_manifest is not None and stat != self._failed_manifest:  # back to the one served
                self._failed_manifest = self.reload_error = None
            return False
        if stat is not None and stat == self._failed_manifest:
            return False
        try:
            fresh = self._open(readonly=True if not self.writes else None)  # as served since start-up
        except Exception as e:  # whatever it was, the index in hand goes on being served
            self._failed_manifest = stat
            self.reload_error = (f"cannot reload the index at {self.path}: {e}; serving generation "
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


def _manifest_stat(index: Path) -> tuple | None:
    try:
        st = os.stat(index / "manifest.json")
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


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
