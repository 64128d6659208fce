"""FAISS indexes: which kind for how many vectors, how to build it, and tuning it to a recall.

All indexes search by inner product on unit vectors (= cosine) and carry the SQLite ids.

    flat    exact search; every vector in memory (4·dim bytes each)    n·dim <= 10M
            (query latency by size: BENCHMARKS.md, 'Index: encoder throughput, search
            latency and recall per kind')
    hnsw    HNSW graph (M=32) over the full vectors, efSearch tuned             n <= 5M
    ivfpq   IVF + product quantisation (dim/8 bytes per vector) with a float16 refine stage
            (2·dim bytes) that re-ranks the shortlist: PQ alone fell short of the recall
            target whatever nprobe, and so did an 8-bit refine on tight clusters; fp16
            reaches it (see BENCHMARKS.md, the index sections)                        beyond
    ivfdisk the same IVF-PQ with its inverted lists in a file beside the index (FAISS
            OnDiskInvertedLists, memory-mapped) and the shortlist re-ranked from the index's
            float16 vector files (index/vectors.py), also memory-mapped: resident memory is
            the coarse centroids and 8 bytes of id per vector; the page cache does the rest.
            Built in blocks merged on disk (`merge_ondisk`), so building needs memory for one
            block only                                    when IVF-PQ does not fit the memory

Each build is tuned on the collection's own vectors: the smallest efSearch / nprobe whose
recall@10 against exact search reaches the target (0.95) is kept, and the measured recall is
written in the manifest. A kind that cannot reach the target (HNSW on vectors with no structure,
such as random ones: see BENCHMARKS.md, 'Index: when a kind cannot reach the recall target') is
followed by the next kind that fits (`fallbacks`), and when none reaches it the build says so
(the manifest's `shortfall`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dsmd.cpus import usable_cpus

KINDS = ("flat", "hnsw", "ivfpq", "ivfdisk")
FLAT_MAX_CELLS = 10_000_000  # n x dim: about 13k vectors at 768 dims, 39k at 256
HNSW_MAX = 5_000_000
TARGET_RECALL = 0.95
FLAT_FALLBACK_MAX_CELLS = 100_000_000  # exact search as the last resort: 130k x 768 (400 MB)
HNSW_EF_GRID = (16, 32, 64, 128, 256, 512, 1024)
IVF_NPROBE_GRID = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclass
class IndexSpec:
    kind: str
    params: dict = field(default_factory=dict)  # build parameters (M, nlist, pq_m, ...)
    search: dict = field(default_factory=dict)  # tuned search parameters (efSearch, nprobe, k_factor)
    recall_at_10: float | None = None  # measured against exact search on the collection itself
    queries: int = 0

    def to_json(self) -> dict:
        return asdict(self)


def choose_kind(n: int, dim: int, memory_bytes: int | None = None) -> str:
    """The index kind for n vectors of `dim`: exact while small, HNSW above, IVF-PQ when memory matters.

    `memory_bytes`: what the index may take; HNSW needs about (4·dim + 8·M·2) bytes per vector.
    """
    if n * dim <= FLAT_MAX_CELLS and (memory_bytes is None or n * bytes_per_vector("flat", dim) <= memory_bytes):
        return "flat"
    if n <= HNSW_MAX and (memory_bytes is None or n * bytes_per_vector("hnsw", dim) <= memory_bytes):
        return "hnsw"
    if memory_bytes is None or n * bytes_per_vector("ivfpq", dim) <= memory_bytes:
        return "ivfpq"
    return "ivfdisk"  # the same recall from disk, rather than a weaker re-ranking stage in memory


ID_MAP_BYTES = 48  # IndexIDMap2: the id array and its reverse hash map, per vector (approximately)
REFINE_BYTES = {"fp16": 2, "sq8": 1, "none": 0}  # re-ranking codes per dimension


def bytes_per_vector(kind: str, dim: int, m: int = 32, refine: str = "fp16") -> int:
    """Memory of one vector in each kind, id map included."""
    if kind == "ivfdisk":
        return 8  # the ids of the inverted lists, read at opening; codes and vectors stay on disk
    own = {"flat": 4 * dim, "hnsw": 4 * dim + 2 * m * 4, "ivfpq": dim // 8 + 8 + REFINE_BYTES[refine] * dim}[kind]
    return own + ID_MAP_BYTES


def fallbacks(kind: str, n: int, dim: int, memory_bytes: int | None = None) -> list[str]:
    """The kinds to try, in order, when `kind` falls short of the recall target: IVF-PQ with its
    float16 re-ranking after HNSW (its grid ends near exhaustive search), then exact search while
    it fits (`memory_bytes`, or FLAT_FALLBACK_MAX_CELLS without one)."""
    after = {"hnsw": ["ivfpq", "flat"], "ivfpq": ["flat"], "ivfdisk": ["flat"], "flat": []}[kind]
    if memory_bytes is None:
        fits = {"ivfpq": True, "flat": n * dim <= FLAT_FALLBACK_MAX_CELLS}
    else:
        fits = {"ivfpq": n * bytes_per_vector("ivfpq", dim, refine=choose_refine(n, dim, memory_bytes)) <= memory_bytes,
                "flat": n * bytes_per_vector("flat", dim) <= memory_bytes}
    return [k for k in after if fits[k]]


def choose_refine(n: int, dim: int, memory_bytes: int | None) -> str:
    """The IVF-PQ re-ranking stage that fits: fp16 (reaches 0.95), else 8-bit, else none (~0.8)."""
    for refine in ("fp16", "sq8"):
        if memory_bytes is None or n * bytes_per_vector("ivfpq", dim, refine=refine) <= memory_bytes:
            return refine
    return "none"


_ivf_params_override: dict = {}  # benchmarks only (bench/ondisk_bench.py --nlist)


def _ivf_params(n: int, dim: int) -> dict:
    """nlist ~ 4·sqrt(n) (a power of two), dim/8 sub-quantisers of 8 bits; both shrunk for small n
    so that k-means has enough points (faiss wants ~39 per centroid)."""
    nlist = max(1, min(65536, 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n)))), n // 39))
    nlist = _ivf_params_override.get("nlist", nlist)
    pq_m = next(m for m in (dim // 8, dim // 4, dim // 2, dim) if m > 0 and dim % m == 0)
    nbits = max(1, min(8, int(math.log2(max(2, n // 39)))))
    return {"nlist": nlist, "pq_m": pq_m, "pq_bits": nbits}


class OnDiskIVF:
    """An IVF-PQ index whose inverted lists are in a file, with its shortlist (k·k_factor per query)
    re-ranked by exact inner products of the vectors `vectors_of(ids)` returns (the float16 vector
    files). The ids in the lists are the rows' own ids (no id map)."""

    def __init__(self, ivf, vectors_of: Callable[[np.ndarray], np.ndarray] | None, k_factor: float = 16):
        self.ivf, self.vectors_of, self.k_factor = ivf, vectors_of, k_factor

    @property
    def ntotal(self) -> int:
        return self.ivf.ntotal

    def ids(self) -> np.ndarray:
        """Every id in the inverted lists, ascending."""
        import faiss

        lists = self.ivf.invlists
        parts = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
                 for i in range(self.ivf.nlist) if lists.list_size(i)]
        return np.sort(np.concatenate(parts)).astype(np.int64) if parts else np.zeros(0, np.int64)

    def search(self, queries: np.ndarray, k: int, params=None) -> tuple[np.ndarray, np.ndarray]:
        # the shortlist as tuned (for k = 10): a smaller k must not shrink it, or top-1 loses what top-10 keeps
        short = int(min(self.ntotal, round(max(k, 10) * self.k_factor)))
        scores, ids = self.ivf.search(queries, short, params=params) if params else self.ivf.search(queries, short)
        if self.vectors_of is None:
            return scores[:, :k], ids[:, :k]
        exact = np.full(ids.shape, -np.inf, np.float32)
        for i in range(len(queries)):  # one query's shortlist at a time: memory of `short` vectors, not of all
            ok = ids[i] >= 0
            if ok.any():
                exact[i, ok] = self.vectors_of(ids[i, ok]) @ queries[i]
        exact[np.isnan(exact)] = -np.inf  # ids whose row is gone (removed by another writer meanwhile)
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(exact, order, 1), np.take_along_axis(ids, order, 1)


