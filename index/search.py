"""Searching an index folder, and changing it live: what the server holds.

FAISS finds the neighbours, SQLite (the source of truth) says what they are. Opening reads the
FAISS files the manifest names, then reconciles them with the rows (live adds since the last
finalize are added, ids whose row is gone tombstoned): an index opened at any time serves exactly
the rows. Filters, paging and dedup build on `ranked` and `rows` (index/filtered.py).

Threads: `search`, `item`, `vector_of`, `count` may be called from many threads at once. Each
thread reads SQLite through its own connection; FAISS searches run in parallel under the read
side of a readers-writer lock, whose write side is held only while a vector is added or a
tombstone set replaced (milliseconds). Writes (`add_image`, `remove`, `set_tags`) run one at a
time per object and hold the folder lock (index/lock.py) across processes, `timeout` seconds at
most (then IndexBusy, naming the holder). `compact` rebuilds the files (finalize) and returns a
new object; writes made on the old one afterwards are passed on to it: a swap loses none."""

from __future__ import annotations

import errno
import hashlib
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsmd.artifacts import MANIFEST, read_manifest
from dsmd.bundle import Bundle
from dsmd.errors import UserError
from dsmd.index import ann, metadata, uploads
from dsmd.index.build import finalize
from dsmd.index.db import IndexDB
from dsmd.index.folder_state import identity, not_writable, stat_of
from dsmd.index.identity import IndexMismatch, check_index_bundle
from dsmd.index.live import LivePart
from dsmd.index.lock import RWLock, folder_lock
from dsmd.index.recall import text_to_image_recall

TABLES = {"images": "items", "texts": "texts"}
__all__ = ["Hit", "IndexMismatch", "ReadOnlyIndex", "SearchIndex", "text_to_image_recall"]


class ReadOnlyIndex(UserError):
    """A write to an index opened read-only."""


@dataclass
class Hit:
    id: int
    score: float
    item: dict


