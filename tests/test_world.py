"""The demo world: deterministic, valid Karpathy data, and hard for a bag of words."""

import json
from collections import Counter

import numpy as np

from dsmd.datasets import load_dataset
from dsmd.retrieval import evaluate
from dsmd.world import bag_of_words, bow_scores, generate, scene_words


def test_world_is_a_valid_karpathy_dataset(tiny_world):
    ds = load_dataset(tiny_world)
    assert ds.counts() == {"train": {"images": 96, "captions": 480}, "val": {"images": 24, "captions": 120},
                           "test": {"images": 24, "captions": 120}}
    for it in ds.items:
        assert len(set(it.captions)) == 5, it.captions  # 5 distinct captions


def test_same_seed_same_world_other_seed_other_world(tmp_path):
    sizes = {"train": 4, "val": 2, "test": 2}
    a = generate(tmp_path / "a", seed=3, image_size=24, split_sizes=sizes)
    b = generate(tmp_path / "b", seed=3, image_size=24, split_sizes=sizes)
    c = generate(tmp_path / "c", seed=4, image_size=24, split_sizes=sizes)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    for name in ("000000.png", "000007.png"):
        assert (tmp_path / "a/images" / name).read_bytes() == (tmp_path / "b/images" / name).read_bytes()


def test_sibling_pairs_share_their_bag_of_words_but_not_their_scene(tiny_world):
    doc = json.loads((tiny_world / "dataset_world.json").read_text())
    images = doc["images"]
    for first, second in zip(images[::2], images[1::2]):
        assert first["pair"] == second["pair"] and first["split"] == second["split"]
        assert first["scene"] != second["scene"]
        bag = lambda s: Counter(w for o in s for w in (o["shape"], o["colour"], o["size"]))  # noqa: E731
        assert bag(first["scene"]) == bag(second["scene"])


def test_captions_mention_every_object(tiny_world):
    doc = json.loads((tiny_world / "dataset_world.json").read_text())
    for im in doc["images"]:
        for s in im["sentences"]:
            words = set(bag_of_words(s["raw"]))
            for o in im["scene"]:
                assert o["shape"] in words and o["colour"] in words, (s["raw"], im["scene"])


def test_bag_of_words_cannot_tell_siblings_apart(tiny_world):
    doc = json.loads((tiny_world / "dataset_world.json").read_text())
    test = [im for im in doc["images"] if im["split"] == "test"]
    caps = [s["raw"] for im in test for s in im["sentences"]]
    owner = np.array([i for i, im in enumerate(test) for _ in im["sentences"]])
    scores = bow_scores(caps, [im["scene"] for im in test])
    r = evaluate(np.eye(len(test), dtype=np.float32), scores.astype(np.float32), owner)
    # the oracle bag of words finds the pair (R@5 high) but cannot pick the right one of it
    assert r.t2i[5] > 60
    assert r.t2i[1] < 65
    assert scene_words(test[0]["scene"])  # words an unbound detector would report


def test_world_difficulty_bench_runs_on_a_small_world(tiny_world):
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1] / "bench"))
    from world_difficulty import bow_recall, world_images

    recall, sibling = bow_recall(world_images(tiny_world, "test"))
    assert recall.n_images == 24 and 0.3 < sibling < 0.8
