"""How hard is the demo world? A bag-of-words oracle against the demo teacher.

The bag-of-words matcher is given each test image's true objects as words (shape, colour,
size and place of every object: a perfect detector that does not bind attributes to
objects) and scores captions by the cosine of word counts, synonyms merged. It finds the
right sibling *pair* but cannot tell which of the two scenes a caption describes; the
teacher has to bind colours, sizes and places to objects to do better.

    .venv/bin/python bench/world_difficulty.py --data data/world --features artifacts/features
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from dsmd.retrieval import Recall, evaluate, format_table
from dsmd.world import bow_scores


def bow_recall(data: Path, split: str) -> Recall:
    path = data / "dataset_world.json" if data.is_dir() else data
    images = [im for im in json.loads(path.read_text())["images"] if im["split"] == split]
    captions = [s["raw"] for im in images for s in im["sentences"]]
    owner = np.array([i for i, im in enumerate(images) for _ in im["sentences"]])
    scores = bow_scores(captions, [im["scene"] for im in images]).astype(np.float32)
    # Bags tie often; our protocol counts ties against the query, which would understate the
    # baseline. Break ties at random instead (a fair guess among equals), seeded.
    scores += np.random.default_rng(0).uniform(0, 1e-4, scores.shape).astype(np.float32)
    # evaluate() scores with dot products: one-hot "image embeddings" pick the BoW score columns
    return evaluate(np.eye(len(images), dtype=np.float32), scores, owner)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("data/world"))
    p.add_argument("--features", type=Path, help="a feature store of the world (adds the teacher's row)")
    p.add_argument("--split", default="test")
    a = p.parse_args(argv)
    rows = {"bag of words (oracle objects, unbound)": bow_recall(a.data, a.split)}
    if a.features:
        from distill.features import FeatureStore

        store = FeatureStore(a.features)
        f = store.split(a.split)
        rows[f"teacher ({store.manifest['teacher']['name']})"] = evaluate(f.image_emb, f.caption_emb, f.caption_image)
    print(format_table(rows))


if __name__ == "__main__":
    main()
