"""What a build does when the size-chosen kind cannot reach the recall target.

Random unit vectors have no neighbourhood structure for a graph to follow: HNSW on 100k random
768-d vectors stopped at recall@10 0.65 with efSearch 1024 (issue 13). This writes n such vectors
into an index folder's SQLite and runs the real finalize, which tries the next kind that fits;
it prints every attempt with its recall and time.

    .venv/bin/python bench/tuning_shortfall.py --n 100000 --dim 768

Writes bench/results/tuning-shortfall/{results.json,table.md}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from common import ROOT, machine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--out", default="bench/results/tuning-shortfall")
    a = p.parse_args()

    from dsmd.index.build import finalize
    from dsmd.index.db import IndexDB, NewItem

    # finalize reads only the bundle's identity from it: name, path, files, dim, variant
    bundle = SimpleNamespace(name="random", path=Path("random"), dim=a.dim, variant="fp32",
                             manifest={"files": {"image.onnx": "-", "text.onnx": "-"}})
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        db = IndexDB(Path(tmp) / "items.sqlite", a.dim, "random", "fp32")
        for start in range(0, a.n, 10_000):
            x = rng.standard_normal((min(10_000, a.n - start), a.dim)).astype(np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            db.replace([NewItem(f"random/{start + i}", f"{start + i:064x}", 1, 1, [], v) for i, v in enumerate(x)])
        db.close()
        t0 = time.time()
        m = finalize(tmp, bundle, progress=True)["images"]
        seconds = time.time() - t0
    result = {"n": a.n, "dim": a.dim, "tried": m["tried"], "kept": m["index"]["kind"],
              "recall_at_10": m["index"]["recall_at_10"], "search": m["index"]["search"], "shortfall": m["shortfall"],
              "finalize_s": round(seconds, 1), "machine": machine(),
              "date": time.strftime("%Y-%m-%d")}
    out = ROOT / a.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    lines = [f"Command: `.venv/bin/python bench/tuning_shortfall.py --n {a.n} --dim {a.dim}`; {result['date']}", "",
             "| attempt | kind | recall@10 (target 0.95) | seconds |", "|---:|---|---:|---:|"]
    lines += [f"| {i + 1} | {t['kind']} | {t['recall_at_10']:.3f} | {t['seconds']:.0f} |"
              for i, t in enumerate(m["tried"])]
    lines += ["", f"Kept: {result['kept']} ({result['search']}), recall@10 {result['recall_at_10']:.3f}; "
              f"finalize {seconds:.0f} s" + (f"; {m['shortfall']}" if m["shortfall"] else "")]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
