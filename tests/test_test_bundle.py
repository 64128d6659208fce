"""The test bundle tells images apart: the search tests' exact assertions (the query image is hit 1,
FAISS equals exact search) mean something only if it does. With a bundle that maps every image to
about one point (as the suite's first tiny student did: median cosine 0.9999), any image would pass them.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from dsmd.bundle import Bundle
from dsmd.datasets import load_dataset


def _test_split_vectors(tiny_search, tiny_world) -> np.ndarray:
    items = load_dataset(tiny_world).split("test")
    return Bundle(tiny_search / "bundle").encode_images([Image.open(it.path).convert("RGB") for it in items])


def test_the_test_bundle_spreads_the_test_images_apart(tiny_search, tiny_world):
    v = _test_split_vectors(tiny_search, tiny_world)
    sims = v @ v.T
    others = sims[~np.eye(len(v), dtype=bool)]
    assert np.median(others) < 0.98, f"median cosine between different images {np.median(others):.5f}"
    # every image's nearest other image is further from it than float noise (1e-6) could bridge
    assert others.max() < 0.9999, f"two different test images at cosine {others.max():.6f}"

