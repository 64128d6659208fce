"""A search as the API asks it: filtered, paged and de-duplicated, over any index kind.

How a filter is honoured depends on how many items it keeps (counted in SQLite, up to EXACT_MAX):

    exact        at most EXACT_MAX items match: their float16 vectors are read from the vector files
                 and scored exactly (FAISS's fp16 scalar quantizer, SIMD). Ranked as exact search
                 would, whatever the index kind. The vectors a filter keeps are cached (SUBSET_CACHE
                 bytes in all, least recently used out) until the rows or the tags change, so the
                 next query with that filter (the next page, a new text) only scores them.
    post-filter  more match: the ANN index is asked for more candidates than needed, and SQLite
                 keeps those that match; the over-fetch is sized from the fraction that matched so
                 far, up to three rounds. Recall is the index's own at that depth.
    scan         a filter that matches many items but few of the query's neighbours (the
                 candidates would pass ANN_MAX): every matching vector is scored exactly, in chunks.

The strategy that ran is returned with the hits (`Answer.strategy`), and BENCHMARKS.md gives the
latency and recall of each by selectivity and index kind.

Paging: results `offset` to `offset + k` of one ranking. An exact ranking (a flat index, the exact
and scan strategies) is the same list for every page. An approximate one searches at least
`page_window` deep on every page, so pages within that depth come from one and the same search
and never overlap or skip; deeper pages come from a wider search and may (rarely) differ.

Near-duplicates (`dedup`): going down the ranking, a result whose cosine to a better-ranked kept
result is at least the threshold is folded into it (its `duplicates` count), so the best of each
group always stays; the search fetches deeper until the page is full or the ranking ends.
"""

from __future__ import annotations

import math
import sqlite3
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field, replace

import numpy as np

from dsmd.errors import UserError
from dsmd.index import fulltext, metadata
from dsmd.index.filters import Filter
from dsmd.index.search import TABLES, Hit, SearchIndex
from dsmd.index.vectors import retrying

EXACT_MAX = 8192  # matching items scored exactly: about as costly as an ANN search of 1M items
ANN_MAX = 16_384  # candidates an ANN post-filter may ask for (Milvus' own top-k limit too)
SCAN_CHUNK = 65_536
PAGE_WINDOW = 100  # an ANN ranking is always searched at least this deep, so its pages agree
DEDUP_MAX = 500  # offset + k with dedup: the folding walks the ranking one result at a time
SUBSET_CACHE = 64 * 2**20  # bytes of filtered vectors kept per opened index
MODES = ("vector", "hybrid", "text")


class FilterUnavailable(UserError):
    """A filter on an index that has no metadata columns (made before them, and read-only here)."""


@dataclass(frozen=True)
class Ask:
    """What to search for besides the query vector."""

    k: int = 10
    target: str = "images"
    where: Filter | None = None
    offset: int = 0
    dedup: float | None = None  # cosine threshold: results this close to a better one are folded into it
    min_score: float | None = None
    mode: str = "vector"  # or "text" (words alone) or "hybrid" (words and vector fused): index/fulltext.py
    text: str | None = None  # the words of a text or hybrid search

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"mode is one of {', '.join(MODES)}, not {self.mode!r}")
        if self.mode != "vector" and (self.target != "images" or self.dedup is not None or not self.text):
            raise UserError(f"mode={self.mode} searches the words of a text query for images, without dedup")
        if self.where is not None and not self.where.empty() and self.target != "images":
            raise UserError("filters apply to image results (target=images)")
        if self.dedup is not None and not 0.0 < self.dedup <= 1.0:
            raise UserError(f"dedup is a cosine threshold in (0, 1], not {self.dedup}")
        if self.offset < 0:
            raise UserError(f"offset must be 0 or more, not {self.offset}")
        if self.dedup is not None and self.offset + self.k > DEDUP_MAX:
            raise UserError(f"with dedup, offset + k is at most {DEDUP_MAX} (not {self.offset + self.k})")


