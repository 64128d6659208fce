"""Load benchmark: the real server on loopback under wrk, a C load generator (`apt-get install wrk`).

For each bundle (the demo student, and the `base` preset with random weights: timing does not
depend on them), a 100,000-item index is made: the demo test images and their captions,
plus synthetic items (clustered unit vectors, bench/index_bench.py's generator, pointing at
those same image files) up to 100k.
First the bare encoder + search is timed in this process (nothing else running), then
`dsmd serve` is started as its own process and measured with wrk:

  cold start     process start -> /readyz answers 200, and the server's resident memory
  text           GET /search?text=...&k=10, a unique text per request (no cache hits): p50 at
                 concurrency 1, req/s at 8, a soak at 32 (zero errors), and 256 (past capacity:
                 only fast 503s, no timeouts)
  image          POST /search/image (multipart PNG) at concurrency 1, 8 and 16: answered images/s
                 and the share of 503s (answered images/s must not fall as concurrency rises)
  floods         at concurrency 64, each after resetting the resident peak (/proc/PID/clear_refs):
                 maximum-size JPEG uploads, 9400x9400 progressive JPEGs, 13 MiB JSON bodies of
                 [{},{},...], and uncached thumbnails; each flood's peak (VmHWM) against the ceiling
                 the server states in /info
  overhead       HTTP text p50 at concurrency 1 / bare encode+search p50, same run

Writes bench/results/load/{results.json,table.md}.

    .venv/bin/python bench/load.py              # after make demo
    .venv/bin/python bench/load.py --presets demo --seconds 5
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import wrk
from common import ROOT, clustered, machine, machine_line, make_bundle, unique_texts


def make_index(bundle_path: Path, data: Path, out: Path, size: int, variant: str = "fp32") -> Path:
    """The demo test split indexed for real, then synthetic items up to `size`, with the vectors of the
    variant the server will run (an index refuses another variant's queries). HNSW, as the size
    would choose, tuned to the recall target as a build does. The synthetic vectors are clustered,
    as in the index benchmarks. Uniformly random 768-d vectors (this benchmark until 2026-12-02)
    are a worst case no real collection has: HNSW falls short of the target on them at the
    largest efSearch tried (bench/tuning_shortfall.py: recall@10 0.77), which the server then
    searches with; search took 22 of the 72 ms of a bare base fp32 text query there."""
    import hashlib

    from dsmd.bundle import Bundle
    from dsmd.index.build import add_images, dataset_sources, finalize
    from dsmd.index.db import IndexDB, NewItem

    b = Bundle(bundle_path, variant)
    sources = dataset_sources(data, split="test")
    add_images(out, b, sources, progress=False)
    db = IndexDB(out / "items.sqlite")
    have = db.count()
    synthetic = clustered(max(size - have, 0), b.dim, seed=0)
    for start in range(have, size, 5000):
        m = min(5000, size - start)
        v = synthetic[start - have:start - have + m]
        db.replace([NewItem(f"{sources[(start + i) % len(sources)].uri}#synthetic{start + i}",
                            hashlib.sha256(f"synthetic{start + i}".encode()).hexdigest(), 64, 64, [], v[i])
                    for i in range(m)])
    db.close()
    finalize(out, b, kind="hnsw", progress=False)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bare(bundle_path: Path, index_path: Path, queries: list[str], image: bytes, variant: str = "fp32",
         n: int = 200) -> dict:
    """Encoder + search without HTTP, one query at a time, same thread settings as the server."""
    import faiss

    from dsmd.bundle import Bundle
    from dsmd.index.search import SearchIndex

    faiss.omp_set_num_threads(1)
    b, s = Bundle(bundle_path, variant), SearchIndex(index_path)
    faiss.omp_set_num_threads(1)
    b.encode_texts(["warm"])

    def timed(fn) -> float:
        out = []
        for i in range(n):
            t0 = time.perf_counter()
            fn(i)
            out.append(time.perf_counter() - t0)
        return 1000 * statistics.median(out)

    text = timed(lambda i: s.search(b.encode_texts([queries[i]]), 10))
    img = timed(lambda i: s.search(b.encode_images([image]), 10))
    enc_only = timed(lambda i: b.encode_texts([queries[i]]))
    return {"text_p50_ms": text, "image_p50_ms": img, "text_encoder_only_p50_ms": enc_only}


def start_server(bundle: Path, index: Path, variant: str) -> tuple[subprocess.Popen, str, float]:
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "dsmd.cli", "serve", "--bundle", str(bundle), "--index", str(index),
                             "--port", str(port), "--variant", variant], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "TQDM_DISABLE": "1"})
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.perf_counter() - t0 > 120:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    return proc, url, time.perf_counter() - t0


def max_size_upload(limit: int, work: Path) -> Path:
    """A multipart body with a JPEG of noise just under the server's upload limit (decoding it is real work)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    side = 2000
    while True:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
        if len(buf.getvalue()) > 0.8 * limit or side > 6000:
            break
        side += 400
    data = buf.getvalue()[:limit] if len(buf.getvalue()) > limit else buf.getvalue()
    path = work / "upload.body"
    path.write_bytes(wrk.multipart(data, "big.jpg", "image/jpeg"))
    return path


def progressive_upload(work: Path) -> Path:
    """A 9400x9400 progressive JPEG of about half a MiB: small on the wire, huge for libjpeg's buffers."""
    from PIL import Image

    side = 9400
    ramp = np.linspace(0, 255, side, dtype=np.uint8)
    img = Image.fromarray(np.stack([np.tile(ramp, (side, 1))] * 3, axis=-1))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=5, progressive=True)
    path = work / "progressive.body"
    path.write_bytes(wrk.multipart(buf.getvalue(), "progressive.jpg", "image/jpeg"))
    return path


