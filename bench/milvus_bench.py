"""The Milvus back end beside FAISS on the same vectors: load time, per-query latency, recall@10.

Synthetic clustered unit vectors (as bench/index_bench.py: dim 768, 1,000 clusters), 1,000
held-out queries. FAISS: exact search and the HNSW index `dsmd index build` would tune (one
thread, as the server searches). Milvus Lite: the embedded engine with the FLAT collection
`dsmd index build --backend milvus` creates on a local file, searched through pymilvus over
its local socket, as the server does. Resident memory of the Lite engine (its own process) is
read from /proc after loading.

    .venv/bin/python bench/milvus_bench.py --n 100000

Writes bench/results/milvus/{results.json,table.md}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ROOT, clustered, held_out, machine, percentile_ms


def _child_rss_bytes() -> int:
    """Resident memory of this process's children (the Milvus Lite engine)."""
    import os

    total = 0
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        for pid in (task / "children").read_text().split():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def _timed(search, queries: np.ndarray) -> dict:
    one = []
    for q in queries[:300]:
        t = time.perf_counter()
        search(q[None])
        one.append(time.perf_counter() - t)
    batch = []
    for i in range(0, len(queries) - 63, 64):
        t = time.perf_counter()
        search(queries[i:i + 64])
        batch.append(time.perf_counter() - t)
    return {"one_p50_ms": percentile_ms(one, 50), "one_p99_ms": percentile_ms(one, 99),
            "batch64_p50_ms": percentile_ms(batch, 50)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--out", default="bench/results/milvus")
    a = p.parse_args()

    import faiss

    from dsmd.index import ann, milvus

    faiss.omp_set_num_threads(1)
    faiss.cvar.distance_compute_blas_threshold = 8
    x = clustered(a.n, a.dim, seed=1)
    ids = np.arange(a.n, dtype=np.int64)
    queries = held_out(a.dim, 1000)
    exact = faiss.IndexIDMap2(faiss.IndexFlatIP(a.dim))
    exact.add_with_ids(x, ids)
    _, truth = exact.search(queries, 10)
    def recall(got) -> float:
        return float(np.mean([len(set(g) & set(t)) / 10 for g, t in zip(got, truth)]))

    rows = []

    rows.append({"backend": "FAISS flat (exact)", "load_s": 0.0, "recall_at_10": 1.0,
                 **_timed(lambda q: exact.search(q, 10), queries)})
    def chunks():
        return iter([(ids, x)])

    t0 = time.perf_counter()
    faiss.omp_set_num_threads(2)
    hnsw, _ = ann.build("hnsw", a.dim, chunks, a.n)
    own = x[np.random.default_rng(2).choice(a.n, 1000, replace=False)]
    search, _ = ann.tune(hnsw, "hnsw", own, ann.exact_kth_score(chunks, own), lambda i: x[i])
    faiss.omp_set_num_threads(1)
    rows.append({"backend": f"FAISS hnsw ({search})", "load_s": time.perf_counter() - t0,
                 "recall_at_10": recall(hnsw.search(queries, 10)[1]), **_timed(lambda q: hnsw.search(q, 10), queries)})


    with tempfile.TemporaryDirectory() as tmp:
        uri = str(Path(tmp) / "vectors.db")
        client = milvus.connect(uri)
        t0 = time.perf_counter()
        params = milvus.ensure_collection(client, "bench_images", a.dim, uri)
        milvus.sync(client, "bench_images", ids, lambda i: x[i])
        load_s = time.perf_counter() - t0
        rss = _child_rss_bytes()
        got = np.concatenate([milvus.search(client, "bench_images", queries[i:i + 100], 10, {})[1]
                              for i in range(0, len(queries), 100)])
        rows.append({"backend": f"Milvus Lite {milvus.is_lite(uri) and 'FLAT' or params['index_type']}",
                     "load_s": load_s, "recall_at_10": recall(got), "engine_rss_bytes": rss,
                     **_timed(lambda q: milvus.search(client, "bench_images", q, 10, {}), queries)})
        milvus.disconnect(client, uri)

    meta = {"n": a.n, "dim": a.dim, "date": time.strftime("%Y-%m-%d"), "machine": machine()}
    out = ROOT / a.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [(f"Command: `.venv/bin/python bench/milvus_bench.py --n {a.n}`; {a.n:,} x {a.dim} clustered vectors, "
              f"1,000 held-out queries, one search thread; {meta['date']}"), "",
             "| back end | load / build s | recall@10 | 1 query p50 / p99 ms | batch 64 p50 ms | engine RSS MiB |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        rss = f"{r['engine_rss_bytes'] / 2**20:.0f}" if "engine_rss_bytes" in r else "(in process)"
        lines.append(f"| {r['backend']} | {r['load_s']:.1f} | {r['recall_at_10']:.3f} | {r['one_p50_ms']:.2f} / "
                     f"{r['one_p99_ms']:.2f} | {r['batch64_p50_ms']:.1f} | {rss} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