@dataclass
class Answer:
    hits: list[Hit]
    strategy: str = "ann"  # ann, exact, post-filter, scan
    collapsed: int = 0  # results folded into a better one by dedup (up to the end of this page)
    more: bool = False  # whether a next page may have results
    duplicates: dict[int, int] = field(default_factory=dict)  # id -> results folded into it


def answer(index: SearchIndex, vector: np.ndarray | None, ask: Ask) -> Answer:
    """The page of hits for one query vector (none for mode=text)."""
    if ask.mode != "vector":
        return _by_words(index, vector, ask)
    need = ask.offset + ask.k
    depth = need + 1 if ask.dedup is None else 2 * need + 1  # one more: whether a next page exists
    deepest = min(ANN_MAX, 8 * need + 64)  # dedup fetches deeper until the page is full, up to this
    while True:
        scores, ids, strategy = _ranking(index, vector, depth, ask)
        if ask.min_score is not None:  # before paging: a page is never emptied by the floor afterwards
            keep = scores >= ask.min_score
            scores, ids, ended = scores[keep], ids[keep], len(ids) < depth or not keep.all()
        else:
            ended = len(ids) < depth
        if ask.dedup is None:
            order, folded = np.arange(len(ids)), {}
        else:
            order, folded = _collapse(index, ids, ask.dedup, need + 1, TABLES[ask.target])
        if len(order) >= need + 1 or ended or depth >= deepest:
            break
        depth = min(deepest, 2 * depth)
    page = order[ask.offset:need]
    rows = index.rows([int(ids[i]) for i in page], ask.target, brief=True)  # index.item(id) has the rest
    hits = [Hit(int(ids[i]), float(scores[i]), rows[int(ids[i])]) for i in page if int(ids[i]) in rows]
    kept_ids = {int(ids[i]) for i in order[:need]}
    duplicates = {i: n for i, n in folded.items() if i in {h.id for h in hits}}
    return Answer(hits, strategy, sum(n for i, n in folded.items() if i in kept_ids),
                  more=len(order) > need, duplicates=duplicates)


def _by_words(index: SearchIndex, vector: np.ndarray | None, ask: Ask) -> Answer:
    """A text or hybrid page (index/fulltext.py): the BM25 ranking of the query's words, alone or fused
    with the vector ranking (both at least PAGE_WINDOW deep, so pages agree); filters apply to both."""
    need = ask.offset + ask.k
    depth = max(need + 1, PAGE_WINDOW)
    db = index.db
    if not fulltext.present(db.con):
        raise FilterUnavailable(f"the index at {index.path} has no full-text index yet, and this server may not "
                                f"write it: open it once with write access (dsmd index info {index.path})")
    cond, args = ask.where.sql() if ask.where is not None else ("1", [])
    try:
        scores, ids = fulltext.ranking(db.con, ask.text, depth, cond, args)
    except sqlite3.OperationalError as e:  # e.g. the database locked beyond its timeout: a 503 to retry
        raise UserError(f"the index database is busy ({e}); try again") from e
    if ask.mode == "hybrid":
        _, by_vector, _ = _ranking(index, vector, depth, replace(ask, mode="vector", min_score=None))
        scores, ids = fulltext.fuse(ids, by_vector[:depth])
    page = ids[ask.offset:need]
    rows = index.rows([int(i) for i in page], "images", brief=True)
    hits = [Hit(int(i), float(s), rows[int(i)]) for s, i in zip(scores[ask.offset:need], page) if int(i) in rows]
    return Answer(hits, ask.mode, more=len(ids) > need)