def json_bomb(limit: int, work: Path) -> Path:
    """A JSON body of [{},{},...] just under the server's body limit: millions of Python objects if parsed."""
    n = (limit * 4 // 3) // 3
    path = work / "bomb.json"
    path.write_bytes(b"[" + b"{}," * n + b"{}]")
    return path


def reset_peak(pid: int) -> None:
    """VmHWM back to the current resident size, so the next peak belongs to the next load."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def peak_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return float("nan")


def show(preset: str, what: str, r: dict) -> None:
    others = {k: v for k, v in r["statuses"].items() if k != 200}
    errs = {k: v for k, v in r["socket_errors"].items() if v}
    print(f"{preset:5s} {what:14s} c={r['connections']:<3d} {r['req_s']:7.1f} req/s ({r['ok_s']:.1f} ok/s)  "
          f"p50 {r['p50_ms']:6.1f} ms  p99 {r['p99_ms']:6.1f} ms  max {r['max_ms']:6.0f} ms  "
          f"non-200 {others or 0}  socket errors {errs or 0}", flush=True)


def bench_preset(preset: str, a, work: Path) -> dict:
    import httpx

    variant = a.variant if preset != "demo" else "fp32"
    bundle = make_bundle(preset, work / f"bundle-{preset}", Path(a.bundle), variant, Path(a.data))
    index = make_index(bundle, Path(a.data), work / f"index-{preset}", a.items, variant)
    image = sorted((Path(a.data) / "images").glob("*.png"))[0].read_bytes()
    result = {"preset": preset, "variant": variant, "items": a.items,
              "index": json.loads((index / "manifest.json").read_text())["images"]["index"]}
    result["bare"] = bare(bundle, index, unique_texts(1000, seed=2), image, variant)  # alone on the machine
    proc, url, cold = start_server(bundle, index, variant)
    result.update(cold_start_s=cold, rss_ready_mib=rss_mib(proc.pid))
    info = httpx.get(f"{url}/info").json()
    result["memory"] = info["memory"]
    small = work / "small.body"
    small.write_bytes(wrk.multipart(image))
    limit = info["limits"]["max_upload_bytes"]
    big = max_size_upload(limit, work)
    from dsmd.index.build import dataset_sources

    real = len(dataset_sources(Path(a.data), split="test"))  # ids 1..real have files; the rest are synthetic
    runs = [("text", wrk.text_script(), 1, a.seconds), ("text", wrk.text_script(), 8, a.seconds),
            *[("image", wrk.upload_script(small), c, a.seconds) for c in (1, 8, 16)],
            ("text soak", wrk.text_script(), 32, a.soak), ("text overload", wrk.text_script(), 256, a.seconds)]
    floods = [("upload flood", wrk.upload_script(big)),
              ("progressive JPEG flood", wrk.upload_script(progressive_upload(work))),
              ("JSON flood", wrk.upload_script(json_bomb(limit, work), ctype="application/json")),
              ("thumbnail flood", wrk.thumbnail_script(real))]
    try:
        for what, script, c, seconds in runs:
            r = wrk.run(url, script, c, seconds, threads=1 if c <= 8 else 2)
            r["what"] = what
            result.setdefault("runs", []).append(r)
            show(preset, what, r)
        peak_before_floods = peak_mib(proc.pid)
        for what, script in floods:
            reset_peak(proc.pid)
            r = wrk.run(url, script, 64, a.seconds, threads=2)
            r.update(what=what, peak_mib=peak_mib(proc.pid))
            result["runs"].append(r)
            show(preset, what, r)
            print(f"{preset:5s} {what}: resident peak {r['peak_mib']:.0f} MiB", flush=True)
        result["rss_after_mib"] = rss_mib(proc.pid)
        result["rss_peak_mib"] = max(peak_before_floods, *(r.get("peak_mib", 0) for r in result["runs"]))
        result["still_healthy"] = httpx.get(f"{url}/readyz", timeout=5).status_code == 200
    finally:
        proc.terminate()
        proc.wait(10)
    first = {r["what"]: r for r in result["runs"] if r["connections"] in (1,)}
    result["overhead_text"] = first["text"]["p50_ms"] / result["bare"]["text_p50_ms"]
    result["overhead_image"] = first["image"]["p50_ms"] / result["bare"]["image_p50_ms"]
    ceiling = (result["memory"]["ceiling_bytes"] or 0) / 2**20
    print(f"{preset:5s} bare encoder+search p50: text {result['bare']['text_p50_ms']:.2f} ms, image "
          f"{result['bare']['image_p50_ms']:.2f} ms; HTTP/bare x{result['overhead_text']:.2f} (text), "
          f"x{result['overhead_image']:.2f} (image); cold start {cold:.2f} s; RSS ready {result['rss_ready_mib']:.0f} "
          f"MiB, after {result['rss_after_mib']:.0f} MiB, peak {result['rss_peak_mib']:.0f} MiB (ceiling "
          f"{ceiling:.0f} MiB)", flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default="artifacts/bundle")
    p.add_argument("--data", default="data/world")
    p.add_argument("--presets", nargs="+", default=["base", "demo"])
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--soak", type=float, default=60.0, help="seconds of the concurrency-32 soak")
    p.add_argument("--seconds", type=float, default=10.0, help="per load level")
    p.add_argument("--variant", default="fp32", help="bundle variant for the base preset (int8: built for timing)")
    p.add_argument("--out", default="bench/results/load")
    a = p.parse_args()
    if not wrk.available():
        sys.exit("bench/load.py drives wrk: install it (apt-get install wrk, or make bench)")
    os.chdir(ROOT)
    work = Path(tempfile.mkdtemp(prefix="dsmd-load-"))
    try:
        results = [bench_preset(preset, a, work) for preset in a.presets]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "seconds_per_level": a.seconds}
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    md = [f"Command: `.venv/bin/python bench/load.py {' '.join(sys.argv[1:])}`; {meta['date']}; "
          f"{machine_line()}; {a.items:,}-item index (HNSW, the kind its size gets); wrk "
          f"and the server on the same machine\n",
          "| bundle | load | connections | req/s | ok/s | p50 ms | p99 ms | max ms | non-200 | socket errors |",
          "|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in results:
        for x in r["runs"]:
            others = {k: v for k, v in x["statuses"].items() if k != 200} or "-"
            errs = {k: v for k, v in x["socket_errors"].items() if v} or "-"
            md.append(f"| {r['preset']} {r['variant']} | {x['what']} | {x['connections']} | {x['req_s']:.1f} "
                      f"| {x['ok_s']:.1f} | {x['p50_ms']:.1f} | {x['p99_ms']:.1f} | {x['max_ms']:.0f} "
                      f"| {others} | {errs} |")
    md += ["", "| bundle | cold start s | RSS ready MiB | RSS after MiB | RSS peak MiB | ceiling MiB "
               "| bare text p50 ms "
               "(encoder alone) | HTTP/bare text | bare image p50 ms | HTTP/bare image |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        md.append(f"| {r['preset']} {r['variant']} | {r['cold_start_s']:.2f} | {r['rss_ready_mib']:.0f} | "
                  f"{r['rss_after_mib']:.0f} | {r['rss_peak_mib']:.0f} "
                  f"| {(r['memory']['ceiling_bytes'] or 0) / 2**20:.0f} | "
                  f"{r['bare']['text_p50_ms']:.2f} ({r['bare']['text_encoder_only_p50_ms']:.2f}) | "
                  f"{r['overhead_text']:.2f} | {r['bare']['image_p50_ms']:.2f} | {r['overhead_image']:.2f} |")
    md += ["", "Images answered per second as concurrency rises (they must not fall), and each flood's "
               "resident peak (measured after resetting the peak) against the stated ceiling:", "",
           "| bundle | image c=1 ok/s | c=8 ok/s (503 share) | c=16 ok/s (503 share) | "
           + " | ".join(f"{f} peak MiB" for f in ("upload", "progressive JPEG", "JSON", "thumbnail"))
           + " | ceiling MiB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        img = {x["connections"]: x for x in r["runs"] if x["what"] == "image"}
        share = lambda x: x["statuses"].get(503, 0) / max(x["requests"], 1)  # noqa: E731
        peaks = [next((x["peak_mib"] for x in r["runs"] if x["what"] == f"{f} flood"), float("nan"))
                 for f in ("upload", "progressive JPEG", "JSON", "thumbnail")]
        md.append(f"| {r['preset']} {r['variant']} | {img[1]['ok_s']:.1f} | {img[8]['ok_s']:.1f} ({share(img[8]):.0%}) "
                  f"| {img[16]['ok_s']:.1f} ({share(img[16]):.0%}) | " + " | ".join(f"{p:.0f}" for p in peaks)
                  + f" | {(r['memory']['ceiling_bytes'] or 0) / 2**20:.0f} |")
    md.append("")
    for r in results:
        ix = r["index"]
        md.append(f"- {r['preset']} {r['variant']}: image index {ix['kind']} {ix['search'] or ''}, recall@10 against "
                  f"exact search {ix['recall_at_10']:.3f}")
    (out / "table.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
