"""A live index: adds and removals that cost O(batch), reconciled on reopening, for every index kind.

Real FAISS and SQLite throughout. The kinds are exercised on small random vectors through a stand-in
encoder (a fixed random projection of 8x8 pixels: fast, deterministic); the tiny exported bundle
and the tiny index of the demo world serve the rest.
"""

from __future__ import annotations

import io
import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dsmd.bundle import Bundle
from dsmd.datasets import load_dataset
from dsmd.errors import UserError
from dsmd.index.build import add_images, dataset_sources, finalize
from dsmd.index.db import IndexDB, NewItem
from dsmd.index.search import IndexMismatch, ReadOnlyIndex, SearchIndex
from dsmd.index.uploads import UploadRefused, remove_items, store_upload
from dsmd.preprocess import PreprocessConfig

DIM = 16


class FakeBundle:
    """What the index reads of a bundle, with a random projection of 8x8 RGB pixels as the encoder."""

    def __init__(self, variant: str = "fp32"):
        self.dim, self.variant, self.name, self.path = DIM, variant, "fake", Path("/nonexistent/fake-bundle")
        self.manifest = {"files": {"image.onnx": "1" * 64, "text.onnx": "2" * 64}}
        self.w = np.random.default_rng(0).normal(size=(3 * 8 * 8, DIM)).astype(np.float32)
        self.preprocess = PreprocessConfig(size=8)

    def transform(self, img: Image.Image) -> np.ndarray:
        return np.asarray(img.convert("RGB").resize((8, 8)), np.float32).transpose(2, 0, 1) / 255 - 0.5

    def encode_pixels(self, x: np.ndarray) -> np.ndarray:
        v = x.reshape(len(x), -1) @ self.w
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)

    def vector(self, data: bytes) -> np.ndarray:
        return self.encode_pixels(self.transform(Image.open(io.BytesIO(data)))[None])[0]


def png(seed: int) -> bytes:
    """A distinct 8x8 noise image."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def vector_index(path: Path, n: int, kind: str, seed: int = 0) -> np.ndarray:
    """An index of n clustered random unit vectors (ids 1..n) finalized as `kind`; returns the vectors."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(40, DIM))[rng.integers(0, 40, n)] + 0.3 * rng.normal(size=(n, DIM))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    path.mkdir(parents=True)
    fake = FakeBundle()
    from dsmd.index.build import bundle_fingerprint

    db = IndexDB(path / "items.sqlite", DIM, bundle_fingerprint(fake), "fp32")
    db.replace([NewItem(f"mem://{i}", f"{i:064x}", 8, 8, [], v) for i, v in enumerate(x)])
    db.close()
    finalize(path, fake, kind=kind, progress=False)
    return x


def served_ids(s: SearchIndex, target: str = "images") -> np.ndarray:
    """The ids the opened FAISS can return (held and not tombstoned), checked free of duplicates."""
    import faiss

    part = s._parts[target]
    raw = [faiss.vector_to_array(ix.id_map) for ix in (part.index, *part.segments) if ix is not None]
    raw = np.concatenate(raw) if raw else np.zeros(0, np.int64)
    assert len(raw) == len(set(raw.tolist())), "an id is in FAISS twice"
    return np.setdiff1d(raw, np.fromiter(part.dead, np.int64, len(part.dead)))


# The index stores float16 vectors (index/vectors.py): an image found by its own embedding scores 1
# to within this, and a stored vector is its embedding to within this.
F16 = 2e-3


def assert_found_first(s: SearchIndex, vector: np.ndarray, item_id: int):
    """The image whose embedding is `vector` is hit 1 at k=1, scoring 1: the tiny test model tells
    images apart (tests/test_test_bundle.py), so no other image may take its place. Returns the hit."""
    hits = s.search(vector[None], 1)[0]
    assert [h.id for h in hits] == [item_id], (item_id, [(h.id, h.score) for h in hits])
    assert hits[0].score == pytest.approx(1.0, abs=F16)
    return hits[0]


def rows(path: Path, table: str = "items") -> np.ndarray:
    con = sqlite3.connect(path / "items.sqlite")
    ids = np.array([r[0] for r in con.execute(f"SELECT id FROM {table} ORDER BY id")], np.int64)
    con.close()
    return ids


