"""Embedding throughput: `dsmd index embed` on a local Ray cluster beside the single-process build.

Same images, same bundle, same machine, one after the other in one run: the single-process path
(`add_images`: decode threads ahead of one ONNX Runtime session with every core) and the Ray
path (decode tasks, encoder actors with one thread each, Parquet shards). Index finalize is
left out of both: this measures embedding only.

    .venv/bin/python bench/ray_embed_bench.py --bundle artifacts/bundle --data data/world --split test
    .venv/bin/python bench/ray_embed_bench.py --preset base --limit 200     # random-weight base student

The demo encoder (64 px) costs so little that the run measures Ray's overheads; the base preset
(ViT-B/16 at 224 px, random weights: timing does not depend on them) measures the encoder.

Writes bench/results/ray-embed-{demo,base}/{results.json,table.md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default="artifacts/bundle")
    p.add_argument("--data", default="data/world")
    p.add_argument("--split", default="test")
    p.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    p.add_argument("--preset", choices=["demo", "base"], default="demo",
                   help="base: a random-weight base student exported to /tmp/dsmd-base-bundle (kept for reruns)")
    p.add_argument("--limit", type=int, help="only the first N images")
    p.add_argument("--out", help="default: bench/results/ray-embed-PRESET")
    a = p.parse_args()

    from dsmd.bundle import Bundle
    from dsmd.cpus import usable_cpus
    from dsmd.index.build import add_images, dataset_sources
    from dsmd.index.ray_embed import embed

    sources = dataset_sources(a.data, split=a.split)[: a.limit]
    if a.preset == "base":
        from common import make_bundle

        a.bundle = "/tmp/dsmd-base-bundle"
        if not (Path(a.bundle) / "manifest.json").exists():
            make_bundle("base", Path(a.bundle), Path(a.bundle))
    bundle = Bundle(a.bundle)
    rows = []
    tmp = Path(tempfile.mkdtemp())
    try:
        t0 = time.perf_counter()
        add_images(tmp / "single", bundle, sources, workers=2, progress=False)
        dt = time.perf_counter() - t0
        rows.append({"what": f"single process (decode threads + one session, {usable_cpus()} threads)",
                     "seconds": dt, "images_per_s": len(sources) / dt})
        print(rows[-1], flush=True)
        for actors in a.actors:
            t0 = time.perf_counter()
            m = embed(tmp / f"ray{actors}", a.bundle, sources, actors=actors, threads=1, progress=False)
            dt = time.perf_counter() - t0
            rows.append({"what": f"Ray, local, {actors} encoder actor(s) x 1 thread (Ray start-up included)",
                         "seconds": dt, "images_per_s": len(sources) / dt, "inside_ray_s": m["seconds"]})
            print(rows[-1], flush=True)
    finally:
        shutil.rmtree(tmp)
    meta = {"images": len(sources), "bundle": bundle.name, "image_size": bundle.preprocess.size, "cores": usable_cpus(),
            "date": time.strftime("%Y-%m-%d"), "machine": machine()}
    out = ROOT / (a.out or f"bench/results/ray-embed-{a.preset}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    base = rows[0]["images_per_s"]
    lines = [(f"Command: `.venv/bin/python bench/ray_embed_bench.py {' '.join(sys.argv[1:])}`; {meta['images']} "
              f"images ({meta['bundle']}, {meta['image_size']} px), {meta['cores']} cores; {meta['date']}"), "",
             "| path | seconds | images/s | vs single process |", "|---|---:|---:|---:|"]
    lines += [f"| {r['what']} | {r['seconds']:.1f} | {r['images_per_s']:.1f} | {r['images_per_s'] / base:.2f}x |"
              for r in rows]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
