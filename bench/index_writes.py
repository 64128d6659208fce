"""Live index writes: one POST /items (add) and one DELETE /items/{id} (remove) on an HNSW index of
N vectors of dim 768, against the full rebuild (finalize) that every upload used to cost.

For each N, through the project's own code path: N clustered unit vectors written as rows of
items.sqlite (IndexDB.replace), `finalize(kind="hnsw")` timed (the old cost of one upload:
build, tune, write), the folder opened (SearchIndex: load + reconcile timed), then `--adds`
calls of `SearchIndex.add_image` with distinct small PNGs and `--removes` calls of
`SearchIndex.remove`, each timed alone; every add is followed by a search that must find it.
Search latency (one query, k=10) is measured before the writes and after them (live segments
and tombstones included).

Embedding is excluded: a stand-in encoder (a fixed random projection of 8x8 pixels to 768 dims,
well under a millisecond) plays the bundle, so the figures are those of the index (PNG decode,
the file stored, one SQLite transaction, one FAISS add). A real bundle adds its image encoder's
time per upload (bench/latency.py measures it).

    .venv/bin/python bench/index_writes.py --sizes 100000 300000 1000000

Writes bench/results/index_writes/{results.json,table.md} (after each size, so a long run keeps
what it measured). Needs about 2.5x (4 + 3.4) KB per vector of disk and 3.5 KB of memory.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ROOT, machine
from PIL import Image


class StandInBundle:
    """What the index reads of a bundle; the encoder is a fixed random projection (no model)."""

    def __init__(self, dim: int):
        self.dim, self.variant, self.name, self.path = dim, "fp32", "stand-in", Path("/nonexistent/stand-in")
        self.manifest = {"files": {"image.onnx": "0" * 64, "text.onnx": "1" * 64}}
        self.w = np.random.default_rng(0).normal(size=(3 * 8 * 8, dim)).astype(np.float32)

    def transform(self, img: Image.Image) -> np.ndarray:
        return np.asarray(img.convert("RGB").resize((8, 8)), np.float32).transpose(2, 0, 1) / 255 - 0.5

    def encode_pixels(self, x: np.ndarray) -> np.ndarray:
        v = x.reshape(len(x), -1) @ self.w
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_rows(path: Path, n: int, bundle: StandInBundle, batch: int = 10_000) -> float:
    """N clustered unit vectors as rows (1,000 clusters, as bench/index_bench.py); returns seconds."""
    from dsmd.index.build import bundle_fingerprint
    from dsmd.index.db import IndexDB, NewItem

    t0 = time.perf_counter()
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(1000, bundle.dim)).astype(np.float32)
    db = IndexDB(path / "items.sqlite", bundle.dim, bundle_fingerprint(bundle), bundle.variant)
    for start in range(0, n, batch):
        m = min(batch, n - start)
        x = centres[rng.integers(0, 1000, m)] + 0.6 * rng.normal(size=(m, bundle.dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        db.replace([NewItem(f"bench://{start + i}", f"{start + i:064x}", 8, 8, [], v) for i, v in enumerate(x)])
    db.close()
    return time.perf_counter() - t0


def stats(times: list[float]) -> dict:
    ms = 1000 * np.asarray(times)
    return {"n": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(ms.max()), "mean_ms": float(ms.mean())}


def search_latency(s, queries: np.ndarray) -> dict:
    times = []
    for q in queries:
        t = time.perf_counter()
        s.search(q[None], 10)
        times.append(time.perf_counter() - t)
    return stats(times)


def run(n: int, dim: int, adds: int, removes: int, work: Path) -> dict:
    import faiss

    from dsmd.index.build import finalize
    from dsmd.index.search import SearchIndex

    faiss.omp_set_num_threads(1)  # as the server searches and writes: one thread per request
    bundle = StandInBundle(dim)
    path = work / f"hnsw-{n}"
    path.mkdir(parents=True)
    rows_s = write_rows(path, n, bundle)
    print(f"n={n:,}: rows written in {rows_s:.0f} s", flush=True)
    t0 = time.perf_counter()
    manifest = finalize(path, bundle, kind="hnsw", progress=False)  # builds on every core
    finalize_s = time.perf_counter() - t0
    print(f"n={n:,}: finalize (the old cost of one upload) {finalize_s:.0f} s", flush=True)
    faiss.omp_set_num_threads(1)
    t0 = time.perf_counter()
    s = SearchIndex(path, threads=1)
    open_s = time.perf_counter() - t0
    queries = np.random.default_rng(2).normal(size=(200, dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    before = search_latency(s, queries)
    add_t, missed = [], 0
    for i in range(adds):
        data = png(1_000_000 + i)
        t = time.perf_counter()
        item = s.add_image(data, bundle)
        add_t.append(time.perf_counter() - t)
        missed += s.search(bundle.encode_pixels(bundle.transform(Image.open(io.BytesIO(data)))[None]), 1)[0][0].id \
            != item["id"]
    victims = np.random.default_rng(3).choice(np.arange(1, n + 1), removes, replace=False)
    remove_t = []
    for v in victims:
        t = time.perf_counter()
        assert s.remove(int(v))
        remove_t.append(time.perf_counter() - t)
    after = search_latency(s, queries)
    returned = {h.id for row in s.search(queries, 10) for h in row}
    row = {"n": n, "dim": dim, "kind": "hnsw", "params": manifest["images"]["index"]["params"],
           "search": manifest["images"]["index"]["search"], "recall_at_10": manifest["images"]["index"]["recall_at_10"],
           "rows_write_s": rows_s, "finalize_s": finalize_s, "open_s": open_s,
           "add": stats(add_t), "remove": stats(remove_t), "adds_not_found_first": int(missed),
           "removed_returned": len(returned & set(victims.tolist())),
           "search_before": before, "search_after": after, "faiss_bytes": manifest["images"]["bytes"],
           "sqlite_bytes": (path / "items.sqlite").stat().st_size}
    print(f"n={n:,}: add p50 {row['add']['p50_ms']:.1f} ms max {row['add']['max_ms']:.1f} ms; remove p50 "
          f"{row['remove']['p50_ms']:.1f} ms max {row['remove']['max_ms']:.1f} ms; open {open_s:.1f} s; search p50 "
          f"{before['p50_ms']:.2f} -> {after['p50_ms']:.2f} ms", flush=True)
    s.close()
    shutil.rmtree(path)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--adds", type=int, default=200)
    p.add_argument("--removes", type=int, default=200)
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--out", default="bench/results/index_writes")
    a = p.parse_args()
    os.chdir(ROOT)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work or tempfile.mkdtemp(prefix="dsmd-writes-"))
    results = {"meta": {"command": "bench/index_writes.py " + " ".join(sys.argv[1:]),
                        "machine": machine(),
                        "date": time.strftime("%Y-%m-%d"),
                        "embedding": "excluded (stand-in encoder: random projection of 8x8 pixels)"}, "runs": []}
    for n in a.sizes:
        results["runs"].append(run(n, a.dim, a.adds, a.removes, work))
        (out / "results.json").write_text(json.dumps(results, indent=2))
        (out / "table.md").write_text(table(results))
    print(table(results))


def table(results: dict) -> str:
    md = [f"Command: `.venv/bin/python {results['meta']['command']}`; {results['meta']['cores']} cores; "
          f"{results['meta']['date']}; embedding {results['meta']['embedding']}\n",
          "| vectors | finalize (old per-upload cost) s | open s | add p50 / p99 / max ms | "
          "remove p50 / p99 / max ms | "
          "search p50 before / after writes ms |", "|---:|---:|---:|---:|---:|---:|"]
    for r in results["runs"]:
        md.append(f"| {r['n']:,} | {r['finalize_s']:.0f} | {r['open_s']:.1f} | "
                  f"{r['add']['p50_ms']:.1f} / {r['add']['p99_ms']:.1f} / {r['add']['max_ms']:.1f} | "
                  f"{r['remove']['p50_ms']:.1f} / {r['remove']['p99_ms']:.1f} / {r['remove']['max_ms']:.1f} | "
                  f"{r['search_before']['p50_ms']:.2f} / {r['search_after']['p50_ms']:.2f} |")
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    main()
