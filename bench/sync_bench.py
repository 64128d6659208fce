"""`dsmd index sync` on a folder of N photos with 1% of them changed: seconds, and what was embedded.

A folder of N generated PNGs (coloured shapes, 128 px, in 100 sub-folders) is synced into an empty
index with a random-weight student of the `demo` preset (timing only: its vectors mean nothing), then
synced again unchanged, then again after 1% of the files changed: a quarter new, a quarter edited
(other bytes at the same path), a quarter moved to another sub-folder, a quarter deleted. Each sync
is timed whole (scan, hashes, embedding, rebuild of the search files); the image vector rows stored
before and after show what was embedded.

    .venv/bin/python bench/sync_bench.py --n 10000

Writes bench/results/sync/{results.json,table.md} (or --out).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ROOT, machine, machine_line, unique_texts
from PIL import Image, ImageDraw


def photo(seed: int, path: Path) -> None:
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (128, 128), tuple(int(c) for c in rng.integers(0, 256, 3)))
    d = ImageDraw.Draw(img)
    for _ in range(3):
        x, y = (int(v) for v in rng.integers(10, 118, 2))
        r = int(rng.integers(6, 30))
        shape = d.ellipse if rng.random() < 0.5 else d.rectangle
        shape((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "PNG")


def demo_bundle(out: Path) -> Path:
    import torch

    from dsmd.distill.student import create_student
    from dsmd.export.onnx import ExportConfig, export, model_encoders

    torch.manual_seed(0)
    model, tok = create_student("demo", 256, captions=unique_texts(2000), log=lambda *a: None)
    export(model_encoders(model.eval(), tok), out, cfg=ExportConfig(variants=()), log=lambda *a: None)
    return out


def vector_rows(index: Path, dim: int) -> int:
    return sum(f.stat().st_size for f in (index / "vectors").glob("items*.f16")) // (2 * dim)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--changed", type=float, default=0.01)
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/sync")
    a = p.parse_args()

    from dsmd.bundle import Bundle
    from dsmd.index.sync import sync

    work = Path(tempfile.mkdtemp(prefix="sync-bench-"))
    try:
        root, index = work / "photos", work / "index"
        t0 = time.perf_counter()
        for i in range(a.n):
            photo(i, root / f"{i % 100:02d}" / f"{i:06d}.png")
        made = time.perf_counter() - t0
        bundle = Bundle(demo_bundle(work / "bundle"))
        runs = []

        def run(what: str) -> None:
            before = vector_rows(index, bundle.dim) if index.exists() else 0
            t = time.perf_counter()
            r = sync(index, bundle, root, progress=False)
            seconds = time.perf_counter() - t
            runs.append({"sync": what, "seconds": round(seconds, 2), "embedded_vectors":
                         vector_rows(index, bundle.dim) - before, **r.to_json()})
            print(f"{what}: {seconds:.1f} s; {r.line()}", flush=True)

        run(f"first, {a.n:,} files")
        run("again, nothing changed")
        k = max(4, int(a.n * a.changed)) // 4
        rng = np.random.default_rng(1)
        picked = rng.choice(a.n, 3 * k, replace=False)
        for j, i in enumerate(picked[:k]):  # edited: other bytes at the same path
            photo(10 * a.n + j, root / f"{i % 100:02d}" / f"{i:06d}.png")
        for i in picked[k:2 * k]:  # moved
            src = root / f"{i % 100:02d}" / f"{i:06d}.png"
            dest = root / "moved" / src.name
            dest.parent.mkdir(exist_ok=True)
            shutil.move(src, dest)
        for i in picked[2 * k:]:  # deleted
            (root / f"{i % 100:02d}" / f"{i:06d}.png").unlink()
        for j in range(k):  # new
            photo(20 * a.n + j, root / "new" / f"n{j:06d}.png")
        run(f"after {4 * k} changes ({k} new, {k} edited, {k} moved, {k} deleted)")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    a.out.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine(), "n": a.n, "generate_seconds": round(made, 1), "bundle": "demo preset, random "
              "weights (timing only)", "runs": runs}
    (a.out / "results.json").write_text(json.dumps(result, indent=2))
    lines = [f"Command: `.venv/bin/python bench/sync_bench.py --n {a.n}`; {machine_line()}", "",
             "| sync | seconds | embedded (vector rows added) | added | changed | moved | removed | unchanged |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['sync']} | {r['seconds']} | {r['embedded_vectors']} | {r['added']} | {r['changed']} | "
              f"{r['moved']} | {r['removed']} | {r['unchanged']} |" for r in runs]
    (a.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