@pytest.fixture
def live(tiny_search, tmp_path) -> tuple[Bundle, Path]:
    shutil.copytree(tiny_search / "index", tmp_path / "index")
    return Bundle(tiny_search / "bundle"), tmp_path / "index"


@pytest.fixture
def new_images(tiny_world) -> list[bytes]:
    """Images of the demo world that the tiny index does not hold (its train split), distinct."""
    seen, out = set(), []
    for it in load_dataset(tiny_world).split("train"):
        data = it.path.read_bytes()
        if data not in seen:
            seen.add(data)
            out.append(data)
    return out


def test_a_live_add_is_found_by_the_next_search(live, new_images):
    bundle, path = live
    s = SearchIndex(path)
    before = s.count()
    item = s.add_image(new_images[0], bundle)
    assert s.count() == before + 1 and item == s.item(item["id"])
    assert assert_found_first(s, bundle.encode_images([new_images[0]])[0], item["id"]).item == item
    assert np.allclose(s.vector_of(item["id"]), bundle.encode_images([new_images[0]])[0], atol=F16)
    stored = Path(item["uri"])
    assert stored.parent == (path / "uploads").resolve() and stored.read_bytes() == new_images[0]
    assert s.add_image(new_images[0], bundle)["id"] == item["id"] and s.count() == before + 1  # same content
    with pytest.raises(UploadRefused, match="not an image"):
        s.add_image(b"definitely not an image", bundle)
    assert s.vector_of(10**9) is None and s.item(10**9) is None
    assert not s.changed_on_disk()  # live writes change the rows, not the manifest


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_removed_items_are_never_returned(kind, tmp_path):
    x = vector_index(tmp_path / "idx", 2000, kind)
    s = SearchIndex(tmp_path / "idx")
    assert s.manifest["images"]["index"]["kind"] == kind
    gone = np.random.default_rng(1).choice(np.arange(1, 2001), 200, replace=False)
    assert s.search(x[gone[:20] - 1], 1)[0][0].id == gone[0]  # found before
    for i in gone:
        assert s.remove(int(i))
    assert not s.remove(int(gone[0])) and not s.remove(10**9)
    assert s.count() == 1800
    for opened in (s, SearchIndex(tmp_path / "idx")):  # live, then reopened (tombstoned from the rows)
        hits = opened.search(x[gone - 1], 10)
        assert all(len(row) == 10 for row in hits)  # the tombstones take no places in the top k
        assert not {h.id for row in hits for h in row} & set(gone.tolist())
        assert opened.count() == 1800 and set(served_ids(opened).tolist()) == set(rows(tmp_path / "idx").tolist())
    fake = FakeBundle()
    item = s.add_image(png(7), fake)
    assert s.search(fake.vector(png(7)), 1)[0][0].id == item["id"]


@pytest.mark.parametrize("kind,mmap", [("hnsw", False), ("ivfpq", True), ("flat", True)])
def test_live_adds_fill_segments_beside_the_finalized_index(kind, mmap, tmp_path, monkeypatch):
    from dsmd.index import live

    monkeypatch.setattr(live, "SEGMENT", 3)
    vector_index(tmp_path / "idx", 1000, kind)
    s, fake = SearchIndex(tmp_path / "idx", mmap=mmap), FakeBundle()
    items = [s.add_image(png(100 + i), fake)["id"] for i in range(8)]
    part = s._parts["images"]
    assert part.base_count == 1000 and [seg.ntotal for seg in part.segments] == [3, 3, 2]
    assert part.index.ntotal == 1000  # the finalized index itself is never grown
    for i, item_id in enumerate(items):
        assert s.search(fake.vector(png(100 + i)), 1)[0][0].id == item_id
    assert s.remove(items[4]) and s.remove(5)
    hits = s.search(np.stack([fake.vector(png(104)), fake.vector(png(105))]), 5)
    assert all(len(row) == 5 for row in hits) and not {h.id for row in hits for h in row} & {items[4], 5}
    assert s.count() == 1000 + 8 - 2
    assert np.array_equal(served_ids(SearchIndex(tmp_path / "idx", mmap=mmap)), rows(tmp_path / "idx"))


