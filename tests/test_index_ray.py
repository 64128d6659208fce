"""Embedding on a local Ray cluster (the two cores here) into vector shards, and an index built from them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray.data  # noqa: F401 - installed by `make test`: a broken install fails here, it is not skipped

from dsmd.bundle import Bundle
from dsmd.errors import UserError
from dsmd.index.build import build, dataset_sources, finalize
from dsmd.index.db import IndexDB
from dsmd.index.ray_embed import add_shards


@pytest.fixture(scope="module")
def world200(tmp_path_factory) -> Path:
    from dsmd.world import generate

    out = tmp_path_factory.mktemp("world200")
    generate(out, seed=11, image_size=32, split_sizes={"train": 160, "val": 20, "test": 20})
    (out / "images" / "000003.png").write_bytes(b"truncated")  # one unreadable file, listed by both builds
    return out


def _rows(index: Path) -> dict:
    db = IndexDB(index / "items.sqlite", readonly=True)
    items = db.con.execute("SELECT id, uri, sha256, width, height, captions FROM items ORDER BY id").fetchall()
    texts = db.con.execute("SELECT id, item_id, text FROM texts ORDER BY id").fetchall()
    out = {"items": items, "texts": texts, "item_vectors": db.vectors_of(np.array([r[0] for r in items])),
           "text_vectors": db.vectors_of(np.array([r[0] for r in texts]), "texts"),
           "skipped": db.skipped()}
    db.close()
    return out


@pytest.mark.slow
def test_ray_shards_build_the_same_index_as_one_process(tiny_search, world200, tmp_path):
    bundle_path = tiny_search / "bundle"
    b = Bundle(bundle_path)
    sources = dataset_sources(world200)
    assert len(sources) == 200
    build(tmp_path / "single", b, sources, progress=False)

    shards = tmp_path / "shards"
    done = subprocess.run([sys.executable, "-m", "dsmd.cli", "index", "embed", str(shards), "--bundle",
                           str(bundle_path), "--data", str(world200), "--shard-size", "80", "--batch", "16"],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "3 shard(s) of 200 images (1 unreadable), 200 embedded now" in done.stdout
    assert sorted(p.name for p in shards.glob("*.parquet")) == [f"shard-{k:06d}.parquet" for k in range(3)]

    report = add_shards(tmp_path / "ray", b, shards, progress=False)
    finalize(tmp_path / "ray", b, progress=False, report=report)
    single, ray = _rows(tmp_path / "single"), _rows(tmp_path / "ray")
    assert report.added == 199 and len(ray["items"]) == 199 and ray["skipped"] == single["skipped"]
    assert ray["items"] == single["items"] and ray["texts"] == single["texts"]  # same ids, rows and captions
    for key in ("item_vectors", "text_vectors"):  # both stored as float16: the same to its precision
        np.testing.assert_allclose(ray[key], single[key], atol=2e-3)
    # and what both hold is each file's and caption's embedding, as computed here
    np.testing.assert_allclose(ray["item_vectors"], b.encode_images([Path(r[1]).read_bytes() for r in ray["items"]]),
                               atol=2e-3)
    np.testing.assert_allclose(ray["text_vectors"], b.encode_texts([r[2] for r in ray["texts"]]), atol=2e-3)

    # a rerun skips the shards done; a changed shard alone is embedded again
    again = json.loads((shards / "manifest.json").read_text())
    from dsmd.index.ray_embed import embed

    m = embed(shards, bundle_path, sources, shard_size=80, batch=16, progress=False)
    assert m["embedded_now"] == 0 and m["shards"] == again["shards"]
    changed = sources[:-1]
    m = embed(shards, bundle_path, changed, shard_size=80, batch=16, progress=False)
    assert m["embedded_now"] == 39 and m["shards"]["shard-000002.parquet"]["count"] == 39
    # a file changed in place makes its shard stale; a shard missing from a run is refused at build time
    victim = next(i for i, src in enumerate(changed) if src.path.name != "000003.png")
    changed[victim].path.write_bytes(changed[victim + 1].path.read_bytes())
    m = embed(shards, bundle_path, changed, shard_size=80, batch=16, progress=False)
    assert m["embedded_now"] == len(changed[victim // 80 * 80:(victim // 80 + 1) * 80])
    manifest = json.loads((shards / "manifest.json").read_text())
    del manifest["shards"]["shard-000001.parquet"]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="the embedding did not finish"):
        list(__import__("dsmd.index.ray_embed", fromlist=["x"]).read_shards(shards, b))


def test_shards_of_another_bundle_are_refused(tiny_search, tiny_teacher, world200, tmp_path):
    from dsmd.index.ray_embed import read_shards

    shards = tmp_path / "s"
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps({"artifact": "vector-shards", "shards": {}, "bundle": {
        "name": "other", "fingerprint": "0" * 64, "dim": 16, "variant": "fp32"}}))
    with pytest.raises(UserError, match="were embedded with other"):
        list(read_shards(shards, Bundle(tiny_search / "bundle")))
    with pytest.raises(UserError, match="no vector shards"):
        list(read_shards(tmp_path, Bundle(tiny_search / "bundle")))
