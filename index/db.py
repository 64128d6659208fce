"""The index's SQLite database: items, caption texts, and their vectors, the source of truth.

Each image row holds its embedding (float32 blob: exact search through the index gives exactly the
recall of the embeddings) in the same row as its metadata, and each
batch of new images is committed in one transaction together with their captions, so a row
never exists without its vector or a vector without its row, whatever moment a build is
killed at. The FAISS files are derived from these rows and can always be rebuilt.

Tables:
    items    id, uri (unique), sha256 (unique: one item per content), width, height,
             captions (JSON list), added (unix time), vector
    texts    id, item_id (NULL for free texts), text, vector: the caption index
    skipped  uri, reason, at: files that could not be read (listed in the build report)
    meta     key, value: dim, bundle fingerprint, generation (bumped on every change)
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsmd.errors import UserError

SCHEMA = """
CREATE TABLE IF NOT EXISTS items(
    id INTEGER PRIMARY KEY AUTOINCREMENT, uri TEXT NOT NULL UNIQUE, sha256 TEXT NOT NULL UNIQUE, width INTEGER, height INTEGER,
    captions TEXT, added REAL NOT NULL, vector BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS texts(
    id INTEGER PRIMARY KEY AUTOINCREMENT, item_id INTEGER REFERENCES items(id) ON DELETE CASCADE, text TEXT NOT NULL,
    vector BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS texts_item ON texts(item_id);
CREATE TABLE IF NOT EXISTS skipped(uri TEXT PRIMARY KEY, reason TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
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


class IndexDB:
    """A connection to items.sqlite with the few operations the index needs."""

    def __init__(self, path: Path, dim: int | None = None, bundle: str | None = None):
        self.path = Path(path)
        # check_same_thread=False: the server uses one connection from its worker threads, behind a lock
        self.con = sqlite3.connect(str(self.path), timeout=30, isolation_level=None, check_same_thread=False)
        self.con.execute("PRAGMA journal_mode=WAL")
        self.con.execute("PRAGMA synchronous=NORMAL")
        self.con.execute("PRAGMA foreign_keys=ON")
        self.con.executescript(SCHEMA)
        meta = self.meta()
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
        self.dim = int(self.meta().get("dim", 0)) or None

    # -- plumbing

    def transaction(self):
        return _Transaction(self.con)

    def snapshot(self):
        """A read transaction: every read inside sees the same state, whatever writers do meanwhile."""
        return _Transaction(self.con, "BEGIN")

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction():
            self._set(key, value)

    def meta(self) -> dict[str, str]:
        return dict(self.con.execute("SELECT key, value FROM meta").fetchall())

    def _set(self, key: str, value: str) -> None:
        self.con.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                         (key, value))

    def _bump(self) -> None:
        self._set("generation", str(self.generation + 1))

    @property
    def generation(self) -> int:
        row = self.con.execute("SELECT value FROM meta WHERE key='generation'").fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        self.con.close()

    # -- writes (each one transaction)

    def replace(self, items: list[NewItem]) -> list[int]:
        """Insert items (and their captions as texts) atomically; an item at a uri already indexed
        (its file changed) replaces the old one. Returns their ids."""
        now = time.time()
        ids = []
        with self.transaction():
            for it in items:
                self.con.execute("DELETE FROM items WHERE uri=?", (it.uri,))
                cur = self.con.execute(
                    "INSERT INTO items(uri, sha256, width, height, captions, added, vector) VALUES(?,?,?,?,?,?,?)",
                    (it.uri, it.sha256, it.width, it.height, json.dumps(it.captions), now, _blob(it.vector)))
                ids.append(cur.lastrowid)
                if it.caption_vectors is not None:
                    self.con.executemany("INSERT INTO texts(item_id, text, vector) VALUES(?,?,?)",
                                         [(cur.lastrowid, c, _blob(v)) for c, v in zip(it.captions, it.caption_vectors)])
            self._bump()
        return ids

    def add_texts(self, texts: list[str], vectors: np.ndarray) -> None:
        with self.transaction():
            self.con.executemany("INSERT INTO texts(item_id, text, vector) VALUES(NULL,?,?)",
                                 [(t, _blob(v)) for t, v in zip(texts, vectors)])
            self._bump()

    def skip(self, uri: str, reason: str) -> None:
        with self.transaction():
            self.con.execute("INSERT OR REPLACE INTO skipped(uri, reason, at) VALUES(?,?,?)", (uri, reason, time.time()))

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

    # -- reads

    def known_hashes(self) -> set[str]:
        return {r[0] for r in self.con.execute("SELECT sha256 FROM items")}

    def known_uris(self) -> set[str]:
        return {r[0] for r in self.con.execute("SELECT uri FROM items")}

    def count(self, table: str = "items") -> int:
        assert table in ("items", "texts", "skipped")
        return self.con.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]

    def vectors(self, table: str = "items", chunk: int = 100_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, float32 vectors) in chunks of rows, in id order (bounded memory)."""
        assert table in ("items", "texts")
        last = -1
        while True:
            rows = self.con.execute(f"SELECT id, vector FROM {table} WHERE id > ? ORDER BY id LIMIT ?",
                                    (last, chunk)).fetchall()
            if not rows:
                return
            ids = np.array([r[0] for r in rows], np.int64)
            vecs = np.frombuffer(b"".join(r[1] for r in rows), np.float32).reshape(len(rows), -1)
            yield ids, vecs
            last = int(ids[-1])

    def vectors_of(self, ids: np.ndarray, table: str = "items") -> np.ndarray:
        """The stored vectors of these ids, in the given order."""
        assert table in ("items", "texts")
        found: dict[int, bytes] = {}
        uniq = sorted({int(i) for i in ids})
        for i in range(0, len(uniq), 900):
            part = uniq[i:i + 900]
            q = ",".join("?" * len(part))
            found.update(self.con.execute(f"SELECT id, vector FROM {table} WHERE id IN ({q})", part).fetchall())
        return np.stack([np.frombuffer(found[int(i)], np.float32) for i in ids])

    def items(self, ids: list[int]) -> dict[int, dict]:
        if not ids:
            return {}
        q = ",".join("?" * len(ids))
        rows = self.con.execute(f"SELECT id, uri, sha256, width, height, captions, added FROM items WHERE id IN ({q})",
                                [int(i) for i in ids]).fetchall()
        return {r[0]: {"id": r[0], "uri": r[1], "sha256": r[2], "width": r[3], "height": r[4],
                       "captions": json.loads(r[5] or "[]"), "added": r[6]} for r in rows}

    def texts(self, ids: list[int]) -> dict[int, dict]:
        if not ids:
            return {}
        q = ",".join("?" * len(ids))
        rows = self.con.execute(f"SELECT id, item_id, text FROM texts WHERE id IN ({q})", [int(i) for i in ids]).fetchall()
        return {r[0]: {"id": r[0], "item_id": r[1], "text": r[2]} for r in rows}

    def skipped(self) -> list[dict]:
        return [{"uri": u, "reason": r} for u, r in self.con.execute("SELECT uri, reason FROM skipped ORDER BY uri")]


class _Transaction:
    def __init__(self, con: sqlite3.Connection, begin: str = "BEGIN IMMEDIATE"):
        self.con, self.begin = con, begin

    def __enter__(self):
        self.con.execute(self.begin)
        return self.con

    def __exit__(self, exc_type, exc, tb):
        self.con.execute("ROLLBACK" if exc_type else "COMMIT")
        return False


def _blob(v: np.ndarray) -> bytes:
    return np.asarray(v, np.float32).tobytes()
