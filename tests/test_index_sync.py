"""`dsmd index sync`: an index kept in step with a living folder (new, changed, touched, moved, copied,
deleted and unreadable files), nothing re-embedded that did not change, a sync that dies half-way
resumed, files still being written left for later, and `--watch` following the folder as it changes.
Real folders, the tiny test bundle, real SQLite and FAISS."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dsmd.artifacts import read_manifest
from dsmd.bundle import Bundle
from dsmd.index import sync as sync_module
from dsmd.index.search import SearchIndex
from dsmd.index.sync import sync


@pytest.fixture(scope="module")
def bundle(tiny_search) -> Bundle:
    return Bundle(tiny_search / "bundle")


@pytest.fixture
def photos(tiny_world, tmp_path) -> tuple[Path, list[Path]]:
    """A folder of 8 world images in sub-folders, and 6 more images of the world that are not in it."""
    images = sorted((tiny_world / "images").glob("*.png"))
    root = tmp_path / "photos"
    for i, src in enumerate(images[:8]):
        dest = root / ("2024" if i < 4 else "2024/june") / src.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dest)
    return root, images[8:14]


def rows(index: Path) -> dict[str, tuple]:
    """uri -> (id, sha256, folder) of every item."""
    with sqlite3.connect(index / "items.sqlite") as con:
        return {u: (i, s, f) for i, u, s, f in con.execute("SELECT id, uri, sha256, folder FROM items")}


def vector_rows(index: Path) -> int:
    """Rows in the image vector files: each embedding ever stored (removed ones until a rebuild reclaims them)."""
    return sum(f.stat().st_size for f in (index / "vectors").glob("items*.f16")) // (2 * 16)


def on_disk(root: Path) -> set[str]:
    return {str(p.resolve()) for p in root.rglob("*.png")}


def test_a_sync_makes_the_index_match_the_folder_and_embeds_only_what_changed(photos, bundle, tmp_path):
    root, spare = photos
    index = tmp_path / "index"
    first = sync(index, bundle, root, progress=False)
    assert (first.added, first.removed, first.finalized) == (8, 0, True)
    assert set(rows(index)) == on_disk(root) and read_manifest(index)["images"]["count"] == 8
    again = sync(index, bundle, root, progress=False)
    assert (again.added, again.unchanged, again.finalized) == (0, 8, False) and "up to date" in again.line()
    embedded = vector_rows(index)

    before = rows(index)
    files = sorted(root.rglob("*.png"))
    shutil.copy(spare[0], root / "2024" / "new-1.png")  # new
    (root / "2025").mkdir()
    shutil.copy(spare[1], root / "2025" / "new-2.png")  # new, in a new folder
    changed = files[0]
    changed_id = before[str(changed.resolve())][0]
    shutil.copy(spare[2], changed)  # the same path, other bytes
    touched = files[1]
    os.utime(touched, (time.time() - 100, time.time() - 100))  # the same bytes, another time
    moved = files[2]
    moved_id = before[str(moved.resolve())][0]
    (root / "elsewhere").mkdir()
    moved_to = root / "elsewhere" / "renamed.png"
    moved.rename(moved_to)
    deleted = files[3]
    deleted.unlink()
    shutil.copy(files[4], root / "2025" / "copy-of-4.png")  # bytes indexed already
    (root / "2025" / "broken.png").write_bytes(b"not an image at all")

    r = sync(index, bundle, root, progress=False)
    assert (r.added, r.changed, r.moved, r.removed, r.touched) == (3, 1, 1, 1, 1), r.to_json()
    assert [u["uri"] for u in r.unreadable] == [str((root / "2025" / "broken.png").resolve())]
    assert vector_rows(index) == embedded + 3  # the new files and the changed one, nothing else
    after = rows(index)
    copy, broken = str((root / "2025" / "copy-of-4.png").resolve()), str((root / "2025" / "broken.png").resolve())
    assert set(after) == on_disk(root) - {copy, broken}
    assert after[str(moved_to.resolve())][0] == moved_id and after[str(moved_to.resolve())][2] == "elsewhere"
    assert after[str(changed.resolve())][0] != changed_id
    assert str(deleted.resolve()) not in after
    with sqlite3.connect(index / "items.sqlite") as con:
        assert con.execute("SELECT uri FROM copies").fetchall() == [(copy,)]
    s = SearchIndex(index)
    try:  # each new file finds itself, through the rebuilt search files
        for path in (root / "2024" / "new-1.png", root / "2025" / "new-2.png", changed):
            vector = bundle.encode_images([path.read_bytes()])
            assert s.search(vector, 1)[0][0].item["uri"] == str(path.resolve())
    finally:
        s.close()

    quiet = sync(index, bundle, root, progress=False)  # the unreadable file is not tried again until it changes
    assert (quiet.added, quiet.finalized) == (0, False) and "unchanged since" in quiet.unreadable[0]["reason"]
    os.chmod(root / "2025" / "broken.png", 0o600)  # its status changed (a chmod keeps the time): tried again
    again = sync(index, bundle, root, progress=False)
    assert len(again.unreadable) == 1 and "unchanged since" not in again.unreadable[0]["reason"]

    # the original of a recorded copy goes: the item lives on at the copy, nothing is embedded
    files[4].unlink()
    r = sync(index, bundle, root, progress=False)
    assert (r.added, r.moved, r.removed) == (0, 1, 0) and copy in rows(index)


def test_a_sync_that_dies_half_way_is_resumed_by_the_next(photos, bundle, tmp_path, monkeypatch):
    root, spare = photos
    index = tmp_path / "index"
    sync(index, bundle, root, progress=False)
    shutil.copy(spare[0], root / "late.png")
    next((root / "2024").glob("*.png")).unlink()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed before the search files were rebuilt")

    monkeypatch.setattr(sync_module, "finalize", killed)
    with pytest.raises(KeyboardInterrupt):
        sync(index, bundle, root, progress=False)
    monkeypatch.undo()
    stale = read_manifest(index)["generation"]
    r = sync(index, bundle, root, progress=False)  # the folder shows nothing more to do; the database does
    assert (r.added, r.removed, r.finalized) == (0, 0, True)
    assert read_manifest(index)["generation"] > stale and set(rows(index)) == on_disk(root)
    assert read_manifest(index)["images"]["count"] == 8


def test_a_file_still_being_written_waits_for_the_next_round(photos, bundle, tmp_path):
    root, spare = photos
    index = tmp_path / "index"
    sync(index, bundle, root, progress=False)
    fresh = root / "arriving.png"
    shutil.copy(spare[0], fresh)
    r = sync(index, bundle, root, progress=False, settle_s=60)
    assert r.settling == [str(fresh.resolve())] and str(fresh.resolve()) not in rows(index)
    os.utime(fresh, (time.time() - 120, time.time() - 120))  # it has rested
    r = sync(index, bundle, root, progress=False, settle_s=60)
    assert r.added == 1 and str(fresh.resolve()) in rows(index)
    ahead = root / "camera-clock-ahead.png"
    shutil.copy(spare[1], ahead)
    os.utime(ahead, (time.time() + 3600, time.time() + 3600))  # a time in the future is no copy under way
    r = sync(index, bundle, root, progress=False, settle_s=60)
    assert r.added == 1 and not r.settling


def test_a_missing_folder_is_a_clear_error(bundle, tmp_path):
    from dsmd.errors import UserError

    with pytest.raises(UserError, match="not a folder"):
        sync(tmp_path / "index", bundle, tmp_path / "nowhere", progress=False)


def test_watch_follows_the_folder(photos, tiny_search, tmp_path):
    root, spare = photos
    index = tmp_path / "index"
    proc = subprocess.Popen([sys.executable, "-m", "dsmd.cli", "index", "sync", str(index), "--bundle",
                             str(tiny_search / "bundle"), "--folder", str(root), "--watch", "--settle-s", "0.5"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1"})

    def wait_for(check, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"the watcher exited: {proc.stdout.read()}")
            manifest = read_manifest(index) if (index / "manifest.json").exists() else None
            if manifest is not None and check(manifest):
                return
            time.sleep(0.2)
        raise AssertionError(f"{what} within {timeout} s")

    try:
        wait_for(lambda m: m["images"]["count"] == 8, "the first sync")
        shutil.copy(next((root / "2024").glob("*.png")), root / "copy.png")  # a second path of indexed bytes
        with open(root / "copied-in.png", "wb") as f:  # written in two parts, a moment apart
            data = spare[0].read_bytes()
            f.write(data[:100])
            f.flush()
            time.sleep(0.2)
            f.write(data[100:])
        wait_for(lambda m: m["images"]["count"] == 9, "the new file indexed")
        assert str((root / "copied-in.png").resolve()) in rows(index)
        next((root / "2024" / "june").glob("*.png")).unlink()  # not the copied one
        wait_for(lambda m: m["images"]["count"] == 8, "the deleted file dropped")
        assert set(rows(index)) == on_disk(root) - {str((root / "copy.png").resolve())}
        time.sleep(5)  # a sync's own reads (it hashes the recorded copy each round) start no further round
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    rounds = out.count("sync: ")  # one per burst of changes (5 or so), not one every few seconds
    assert 3 <= rounds <= 7 and "Traceback" not in out, out


def test_tiff_and_heic_photos_are_indexed_and_what_cannot_be_read_says_why(photos, bundle, tmp_path):
    import pillow_heif
    from PIL import Image

    root, spare = photos
    pillow_heif.register_heif_opener()
    Image.open(spare[0]).convert("RGB").save(root / "scan.tif", format="TIFF")
    Image.open(spare[1]).convert("RGB").save(root / "phone.HEIC", format="HEIF")
    r = sync(tmp_path / "index", bundle, root, progress=False)
    assert r.added == 10 and not r.unreadable
    assert {str((root / n).resolve()) for n in ("scan.tif", "phone.HEIC")} <= set(rows(tmp_path / "index"))
    # without pillow-heif the HEIC file is skipped with the reason and the fix, the rest indexed
    code = ("import sys; sys.modules['pillow_heif'] = None\n"
            "from dsmd.images import BadImage, open_image\n"
            f"try:\n    open_image({str(root / 'phone.HEIC')!r})\nexcept BadImage as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert "a HEIC/HEIF photo; reading it needs pillow-heif: pip install 'dsmd[heic]'" in out


def test_a_captionless_collection_is_tuned_for_text_queries_too(photos, bundle, tmp_path):
    """Folder photos have no captions: the image index is tuned with image vectors and with text queries
    (the built-in ones, or the operator's, remembered), and the manifest reports both recalls."""
    from dsmd.index.tune_queries import QUERIES

    root, spare = photos
    sync(tmp_path / "index", bundle, root, progress=False)
    q = read_manifest(tmp_path / "index")["images"]["text_queries"]
    assert q["from"] == "built-in" and q["count"] == len(QUERIES) >= 300
    assert q["recall_at_10"] == q["image_queries_recall_at_10"] == 1.0  # a flat index: exact for both
    mine = tmp_path / "queries.txt"
    mine.write_text("a red circle\n\na blue square\n")
    r = subprocess.run([sys.executable, "-m", "dsmd.cli", "index", "build", str(tmp_path / "index"), "--bundle",
                        str(bundle.path), "--folder", str(root), "--index-type", "hnsw", "--tune-queries", str(mine)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "TQDM_DISABLE": "1"})
    assert r.returncode == 0, r.stderr
    m = read_manifest(tmp_path / "index")
    assert m["images"]["text_queries"]["from"] == "operator" and m["images"]["text_queries"]["count"] == 2
    assert m["images"]["index"]["kind"] == "hnsw"
    info = subprocess.run([sys.executable, "-m", "dsmd.cli", "index", "info", str(tmp_path / "index")],
                          capture_output=True, text=True, timeout=120).stdout
    assert "2 operator text queries" in info
    shutil.copy(spare[0], root / "one-more.png")  # a change: the next rebuild remembers the operator's queries
    assert sync(tmp_path / "index", bundle, root, progress=False).finalized
    assert read_manifest(tmp_path / "index")["images"]["text_queries"]["count"] == 2


def test_tuning_holds_the_target_for_every_query_set():
    """ann.tune with a second query set keeps a setting at least as deep, and reports the lower recall."""
    from dsmd.index import ann

    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    near = x[:200] + 0.05 * rng.normal(size=(200, 32)).astype(np.float32)  # queries among the data
    far = rng.normal(size=(200, 32)).astype(np.float32) + 3.0  # queries off to one side: harder for HNSW
    near, far = (q / np.linalg.norm(q, axis=1, keepdims=True) for q in (near, far))
    chunks = lambda: iter([(np.arange(len(x)), x)])  # noqa: E731
    index, _ = ann.build("hnsw", 32, chunks, len(x))
    vectors_of = lambda ids: x[ids]  # noqa: E731
    kth_near, kth_far = ann.exact_kth_score(chunks, near), ann.exact_kth_score(chunks, far)
    alone, r_alone = ann.tune(index, "hnsw", near, kth_near, vectors_of, 0.995)
    both, r_both = ann.tune(index, "hnsw", near, kth_near, vectors_of, 0.995, also=((far, kth_far),))
    assert both["efSearch"] > alone["efSearch"]  # here: 64 against 32, the far queries need the deeper search
    ann.apply_search_params(index, "hnsw", both)
    far_recall = ann.recall_at_k(index.search(far, 10)[1], far, kth_far, vectors_of, len(x))
    assert r_both == min(far_recall, ann.recall_at_k(index.search(near, 10)[1], near, kth_near, vectors_of, len(x)))
