"""Filtered search: latency and recall@10 against an exact filtered scan, by selectivity and index kind.

A real index folder (SQLite rows with metadata, float16 vector files, FAISS files written by
finalize and tuned to recall 0.95 as `dsmd index build` does) of synthetic clustered unit vectors
(dim 768 like the base student), searched through `index.filtered.answer`, the function the
server calls, one query at a time on one thread. Filters on real columns, independent of the vectors:

    50%    taken_from = the median capture time
    5%     folder = "07" (one of 20 top folders; its sub-folders count)
    0.5%   folder = "07/3" (one of its 10 sub-folders)

and no filter, for the ratio. Recall@10 is against an exact scan (numpy) of the items the filter
keeps; the strategy column says how the search honoured the filter (index/filtered.py). p50/p99
are over 200 queries with the filter's vectors cached after the first (as when a user pages or
types a new query within a filter); "first query" is the median of 5 first queries, cache emptied.

    .venv/bin/python bench/filtered_search.py                          # 100k and 1M, flat hnsw ivfpq
    .venv/bin/python bench/filtered_search.py --sizes 100000 --kinds hnsw

Writes bench/results/filtered/{results.json,table.md}.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ROOT, clustered, held_out, machine, machine_line, percentile_ms

from dsmd.cpus import usable_cpus
from dsmd.preprocess import PreprocessConfig


class VectorsOnly:
    """What finalize reads of a bundle when the vectors are given: dim, variant, a fingerprint."""

    def __init__(self, dim: int):
        self.dim, self.variant, self.name, self.path = dim, "fp32", "synthetic", Path("/nonexistent/synthetic")
        self.manifest = {"files": {"image.onnx": "1" * 64, "text.onnx": "2" * 64}}
        self.preprocess = PreprocessConfig(size=8)


def make_folder(path: Path, x: np.ndarray, seed: int = 0) -> dict:
    """The rows of `x` (ids 1..n) with folders 'AA/B' and capture times; returns the metadata arrays."""
    from dsmd.index.build import bundle_fingerprint
    from dsmd.index.db import IndexDB, NewItem

    n, dim = x.shape
    rng = np.random.default_rng(seed)
    top, sub = rng.integers(0, 20, n), rng.integers(0, 10, n)
    taken = 1.5e9 + rng.uniform(0, 3e8, n)
    db = IndexDB(path / "items.sqlite", dim, bundle_fingerprint(VectorsOnly(dim)), "fp32")
    t0 = time.perf_counter()
    for start in range(0, n, 20_000):
        db.replace([NewItem(f"bench://{i}", f"{i:064x}", 640, 480, [], x[i],
                            meta={"folder": f"{top[i]:02d}/{sub[i]}", "taken": float(taken[i]), "bytes": 100_000})
                    for i in range(start, min(n, start + 20_000))])
    db.close()
    print(f"  rows and vectors of {n:,} items written in {time.perf_counter() - t0:.0f} s", flush=True)
    return {"top": top, "sub": sub, "taken": taken}


def masks(meta: dict) -> tuple[dict, float]:
    median = float(np.median(meta["taken"]))
    return {"none": None, "50%": meta["taken"] >= median, "5%": meta["top"] == 7,
            "0.5%": (meta["top"] == 7) & (meta["sub"] == 3)}, median


def bench_kind(path: Path, kind: str, x: np.ndarray, meta: dict, queries: np.ndarray, threads: int) -> list[dict]:
    import faiss

    from dsmd.index import filtered
    from dsmd.index.build import finalize
    from dsmd.index.filtered import Ask, answer
    from dsmd.index.filters import Filter
    from dsmd.index.search import SearchIndex

    t0 = time.perf_counter()
    m = finalize(path, VectorsOnly(x.shape[1]), kind=kind, progress=False)
    build_s = time.perf_counter() - t0
    spec = m["images"]["index"]
    print(f"  {kind}: finalize {build_s:.0f} s, {spec['search'] or 'exact'}, recall@10 {spec['recall_at_10']:.3f}",
          flush=True)
    keep, median = masks(meta)
    filters = {"none": None, "50%": Filter(taken_from=median), "5%": Filter(folder="07"),
               "0.5%": Filter(folder="07/3")}
    rows = []
    with SearchIndex(path) as s:
        faiss.omp_set_num_threads(1)  # as the server searches: one thread per query
        for name, where in filters.items():
            ask = Ask(10, where=where)
            ids_all = np.arange(1, len(x) + 1)
            sel = keep[name]
            cand = ids_all if sel is None else ids_all[sel]
            cold = []  # the first query of a filter: its matching vectors read, not yet cached
            for q in queries[:5]:
                filtered._caches.clear()
                t = time.perf_counter()
                answer(s, q, ask)
                cold.append(time.perf_counter() - t)
            times, hits, strategies = [], 0, collections.Counter()
            for q in queries:
                t = time.perf_counter()
                ans = answer(s, q, ask)
                times.append(time.perf_counter() - t)
                strategies[ans.strategy] += 1
                scores = x[cand - 1] @ q
                top = cand[np.argpartition(-scores, 10)[:10]]
                hits += len({h.id for h in ans.hits} & set(top.tolist()))
            row = {"n": len(x), "kind": kind, "filter": name, "selectivity": 1.0 if sel is None else float(sel.mean()),
                   "p50_ms": percentile_ms(times, 50), "p99_ms": percentile_ms(times, 99),
                   "cold_ms": percentile_ms(cold, 50),
                   "recall_at_10": hits / (10 * len(queries)), "strategy": dict(strategies),
                   "index_search": spec["search"], "index_recall_at_10": spec["recall_at_10"], "build_s": build_s}
            rows.append(row)
            print(f"    {name:5s} sel {row['selectivity']:.4f}  p50 {row['p50_ms']:7.2f} ms  p99 {row['p99_ms']:7.2f} "
                  f"ms  cold {row['cold_ms']:.2f} ms  recall@10 {row['recall_at_10']:.3f}  {dict(strategies)}",
                  flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--kinds", nargs="+", default=["flat", "hnsw", "ivfpq"])
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--threads", type=int, default=usable_cpus(), help="FAISS threads while building")
    p.add_argument("--out", default=str(ROOT / "bench/results/filtered"))
    a = p.parse_args()
    import faiss

    rows = []
    queries = held_out(a.dim, a.queries)
    for n in a.sizes:
        print(f"n={n:,}", flush=True)
        x = clustered(n, a.dim, seed=1)
        tmp = Path(tempfile.mkdtemp(prefix="filtered-"))
        try:
            meta = make_folder(tmp, x)
            for kind in a.kinds:
                faiss.omp_set_num_threads(a.threads)
                rows += bench_kind(tmp, kind, x, meta, queries, a.threads)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        del x
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))
    md = [f"Command: `.venv/bin/python bench/filtered_search.py {' '.join(sys.argv[1:])}`; {machine_line()}\n",
          "| items | kind | filter | selectivity | p50 ms | p99 ms | first query ms | vs unfiltered p50 "
          "| recall@10 vs exact | strategy |",
          "|---:|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        base = next(b for b in rows if b["n"] == r["n"] and b["kind"] == r["kind"] and b["filter"] == "none")
        md.append(f"| {r['n']:,} | {r['kind']} | {r['filter']} | {r['selectivity']:.4f} | {r['p50_ms']:.2f} | "
                  f"{r['p99_ms']:.2f} | {r['cold_ms']:.2f} | {r['p50_ms'] / base['p50_ms']:.2f}x | "
                  f"{r['recall_at_10']:.3f} | "
                  f"{', '.join(f'{k} {v}' for k, v in r['strategy'].items())} |")
    (out / "table.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
