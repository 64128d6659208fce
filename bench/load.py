"""Load benchmark: the real server on loopback under a real HTTP client.

For each bundle (the demo student, and the `base` preset with random weights: timing does not
depend on them), a 100,000-item index is made: the demo test images and their captions,
plus synthetic items (random unit vectors pointing at those same image files) up to 100k.
Then `dsmd serve` is started as its own process and measured:

  cold start     process start -> /readyz answers 200, and the server's resident memory
  text queries   GET /search?text=...&k=10, unique texts (no cache hits), concurrency 1, 8, 32
  image queries  POST /search/image (multipart PNG), concurrency 1, 8, 32
  overhead       HTTP p50 at concurrency 1 / (bare encoder + search p50, same machine, same run)

Errors (non-2xx, timeouts) are counted. Writes bench/results/load/{results.json,table.md}.

    .venv/bin/python bench/load.py              # after make demo
    .venv/bin/python bench/load.py --presets demo --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

WORDS = ["red", "blue", "green", "yellow", "small", "big", "circle", "square", "star", "triangle", "left of", "above"]


def texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"a {rng.choice(WORDS[:4])} {rng.choice(WORDS[6:10])} {rng.choice(WORDS[10:])} a {rng.choice(WORDS[4:6])} "
            f"{rng.choice(WORDS[6:10])} #{i}" for i in range(n)]


def make_bundle(preset: str, out: Path, demo_bundle: Path, variant: str = "fp32", data: Path | None = None) -> Path:
    """The demo bundle as it is, or a random-weight `base` student exported the same way."""
    if preset == "demo":
        return demo_bundle
    import torch

    from dsmd.distill.student import create_student
    from dsmd.export.onnx import ExportCfg, export, model_encoders

    torch.manual_seed(0)
    model, tok = create_student(preset, 768, captions=texts(2000), log=lambda *a: None)
    # a variant is built only with a recall check; with random weights that check is at chance for
    # both fp32 and the variant, so it passes without meaning anything: this bundle is for timing only
    variants = () if variant == "fp32" else (variant,)
    export(model_encoders(model.eval(), tok), out, data=data if variants else None,
           cfg=ExportCfg(variants=variants, max_drop=600.0), log=lambda *a: None)
    return out


def make_index(bundle_path: Path, data: Path, out: Path, size: int) -> Path:
    """The demo test split indexed for real, then synthetic items up to `size`."""
    import hashlib

    from dsmd.bundle import Bundle
    from dsmd.index.build import add_images, dataset_sources, finalize
    from dsmd.index.db import IndexDB, NewItem

    b = Bundle(bundle_path)
    sources = dataset_sources(data, split="test")
    add_images(out, b, sources, progress=False)
    db = IndexDB(out / "items.sqlite")
    rng = np.random.default_rng(0)
    have = db.count()
    for start in range(have, size, 5000):
        m = min(5000, size - start)
        v = rng.normal(size=(m, b.dim)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        db.replace([NewItem(f"{sources[(start + i) % len(sources)].uri}#synthetic{start + i}",
                            hashlib.sha256(f"synthetic{start + i}".encode()).hexdigest(), 64, 64, [], v[i])
                    for i in range(m)])
    db.close()
    finalize(out, b, progress=False)  # the kind `dsmd index build` would choose
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


async def load(url: str, make_request, concurrency: int, seconds: float) -> dict:
    import httpx

    lat, errors, count = [], 0, 0
    t_end = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        async def worker(w: int) -> None:
            nonlocal errors, count
            i = w
            while time.perf_counter() < t_end:
                t0 = time.perf_counter()
                try:
                    r = await make_request(client, i)
                    if r.status_code >= 300:
                        errors += 1
                except Exception:  # noqa: BLE001 - a failed request is an error, counted
                    errors += 1
                lat.append(time.perf_counter() - t0)
                count += 1
                i += concurrency

        t0 = time.perf_counter()
        await asyncio.gather(*[worker(w) for w in range(concurrency)])
        wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": count, "errors": errors, "qps": count / wall,
            "p50_ms": 1000 * statistics.median(lat), "p99_ms": 1000 * float(np.percentile(lat, 99))}


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


def bench_preset(preset: str, a, work: Path) -> dict:
    import httpx

    variant = a.variant if preset != "demo" else "fp32"
    bundle = make_bundle(preset, work / f"bundle-{preset}", Path(a.bundle), variant, Path(a.data))
    index = make_index(bundle, Path(a.data), work / f"index-{preset}", a.items)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "dsmd.cli", "serve", "--bundle", str(bundle), "--index", str(index),
                             "--port", str(port), "--variant", variant], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "TQDM_DISABLE": "1"})
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.perf_counter() - t0 > 120:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    cold = time.perf_counter() - t0
    rss_ready = rss_mib(proc.pid)
    qs = texts(200_000, seed=1)
    image = sorted((Path(a.data) / "images").glob("*.png"))[0].read_bytes()
    result = {"preset": preset, "variant": variant, "items": a.items, "cold_start_s": cold, "rss_ready_mib": rss_ready, "text": [],
              "image": []}
    try:
        for c in a.concurrency:
            r = asyncio.run(load(url, lambda cl, i: cl.get("/search", params={"text": qs[i], "k": 10}), c, a.seconds))
            result["text"].append(r)
            print(f"{preset:5s} text  c={c:<3d} {r['qps']:7.1f} req/s  p50 {r['p50_ms']:6.1f} ms  p99 {r['p99_ms']:6.1f} ms"
                  f"  errors {r['errors']}", flush=True)
        for c in a.concurrency:
            r = asyncio.run(load(url, lambda cl, i: cl.post("/search/image", params={"k": 10},
                                                             files={"file": ("q.png", image, "image/png")}),
                                 c, a.seconds))
            result["image"].append(r)
            print(f"{preset:5s} image c={c:<3d} {r['qps']:7.1f} req/s  p50 {r['p50_ms']:6.1f} ms  p99 {r['p99_ms']:6.1f} ms"
                  f"  errors {r['errors']}", flush=True)
        result["rss_after_mib"] = rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)
    result["bare"] = bare(bundle, index, texts(1000, seed=2), image, variant)
    result["overhead_text"] = result["text"][0]["p50_ms"] / result["bare"]["text_p50_ms"]
    result["overhead_image"] = result["image"][0]["p50_ms"] / result["bare"]["image_p50_ms"]
    print(f"{preset:5s} bare encoder+search p50: text {result['bare']['text_p50_ms']:.2f} ms, image "
          f"{result['bare']['image_p50_ms']:.2f} ms; HTTP overhead x{result['overhead_text']:.2f} (text), "
          f"x{result['overhead_image']:.2f} (image); cold start {cold:.2f} s, RSS {rss_ready:.0f} MiB", flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default="artifacts/bundle")
    p.add_argument("--data", default="data/world")
    p.add_argument("--presets", nargs="+", default=["base", "demo"])
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--seconds", type=float, default=10.0, help="per load level")
    p.add_argument("--variant", default="fp32", help="bundle variant for the base preset (int8: built for timing)")
    p.add_argument("--out", default="bench/results/load")
    a = p.parse_args()
    os.chdir(ROOT)
    work = Path(tempfile.mkdtemp(prefix="dsmd-load-"))
    try:
        results = [bench_preset(preset, a, work) for preset in a.presets]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d"), "seconds_per_level": a.seconds}
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    md = [f"Command: `.venv/bin/python bench/load.py {' '.join(sys.argv[1:])}`; {meta['date']}; "
          f"{meta['cores']} cores; {a.items:,}-item index (kind chosen by size, as dsmd index build does); client and server on the same machine\n",
          "| bundle | query | concurrency | req/s | p50 ms | p99 ms | errors |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        for kind in ("text", "image"):
            for x in r[kind]:
                md.append(f"| {r['preset']} {r['variant']} | {kind} | {x['concurrency']} | {x['qps']:.1f} | {x['p50_ms']:.1f} | "
                          f"{x['p99_ms']:.1f} | {x['errors']} |")
    md += ["", "| bundle | cold start s | RSS at ready MiB | RSS after load MiB | bare text p50 ms | HTTP/bare text | "
               "bare image p50 ms | HTTP/bare image |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        md.append(f"| {r['preset']} {r['variant']} | {r['cold_start_s']:.2f} | {r['rss_ready_mib']:.0f} | {r['rss_after_mib']:.0f} | "
                  f"{r['bare']['text_p50_ms']:.2f} | {r['overhead_text']:.2f} | {r['bare']['image_p50_ms']:.2f} | "
                  f"{r['overhead_image']:.2f} |")
    (out / "table.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
