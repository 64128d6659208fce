"""Text-query recall of a captionless image index, tuned as before issue 26 and as now.

A collection without captions used to be tuned with its own image vectors as queries, but it
is asked in words, and text vectors sit elsewhere in the embedding space. This renders N new
scenes of the demo world (seed 1: none of them trained on), embeds them with a bundle into an
index with no captions, and finalizes it twice with the real `finalize`: once as before (image
queries only: the bundle is passed without its text encoder) and once as now (the built-in
tuning queries of index/tune_queries.py too). The scenes' own captions, which neither the index
nor the tuner saw, are then the text queries that measure recall@10 against exact search.

    .venv/bin/python bench/captionless_tuning.py --bundle artifacts/bundle --n 100000

Writes bench/results/captionless-tuning/{results.json,table.md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from common import ROOT, machine, machine_line
from tqdm import tqdm


def embed_world(bundle, n: int, seed: int, queries: int, batch: int = 256):
    """(n, dim) image vectors of scenes 0..n-1 of the world of `seed`, and one caption each of
    `queries` of them, spread evenly (the held-out text queries), with the image index of each."""
    from dsmd.world import scene_pair

    step = max(1, n // queries)
    vectors, images, captions, owners = [], [], [], []
    rng = np.random.default_rng(seed)
    bar = tqdm(total=n, desc="render+embed", unit="img")
    for first in range(0, n, 2):
        for i, (_, image, caps) in enumerate(scene_pair(seed, first)):
            images.append(image)
            if (first + i) % step == 0 and len(captions) < queries:
                captions.append(caps[int(rng.integers(len(caps)))])
                owners.append(first + i)
        if len(images) >= batch or first + 2 >= n:
            vectors.append(bundle.encode_images(images))
            bar.update(len(images))
            images = []
    bar.close()
    return np.concatenate(vectors)[:n], captions, owners


def write_rows(path: Path, vectors: np.ndarray, bundle) -> None:
    from dsmd.index.db import IndexDB, NewItem
    from dsmd.index.identity import bundle_fingerprint

    db = IndexDB(path / "items.sqlite", vectors.shape[1], bundle_fingerprint(bundle), bundle.variant)
    for start in range(0, len(vectors), 10_000):
        db.replace([NewItem(f"world/{start + i:06d}.png", f"{start + i:064x}", 64, 64, [], v)
                    for i, v in enumerate(vectors[start:start + 10_000])])
    db.close()


def measure(index, kind: str, search: dict, sets: dict, vectors_of) -> dict:
    """Recall@10 of each query set at `search`, and the mean milliseconds of a text query."""
    from dsmd.index import ann

    ann.apply_search_params(index, kind, search)
    out = {}
    for name, (q, kth) in sets.items():
        t0 = time.perf_counter()
        _, ids = index.search(q, 10)
        ms = (time.perf_counter() - t0) * 1000 / len(q)
        out[name] = round(ann.recall_at_k(ids, q, kth, vectors_of, index.ntotal), 4)
        out[f"{name}_ms"] = round(ms, 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default="artifacts/bundle")
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=1000, help="held-out captions used as text queries")
    p.add_argument("--seed", type=int, default=1, help="world seed of the indexed scenes (the demo trains on 0)")
    p.add_argument("--out", default="bench/results/captionless-tuning")
    a = p.parse_args()

    from dsmd.bundle import Bundle
    from dsmd.index import ann
    from dsmd.index.build import finalize
    from dsmd.index.db import IndexDB
    from dsmd.index.identity import bundle_fingerprint
    from dsmd.index.tune_queries import QUERIES

    bundle = Bundle(a.bundle)
    t0 = time.time()
    vectors, captions, owners = embed_world(bundle, a.n, a.seed, a.queries)
    embed_s = time.time() - t0
    vectors = vectors.astype(np.float16).astype(np.float32)  # as the index stores them (index/vectors.py)
    held_out = np.ascontiguousarray(bundle.encode_texts(captions), np.float32)
    built_in = np.ascontiguousarray(bundle.encode_texts(list(QUERIES)), np.float32)
    pick = np.random.default_rng(a.seed).choice(a.n, size=a.queries, replace=False)
    image_q = np.ascontiguousarray(vectors[np.sort(pick)], np.float32)

    def chunks():
        yield np.arange(1, a.n + 1), vectors

    sets = {name: (q, ann.exact_kth_score(chunks, q))
            for name, q in (("held_out_text", held_out), ("image", image_q), ("built_in_text", built_in))}
    # how often a caption's own image is the exact top-1: the bundle's text-to-image quality on these scenes
    own_top1 = float(np.mean(np.argmax(held_out @ vectors.T, axis=1) == np.array(owners)))

    # the bundle as finalize sees it, without a text encoder: the tuning of before issue 26
    image_only = SimpleNamespace(name=bundle.name, path=bundle.path, dim=bundle.dim, variant=bundle.variant,
                                 manifest=bundle.manifest)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        before, after = Path(tmp) / "before", Path(tmp) / "after"
        before.mkdir()
        write_rows(before, vectors, bundle)
        shutil.copytree(before, after)
        for name, folder, b in (("before", before, image_only), ("after", after, bundle)):
            t1 = time.time()
            part = finalize(folder, b, progress=True)["images"]
            spec = part["index"]
            index = ann.read(folder / part["file"], spec["kind"], spec["search"])
            db = IndexDB(folder / "items.sqlite", bundle.dim, bundle_fingerprint(bundle), bundle.variant)

            def vectors_of(ids, db=db):
                return db.vectors_of(ids, "items")
            runs[name] = {"kind": spec["kind"], "search": spec["search"], "finalize_s": round(time.time() - t1, 1),
                          "manifest_text_queries": part.get("text_queries"),
                          **measure(index, spec["kind"], spec["search"], sets, vectors_of)}
            if name == "after" and spec["kind"] == "hnsw":  # the whole efSearch curve on one graph
                runs["curve"] = [{"efSearch": ef, **measure(index, "hnsw", {"efSearch": ef}, sets, vectors_of)}
                                 for ef in ann.HNSW_EF_GRID]
            db.close()
            del index

    result = {"n": a.n, "dim": bundle.dim, "bundle": str(a.bundle), "variant": bundle.variant, "seed": a.seed,
              "queries": {"held_out_text": len(held_out), "image": len(image_q), "built_in_text": len(built_in)},
              "caption_finds_own_image_top1": round(own_top1, 4), "embed_s": round(embed_s, 1),
              "target_recall": ann.TARGET_RECALL, **runs, "machine": machine()}
    out = ROOT / a.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    lines = [f"Command: `.venv/bin/python bench/captionless_tuning.py --bundle {a.bundle} --n {a.n}`", "",
             machine_line(), "",
             "| tuned with | kind | setting | recall@10, held-out captions | recall@10, images | "
             "recall@10, built-in queries | ms per text query | finalize s |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for name, label in (("before", "image queries (before)"), ("after", "images + built-in text (now)")):
        r = runs[name]
        lines.append(f"| {label} | {r['kind']} | {r['search']} | {r['held_out_text']:.3f} | {r['image']:.3f} | "
                     f"{r['built_in_text']:.3f} | {r['held_out_text_ms']:.3f} | {r['finalize_s']:.0f} |")
    if "curve" in runs:
        lines += ["", "| efSearch | recall@10, held-out captions | recall@10, images | recall@10, built-in queries | "
                  "ms per text query |", "|---:|---:|---:|---:|---:|"]
        lines += [f"| {c['efSearch']} | {c['held_out_text']:.3f} | {c['image']:.3f} | {c['built_in_text']:.3f} | "
                  f"{c['held_out_text_ms']:.3f} |" for c in runs["curve"]]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