class SearchIndex:
    """An opened index: `search` returns hits with their rows; `add_image`, `remove` change it live."""

    # needs_compaction(): tombstones past 10% or live additions past 20% of the vectors in the FAISS
    # files, never for fewer than 64 changes (a compaction of a small index buys nothing)
    deleted_fraction = 0.10
    grown_fraction = 0.20
    compaction_min = 64
    lock_timeout = 60.0  # seconds a write waits for another writer (a build's batch, a merge), then IndexBusy
    open_attempts = 20  # manifest re-reads when its files vanish under a concurrent finalize

    def __init__(self, path: str | Path, mmap: bool = False, threads: int | None = None,
                 readonly: bool | None = None, milvus_uri: str | None = None):
        """`readonly` None: read-only when the folder or items.sqlite cannot be written (a read-only
        mount, another user's files). `mmap`: flat and IVF files are memory-mapped, not loaded.
        `milvus_uri`: where the vectors of a Milvus-backed index are, when not where it was built."""
        import faiss

        self.path = Path(path)
        self.mmap, self.threads = mmap, threads
        self.readonly = not_writable(self.path) if readonly is None else bool(readonly)
        if threads:
            faiss.omp_set_num_threads(threads)
        # batched exact search uses BLAS only above this many queries (default 20): lowered so that
        # batches of the server's size take it too (batch latency: see BENCHMARKS.md, the index sections)
        faiss.cvar.distance_compute_blas_threshold = 8
        self._rw = RWLock()  # FAISS searches (read) against FAISS changes (write)
        self._write_mutex = threading.Lock()  # one write at a time through this object
        self._local = threading.local()  # this thread's read connection
        self._conns: list[IndexDB] = []
        self._conns_lock = threading.Lock()
        self._epoch = 0  # bumped by close(): threads then open a new connection
        self._writer: IndexDB | None = None
        self._successor: SearchIndex | None = None
        self._milvus_uri, self._milvus = milvus_uri, None  # a Milvus-backed index's client
        self._open()
        if not self.readonly:
            self._writer_db()  # an index made before metadata gains its columns now (index/metadata.py)
        self._reconcile()

    # ---------------------------------------------------------------- opening

    def _open(self) -> None:
        """Read the manifest and its FAISS files; re-read the manifest when a finalize replaced it
        (and deleted the files it named) in between."""
        for attempt in range(self.open_attempts):
            stat = stat_of(self.path / MANIFEST)
            m = read_manifest(self.path)
            if m is None:
                raise UserError(f"{self.path} is not a finished index (no manifest.json): run dsmd index build")
            try:
                parts = {name: self._load(m, name) for name in TABLES}
                break
            except FileNotFoundError as e:
                if attempt == self.open_attempts - 1:
                    raise UserError(f"{self.path}/manifest.json names {Path(e.filename).name}, which is missing: "
                                    f"rebuild the FAISS files with dsmd index build") from None
                time.sleep(0.01 * (attempt + 1))
        self.manifest: dict = m
        self.backend: str = (m.get("backend") or {}).get("name", "faiss")
        self.generation: int = int(m["generation"])
        self.dim: int = m["bundle"]["dim"]
        self._manifest_stat = stat
        self._parts: dict[str, LivePart] = parts

    def _load(self, m: dict, name: str) -> LivePart:
        part = m.get(name, {})
        if (m.get("backend") or {}).get("name") == "milvus":
            return self._load_milvus(m, name)
        if not part.get("count"):
            return LivePart(None, m["bundle"]["dim"])
        file, kind = self.path / part["file"], part["index"]["kind"]
        table = TABLES[name]
        try:
            index = ann.read(file, kind, part["index"]["search"], self.mmap,
                             vectors_of=lambda ids: self._read(lambda db: db.vectors_of(ids, table, missing_ok=True)))
        except RuntimeError:  # FAISS says "could not open": gone, or another problem
            data = part["index"]["params"].get("data_file")
            for needed in (file, *([self.path / data] if data else [])):
                if not needed.exists():
                    raise FileNotFoundError(errno.ENOENT, "missing", str(needed)) from None
            raise
        return LivePart(index, m["bundle"]["dim"], part["index"])

    def _load_milvus(self, m: dict, name: str):
        from dsmd.index import milvus

        if self._milvus is None:
            self._milvus_at = self._milvus_uri or m["backend"]["uri"]
            self._milvus = milvus.connect(self._milvus_at)
        part = m.get(name, {})
        spec = part.get("index") or {"kind": "milvus", "params": {}, "search": {}}
        return milvus.MilvusPart(self._milvus, part["collection"], m["bundle"]["dim"], spec)

    def _reconcile(self) -> None:
        """Make the in-memory FAISS hold exactly the rows: add the missing ones, tombstone the gone."""
        if self.backend == "milvus" and self.readonly:
            return  # the collection is shared: a read-only server changes nothing in it
        db = self._db()
        for name, table in TABLES.items():
            part = self._parts[name]
            for attempt in range(5):
                try:
                    with db.snapshot():
                        rows = db.ids(table)
                        missing = np.setdiff1d(rows, part.all_ids(), assume_unique=True)
                        vectors = [db._vectors_of(missing[i:i + 10_000], table, False)
                                   for i in range(0, len(missing), 10_000)]
                    break
                except FileNotFoundError:  # a compaction moved the vectors after the snapshot began
                    if attempt == 4:
                        raise
            with self._rw.write():
                for i, v in zip(range(0, len(missing), 10_000), vectors):
                    part.add(missing[i:i + 10_000], v)
                # gone: held (the rows just added too) but without a row now, read after the adds: a removal by
                # another writer meanwhile is not re-added; a row written since the snapshot is not gone
                part.tombstone(np.setdiff1d(part.all_ids(), db.ids(table), assume_unique=True))

    # ---------------------------------------------------------------- reading

    def check_bundle(self, bundle: Bundle) -> None:  # IndexMismatch when its vectors are not comparable
        check_index_bundle(self.path, {}, self.manifest, bundle)

    def count(self, target: str = "images") -> int:
        """Vectors a search can return now (live adds and removes included)."""
        return self._parts[_target(target)].count()

    def search(self, vectors: np.ndarray, k: int = 10, target: str = "images") -> list[list[Hit]]:
        """Top-k hits for each query row, best first; `target` is "images" or "texts"."""
        with self._rw.read():  # rows read under it too: a removal here never leaves a hole in the top k
            scores, ids = self._ranked(vectors, k, target)
            rows = self.rows([int(i) for i in ids.ravel() if i >= 0], target)
        # a row removed by another process since this object reconciled is left out
        return [[Hit(int(i), float(s), rows[int(i)]) for s, i in zip(srow, irow) if int(i) in rows]
                for srow, irow in zip(scores, ids)]

    def kind(self, target: str = "images") -> str:
        """The kind of the target's index: flat (exact), hnsw, ivf..., or milvus."""
        return self._parts[_target(target)].spec["kind"]

    def ranked(self, vectors: np.ndarray, n: int, target: str = "images") -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the top n per query row, without their rows; -1 ids pad short rows."""
        with self._rw.read():
            return self._ranked(vectors, n, target)

    def _ranked(self, vectors: np.ndarray, n: int, target: str) -> tuple[np.ndarray, np.ndarray]:
        part = self._parts[_target(target)]
        q = np.ascontiguousarray(np.atleast_2d(vectors), np.float32)
        if q.shape[1] != self.dim:
            raise IndexMismatch(f"queries have {q.shape[1]} dims, the index {self.dim}")
        if part.count() <= 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        return part.search(q, n)

    def rows(self, ids: list[int], target: str = "images", brief: bool = False) -> dict[int, dict]:
        """The rows of these ids that still have one, by id; `brief`: what a result shows (metadata.BRIEF)."""
        return self._read(lambda db: db.items(sorted(set(ids)), brief) if target == "images"
                          else db.texts(sorted(set(ids))))

    def item(self, item_id: int) -> dict | None:
        """The row of an item (same shape as search hits' `item`), or None."""
        return self._read(lambda db: db.items([int(item_id)]).get(int(item_id)))

    def vector_of(self, item_id: int) -> np.ndarray | None:
        """The stored image vector of an item (for "more like this"), or None."""
        return self._read(lambda db: db.vector_of(item_id))

    @property
    def db(self) -> IndexDB:
        """This thread's read-only connection, for callers that query the rows directly."""
        return self._db()

    def _db(self) -> IndexDB:
        local = self._local
        if getattr(local, "db", None) is not None and local.epoch == self._epoch and local.db.stale():
            local.db.close()  # opened immutable while no writer was there; one is now: read its WAL too
            local.db = None
        if getattr(local, "db", None) is None or local.epoch != self._epoch:
            local.db = IndexDB(self.path / "items.sqlite", readonly=True, create_files=not self.readonly)
            local.epoch = self._epoch
            with self._conns_lock:
                self._conns.append(local.db)
        return local.db

    def _read(self, query):
        try:
            return query(self._db())
        except sqlite3.ProgrammingError:  # closed by close() under this thread: once more on a new one
            self._local.db = None
            return query(self._db())
        except sqlite3.OperationalError as e:  # e.g. the database locked beyond the timeout
            raise UserError(f"the index database is busy ({e}); try again") from e

    # ---------------------------------------------------------------- writing

    def add_image(self, data: bytes, bundle: Bundle, upload_dir: str | Path | None = None,
                  timeout: float | None = None) -> dict:
        """Store the upload (content-named, in `upload_dir`, default INDEX/uploads), embed it, insert its
        row and add its vector to the in-memory index: the next search finds it. The same content
        again (from any thread or process) returns the item it already is. Cost: one embedding,
        one SQLite transaction, one FAISS add; the encoder runs before the folder lock is taken.
        `timeout`: seconds to wait for the folder lock (default `lock_timeout`), so a server can fail fast.

        Raises:
            UploadRefused: not an image that can be indexed. ReadOnlyIndex: opened read-only.
            IndexMismatch: the bundle is not the index's. IndexBusy: another writer held the folder too long.
        """
        self._writable()
        self.check_bundle(bundle)
        sha = hashlib.sha256(data).hexdigest()
        known = self._read(lambda db: db.id_of_sha(sha))
        if known is not None and (item := self._adopt(known)) is not None:
            return item
        img = uploads.decode(data, 2 * bundle.preprocess.size)
        vector = uploads.embed(bundle, img)
        folder = Path(upload_dir) if upload_dir else self.path / "uploads"
        with self._write_mutex:
            with folder_lock(self.path, self._timeout(timeout)):
                item_id, created, replaced, captions = uploads.insert(self._writer_db(), data, sha, img, vector,
                                                                      folder)
            if created:  # the items it replaced (same path, other content) leave both parts, with their captions
                for s in self._chain():
                    s._apply(lambda p: (p.tombstone(replaced), p.add([item_id], vector[None])),
                             lambda p: p.tombstone(captions))
        item = self._adopt(item_id)
        if item is None:
            raise uploads.UploadRefused("the image was removed again while it was being added; send it again")
        return item

    def remove(self, item_id: int, timeout: float | None = None) -> bool:
        """Delete the item's row (its captions go with it) and never return it again; False if none.
        `timeout`: seconds to wait for the folder lock (default `lock_timeout`), then IndexBusy."""
        self._writable()
        images = lambda p: p.tombstone([item_id])  # noqa: E731 - also when the row was gone already
        with self._write_mutex:
            with folder_lock(self.path, self._timeout(timeout)), self._rw.write():
                # row and tombstone change together for this object's searches: none sees the row
                # gone while its id is still served (a hole in its top k)
                texts = self._writer_db().remove_item(item_id)
                images(self._parts["images"])
                self._parts["texts"].tombstone(texts or [])
            for s in list(self._chain())[1:]:
                s._apply(images, lambda p: p.tombstone(texts or []))
        return texts is not None

    def set_tags(self, item_id: int, tags: list[str], timeout: float | None = None) -> list[str] | None:
        """Replace an item's tags (index/metadata.py); None when there is no such item."""
        self._writable()
        with self._write_mutex, folder_lock(self.path, self._timeout(timeout)):
            db = self._writer_db()
            with db.transaction():
                found = metadata.set_tags(db.con, item_id, tags)
        return metadata.clean_tags(tags) if found else None

    def needs_compaction(self) -> bool:
        """Whether tombstones or live additions have piled up past the thresholds (class attributes)."""
        for part in self._parts.values():
            base = part.base_count
            if len(part.dead) > max(self.compaction_min, self.deleted_fraction * base):
                return True
            if len(part.added) > max(self.compaction_min, self.grown_fraction * base):
                return True
        return False

    def compact(self, bundle: Bundle) -> SearchIndex:
        """Rebuild and re-tune the FAISS files from the rows (finalize) and return the index opened anew;
        the vector rows and upload files of removed items are reclaimed. Meant for a thread of its own:
        this object keeps serving and taking writes meanwhile (finalize holds the folder lock only to
        switch files), and writes made through it after the new one opened are passed on to it."""
        self._writable()
        self.check_bundle(bundle)
        finalize(self.path, bundle, progress=False, reclaim=True)
        fresh = SearchIndex(self.path, self.mmap, self.threads, readonly=False, milvus_uri=self._milvus_uri)
        with self._write_mutex:
            fresh._reconcile()  # what was written (here or elsewhere) while it opened
            self._successor = fresh
        return fresh

    def changed_on_disk(self) -> bool:
        """Whether another finalize wrote a new manifest since this object opened (cheap: a stat, and a
        read of the manifest only when its stat changed)."""
        stat = stat_of(self.path / MANIFEST)
        if stat is None or stat == self._manifest_stat:
            return False
        try:
            m = read_manifest(self.path)
        except (OSError, ValueError):  # replaced again while read: ask next time
            return False
        changed = m is not None and identity(m) != identity(self.manifest)
        if not changed:
            self._manifest_stat = stat
        return changed

    def close(self) -> None:
        """Close the SQLite connections (waiting for searches in flight). A straggler thread that
        still calls it afterwards gets a new connection rather than an error."""
        with self._rw.write():
            self._epoch += 1
            with self._conns_lock:
                conns, self._conns = self._conns, []
            for c in conns:
                c.close()
        with self._write_mutex:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            if self._milvus is not None:
                from dsmd.index import milvus

                milvus.disconnect(self._milvus, self._milvus_at)
                self._milvus = None

    def __enter__(self) -> SearchIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- plumbing of the writes

    def _writable(self) -> None:
        if self.readonly:
            raise ReadOnlyIndex(f"the index at {self.path} is open read-only (its folder or items.sqlite cannot "
                                f"be written, or readonly=True): adding and removing items are off")

    def _timeout(self, timeout: float | None) -> float:
        return self.lock_timeout if timeout is None else float(timeout)

    def _writer_db(self) -> IndexDB:
        if self._writer is None:
            self._writer = IndexDB(self.path / "items.sqlite")
        return self._writer

    def _chain(self):
        """This object and the ones compact() opened after it: a write applies to each."""
        s: SearchIndex | None = self
        while s is not None:
            yield s
            s = s._successor

    def _apply(self, images, texts) -> None:
        with self._rw.write():
            images(self._parts["images"])
            texts(self._parts["texts"])

    def _adopt(self, item_id: int) -> dict | None:
        """The item's row, its vector added to the in-memory index first if it is not there (written
        by another process since this object reconciled); None when it has no row."""
        item = self.item(item_id)
        if item is None:
            return None
        if not self._parts["images"].contains(item_id):
            vector = self.vector_of(item_id)
            if vector is None:
                return None
            with self._write_mutex:
                for s in self._chain():
                    s._apply(lambda p: p.add([item_id], vector[None]), lambda p: None)
        return item


def _target(target: str) -> str:
    if target not in TABLES:
        raise ValueError(f"target must be images or texts, not {target!r}")
    return target