def test_an_empty_index_takes_live_adds(tmp_path):
    vector_index(tmp_path / "idx", 0, "flat")
    s, fake = SearchIndex(tmp_path / "idx"), FakeBundle()
    assert s.count() == 0 and s.search(np.ones((2, DIM), np.float32), 5) == [[], []]
    first, second = (s.add_image(png(i), fake)["id"] for i in (1, 2))
    assert [h.id for h in s.search(fake.vector(png(2)), 5)[0]] == [second, first]
    assert s.remove(second)
    assert [h.id for h in SearchIndex(tmp_path / "idx").search(fake.vector(png(2)), 5)[0]] == [first]


def test_reopening_serves_exactly_the_rows(live, new_images, tiny_world):
    bundle, path = live
    a = SearchIndex(path)
    added = [a.add_image(d, bundle)["id"] for d in new_images[:3]]
    assert a.remove(added[1]) and a.remove(1)
    store_upload(path, bundle, new_images[3])  # rows written by no opened index (another process's way)
    remove_items(path, bundle, [2])
    b = SearchIndex(path)
    for target, table in (("images", "items"), ("texts", "texts")):
        assert np.array_equal(served_ids(b, target), rows(path, table)), target
    assert b.count() == a.count() + 1 - 1 == 24 + 3 - 2 + 1 - 1
    assert b.count("texts") == 120 - 10  # the captions of items 1 and 2 went with them
    sha = __import__("hashlib").sha256(new_images[3]).hexdigest()
    for data, item_id in ((new_images[0], added[0]), (new_images[2], added[2]), (new_images[3], b.db.id_of_sha(sha))):
        assert_found_first(b, bundle.encode_images([data])[0], item_id)
    hits = b.search(np.eye(DIM, dtype=np.float32), 30)
    assert not {h.id for row in hits for h in row} & {1, 2, added[1]}


def test_writes_after_a_compaction_reach_the_new_index(tmp_path):
    x = vector_index(tmp_path / "idx", 300, "flat")
    fake = FakeBundle()
    s = SearchIndex(tmp_path / "idx")
    s.compaction_min = 5
    assert not s.needs_compaction()
    for i in range(1, 21):
        s.remove(i)
    assert not s.needs_compaction()  # 20 tombstones: not past 10% of 300
    for i in range(21, 36):
        s.remove(i)
    assert s.needs_compaction()
    fresh = s.compact(fake)
    assert fresh.generation > s.generation and fresh._parts["images"].base_count == 265
    assert not fresh.needs_compaction() and s.changed_on_disk() and not fresh.changed_on_disk()
    item = s.add_image(png(1), fake)  # through the old object, as a server would before swapping
    assert s.remove(40)
    for opened in (s, fresh):
        assert opened.search(fake.vector(png(1)), 1)[0][0].id == item["id"]
        assert 40 not in {h.id for h in opened.search(x[39], 10)[0]}
    fresh.compaction_min = 5
    for seed in range(2, 60):
        fresh.add_image(png(seed), fake)
    assert fresh.needs_compaction()  # 59 live additions: past 20% of 265


