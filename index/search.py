"""Searching an index folder: FAISS for the neighbours, SQLite for what they are.

Opening checks the bundle against the one the index was built with (dim and fingerprint)
and refuses a mismatch with a message that says which. Results whose row was removed after
the FAISS files were written (an update still in progress) are left out, so a search never
returns an item that no longer exists.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsmd.artifacts import read_manifest
from dsmd.bundle import Bundle
from dsmd.errors import UserError
from dsmd.index import ann
from dsmd.index.build import bundle_fingerprint
from dsmd.index.db import IndexDB


class IndexMismatch(UserError):
    """The bundle does not embed into the index's space."""


@dataclass
class Hit:
    id: int
    score: float
    item: dict


class SearchIndex:
    """An opened index: `search(vectors, k, target)` returns hits with their rows."""

    def __init__(self, path: str | Path, mmap: bool = False, threads: int | None = None):
        import faiss

        self.path = Path(path)
        m = read_manifest(self.path)
        if m is None:
            raise UserError(f"{self.path} is not a finished index (no manifest.json): run dsmd index build")
        self.manifest = m
        self.dim: int = m["bundle"]["dim"]
        if threads:
            faiss.omp_set_num_threads(threads)
        # batched exact search uses BLAS only above this many queries (default 20): batches of
        # 64 were 5-6x faster with it lowered
        faiss.cvar.distance_compute_blas_threshold = 8
        self.indexes = {}
        for name in ("images", "texts"):
            part = m.get(name, {})
            if part.get("count"):
                self.indexes[name] = ann.read(self.path / part["file"], part["index"]["kind"],
                                              part["index"]["search"], mmap)
        self.db = IndexDB(self.path / "items.sqlite")

    def check_bundle(self, bundle: Bundle) -> None:
        """Refuse a bundle whose vectors would not be comparable with the index's."""
        want = self.manifest["bundle"]
        if bundle.dim != want["dim"]:
            raise IndexMismatch(f"the bundle {bundle.name} embeds into {bundle.dim} dims, the index at {self.path} "
                                f"holds {want['dim']}-dim vectors (built with {want['name']})")
        if bundle_fingerprint(bundle) != want["fingerprint"]:
            raise IndexMismatch(f"the bundle at {bundle.path} is not the one the index at {self.path} was built with "
                                f"({want['name']} at {want['path']}, fingerprint {want['fingerprint'][:12]}): "
                                f"rebuild the index with this bundle")

    def count(self, target: str = "images") -> int:
        return self.indexes[target].ntotal if target in self.indexes else 0

    def search(self, vectors: np.ndarray, k: int = 10, target: str = "images") -> list[list[Hit]]:
        """Top-k hits for each query row, best first; `target` is "images" or "texts"."""
        if target not in ("images", "texts"):
            raise ValueError(f"target must be images or texts, not {target!r}")
        q = np.ascontiguousarray(np.atleast_2d(vectors), np.float32)
        if q.shape[1] != self.dim:
            raise IndexMismatch(f"queries have {q.shape[1]} dims, the index {self.dim}")
        index = self.indexes.get(target)
        if index is None or index.ntotal == 0:
            return [[] for _ in q]
        scores, ids = index.search(q, min(k, index.ntotal))
        wanted = sorted({int(i) for i in ids.ravel() if i >= 0})
        try:
            rows = self.db.items(wanted) if target == "images" else self.db.texts(wanted)
        except sqlite3.OperationalError as e:  # e.g. the database locked by a writer for longer than the timeout
            raise UserError(f"the index database is busy ({e}); try again") from e
        return [[Hit(int(i), float(s), rows[int(i)]) for s, i in zip(srow, irow) if int(i) in rows]
                for srow, irow in zip(scores, ids)]

    def item(self, item_id: int) -> dict | None:
        return self.db.items([item_id]).get(int(item_id))

    def close(self) -> None:
        self.db.close()


def text_to_image_recall(path: str | Path, ks: tuple[int, ...] = (1, 5, 10)) -> tuple[dict[int, float], dict[int, float]]:
    """Text→image R@K of the index's captions: (computed directly from the stored vectors,
    found through the FAISS index). Equal for an exact index; an approximate one may lose a little."""
    from dsmd.retrieval import evaluate

    s = SearchIndex(path)
    item_ids, item_vecs = (np.concatenate(x) for x in zip(*s.db.vectors("items")))
    rows = s.db.con.execute("SELECT id, item_id FROM texts WHERE item_id IS NOT NULL ORDER BY id").fetchall()
    if not rows:
        raise UserError(f"{path} has no captions of its images: build it from a data set to measure recall")
    text_ids = np.array([r[0] for r in rows])
    owner_ids = np.array([r[1] for r in rows])
    text_vecs = s.db.vectors_of(text_ids, "texts")
    owner_rows = np.searchsorted(item_ids, owner_ids)
    direct = evaluate(item_vecs, text_vecs, owner_rows).t2i
    hits = s.search(text_vecs, max(ks), "images")
    via = {k: 100 * float(np.mean([any(h.id == o for h in row[:k]) for row, o in zip(hits, owner_ids)])) for k in ks}
    s.close()
    return {k: direct[k] for k in ks}, via
