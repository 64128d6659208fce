"""The index's SQLite database: items, caption texts, and where their vectors are: the source of truth.

The vectors themselves are in float16 matrix files beside it (index/vectors.py); each row holds
the row number of its vector there (`vrow`), written and synced before the row is committed.
Each batch of new images is committed in one transaction together with their captions, so a
row never exists without its vector, whatever moment a build is killed at. The FAISS files are
derived from these rows and can always be rebuilt.

Tables:
    items    id, uri (unique), sha256 (unique: one item per content), width, height,
             captions (JSON list), added (unix time), vrow, and metadata (index/metadata.py,
             with the table `tags`)
    texts    id, item_id (NULL for free texts), text, vrow: the caption index
    skipped  uri, reason, at: files that could not be read (listed in the build report)
    meta     key, value: dim, bundle fingerprint, variant (fp32/int8/fp16 of the encoder that
             made the vectors; an index without one was made with fp32), index_kind when
             overridden, generation (bumped on every change), vectors_<table> (the vector
             file appends go to), upload_dirs (folders uploads were stored in)
    removed  uri: paths of deleted items (a trigger), so compaction can delete the upload files
             no row names any more (only in an upload folder: a collection's own files stay)

`vrow` is `file generation << 40 | row`: a compaction copies the live rows into a new generation's
file and switches every vrow in one transaction (index/reclaim.py); a reader that meets an old
file deleted reads the row again.

An index made before the vectors moved out (float32 blobs in a `vector` column) is converted the
first time it is opened with write access (`dsmd index info INDEX` does it), then vacuumed;
read-only it is refused with that instruction.

Read-only opening (`readonly=True`: a read-only mount, another user's volume) runs no PRAGMA
that writes and no CREATE; the rules of which connection, and durability: index/connect.py.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dsmd.errors import UserError
from dsmd.index import metadata
from dsmd.index.connect import BUSY_TIMEOUT, Transaction, connect_readonly, state, synchronous
from dsmd.index.vectors import GEN_SHIFT, VectorFile, retrying, vector_generations, vector_path

TABLES = ("items", "texts")

SCHEMA = """
CREATE TABLE IF NOT EXISTS items(
    id INTEGER PRIMARY KEY AUTOINCREMENT, uri TEXT NOT NULL UNIQUE, sha256 TEXT NOT NULL UNIQUE,
    width INTEGER, height INTEGER, captions TEXT, added REAL NOT NULL, vrow INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS texts(
    id INTEGER PRIMARY KEY AUTOINCREMENT, item_id INTEGER REFERENCES items(id) ON DELETE CASCADE, text TEXT NOT NULL,
    vrow INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS texts_item ON texts(item_id);
CREATE TABLE IF NOT EXISTS skipped(uri TEXT PRIMARY KEY, reason TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS removed(uri TEXT PRIMARY KEY);
CREATE TRIGGER IF NOT EXISTS items_removed AFTER DELETE ON items
    BEGIN INSERT OR IGNORE INTO removed(uri) VALUES(old.uri); END;
"""


@dataclass
class NewItem:
    uri: str
    sha256: str
    width: int
    height: int
    captions: list[str]
    vector: np.ndarray  # (dim,) float32 unit vector
    caption_vectors: np.ndarray | None = None  # (len(captions), dim)
    meta: dict = field(default_factory=dict)  # file size and time, EXIF, folder (index/metadata.py)


class IndexDB:
    """A connection to items.sqlite with the few operations the index needs."""

    def __init__(self, path: Path, dim: int | None = None, bundle: str | None = None, variant: str | None = None,
                 readonly: bool = False, create_files: bool = True):
        """`readonly`: no write, no lock; with `create_files` False it creates no -wal/-shm file either."""
        self.path = Path(path)
        self.readonly, self.immutable = readonly, False
        self._files: dict[tuple[str, int], VectorFile] = {}
        self._meta: tuple | None = None  # items(): schema version, the metadata columns to select, tags or not
        if readonly:
            if dim is not None or variant is not None:
                raise ValueError("a read-only IndexDB records no dim, bundle nor variant")
            self._seen = state(self.path)
            self.con, self.immutable = connect_readonly(self.path, create_files)
            self.dim = int(self.meta().get("dim", 0)) or None
            if self._legacy():
                self.con.close()
                raise UserError(f"{self.path.parent} keeps its vectors inside items.sqlite (an index made before "
                                f"2026-12-02): open it once with write access to convert it (dsmd index info "
                                f"{self.path.parent}), or rebuild it")
            return
        # check_same_thread=False: a connection may be closed (or used, one thread at a time) elsewhere
        self.con = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT, isolation_level=None,
                                   check_same_thread=False)
        self.con.execute("PRAGMA journal_mode=WAL")
        self.con.execute(f"PRAGMA synchronous={synchronous()}")
        self.con.execute("PRAGMA foreign_keys=ON")
        self.con.executescript(SCHEMA)
        if self._legacy():
            self._convert()
        metadata.migrate(self.con)
        meta = self.meta()
        if variant is not None:
            held = self.variant(meta)
            if held is not None and held != variant:
                raise UserError(f"{self.path.parent} holds vectors of the {held} variant of its bundle, not "
                                f"{variant}: add to it with --variant {held}, or build a new index folder with "
                                f"--variant {variant}")
        if dim is not None:
            if "dim" in meta and int(meta["dim"]) != dim:
                raise UserError(f"{self.path.parent} holds {meta['dim']}-dim vectors; this bundle embeds into {dim} "
                                f"dims: use a new index folder")
            if "bundle" in meta and bundle is not None and meta["bundle"] != bundle:
                raise UserError(f"{self.path.parent} was built with bundle {meta['bundle'][:12]}, not this one "
                                f"({bundle[:12]}): mixing encoders would make its vectors incomparable; "
                                f"use a new index folder")
            with self.transaction():
                self._set("dim", str(dim))
                if bundle is not None:
                    self._set("bundle", bundle)
                if variant is not None:
                    self._set("variant", variant)
        self.dim = int(self.meta().get("dim", 0)) or None

    # -- plumbing

    def transaction(self):
        return Transaction(self.con)

    def snapshot(self):
        """A read transaction: every read inside sees the same state, whatever writers do meanwhile."""
        return Transaction(self.con, "BEGIN")

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction():
            self._set(key, value)

    def meta(self) -> dict[str, str]:
        return dict(self.con.execute("SELECT key, value FROM meta").fetchall())

    @staticmethod
    def variant(meta: dict[str, str]) -> str | None:
        """The encoder variant the vectors were made with: recorded, else fp32 for an index made
        before variants were recorded, else None for an empty new one."""
        return meta.get("variant") or ("fp32" if "dim" in meta else None)

    def _set(self, key: str, value: str) -> None:
        self.con.execute("INSERT INTO meta(key, value) VALUES(?, ?) "
                         "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, value))

    def _bump(self) -> None:
        self._set("generation", str(self.generation + 1))

    @property
    def generation(self) -> int:
        row = self.con.execute("SELECT value FROM meta WHERE key='generation'").fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        self.con.close()
        for f in self._files.values():
            f.close()

    def stale(self) -> bool:
        """Whether this connection may miss writes: opened `immutable` while no writer was there, and a
        writer's -wal file has appeared since (the caller then opens a new connection)."""
        return self.immutable and state(self.path) != self._seen

    # -- the vector files

    def vector_file(self, table: str, gen: int | None = None) -> VectorFile:
        """The vector file of generation `gen` (default: the one appends go to now)."""
        assert table in TABLES
        gen = self.vector_generation(table) if gen is None else int(gen)
        f = self._files.get((table, gen))
        if f is None:
            if not self.dim:
                raise UserError(f"{self.path.parent} has no vectors yet (no dim recorded)")
            f = self._files[table, gen] = VectorFile(vector_path(self.path.parent, table, gen), self.dim,
                                                     not self.readonly)
        return f

    def vector_generation(self, table: str) -> int:
        row = self.con.execute("SELECT value FROM meta WHERE key=?", (f"vectors_{table}",)).fetchone()
        return int(row[0]) if row else 0

    def _append(self, table: str, vectors: np.ndarray) -> np.ndarray:
        """Append inside the caller's write transaction; returns the vrows (generation and row)."""
        gen = self.vector_generation(table)
        return self.vector_file(table, gen).append(vectors) + (gen << GEN_SHIFT)

    def _read(self, table: str, rows, raw: bool = False) -> np.ndarray:
        """Vectors of these vrows, float32 (`raw`: float16 as stored) (FileNotFoundError: a compaction
        deleted their file; `retrying` reads again)."""
        vrows = np.fromiter((r for r in rows), np.int64)
        gens = vrows >> GEN_SHIFT
        out = np.empty((len(vrows), self.dim or 0), np.float16 if raw else np.float32)
        for g in np.unique(gens):
            at = gens == g
            out[at] = self.vector_file(table, int(g)).read(vrows[at] & ((1 << GEN_SHIFT) - 1), raw)
        return out

    def dead_rows(self) -> dict[str, int]:
        """Rows of the vector files no database row points to (removed items, killed appends)."""
        if not self.dim:
            return {t: 0 for t in TABLES}
        return {t: sum(self.vector_file(t, g).rows() for g in vector_generations(self.path.parent, t))
                - self.count(t) for t in TABLES}

    def _legacy(self) -> bool:
        return "vector" in {r[1] for r in self.con.execute("PRAGMA table_info(items)")}

    def _convert(self) -> None:
        """Move the float32 blobs of an older index into the vector files (one transaction), then vacuum."""
        self.dim = int(self.meta().get("dim", 0)) or None
        with self.transaction():
            if not self._legacy():  # another process converted it while this one waited for the lock
                return
            for table in TABLES:
                self.con.execute(f"ALTER TABLE {table} ADD COLUMN vrow INTEGER")
                last = -1
                while rows := self.con.execute(f"SELECT id, vector FROM {table} WHERE id > ? ORDER BY id LIMIT 10000",
                                               (last,)).fetchall():
                    vecs = np.frombuffer(b"".join(r[1] for r in rows), np.float32).reshape(len(rows), -1)
                    if self.dim is None:
                        self.dim = vecs.shape[1]
                    where = self._append(table, vecs)
                    self.con.executemany(f"UPDATE {table} SET vrow=? WHERE id=?",
                                         [(int(w), r[0]) for w, r in zip(where, rows)])
                    last = rows[-1][0]
                self.con.execute(f"ALTER TABLE {table} DROP COLUMN vector")
        self.con.execute("VACUUM")
        self.con.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # -- writes (each one transaction)

    def replace(self, items: list[NewItem]) -> list[int | None]:
        """Insert items (and their captions as texts) atomically; an item at a uri already indexed
        (its file changed) replaces the old one. Returns their ids, None for an item whose content
        is already indexed (under another uri: a live upload may have added it since the caller
        looked), so two writers never hit the UNIQUE constraint on sha256."""
        with self.transaction():
            # the vectors of the new contents in one append (one sync) for the whole transaction
            new, seen = [], set()
            for it in items:
                if it.sha256 not in seen and self.id_of_sha(it.sha256) is None:
                    new.append(it)
                seen.add(it.sha256)
            rows = iter(self._append("items", np.stack([it.vector for it in new])) if new else [])
            caps = [it.caption_vectors for it in new if it.caption_vectors is not None and len(it.caption_vectors)]
            cap_rows = iter(self._append("texts", np.concatenate(caps)) if caps else [])
            placed = {id(it): (next(rows), it) for it in new}
            ids = []
            for it in items:
                if id(it) in placed:
                    n = len(it.caption_vectors) if it.caption_vectors is not None else 0
                    ids.append(self._insert(it, placed[id(it)][0], [next(cap_rows) for _ in range(n)])[0])
                else:
                    ids.append(None)
            self._bump()
        return ids

    def insert_once(self, item: NewItem) -> tuple[int, bool, list[int], list[int]]:
        """Insert one item unless its content is indexed already, in one transaction: (its id, whether
        it was created, ids of the items it replaced at the same uri, ids of their captions, gone with them)."""
        with self.transaction():
            old = [r[0] for r in self.con.execute("SELECT id FROM items WHERE uri=? AND sha256<>?",
                                                  (item.uri, item.sha256))]
            texts = [r[0] for o in old for r in self.con.execute("SELECT id FROM texts WHERE item_id=?", (o,))]
            new_id, existing = self._insert(item)
            if new_id is not None:
                self._bump()
                return new_id, True, old, texts
        return int(existing), False, [], []

    def _insert(self, it: NewItem, vrow: int | None = None, cap_rows: list[int] | None = None
                ) -> tuple[int | None, int | None]:
        """(new id, None), or (None, id of the item holding this content already). `vrow`, `cap_rows`:
        where its vectors were appended already (else they are appended here)."""
        row = self.con.execute("SELECT id FROM items WHERE sha256=?", (it.sha256,)).fetchone()
        if row is not None:
            return None, row[0]
        self.con.execute("DELETE FROM items WHERE uri=?", (it.uri,))
        if vrow is None:
            vrow = int(self._append("items", it.vector)[0])
        cur = self.con.execute(
            f"INSERT INTO items(uri, sha256, width, height, captions, added, vrow, {', '.join(metadata.COLUMNS)}) "
            f"VALUES(?,?,?,?,?,?,?{',?' * len(metadata.COLUMNS)})",
            (it.uri, it.sha256, it.width, it.height, json.dumps(it.captions), time.time(), int(vrow),
             *(it.meta.get(c) for c in metadata.COLUMNS)))
        if it.caption_vectors is not None and len(it.caption_vectors):
            where = cap_rows if cap_rows is not None else self._append("texts", it.caption_vectors)
            self.con.executemany("INSERT INTO texts(item_id, text, vrow) VALUES(?,?,?)",
                                 [(cur.lastrowid, c, int(w)) for c, w in zip(it.captions, where)])
        return cur.lastrowid, None

    def add_texts(self, texts: list[str], vectors: np.ndarray) -> None:
        with self.transaction():
            where = self._append("texts", vectors)
            self.con.executemany("INSERT INTO texts(item_id, text, vrow) VALUES(NULL,?,?)",
                                 [(t, int(w)) for t, w in zip(texts, where)])
            self._bump()

    def skip(self, uri: str, reason: str) -> None:
        with self.transaction():
            self.con.execute("INSERT OR REPLACE INTO skipped(uri, reason, at) VALUES(?,?,?)",
                             (uri, reason, time.time()))

    def remove(self, ids: list[int] = (), uris: list[str] = ()) -> int:
        """Delete items by id or uri (their captions go with them); returns how many were removed."""
        with self.transaction():
            n = 0
            for i in ids:
                n += self.con.execute("DELETE FROM items WHERE id=?", (int(i),)).rowcount
            for u in uris:
                n += self.con.execute("DELETE FROM items WHERE uri=?", (str(u),)).rowcount
            if n:
                self._bump()
        return n

    def remove_item(self, item_id: int) -> list[int] | None:
        """Delete one item; returns the ids of its captions (deleted with it), or None if no such item."""
        with self.transaction():
            texts = [r[0] for r in self.con.execute("SELECT id FROM texts WHERE item_id=?", (int(item_id),))]
            if not self.con.execute("DELETE FROM items WHERE id=?", (int(item_id),)).rowcount:
                return None
            self._bump()
        return texts

    # -- reads

    def ids(self, table: str = "items") -> np.ndarray:
        """Every id of `table`, ascending (int64)."""
        assert table in ("items", "texts")
        cur = self.con.execute(f"SELECT id FROM {table} ORDER BY id")
        return np.fromiter((r[0] for r in cur), np.int64)

    def id_of_sha(self, sha: str) -> int | None:
        row = self.con.execute("SELECT id FROM items WHERE sha256=?", (sha,)).fetchone()
        return row[0] if row else None

    def vector_of(self, item_id: int) -> np.ndarray | None:
        def query():
            row = self.con.execute("SELECT vrow FROM items WHERE id=?", (int(item_id),)).fetchone()
            return self._read("items", [row[0]])[0] if row else None

        return retrying(query)

    def known_hashes(self) -> set[str]:
        return {r[0] for r in self.con.execute("SELECT sha256 FROM items")}

    def count(self, table: str = "items") -> int:
        assert table in ("items", "texts", "skipped")
        return self.con.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]

    def vectors(self, table: str = "items", chunk: int = 100_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, float32 vectors) in chunks of rows, in id order (bounded memory)."""
        assert table in TABLES
        last = -1
        while True:
            rows = self.con.execute(f"SELECT id, vrow FROM {table} WHERE id > ? ORDER BY id LIMIT ?",
                                    (last, chunk)).fetchall()
            if not rows:
                return
            ids = np.array([r[0] for r in rows], np.int64)
            try:
                vecs = self._read(table, (r[1] for r in rows))
            except FileNotFoundError:  # a compaction moved them meanwhile: this chunk's rows again
                vecs = self.vectors_of(ids, table)
            yield ids, vecs
            last = int(ids[-1])

    def vectors_of(self, ids: np.ndarray, table: str = "items", missing_ok: bool = False) -> np.ndarray:
        """The stored vectors of these ids, in the given order; with `missing_ok`, rows of NaN for ids
        without a row (removed meanwhile by another writer), else KeyError."""
        return retrying(lambda: self._vectors_of(ids, table, missing_ok))

    def _vectors_of(self, ids: np.ndarray, table: str, missing_ok: bool) -> np.ndarray:
        assert table in TABLES
        found: dict[int, int] = {}
        uniq = sorted({int(i) for i in ids})
        for i in range(0, len(uniq), 900):
            part = uniq[i:i + 900]
            q = ",".join("?" * len(part))
            found.update(self.con.execute(f"SELECT id, vrow FROM {table} WHERE id IN ({q})", part).fetchall())
        if not missing_ok or len(found) == len(uniq):
            return self._read(table, (found[int(i)] for i in ids))
        have = np.array([int(i) in found for i in ids], bool)
        out = np.full((len(have), self.dim), np.nan, np.float32)
        out[have] = self._read(table, (found[int(i)] for i, h in zip(ids, have) if h))
        return out

    def items(self, ids: list[int], brief: bool = False) -> dict[int, dict]:
        """Rows of these items with their metadata and tags (index/metadata.py; `brief`: what a search
        result shows), by id."""
        version = self.con.execute("PRAGMA schema_version").fetchone()[0]  # another process may migrate it
        if self._meta is None or self._meta[0] != version:  # (an old read-only index has no metadata)
            self._meta = version, metadata.select_list(self.con), metadata.has_tags(self.con)
        return metadata.rows(self.con, ids, *self._meta[1:], brief=brief)

    def texts(self, ids: list[int]) -> dict[int, dict]:
        if not ids:
            return {}
        q = ",".join("?" * len(ids))
        rows = self.con.execute(f"SELECT id, item_id, text FROM texts WHERE id IN ({q})",
                                [int(i) for i in ids]).fetchall()
        return {r[0]: {"id": r[0], "item_id": r[1], "text": r[2]} for r in rows}

    def skipped(self) -> list[dict]:
        return [{"uri": u, "reason": r} for u, r in self.con.execute("SELECT uri, reason FROM skipped ORDER BY uri")]
