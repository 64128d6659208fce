"""An on-disk IVF-PQ index (`ivfdisk`) at millions of vectors: build time, disk, memory, latency, recall.

Synthetic clustered unit vectors (as bench/index_bench.py: dim 768, 1,000 clusters) are written
to a float16 vector file (index/vectors.py) in chunks; the index is built from it the way
`dsmd index build` builds `ivfdisk` (index/ann.py: train on a sample, one block file per chunk,
inverted lists merged into one .ivfdata file) and tuned to recall@10 >= 0.95 on the collection's
own vectors. A fresh process then opens it as the server would (lists and vectors memory-mapped)
and answers 300 single queries twice: p50/p99, first with the page cache dropped (when this
process may drop it), then warm; memory is reported as anonymous (the process's own) and as
mapped file pages (page cache, which the kernel reclaims under pressure). SQLite is left out (the rows'
metadata is not what grows here).

    .venv/bin/python bench/ondisk_bench.py --n 5000000 --nlist 2048

Writes bench/results/ondisk/{results.json,table.md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import ROOT, held_out, machine


class PeakAnon:
    """The peak of this process's anonymous resident memory (RssAnon: its own allocations, not the
    file pages it maps, which are page cache the kernel can drop), sampled every 0.2 s."""

    def __init__(self):
        import threading

        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, _rss_mib("RssAnon"))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _rss_mib("RssAnon"))


def _rss_mib(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def serve(folder: Path, dim: int, search: dict) -> dict:
    """In a fresh process: open the index as the server would and time single queries."""
    import faiss

    from dsmd.index import ann
    from dsmd.index.vectors import VectorFile

    faiss.omp_set_num_threads(1)
    base = _rss_mib()
    t0 = time.perf_counter()
    vf = VectorFile(folder / "vectors.f16", dim, writable=False)
    index = ann.read(folder / "index.faiss", "ivfdisk", search, vectors_of=vf.read)
    ids = index.ids()
    open_s = time.perf_counter() - t0
    queries = held_out(dim, 300)
    out = {"open_s": open_s, "ids": len(ids), "rss_after_open_mib": _rss_mib() - base,
           "anon_after_open_mib": _rss_mib("RssAnon")}
    for run in ("cold", "warm"):
        times = []
        for q in queries:
            t = time.perf_counter()
            index.search(q[None], 10)
            times.append(time.perf_counter() - t)
        out[f"{run}_p50_ms"] = 1000 * float(np.percentile(times, 50))
        out[f"{run}_p99_ms"] = 1000 * float(np.percentile(times, 99))
    out["rss_after_queries_mib"] = _rss_mib() - base
    out["anon_after_queries_mib"] = _rss_mib("RssAnon")
    out["file_after_queries_mib"] = _rss_mib("RssFile")
    out["peak_rss_mib"] = _rss_mib("VmHWM")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=5_000_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--nlist", type=int, help="coarse lists (default: the build's own choice, ~4 sqrt(n))")
    p.add_argument("--folder", default="/tmp/dsmd-ondisk", help="where the vectors and the index are written")
    p.add_argument("--out", default="bench/results/ondisk")
    p.add_argument("--reuse-vectors", action="store_true", help="keep FOLDER/vectors.f16 from an earlier run")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the fresh-process half
    p.add_argument("--search", help=argparse.SUPPRESS)
    a = p.parse_args()
    folder = Path(a.folder)
    if a.serve:
        print(json.dumps(serve(folder, a.dim, json.loads(a.search))))
        return


    from dsmd.index import ann
    from dsmd.index.vectors import VectorFile

    reuse = a.reuse_vectors and VectorFile(folder / "vectors.f16", a.dim, writable=False).rows() == a.n
    if reuse:
        for f in folder.iterdir():
            if f.name != "vectors.f16":
                f.unlink()
    else:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    vf = VectorFile(folder / "vectors.f16", a.dim, writable=True)
    t0 = time.perf_counter()
    # index_bench's clusters (the centres its held-out queries come from), the points drawn chunk by chunk
    centres = np.random.default_rng(1).normal(size=(1000, a.dim)).astype(np.float32)
    for i in range(0, 0 if reuse else a.n, 200_000):
        m = min(200_000, a.n - i)
        r = np.random.default_rng(1000 + i // 200_000)
        x = centres[r.integers(0, 1000, m)] + 0.6 * r.normal(size=(m, a.dim)).astype(np.float32)
        vf.append(x / np.linalg.norm(x, axis=1, keepdims=True))
    write_s = time.perf_counter() - t0
    print(f"{'kept' if reuse else 'wrote'} {a.n:,} vectors in {write_s:.0f} s", flush=True)
    chunk = 250_000
    def chunks():
        return ((np.arange(i, min(a.n, i + chunk)), vf.read(np.arange(i, min(a.n, i + chunk))))
                for i in range(0, a.n, chunk))

    if a.nlist:
        ann._ivf_params_override = {"nlist": a.nlist}
    t0 = time.perf_counter()
    peak = PeakAnon()
    index, params = ann.build("ivfdisk", a.dim, chunks, a.n, data_path=folder / "index.ivfdata", vectors_of=vf.read)
    build_s = time.perf_counter() - t0
    print(f"built in {build_s:.0f} s: {params}", flush=True)
    rng = np.random.default_rng(2)
    own = vf.read(np.sort(rng.choice(a.n, 1000, replace=False)))
    t1 = time.perf_counter()
    kth = ann.exact_kth_score(chunks, own)
    search, own_recall = ann.tune(index, "ivfdisk", own, kth, vf.read)
    tune_s = time.perf_counter() - t1
    ann.write(index, folder / "index.faiss")
    build_peak = peak.stop()
    # recall on held-out queries against exact search over the same (float16) vectors
    held = held_out(a.dim, 300)
    held_kth = ann.exact_kth_score(chunks, held)
    ann.apply_search_params(index, "ivfdisk", search)
    held_recall = ann.recall_at_k(index.search(held, 10)[1], held, held_kth, vf.read, a.n)
    del index
    subprocess.run(["sync"], check=False)
    try:  # "cold" means cold only when the page cache could be dropped (root, a writable /proc/sys)
        Path("/proc/sys/vm/drop_caches").write_text("1")
        dropped = True
    except OSError:
        dropped = False
    done = subprocess.run([sys.executable, __file__, "--serve", "--folder", str(folder), "--dim", str(a.dim),
                           "--search", json.dumps(search)], capture_output=True, text=True, check=True)
    served = json.loads(done.stdout.strip().splitlines()[-1])
    sizes = {f.name: f.stat().st_size for f in folder.iterdir()}
    result = {"n": a.n, "dim": a.dim, "params": params, "search": search, "write_vectors_s": write_s,
              "build_s": build_s, "tune_s": tune_s, "build_peak_anon_mib": build_peak,
              "recall_at_10_own": own_recall, "recall_at_10_heldout": held_recall, "bytes": sizes, **served,
              "page_cache_dropped": dropped,
              "date": time.strftime("%Y-%m-%d"), "machine": machine()}
    out = ROOT / a.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    def gib(b: float) -> float:
        return b / 2**30

    table = [
        ("vectors", f"{a.n:,} x {a.dim}"),
        ("index", f"ivfdisk {params['nlist']} lists, PQ {params['pq_m']}x{params['pq_bits']} bits; search {search}"),
        ("build (train, fill blocks, merge on disk)", f"{build_s:.0f} s"),
        ("tuning to recall@10 >= 0.95 (exact k-th scores over all vectors included)", f"{tune_s:.0f} s"),
        ("disk: vectors (float16) / inverted lists / index header",
         (f"{gib(sizes['vectors.f16']):.2f} GiB / {gib(sizes['index.ivfdata']):.2f} GiB / "
          f"{sizes['index.faiss'] / 2**20:.1f} MiB")),
        ("peak anonymous memory while building and tuning (mapped file pages excluded)",
         f"{build_peak / 1024:.2f} GiB"),
        ("recall@10 own / held-out queries", f"{own_recall:.3f} / {held_recall:.3f}"),
        ("serving process: open", f"{served['open_s']:.1f} s"),
        ("serving process: anonymous memory after open / after 600 queries",
         f"{served['anon_after_open_mib']:.0f} / {served['anon_after_queries_mib']:.0f} MiB"),
        ("serving process: mapped file pages resident after 600 queries (page cache)",
         f"{served['file_after_queries_mib']:.0f} MiB"),
        ("one query p50 / p99, first pass" + (" (page cache dropped before)" if dropped else
                                               " (page cache could not be dropped: not cold)"),
         f"{served['cold_p50_ms']:.1f} / {served['cold_p99_ms']:.1f} ms"),
        ("one query p50 / p99, warm", f"{served['warm_p50_ms']:.1f} / {served['warm_p99_ms']:.1f} ms"),
    ]
    lines = [f"Command: `.venv/bin/python bench/ondisk_bench.py {' '.join(sys.argv[1:])}`; {result['date']}", "",
             "| | |", "|---|---:|", *(f"| {k} | {v} |" for k, v in table)]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