def build(kind: str, dim: int, chunks: Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]], n: int,
          train_sample: int = 200_000, seed: int = 0, progress=None, refine: str = "fp16",
          data_path: Path | None = None, vectors_of: Callable[[np.ndarray], np.ndarray] | None = None):
    """A FAISS index of `kind` over the vectors `chunks()` yields as (ids, vectors), added in batches.

    IVF-PQ trains on a sample (at most `train_sample` vectors), so memory stays bounded by the
    index itself plus one chunk. `ivfdisk` writes its inverted lists to `data_path` and re-ranks
    with `vectors_of`.
    """
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(usable_cpus())  # building uses every core; searching keeps its own setting
    try:
        if kind == "ivfdisk":
            return _build_on_disk(dim, chunks, n, train_sample, seed, progress, data_path, vectors_of)
        return _build(kind, dim, chunks, n, train_sample, seed, progress, refine)
    finally:
        faiss.omp_set_num_threads(threads)


def _build_on_disk(dim, chunks, n, train_sample, seed, progress, data_path: Path, vectors_of):
    """Train IVF-PQ on a sample, fill one copy per chunk (written as a block file), and merge the blocks'
    inverted lists into `data_path` (FAISS merge_ondisk): memory for one block at a time."""
    import shutil

    import faiss

    params = _ivf_params(n, dim)
    ivf = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, params["nlist"], params["pq_m"], params["pq_bits"],
                           faiss.METRIC_INNER_PRODUCT)
    ivf.do_polysemous_training = False
    ivf.train(_sample(chunks, n, max(train_sample, 40 * params["nlist"]), seed))
    blocks = data_path.with_name(f".{data_path.name}.{os.getpid()}.blocks.tmp")
    blocks.mkdir(parents=True, exist_ok=True)
    try:
        files = []
        for b, (ids, vecs) in enumerate(chunks()):
            block = faiss.clone_index(ivf)
            block.add_with_ids(np.ascontiguousarray(vecs, np.float32), np.asarray(ids, np.int64))
            files.append(str(blocks / f"{b}.faiss"))
            faiss.write_index(block, files[-1])
            del block
            if progress:
                progress(len(ids))
        _merge_blocks(ivf, files, data_path)
    finally:
        shutil.rmtree(blocks, ignore_errors=True)
    return OnDiskIVF(ivf, vectors_of), {**params, "storage": "disk", "data_file": data_path.name}


