"""Index benchmarks: embedding throughput, and search latency / recall / build cost per index kind.

1. Throughput: the demo test images (decode, preprocess, encode at batch 64) through the
   bundle (ONNX Runtime fp32 and each shipped variant) and through the PyTorch student, same
   images, same run; and `dsmd index build` end to end (hashing, SQLite, FAISS).
2. Search: synthetic clustered unit vectors (dim 768 like the base student; 1,000 clusters),
   for each kind at each size: build time, index bytes, recall@10 against exact search on
   1,000 held-out queries (after tuning to 0.95 on the collection's own vectors, as
   `dsmd index build` does), latency p50/p99 of one query and of batches of 64.

    .venv/bin/python bench/index_bench.py                     # after make demo
    .venv/bin/python bench/index_bench.py --sizes 100000 --kinds flat hnsw

Writes bench/results/index/{results.json,table.md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ROOT, clustered, held_out, machine, percentile_ms

from dsmd.cpus import usable_cpus


def throughput(bundle_path: Path, student: Path, data: Path, split: str, threads: int) -> list[dict]:
    import torch

    from dsmd.bundle import Bundle, RuntimeOptions
    from dsmd.datasets import load_dataset
    from dsmd.distill.student import load_student
    from dsmd.images import open_image
    from dsmd.index.build import build, dataset_sources

    items = load_dataset(data).split(split)
    files = [it.path for it in items]
    rows = []

    def run(name: str, encode, transform) -> None:
        t0 = time.perf_counter()
        for i in range(0, len(files), 64):
            encode(np.stack([transform(open_image(p.read_bytes())) for p in files[i:i + 64]]))
        dt = time.perf_counter() - t0
        rows.append({"what": name, "images": len(files), "seconds": dt, "images_per_s": len(files) / dt})
        print(f"{name:28s} {len(files) / dt:8.0f} images/s", flush=True)

    torch.set_num_threads(threads)
    model, _ = load_student(student)
    with torch.no_grad():
        run("PyTorch student fp32", lambda x: model.encode_image(torch.from_numpy(x)).numpy(),
            lambda im: __import__("dsmd.preprocess", fromlist=["x"]).image_to_array(im, model.cfg.preprocess()))
    base = Bundle(bundle_path, options=RuntimeOptions(threads=threads))
    for variant in base.manifest["variants"]:
        b = Bundle(bundle_path, variant, RuntimeOptions(threads=threads))
        run(f"bundle {variant} (ONNX Runtime)", b.encode_pixels, b.transform)
    tmp = Path(tempfile.mkdtemp())
    t0 = time.perf_counter()
    build(tmp / "idx", base, dataset_sources(data, split=split), progress=False)
    dt = time.perf_counter() - t0
    rows.append({"what": "dsmd index build (fp32, with captions)", "images": len(files), "seconds": dt,
                 "images_per_s": len(files) / dt})
    print(f"{'dsmd index build':28s} {len(files) / dt:8.0f} images/s (captions, SQLite and FAISS included)")
    shutil.rmtree(tmp)
    return rows


def search_bench(n: int, dim: int, kinds: list[str], threads: int) -> list[dict]:
    import faiss

    from dsmd.index import ann

    faiss.omp_set_num_threads(threads)
    faiss.cvar.distance_compute_blas_threshold = 8
    x = clustered(n, dim, seed=1)
    rng = np.random.default_rng(2)
    queries = held_out(dim, 1000)
    ids = np.arange(n, dtype=np.int64)
    chunk = 200_000
    chunks = lambda: ((ids[i:i + chunk], x[i:i + chunk]) for i in range(0, n, chunk))  # noqa: E731
    exact = faiss.IndexFlatIP(dim)
    exact.add(x)
    _, truth = exact.search(queries, 10)
    del exact
    own = x[rng.choice(n, 1000, replace=False)]
    own_kth = ann.exact_kth_score(chunks, own)
    rows = []
    for kind in kinds:
        t0 = time.perf_counter()
        index, params = ann.build(kind, dim, chunks, n)
        build_s = time.perf_counter() - t0
        search, tuned_recall = ann.tune(index, kind, own, own_kth, lambda i: x[i])
        _, got = index.search(queries, 10)
        recall = float(np.mean([len(set(g) & set(t)) / 10 for g, t in zip(got, truth)]))
        one = []
        for q in queries[:300]:
            t = time.perf_counter()
            index.search(q[None], 10)
            one.append(time.perf_counter() - t)
        batch = []
        for i in range(0, 1000 - 63, 64):
            t = time.perf_counter()
            index.search(queries[i:i + 64], 10)
            batch.append(time.perf_counter() - t)
        path = Path(tempfile.mkdtemp()) / "i.faiss"
        faiss.write_index(index, str(path))
        size = path.stat().st_size
        shutil.rmtree(path.parent)
        row = {"n": n, "dim": dim, "kind": kind, "params": params, "search": search, "build_s": build_s,
               "bytes": size, "bytes_per_vector": size / n, "recall_at_10_own": tuned_recall,
               "recall_at_10_heldout": recall,
               "one_p50_ms": percentile_ms(one, 50), "one_p99_ms": percentile_ms(one, 99),
               "batch64_p50_ms": percentile_ms(batch, 50), "batch64_p99_ms": percentile_ms(batch, 99)}
        rows.append(row)
        print(f"n={n:>9,} {kind:5s} build {build_s:7.1f} s  {size / 2**20:8.1f} MiB  recall@10 {recall:.3f} "
              f"(tuned {tuned_recall:.3f}, {search})  "
              f"1 query p50 {row['one_p50_ms']:.2f} ms p99 {row['one_p99_ms']:.2f}"
              f"  batch 64 p50 {row['batch64_p50_ms']:.1f} ms", flush=True)
        del index
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default="artifacts/bundle")
    p.add_argument("--student", default="artifacts/student/best")
    p.add_argument("--data", default="data/world")
    p.add_argument("--split", default="test")
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--kinds", nargs="+", default=["flat", "hnsw", "ivfpq"])
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--threads", type=int, default=usable_cpus())
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--out", default="bench/results/index")
    a = p.parse_args()
    os.chdir(ROOT)
    results = {"meta": {"threads": a.threads, "machine": machine(), "date": time.strftime("%Y-%m-%d")}}
    if not a.skip_throughput:
        results["throughput"] = throughput(Path(a.bundle), Path(a.student), Path(a.data), a.split, a.threads)
    results["search"] = [r for n in a.sizes for r in search_bench(n, a.dim, a.kinds, a.threads)]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    md = [f"Command: `.venv/bin/python bench/index_bench.py {' '.join(sys.argv[1:])}`; {a.threads} threads; "
          f"{results['meta']['date']}\n"]
    if "throughput" in results:
        md += ["| encoder (demo test images, batch 64) | images/s |", "|---|---:|"]
        md += [f"| {r['what']} | {r['images_per_s']:.0f} |" for r in results["throughput"]]
        md.append("")
    md += ["| vectors | kind | build s | MiB | bytes/vector | recall@10 held-out | recall@10 own (tuned) | search | "
           "1 query p50 / p99 ms | batch 64 p50 / p99 ms |", "|---:|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in results["search"]:
        md.append(f"| {r['n']:,} | {r['kind']} | {r['build_s']:.1f} | {r['bytes'] / 2**20:.0f} | "
                  f"{r['bytes_per_vector']:.0f} | {r['recall_at_10_heldout']:.3f} | {r['recall_at_10_own']:.3f} | "
                  f"{r['search'] or 'exact'} | {r['one_p50_ms']:.2f} / {r['one_p99_ms']:.2f} | "
                  f"{r['batch64_p50_ms']:.1f} / {r['batch64_p99_ms']:.1f} |")
    (out / "table.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