def test_changed_on_disk_after_a_finalize_by_another_process(live):
    bundle, path = live
    s = SearchIndex(path)
    assert not s.changed_on_disk()
    done = subprocess.run([sys.executable, "-m", "dsmd.cli", "index", "remove", str(path), "--id", "3", "--bundle",
                           str(bundle.path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert s.changed_on_disk()
    assert 3 not in {h.id for row in s.search(np.eye(DIM, dtype=np.float32), 24) for h in row}  # row gone: left out
    fresh = SearchIndex(path)
    assert not fresh.changed_on_disk() and fresh.count() == 23 and fresh.generation > s.generation


def test_a_bundle_variant_other_than_the_index_is_refused(live, tiny_world, tmp_path):
    bundle, path = live
    s = SearchIndex(path)
    assert s.manifest["bundle"]["variant"] == "fp32"
    s.check_bundle(bundle)
    int8 = Bundle(bundle.path)
    int8.variant = "int8"  # the tiny bundle ships fp32 only: the label is what the index checks
    with pytest.raises(IndexMismatch, match=r"fp32 variant.*--variant fp32.*--variant int8"):
        s.check_bundle(int8)
    with pytest.raises(UserError, match="fp32 variant"):
        add_images(path, int8, dataset_sources(tiny_world, split="val"), progress=False)
    with pytest.raises(IndexMismatch):
        s.add_image(b"x", int8)
    # an index from before variants were recorded holds fp32 vectors
    m = json.loads((path / "manifest.json").read_text())
    del m["bundle"]["variant"]
    (path / "manifest.json").write_text(json.dumps(m))
    con = sqlite3.connect(path / "items.sqlite")
    con.execute("DELETE FROM meta WHERE key='variant'")
    con.commit()
    con.close()
    old = SearchIndex(path)
    old.check_bundle(bundle)
    with pytest.raises(IndexMismatch, match="fp32"):
        old.check_bundle(int8)
    # an index built with int8 says so, and refuses fp32
    from dsmd.index.build import build

    m = build(tmp_path / "int8", int8, dataset_sources(tiny_world, split="val"), progress=False)
    assert m["bundle"]["variant"] == "int8"
    with pytest.raises(IndexMismatch, match="--variant int8"):
        SearchIndex(tmp_path / "int8").check_bundle(bundle)


def test_read_only_by_request(live, new_images):
    bundle, path = live
    (path / ".lock").unlink(missing_ok=True)
    s = SearchIndex(path, readonly=True)
    assert s.readonly and len(s.search(np.ones((1, DIM), np.float32), 5)[0]) == 5 and s.item(1)
    for write in (lambda: s.add_image(new_images[0], bundle), lambda: s.remove(1), lambda: s.compact(bundle)):
        with pytest.raises(ReadOnlyIndex, match="read-only"):
            write()
    assert s.db.readonly and not (path / ".lock").exists()
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        s.db.con.execute("DELETE FROM items")
    assert SearchIndex(path).readonly is False


def test_a_folder_that_cannot_be_written_is_served_read_only(live, tiny_world, tmp_path):
    """Permissions, not a flag: chmod -R a-w. Tests run as root, whom chmod does not stop, so the
    index is opened with the effective uid and gid of `nobody` (seteuid, restored afterwards): file
    access, os.access(effective_ids=True) and SQLite then meet the permission bits as any other
    user would. SQLite, unable to create its -shm file there, opens the database immutable."""
    import os
    import tempfile

    bundle, path = live
    image = load_dataset(tiny_world).split("test")[0].path
    want, uri = bundle.encode_images([image.read_bytes()])[0], str(image.resolve())
    sqlite3.connect(path / "items.sqlite").close()  # checkpoint: no -wal left for the copy
    root = Path(tempfile.mkdtemp(prefix="dsmd-ro-"))  # not under pytest's 0700 folders: nobody reads it
    try:
        root.chmod(0o755)
        ro = root / "index"
        shutil.copytree(path, ro)
        for p in [ro, *ro.rglob("*")]:
            p.chmod(0o555 if p.is_dir() else 0o444)
        listing = sorted(p.name for p in ro.iterdir())
        as_root = os.geteuid() == 0
        if as_root:
            os.setegid(65534)
            os.seteuid(65534)
        try:
            s = SearchIndex(ro)
            assert s.readonly
            hits = s.search(want[None], 3)[0]
            assert len(hits) == 3 and hits[0].item["uri"] == uri and s.item(hits[0].id) == hits[0].item
            np.testing.assert_allclose(s.vector_of(hits[0].id), want, atol=F16)  # its embedding, as float16
            with pytest.raises(ReadOnlyIndex, match="read-only"):
                s.remove(hits[0].id)
            s.close()
        finally:
            if as_root:
                os.seteuid(0)
                os.setegid(0)
        assert sorted(p.name for p in ro.iterdir()) == listing  # nothing created: no lock, no -wal/-shm
    finally:
        for p in [root, *root.rglob("*")]:
            p.chmod(0o755)
        shutil.rmtree(root)
