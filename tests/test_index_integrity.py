"""Trust at the edges of an index folder (issue 24): the wrong-result paths a review found.

Each test provokes one of them for real (SQLite locks, another bundle, a folder that cannot be
written, a removal that lands in the middle of a reconcile) and checks what the index then
serves against its rows: the ground truth is the database and the vectors the test made.
Interleavings are forced with hooks and events, never with sleeps.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
from test_index_live import DIM, F16, FakeBundle, png, rows, served_ids, vector_index

from dsmd.bundle import Bundle
from dsmd.errors import UserError
from dsmd.index import build as build_module
from dsmd.index import db as db_module
from dsmd.index.build import bundle_fingerprint, finalize, info, remove
from dsmd.index.db import IndexDB, NewItem
from dsmd.index.live import LivePart
from dsmd.index.lock import IndexBusy
from dsmd.index.search import SearchIndex

WAIT = 120  # seconds an event may take on a loaded machine before the test gives up (never reached when right)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def captioned_index(path: Path, n: int, captions: int = 2, seed: int = 0, uri_of=None) -> tuple[np.ndarray, np.ndarray]:
    """An exact index of n items (ids 1..n), each with `captions` captions (text ids in order), from
    random unit vectors; `uri_of(i)` names item i+1. Returns (image vectors, caption vectors)."""
    rng = np.random.default_rng(seed)
    x = _unit(rng.normal(size=(n, DIM)))
    t = _unit(rng.normal(size=(n * captions, DIM)))
    path.mkdir(parents=True)
    fake = FakeBundle()
    db = IndexDB(path / "items.sqlite", DIM, bundle_fingerprint(fake), "fp32")
    db.replace([NewItem(uri_of(i) if uri_of else f"mem://{i}", f"{i:064x}", 8, 8,
                        [f"caption {i}.{c}" for c in range(captions)], x[i], t[i * captions:(i + 1) * captions])
                for i in range(n)])
    db.close()
    finalize(path, fake, kind="flat", progress=False)
    return x, t


def _as_nobody(fn):
    """Run fn with the effective uid/gid of `nobody` when root (permission bits then apply), restored after."""
    as_root = os.geteuid() == 0
    if as_root:
        os.setegid(65534)
        os.seteuid(65534)
    try:
        return fn()
    finally:
        if as_root:
            os.seteuid(0)
            os.setegid(0)


def _read_only_copy(path: Path) -> tuple[Path, Path]:
    """A chmod -R a-w copy of the index in a folder `nobody` may read (pytest's are 0700). (root, copy)."""
    sqlite3.connect(path / "items.sqlite").close()  # checkpoint: no -wal left for the copy
    root = Path(tempfile.mkdtemp(prefix="dsmd-ro-"))
    root.chmod(0o755)
    ro = root / "index"
    shutil.copytree(path, ro)
    for p in [ro, *ro.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    return root, ro


def _remove_tree(root: Path) -> None:
    for p in [root, *root.rglob("*")]:
        p.chmod(0o755)
    shutil.rmtree(root)


# ---------------------------------------------------------------- 15: live bookkeeping


def test_replacing_an_item_tombstones_its_image_and_captions_not_an_unrelated_caption(tmp_path):
    """An upload whose stored name is the uri of an indexed item with other content replaces that
    item: its image vector must leave the image index, its captions the caption index, and every
    other caption stay findable (the replaced id was tombstoned in the captions part instead)."""
    fake, n, new = FakeBundle(), 30, png(999)
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    target = (uploads / f"{hashlib.sha256(new).hexdigest()[:32]}.png").resolve()
    target.write_bytes(png(998))  # the file there now holds other bytes than the upload (changed in place)
    replaced = 7
    x, t = captioned_index(tmp_path / "idx", n, uri_of=lambda i: str(target) if i + 1 == replaced else f"mem://{i}")
    s = SearchIndex(tmp_path / "idx")
    item = s.add_image(new, fake, uploads)
    assert item["uri"] == str(target) and item["id"] == n + 1
    for opened in (s, SearchIndex(tmp_path / "idx")):
        # images: the old vector no longer takes a place in the top k (no hole), the new one is found
        hits = opened.search(x[replaced - 1][None], n)[0]
        assert sorted(h.id for h in hits) == sorted(rows(tmp_path / "idx").tolist())
        assert opened.search(fake.vector(new)[None], 1)[0][0].id == item["id"]
        # captions: every caption with a row is found by its own vector; the replaced item's are gone
        text_rows = rows(tmp_path / "idx", "texts")
        assert len(text_rows) == 2 * n - 2 and opened.count("texts") == len(text_rows)
        got = opened.search(t[text_rows - 1], 1, "texts")
        assert [h[0].id if h else None for h in got] == text_rows.tolist()
        assert np.array_equal(served_ids(opened, "texts"), text_rows)
        assert np.array_equal(served_ids(opened), rows(tmp_path / "idx"))
    assert target.read_bytes() == new  # the file holds what the row and its vector say


def test_a_removal_during_reconcile_is_not_re_added(tmp_path, monkeypatch):
    """Rows written by another process are added when an index opens; one of them removed by a third
    writer while the opening reconciles (after it read the rows, before it added their vectors) must
    not come back: the opened index serves exactly the rows."""
    vector_index(tmp_path / "idx", 50, "flat")
    db = IndexDB(tmp_path / "idx" / "items.sqlite")
    extra = _unit(np.random.default_rng(5).normal(size=(5, DIM)))
    db.replace([NewItem(f"late://{i}", f"{1000 + i:064x}", 8, 8, [], v) for i, v in enumerate(extra)])
    db.close()
    assert rows(tmp_path / "idx")[-5:].tolist() == [51, 52, 53, 54, 55]
    original, hooked = LivePart.add, []

    def add(self, ids, vectors):
        if 53 in np.asarray(ids).tolist() and not hooked:
            hooked.append(remove(tmp_path / "idx", ids=[53]))  # another writer, in the middle of the reconcile
        return original(self, ids, vectors)

    monkeypatch.setattr(LivePart, "add", add)
    s = SearchIndex(tmp_path / "idx")
    assert hooked == [1]
    assert np.array_equal(served_ids(s), rows(tmp_path / "idx")) and 53 not in rows(tmp_path / "idx")
    assert s.count() == 54
    assert [h.id for h in s.search(extra[2][None], 54)[0]].count(53) == 0
    assert len(s.search(extra[2][None], 54)[0]) == 54  # no hole in the top k


# ---------------------------------------------------------------- 14: SQLite's read-only fallback


def test_a_busy_database_is_not_opened_immutable(tmp_path, monkeypatch):
    """A lock held past the busy timeout is not a read-only folder: the read fails with a message (and
    the next one retries) instead of pinning the thread to an `immutable` connection that ignores the
    WAL (rows added later invisible, removed ones served)."""
    monkeypatch.setattr(db_module, "BUSY_TIMEOUT", 0.3, raising=False)
    vector_index(tmp_path / "idx", 20, "flat")
    s = SearchIndex(tmp_path / "idx")
    s.close()  # its connections closed (an exclusive lock waits for every one); the next read opens anew
    holder = sqlite3.connect(tmp_path / "idx" / "items.sqlite", isolation_level=None)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("DELETE FROM items WHERE id=20")
    out: dict = {}

    def reader():  # a thread whose first read meets the lock
        try:
            s.item(1)
            out["first"] = "read"
        except UserError as e:
            out["first"] = str(e)
        go.wait(WAIT)
        out["removed"], out["added"] = s.item(20), s.item(21)

    go = threading.Event()
    t = threading.Thread(target=reader)
    t.start()
    try:
        assert _wait(lambda: "first" in out), "the reader never returned"
        holder.execute("COMMIT")
    finally:
        holder.close()
    new = SearchIndex(tmp_path / "idx")
    item = new.add_image(png(1), FakeBundle())
    go.set()
    t.join(WAIT)
    assert "busy" in out["first"] and "try again" in out["first"], out["first"]
    assert out["removed"] is None and out["added"] is not None and out["added"]["id"] == item["id"] == 21


def _wait(condition, seconds: float = WAIT) -> bool:
    import time

    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


# ---------------------------------------------------------------- 12: the index's own bundle only


def _other_bundle(bundle: Path, dest: Path) -> Path:
    """A copy of the bundle whose manifest names other file hashes: another encoder to the index."""
    shutil.copytree(bundle, dest)
    m = json.loads((dest / "manifest.json").read_text())
    m["files"]["image.onnx"] = "0" * 64
    (dest / "manifest.json").write_text(json.dumps(m))
    return dest


def test_finalize_refuses_a_bundle_that_is_not_the_index(tmp_path):
    vector_index(tmp_path / "idx", 40, "flat")
    before = (tmp_path / "idx" / "manifest.json").read_text()
    other = FakeBundle()
    other.manifest = {"files": {"image.onnx": "3" * 64, "text.onnx": "4" * 64}}
    own, theirs = bundle_fingerprint(FakeBundle())[:12], bundle_fingerprint(other)[:12]
    with pytest.raises(UserError, match=rf"(?s){own}.*{theirs}|{theirs}.*{own}") as e:
        finalize(tmp_path / "idx", other, progress=False)
    assert "new index folder" in str(e.value) or "--bundle" in str(e.value)
    with pytest.raises(UserError, match="int8"):
        finalize(tmp_path / "idx", FakeBundle("int8"), progress=False)
    assert (tmp_path / "idx" / "manifest.json").read_text() == before
    finalize(tmp_path / "idx", FakeBundle(), progress=False)  # its own bundle still finalizes


def test_index_commands_that_write_refuse_another_bundle(tiny_search, tmp_path, capsys):
    from dsmd.cli import main

    index = tmp_path / "index"
    shutil.copytree(tiny_search / "index", index)
    other = _other_bundle(tiny_search / "bundle", tmp_path / "other")
    own, theirs = bundle_fingerprint(Bundle(tiny_search / "bundle"))[:12], bundle_fingerprint(Bundle(other))[:12]
    manifest, ids = (index / "manifest.json").read_text(), rows(index)
    assert main(["index", "remove", str(index), "--id", "3", "--bundle", str(other)]) == 2
    err = capsys.readouterr().err
    assert own in err and theirs in err, err
    assert (index / "manifest.json").read_text() == manifest and np.array_equal(rows(index), ids)  # nothing removed
    assert main(["index", "merge", str(tmp_path / "merged"), str(index), "--bundle", str(other)]) == 2
    err = capsys.readouterr().err
    assert own in err and theirs in err, err
    assert not (tmp_path / "merged" / "items.sqlite").exists()
    (tmp_path / "t.txt").write_text("a red circle\n")
    assert main(["index", "add-texts", str(index), "--file", str(tmp_path / "t.txt"), "--bundle", str(other)]) == 2
    assert own in capsys.readouterr().err
    assert main(["index", "remove", str(index), "--id", "3", "--bundle", str(tiny_search / "bundle")]) == 0
    assert 3 not in rows(index)


# ---------------------------------------------------------------- 13: ivfdisk served read-only


def test_an_on_disk_ivf_index_is_served_from_a_folder_that_cannot_be_written(tmp_path):
    """The inverted lists are opened read-only (faiss.IO_FLAG_READ_ONLY): as `nobody`, on a chmod a-w
    copy, a read-write open of the .ivfdata file would fail, and the index must still open and search."""
    x = vector_index(tmp_path / "idx", 2000, "ivfdisk")
    root, ro = _read_only_copy(tmp_path / "idx")
    try:
        listing = sorted(p.name for p in ro.iterdir())

        def serve():
            with SearchIndex(ro) as s:
                assert s.readonly and s.manifest["images"]["index"]["kind"] == "ivfdisk"
                got = [h[0].id for h in s.search(x[:50], 1)]
                with pytest.raises(PermissionError):
                    open(next(ro.glob("*.ivfdata")), "r+b")  # what FAISS's default ("r+") open would meet
                return got

        got = _as_nobody(serve)
        assert np.mean(np.array(got) == np.arange(1, 51)) >= 0.9  # each vector finds itself (recall 0.95)
        assert sorted(p.name for p in ro.iterdir()) == listing
    finally:
        _remove_tree(root)


# ---------------------------------------------------------------- 11: lock timeout, compaction beside writes

HOLDER = """
import sys
from dsmd.index.lock import folder_lock
with folder_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.readline()
"""


def test_a_write_waits_for_the_folder_lock_only_as_long_as_asked_and_names_the_holder(tmp_path):
    vector_index(tmp_path / "idx", 20, "flat")
    s = SearchIndex(tmp_path / "idx")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "idx")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for write in (lambda: s.add_image(png(1), FakeBundle(), timeout=0.2), lambda: s.remove(3, timeout=0.2)):
            with pytest.raises(IndexBusy, match=rf"pid {holder.pid}\b") as e:
                write()
            assert "0.2 s" in str(e.value)
    finally:
        holder.stdin.write("\n")
        holder.stdin.close()
        holder.wait(WAIT)
    assert s.remove(3, timeout=WAIT) and s.add_image(png(1), FakeBundle(), timeout=WAIT)["id"] == 21
    assert (tmp_path / "idx" / ".lock").read_text() == ""  # released: no stale holder named


def test_live_writes_complete_while_a_compaction_rebuilds(tmp_path, monkeypatch):
    """A compaction in one thread is held inside its rebuild (a hook); a live add and a remove in this
    thread complete meanwhile, and both reach the index the compaction returns."""
    x = vector_index(tmp_path / "idx", 200, "flat")
    s, fake = SearchIndex(tmp_path / "idx"), FakeBundle()
    rebuilding, writes_done = threading.Event(), threading.Event()
    original = build_module._rebuild

    def held_rebuild(*a, **kw):
        rebuilding.set()
        assert writes_done.wait(WAIT), "the writes never completed during the compaction"
        return original(*a, **kw)

    monkeypatch.setattr(build_module, "_rebuild", held_rebuild)
    out: dict = {}
    compaction = threading.Thread(target=lambda: out.setdefault("fresh", s.compact(fake)))
    compaction.start()
    try:
        assert rebuilding.wait(WAIT)
        item = s.add_image(png(1), fake, timeout=WAIT)  # IndexBusy, not a hang, if the compaction held the lock
        assert s.remove(5, timeout=WAIT)
        assert compaction.is_alive()  # the writes finished first: the compaction is still in its rebuild
    finally:
        writes_done.set()
        compaction.join(WAIT)
    fresh = out["fresh"]
    for opened in (s, fresh):
        assert opened.search(fake.vector(png(1))[None], 1)[0][0].id == item["id"]
        assert 5 not in {h.id for h in opened.search(x[4][None], 10)[0]}
    assert np.array_equal(served_ids(fresh), rows(tmp_path / "idx"))


# ---------------------------------------------------------------- 16: what a deletion leaves behind


def test_compaction_reclaims_the_files_and_vector_rows_of_removed_items(tmp_path):
    x = vector_index(tmp_path / "idx", 100, "flat")
    path, fake = tmp_path / "idx", FakeBundle()
    s = SearchIndex(path)
    added = [s.add_image(png(i), fake) for i in range(1, 6)]
    files = [Path(a["uri"]) for a in added]
    assert all(f.parent == path / "uploads" and f.exists() for f in files)
    for a in added[:3]:
        assert s.remove(a["id"])
    for i in range(1, 21):
        assert s.remove(i)
    row_bytes = 2 * DIM
    report = info(path)["reclaimable"]
    assert report["vector_rows"] == {"items": 23, "texts": 0}
    assert report["upload_files"] == 3
    assert report["bytes"] == 23 * row_bytes + sum(f.stat().st_size for f in files[:3])
    vectors_before = sum(f.stat().st_size for f in (path / "vectors").iterdir())
    assert vectors_before == 105 * row_bytes
    fresh = s.compact(fake)
    assert [f.exists() for f in files] == [False, False, False, True, True]
    assert sum(f.stat().st_size for f in (path / "vectors").iterdir()) == 82 * row_bytes
    assert info(path)["reclaimable"] == {"vector_rows": {"items": 0, "texts": 0}, "upload_files": 0, "bytes": 0}
    # both the old object (a server before its swap) and the new one read the right vectors
    for opened in (s, fresh, SearchIndex(path)):
        for i in (21, 50, 100):
            np.testing.assert_allclose(opened.vector_of(i), x[i - 1], atol=F16)
            assert opened.search(x[i - 1][None], 1)[0][0].id == i
        for a in added[3:]:
            assert opened.search(fake.vector(Path(a["uri"]).read_bytes())[None], 1)[0][0].id == a["id"]
    assert np.array_equal(served_ids(fresh), rows(path))
    item = fresh.add_image(png(9), fake)  # appends after a compaction land in the new vector file
    assert SearchIndex(path).search(fake.vector(png(9))[None], 1)[0][0].id == item["id"]


# ---------------------------------------------------------------- 17: read-only by request, durability


def test_a_read_only_open_creates_no_file_in_a_writable_folder(tmp_path):
    x = vector_index(tmp_path / "idx", 30, "flat")
    path = tmp_path / "idx"
    (path / ".lock").unlink(missing_ok=True)
    listing = sorted(p.name for p in path.iterdir())
    assert not any(n.endswith(("-wal", "-shm")) for n in listing)
    s = SearchIndex(path, readonly=True)
    assert s.search(x[3][None], 1)[0][0].id == 4 and s.item(4) and s.vector_of(4) is not None
    assert sorted(p.name for p in path.iterdir()) == listing
    # a writer arriving later: the read-only index sees its rows (it reopens on the writer's WAL)
    w = SearchIndex(path)
    new = w.add_image(png(3), FakeBundle())
    assert w.remove(4)
    assert s.item(new["id"]) is not None and s.item(4) is None
    s.close()
    w.close()


def test_the_durability_of_a_commit_is_a_setting(tmp_path, monkeypatch):
    vector_index(tmp_path / "idx", 5, "flat")
    assert IndexDB(tmp_path / "idx" / "items.sqlite").con.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    monkeypatch.setenv("DSMD_INDEX_SYNCHRONOUS", "full")
    assert IndexDB(tmp_path / "idx" / "items.sqlite").con.execute("PRAGMA synchronous").fetchone()[0] == 2
    monkeypatch.setenv("DSMD_INDEX_SYNCHRONOUS", "sometimes")
    with pytest.raises(UserError, match="DSMD_INDEX_SYNCHRONOUS.*normal.*full"):
        IndexDB(tmp_path / "idx" / "items.sqlite")