def _ranking(index: SearchIndex, vector: np.ndarray, n: int, ask: Ask) -> tuple[np.ndarray, np.ndarray, str]:
    """(scores, ids) of the best n (fewer where the ranking ends), best first, and the strategy."""
    q = np.ascontiguousarray(np.atleast_2d(vector), np.float32)
    if ask.where is None or ask.where.empty():
        exact = index.kind(ask.target) == "flat"
        scores, ids = index.ranked(q, n if exact else max(n, PAGE_WINDOW), ask.target)
        scores, ids = scores[0][:n], ids[0][:n]
        keep = ids >= 0
        return scores[keep], ids[keep], "exact" if exact else "ann"
    cond, args = ask.where.sql()
    db = index.db
    if not metadata.has_metadata(db.con) or not metadata.has_tags(db.con):
        raise FilterUnavailable(f"the index at {index.path} was built before items had metadata, and this server "
                                f"may not write it: open it once with write access (dsmd index info {index.path}) "
                                f"to add the columns, and build it again to fill them")
    matches = db.con.execute(f"SELECT COUNT(*) FROM (SELECT 1 FROM items WHERE {cond} LIMIT ?)",
                             [*args, EXACT_MAX + 1]).fetchone()[0]
    if matches <= EXACT_MAX:
        return (*_subset(index, ask.where, cond, args).search(q, n), "exact")
    return _post_filter(index, q, n, cond, args, matches)