def _merge_blocks(ivf, files: list[str], data_path: Path) -> None:
    """FAISS's merge_ondisk, except that the block indexes are freed afterwards (merge_ondisk keeps
    them, and with them the mappings of the block files, deleted or not) and the lists synced."""
    import faiss

    from dsmd.index.vectors import sync_dir

    blocks = [faiss.read_index(f, faiss.IO_FLAG_MMAP) for f in files]
    lists = faiss.InvertedListsPtrVector()
    for b in blocks:
        lists.push_back(faiss.extract_index_ivf(b).invlists)
    merged = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(data_path))
    ivf.ntotal = merged.merge_from_multiple(lists.data(), lists.size(), False)
    ivf.replace_invlists(merged, True)
    merged.this.disown()  # owned by ivf now
    del lists, blocks  # unmaps the block files
    with open(data_path, "rb+") as f:
        os.fsync(f.fileno())
    sync_dir(data_path.parent)


def _build(kind, dim, chunks, n, train_sample, seed, progress, refine):
    import faiss

    if kind == "flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        params = {}
    elif kind == "hnsw":
        params = {"M": 32, "efConstruction": 80}
        hnsw = faiss.IndexHNSWFlat(dim, params["M"], faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = params["efConstruction"]
        index = faiss.IndexIDMap2(hnsw)
    elif kind == "ivfpq":
        params = {**_ivf_params(n, dim), "refine": refine}
        quantizer = faiss.IndexFlatIP(dim)
        ivf = faiss.IndexIVFPQ(quantizer, dim, params["nlist"], params["pq_m"], params["pq_bits"],
                               faiss.METRIC_INNER_PRODUCT)
        ivf.do_polysemous_training = False  # most of the training time, for codes no search here uses
        sample = _sample(chunks, n, max(train_sample, 40 * params["nlist"]), seed)
        if refine == "none":
            index = ivf
        else:
            codes = faiss.ScalarQuantizer.QT_fp16 if refine == "fp16" else faiss.ScalarQuantizer.QT_8bit
            index = faiss.IndexRefine(ivf, faiss.IndexScalarQuantizer(dim, codes, faiss.METRIC_INNER_PRODUCT))
        index.train(sample)
        index = faiss.IndexIDMap2(index)
    else:
        raise ValueError(f"index kind must be one of {KINDS}, not {kind!r}")
    for ids, vecs in chunks():
        index.add_with_ids(np.ascontiguousarray(vecs, np.float32), ids)
        if progress:
            progress(len(ids))
    return index, params


def _sample(chunks, n: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    keep = rng.random(n) < min(1.0, size / max(1, n)) if n > size else np.ones(n, bool)
    parts, pos = [], 0
    for _, vecs in chunks():
        parts.append(vecs[keep[pos:pos + len(vecs)]])
        pos += len(vecs)
    return np.ascontiguousarray(np.concatenate(parts), np.float32)


def apply_search_params(index, kind: str, search: dict) -> None:
    import faiss

    if kind == "ivfdisk":
        index.ivf.nprobe = int(search.get("nprobe", 16))
        index.k_factor = float(search.get("k_factor", 16))
        return
    inner = faiss.downcast_index(index.index) if hasattr(index, "index") else index
    if kind == "hnsw":
        faiss.downcast_index(inner).hnsw.efSearch = int(search.get("efSearch", 64))
    elif kind == "ivfpq":
        inner = faiss.downcast_index(inner)
        if isinstance(inner, faiss.IndexRefine):
            inner.k_factor = float(search.get("k_factor", 4))
            inner = faiss.downcast_index(inner.base_index)
        inner.nprobe = int(search.get("nprobe", 16))


def tune(index, kind: str, queries: np.ndarray, kth_exact: np.ndarray, vectors_of: Callable[[np.ndarray], np.ndarray],
         target: float = TARGET_RECALL, k: int = 10, also: tuple = ()) -> tuple[dict, float]:
    """The cheapest search setting reaching recall@k >= target.

    Recall@k counts the returned neighbours whose *exact* score (recomputed from
    `vectors_of(ids)`, not the index's approximate one) is at least the exact k-th score
    (`kth_exact`, per query): ties at the k-th place are all correct answers. `also`: more
    (queries, kth_exact) sets the setting must reach the target for too (the text queries of a
    captionless collection); the recall returned is the lowest of them.
    """
    def recall(search: dict) -> float:
        apply_search_params(index, kind, search)
        found = []
        for q, kth in ((queries, kth_exact), *also):
            _, ids = index.search(q, k)
            found.append(recall_at_k(ids, q, kth, vectors_of, index.ntotal))
        return min(found)

    if kind == "flat":
        return {}, recall({})
    if kind == "hnsw":
        grid = [{"efSearch": ef} for ef in HNSW_EF_GRID]
    else:
        if kind == "ivfdisk":
            refined, nlist = True, index.ivf.nlist
        else:
            import faiss

            inner = faiss.downcast_index(index.index)
            refined = isinstance(inner, faiss.IndexRefine)
            nlist = faiss.downcast_index(inner.base_index).nlist if refined else inner.nlist
        # k_factor 256: tight clusters at 5M needed it (BENCHMARKS.md, 'Index: IVF-PQ on disk at 5M vectors')
        grid = [{"nprobe": p, "k_factor": kf} for p in IVF_NPROBE_GRID if p <= nlist
                for kf in ((4, 16, 64, 256) if refined else (4,))]
    best, best_recall = grid[-1], -1.0
    for search in grid:
        r = recall(search)
        if r >= target:
            return search, r
        if r > best_recall:
            best, best_recall = search, r
    apply_search_params(index, kind, best)
    return best, best_recall


def recall_at_k(ids: np.ndarray, queries: np.ndarray, kth_exact: np.ndarray,
                vectors_of: Callable[[np.ndarray], np.ndarray], total: int) -> float:
    """Recall@k of the ids a search returned (one row per query, -1 for none): the share whose exact
    score is at least the exact k-th score (ties at the k-th place are all correct answers)."""
    k = ids.shape[1]
    flat = ids.ravel()
    ok = flat >= 0
    exact = np.full(flat.shape, -np.inf, np.float32)
    exact[ok] = (vectors_of(flat[ok]) * np.repeat(queries, k, axis=0)[ok]).sum(1)
    hits = exact.reshape(ids.shape) >= kth_exact[:, None] - 1e-5
    return float(hits.sum(1).mean() / min(k, total))


def exact_kth_score(chunks, queries: np.ndarray, k: int = 10, block: int = 16_384) -> np.ndarray:
    """The exact k-th best inner product of each query, streaming over the vectors in blocks
    (1,000 queries x 16k scores at a time: bounded memory whatever the collection's size)."""
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    for _, all_vecs in chunks():
        for j in range(0, len(all_vecs), block):
            s = queries @ all_vecs[j:j + block].T
            take = min(k, s.shape[1])
            top = -np.partition(-s, take - 1, axis=1)[:, :take]
            best_s = -np.partition(-np.concatenate([best_s, top], 1), k - 1, axis=1)[:, :k]
    best_s = np.sort(best_s, axis=1)[:, ::-1]
    filled = np.isfinite(best_s).sum(1)
    return best_s[np.arange(len(queries)), np.maximum(filled - 1, 0)]


def write(index, path: Path, before_replace: Callable[[], None] | None = None) -> None:
    """Write the index to `path` through a temporary file (a kill leaves no half-written file,
    only a `.NAME.PID.tmp` that the next finalize deletes). `before_replace`: a hook for the kill tests."""
    import faiss

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    faiss.write_index(index.ivf if isinstance(index, OnDiskIVF) else index, str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    if before_replace is not None:
        before_replace()
    os.replace(tmp, path)
    from dsmd.index.vectors import sync_dir

    sync_dir(path.parent)


def read(path: Path, kind: str, search: dict, mmap: bool = False,
         vectors_of: Callable[[np.ndarray], np.ndarray] | None = None):
    """`vectors_of`: the re-ranking vectors of an ivfdisk index (its lists are in the file its
    manifest names beside `path`)."""
    import faiss

    if kind == "ivfdisk":  # lists opened read-only (FAISS's default is "r+"): nothing is ever written to them
        # after their build, and a read-only mount or another user's files must serve
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY
        index = OnDiskIVF(faiss.read_index(str(path), flags), vectors_of)
    else:
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP if mmap and kind != "hnsw" else 0)
    apply_search_params(index, kind, search)
    return index
