"""One searchable FAISS index (images or texts) that takes adds and removals between two finalizes.

A finalize writes the FAISS files from SQLite; between two finalizes a live index changes in
memory only, at the cost of the change itself (O(batch)), not of a rebuild:

    add        `add_with_ids` into small in-memory segments of at most SEGMENT vectors beside the
               finalized index (HNSW segments beside HNSW or IVF, exact ones beside exact).
               The finalized index itself is never grown: its vectors sit in one array that the
               first add after loading would reallocate and copy whole (what the live adds
               avoid: see BENCHMARKS.md, 'Index writes'), while a full segment is simply closed
               and a new one started, so no add copies more than one segment. The segments are
               merged into the files by the next compaction.
    remove     the id joins the tombstones; searches skip them inside FAISS with an IDSelector
               (a batch set with a Bloom filter), so a removed item never takes a place in the top k

The caller serialises changes against searches (a readers-writer lock): FAISS searches may run
in parallel, but not while a segment is being added to. Tombstones and their selector are
replaced, never changed in place, so a search holds one consistent set.
"""

from __future__ import annotations

import numpy as np

SEGMENT = 16_384  # vectors per live segment: 48 MiB at 768 dims, the most one add ever copies


class LivePart:
    """The FAISS side of one target: the finalized index, its live segments and tombstones."""

    def __init__(self, index, dim: int, spec: dict | None = None):
        """`index`: an IndexIDMap2 read from the manifest's file, or None when the target was empty;
        `spec`: its IndexSpec as the manifest records it (kind, params, tuned search)."""
        import faiss

        self.dim = dim
        self.index = index
        self.spec = spec or {"kind": "flat", "params": {}, "search": {}}
        if index is None:
            self.base_ids = np.zeros(0, np.int64)
        elif hasattr(index, "id_map"):
            self.base_ids = np.sort(faiss.vector_to_array(index.id_map))
        else:  # ann.OnDiskIVF: the rows' ids are in its inverted lists
            self.base_ids = index.ids()
        self.added: set[int] = set()  # ids added since the file was written (live adds, reconciliation)
        self.segments: list = []  # IndexIDMap2s holding the added vectors, the last one open
        self.dead: frozenset[int] = frozenset()
        self._selector = None  # faiss.IDSelectorBatch over `dead`

    # -- what it holds

    @property
    def base_count(self) -> int:
        """Vectors in the finalized file (tombstoned ones included)."""
        return len(self.base_ids)

    def count(self) -> int:
        """Vectors a search can return: the file's and the live additions, less the tombstones."""
        return len(self.base_ids) + len(self.added) - len(self.dead)

    def all_ids(self) -> np.ndarray:
        """Every id in FAISS (file and additions, tombstoned or not), ascending."""
        extra = np.fromiter(self.added, np.int64, len(self.added))
        return np.union1d(self.base_ids, extra) if len(extra) else self.base_ids

    def holds(self, item_id: int) -> bool:
        """Whether the id is in FAISS (tombstoned or not)."""
        i = int(item_id)
        if i in self.added:
            return True
        pos = int(np.searchsorted(self.base_ids, i))
        return pos < len(self.base_ids) and int(self.base_ids[pos]) == i

    def contains(self, item_id: int) -> bool:
        """Whether a search can return this id."""
        return int(item_id) not in self.dead and self.holds(item_id)

    # -- changes (the caller holds the write side of its lock)

    def add(self, ids, vectors: np.ndarray) -> int:
        """Add vectors under their ids, skipping ids it holds already (safe to repeat); returns how many."""
        ids = np.asarray(ids, np.int64)
        fresh = np.array([not self.holds(i) for i in ids], bool)
        if not fresh.any():
            return 0
        ids, vectors = ids[fresh], np.ascontiguousarray(np.asarray(vectors, np.float32)[fresh])
        start = 0
        while start < len(ids):
            if not self.segments or self.segments[-1].ntotal >= SEGMENT:
                self.segments.append(self._new_segment())
            take = min(len(ids) - start, SEGMENT - self.segments[-1].ntotal)
            self.segments[-1].add_with_ids(vectors[start:start + take], ids[start:start + take])
            start += take
        self.added.update(int(i) for i in ids)
        return len(ids)

    def _new_segment(self):
        """An empty segment: HNSW with the finalized index's build and search settings beside an
        approximate index (exact search over many segments would cost O(additions) per query),
        exact beside an exact one."""
        import faiss

        if self.spec["kind"] == "flat":
            return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        params, search = self.spec.get("params", {}), self.spec.get("search", {})
        hnsw = faiss.IndexHNSWFlat(self.dim, int(params.get("M", 32)), faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = int(params.get("efConstruction", 80))
        hnsw.hnsw.efSearch = int(search.get("efSearch", 64))
        return faiss.IndexIDMap2(hnsw)

    def tombstone(self, ids) -> None:
        """Never return these ids again (ids it does not hold are ignored)."""
        import faiss

        held = [int(i) for i in ids if int(i) not in self.dead and self.holds(i)]
        if not held:
            return
        dead = frozenset(self.dead | set(held))
        selector = faiss.IDSelectorBatch(np.fromiter(dead, np.int64, len(dead)))
        self.dead, self._selector = dead, selector

    # -- search (the caller holds the read side of its lock)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the top k per query, best first; -1 ids pad rows with fewer hits."""
        k = max(1, min(k, self.count()))
        parts = [self._search_one(ix, queries, k) for ix in (self.index, *self.segments)
                 if ix is not None and ix.ntotal]
        if not parts:
            return np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
        if len(parts) == 1:
            return parts[0]
        return _top_k(np.concatenate([p[0] for p in parts], 1), np.concatenate([p[1] for p in parts], 1), k)

    def _search_one(self, index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        dead, selector = self.dead, self._selector  # one consistent pair for this search
        k = min(k, index.ntotal)
        params = _search_params(index, selector if dead else None, k)
        if params is not None:
            params, _keep_alive = params  # SWIG holds raw pointers to these: they must outlive the search
            return index.search(queries, k, params=params)
        if not dead:
            return index.search(queries, k)
        # an index kind without selector support: over-fetch by the tombstones, then drop them
        scores, ids = index.search(queries, min(k + len(dead), index.ntotal))
        gone = np.isin(ids, np.fromiter(dead, np.int64, len(dead)))
        return _top_k(np.where(gone, -np.inf, scores), np.where(gone, -1, ids), k)


def _top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = np.where(ids >= 0, scores, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def _search_params(index, selector, k: int) -> tuple | None:
    """(search parameters with the index's own tuned settings that skip the ids in `selector` (if
    any) and search HNSW at least k deep, the objects they point to); None where the plain search
    does (no selector, and k within efSearch) or where the kind takes no selector. HNSW keeps only
    efSearch candidates, so a deeper k (a page far down, a filter's over-fetch) needs a deeper
    search, or it would return fewer than k. Made per search: IndexIDMap swaps the selector of the
    parameters it is given for the time of the call, so they must not be shared between threads."""
    import faiss

    keep = faiss.IDSelectorNot(selector) if selector is not None else None
    if not hasattr(index, "index"):  # ann.OnDiskIVF: ids in its lists are the rows' own
        return (faiss.SearchParametersIVF(sel=keep, nprobe=index.ivf.nprobe), (keep, selector)) if keep else None
    inner = faiss.downcast_index(index.index)
    if isinstance(inner, faiss.IndexHNSW):
        if keep is None and k <= inner.hnsw.efSearch:
            return None
        params = faiss.SearchParametersHNSW(efSearch=max(inner.hnsw.efSearch, k))
        if keep is not None:
            params.sel = keep
        return params, (keep, selector)
    if keep is None:
        return None
    if isinstance(inner, faiss.IndexRefine):
        # IndexRefine hands its base only `base_index_params`, which IndexIDMap does not translate:
        # give both levels a selector already translated to the inner ids
        base = faiss.downcast_index(inner.base_index)
        if not isinstance(base, faiss.IndexIVF):
            return None
        keep = faiss.IDSelectorTranslated(index.id_map, keep)
        base_params = faiss.SearchParametersIVF(sel=keep, nprobe=base.nprobe)
        params = faiss.IndexRefineSearchParameters(sel=keep, k_factor=inner.k_factor, base_index_params=base_params)
        return params, (keep, selector, base_params)
    if isinstance(inner, faiss.IndexIVF):
        params = faiss.SearchParametersIVF(sel=keep, nprobe=inner.nprobe)
    elif isinstance(inner, faiss.IndexFlat):
        params = faiss.SearchParameters(sel=keep)
    else:
        return None
    return params, (keep, selector)
