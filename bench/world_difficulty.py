"""How hard is a generated world (demo or shifted)? A bag-of-words oracle against the demo teacher.

The bag-of-words matcher is given each test image's true objects as words (shape, colour,
size and place of every object: a perfect detector that does not bind attributes to
objects) and scores captions by the cosine of word counts, synonyms merged. It finds the
right sibling *pair* but cannot tell which of the two scenes a caption describes; the
teacher has to bind colours, sizes and places to objects to do better.

    .venv/bin/python bench/world_difficulty.py --data data/world --features artifacts/features

Writes OUT/{results.json,table.md} (default bench/results/world-difficulty).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from common import ROOT, machine, machine_line

from dsmd.retrieval import Recall, evaluate, format_table
from dsmd.world_captions import bow_scores
from dsmd.world_specs import DEMO, WorldSpec, world_spec


def world_images(data: Path, split: str) -> list[dict]:
    path = data / "dataset_world.json" if data.is_dir() else data
    return [im for im in json.loads(path.read_text())["images"] if im["split"] == split]


def world_of(data: Path) -> WorldSpec:
    """The spec a generated world was made from (the demo world's file names none)."""
    path = data / "dataset_world.json" if data.is_dir() else data
    return world_spec(json.loads(path.read_text()).get("world", "demo"))


def sibling_accuracy(scores: np.ndarray, owner: np.ndarray, image_ids: np.ndarray, pair: dict[int, int]) -> float:
    """Share of captions that score their own image above its sibling (0.5 = cannot bind)."""
    row = {int(i): r for r, i in enumerate(image_ids)}
    by_pair: dict[int, list[int]] = {}
    for i in image_ids:
        by_pair.setdefault(pair[int(i)], []).append(int(i))
    sib = np.array([row[next(j for j in by_pair[pair[int(image_ids[o])]] if j != int(image_ids[o]))] for o in owner])
    idx = np.arange(len(owner))
    return float((scores[idx, owner] > scores[idx, sib]).mean())


def bow_recall(images: list[dict], world: WorldSpec = DEMO) -> tuple[Recall, float]:
    captions = [s["raw"] for im in images for s in im["sentences"]]
    owner = np.array([i for i, im in enumerate(images) for _ in im["sentences"]])
    scores = bow_scores(captions, [im["scene"] for im in images], world).astype(np.float32)
    # Bags tie often; our protocol counts ties against the query, which would understate the
    # baseline. Break ties at random instead (a fair guess among equals), seeded.
    scores += np.random.default_rng(0).uniform(0, 1e-4, scores.shape).astype(np.float32)
    ids = np.array([im["imgid"] for im in images])
    pair = {im["imgid"]: im["pair"] for im in images}
    # evaluate() scores with dot products: one-hot "image embeddings" pick the BoW score columns
    return evaluate(np.eye(len(images), dtype=np.float32), scores, owner), sibling_accuracy(scores, owner, ids, pair)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("data/world"))
    p.add_argument("--features", type=Path, help="a feature store of the world (adds the teacher's row)")
    p.add_argument("--split", default="test")
    p.add_argument("--out", default="bench/results/world-difficulty")
    a = p.parse_args(argv)
    images = world_images(a.data, a.split)
    bow, bow_sib = bow_recall(images, world_of(a.data))
    rows, sib = {"bag of words (oracle objects, unbound)": bow}, {"bag of words (oracle objects, unbound)": bow_sib}
    if a.features:
        from dsmd.distill.features import FeatureStore

        store = FeatureStore(a.features)
        f = store.split(a.split)
        name = f"teacher ({store.manifest['teacher']['name']})"
        rows[name] = evaluate(f.image_emb, f.caption_emb, f.caption_image)
        scores = f.caption_emb.astype(np.float32) @ f.image_emb.astype(np.float32).T
        sib[name] = sibling_accuracy(scores, f.caption_image, f.image_ids, {im["imgid"]: im["pair"] for im in images})
    args = " ".join(sys.argv[1:] if argv is None else argv)
    table = (f"Command: `.venv/bin/python bench/world_difficulty.py {args}`; "
             f"{machine_line()}. Split {a.split}, {len(images)} images.\n\n" + format_table(rows)
             + "\n\nsibling-pair accuracy (caption scores its own image above its sibling; 0.5 = no binding):\n"
             + "".join(f"  {name}: {acc:.3f}\n" for name, acc in sib.items()))
    print(table)
    out = ROOT / a.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table)
    (out / "results.json").write_text(json.dumps(
        {"meta": {"data": str(a.data), "features": str(a.features), "split": a.split, "machine": machine()},
         "recall": {name: r.to_json() for name, r in rows.items()}, "sibling_pair_accuracy": sib}, indent=2) + "\n")


if __name__ == "__main__":
    main()