class Subset:
    """The vectors one filter keeps, in a FAISS fp16 flat index: scored exactly, without a float32 copy."""

    def __init__(self, ids: np.ndarray, codes: np.ndarray):
        import faiss

        order = np.argsort(ids)  # one order for ties, whatever order SQLite gave the rows in
        self.ids = ids[order]
        self.index = faiss.IndexScalarQuantizer(codes.shape[1], faiss.ScalarQuantizer.QT_fp16,
                                                faiss.METRIC_INNER_PRODUCT)
        faiss.copy_array_to_vector(np.ascontiguousarray(codes[order]).view(np.uint8).ravel(), self.index.codes)
        self.index.ntotal = len(ids)
        self.nbytes = codes.nbytes + ids.nbytes

    def search(self, q: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        if not len(self.ids):
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        scores, pos = self.index.search(q, min(n, len(self.ids)))
        keep = pos[0] >= 0
        return scores[0][keep], self.ids[pos[0][keep]]


class _SubsetCache:
    """Least recently used Subsets of one opened index, by filter and by the state of rows and tags."""

    def __init__(self):
        self.lock, self.held, self.nbytes = threading.Lock(), OrderedDict(), 0

    def get(self, key):
        with self.lock:
            found = self.held.get(key)
            if found is not None:
                self.held.move_to_end(key)
            return found

    def put(self, key, subset: Subset) -> None:
        with self.lock:
            if key in self.held or subset.nbytes > SUBSET_CACHE:
                return
            self.held[key] = subset
            self.nbytes += subset.nbytes
            while self.nbytes > SUBSET_CACHE:
                self.nbytes -= self.held.popitem(last=False)[1].nbytes


_caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # SearchIndex -> its _SubsetCache
_caches_lock = threading.Lock()


def _subset(index: SearchIndex, where: Filter, cond: str, args: list) -> Subset:
    """The filter's Subset: cached while the rows (generation) and tags (tags_version) stay as they are."""
    db = index.db
    state = dict(db.con.execute("SELECT key, value FROM meta WHERE key IN ('generation', 'tags_version')"))
    key = (where.key(), state.get("generation"), state.get("tags_version"))
    with _caches_lock:
        cache = _caches.setdefault(index, _SubsetCache())
    found = cache.get(key)
    if found is not None:
        return found
    for attempt in range(5):
        rows = db.con.execute(f"SELECT id, vrow FROM items WHERE {cond}", args).fetchall()
        ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
        try:
            codes = db._read("items", (r[1] for r in rows), raw=True)
            break
        except FileNotFoundError:  # a compaction moved the vectors meanwhile: read the rows again
            if attempt == 4:
                raise
    subset = Subset(ids, codes)
    cache.put(key, subset)
    return subset


def _exact(index: SearchIndex, q: np.ndarray, n: int, cond: str, args: list) -> tuple[np.ndarray, np.ndarray]:
    """Score every matching item (in chunks of SCAN_CHUNK) and keep the best n."""
    best_s, best_i = np.zeros(0, np.float32), np.zeros(0, np.int64)
    db = index.db
    cur = db.con.execute(f"SELECT id, vrow FROM items WHERE {cond}", args)
    while rows := cur.fetchmany(SCAN_CHUNK):
        ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
        vrows = [r[1] for r in rows]
        try:
            vecs = db._read("items", vrows)
        except FileNotFoundError:  # a compaction moved the vectors meanwhile
            vecs = retrying(lambda ids=ids: db._vectors_of(ids, "items", True))
        scores = vecs @ q
        scores[np.isnan(scores)] = -np.inf
        s, i = np.concatenate([best_s, scores]), np.concatenate([best_i, ids])
        order = np.lexsort((i, -s))[:n]  # score, then id: one order whatever the chunks
        best_s, best_i = s[order], i[order]
    keep = np.isfinite(best_s)
    return best_s[keep], best_i[keep]


def _post_filter(index: SearchIndex, q: np.ndarray, n: int, cond: str, args: list,
                 matches: int) -> tuple[np.ndarray, np.ndarray, str]:
    """ANN candidates, kept where they match; deeper rounds sized from the fraction that matched. The
    first round is as deep as an unfiltered page would be: a broad filter is usually done there."""
    total = max(1, index.count("images"))
    floor = matches / total  # a lower bound of the fraction: the count stopped at EXACT_MAX + 1
    fraction = max(floor, 0.5)
    depth = max(PAGE_WINDOW, math.ceil(2 * n / fraction))
    for _ in range(3):
        if depth > ANN_MAX:
            break
        scores, ids = index.ranked(q, depth, "images")
        scores, ids = scores[0], ids[0]
        ids_ok = ids[ids >= 0]
        db = index.db
        passed = {r[0] for r in db.con.execute(
            f"SELECT id FROM items WHERE id IN (SELECT value FROM json_each(?)) AND {cond}",
            ["[" + ",".join(str(int(i)) for i in ids_ok) + "]", *args])}
        keep = np.array([int(i) in passed for i in ids], bool)
        if keep.sum() >= n or (len(ids_ok) < depth and depth >= total):  # enough, or the index holds no more
            return scores[keep][:n], ids[keep][:n], "post-filter"
        if len(ids_ok) < depth:  # the index ranks no deeper (IVF probes a few lists): score the matches
            break
        fraction = max(floor, (keep.sum() + 1) / depth)
        depth = max(2 * depth, math.ceil(2 * n / fraction))
    return (*_exact(index, q[0], n, cond, args), "scan")


def _collapse(index: SearchIndex, ids: np.ndarray, threshold: float, enough: int,
              table: str) -> tuple[np.ndarray, dict[int, int]]:
    """Positions of the results kept (best first, at most `enough`) and, per kept id, how many of the
    results walked were folded into it."""
    if not len(ids):
        return np.arange(0), {}
    vecs = np.nan_to_num(index.db.vectors_of(ids, table, missing_ok=True))
    kept_vecs = np.empty((enough, vecs.shape[1]), np.float32)
    kept: list[int] = []
    folded: dict[int, int] = {}
    for pos in range(len(ids)):
        if kept:
            sims = kept_vecs[:len(kept)] @ vecs[pos]
            j = int(np.argmax(sims))
            if sims[j] >= threshold:
                folded[int(ids[kept[j]])] = folded.get(int(ids[kept[j]]), 0) + 1
                continue
        kept_vecs[len(kept)] = vecs[pos]
        kept.append(pos)
        if len(kept) == enough:
            break
    return np.array(kept, np.int64), folded
