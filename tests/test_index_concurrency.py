"""One index folder, many writers and readers: threads, processes, a CLI build beside a live server.

Real threads and real processes; the results are checked, not the timing: whichever way the
writers interleave, every content ends up exactly once in SQLite and once in FAISS.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_index_live import FakeBundle, png, rows, served_ids, vector_index

from dsmd.datasets import load_dataset
from dsmd.index import search as search_module
from dsmd.index.build import finalize
from dsmd.index.lock import IndexBusy, folder_lock
from dsmd.index.search import SearchIndex

ADDER = """
import json, sys
from pathlib import Path
from dsmd.bundle import Bundle
from dsmd.index.search import SearchIndex
index, bundle, files = sys.argv[1], sys.argv[2], sys.argv[3:]
s, b = SearchIndex(index), Bundle(bundle)
print("ready", flush=True)
sys.stdin.readline()  # the go
print(json.dumps([s.add_image(Path(f).read_bytes(), b)["id"] for f in files]), flush=True)
"""


def _start_adder(index: Path, bundle: Path, files: list[Path]) -> subprocess.Popen:
    """A process that opens the index, says ready, and adds `files` on the go (`_go`)."""
    proc = subprocess.Popen([sys.executable, "-c", ADDER, str(index), str(bundle), *map(str, files)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1"})
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()[-2000:]
    return proc


def _go(*procs: subprocess.Popen) -> None:
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()


def _wait_for(condition, what: str, seconds: float = 120) -> None:
    """Poll `condition` until it holds; fail after a deadline generous enough for a loaded machine."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def _check_exactly_once(path: Path, contents: set[str]) -> SearchIndex:
    """The folder opens and holds each content once: SQLite rows == FAISS ids, one row per content."""
    s = SearchIndex(path)
    shas = [r[0] for r in s.db.con.execute("SELECT sha256 FROM items")]
    assert sorted(shas) == sorted(contents)
    assert np.array_equal(served_ids(s), rows(path)) and s.count() == len(contents)
    return s


def _shas(index: Path) -> set[str]:
    con = sqlite3.connect(f"{(index / 'items.sqlite').as_uri()}?mode=ro", uri=True)
    try:
        return {r[0] for r in con.execute("SELECT sha256 FROM items")}
    finally:
        con.close()


def test_the_same_image_from_many_threads_makes_one_item(tmp_path):
    vector_index(tmp_path / "idx", 100, "hnsw")
    s, fake = SearchIndex(tmp_path / "idx"), FakeBundle()
    barrier, got, errors = threading.Barrier(8), [], []

    def add() -> None:
        barrier.wait()
        try:
            got.append(s.add_image(png(5), fake)["id"])
        except Exception as e:  # collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=add) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(got)) == 1 and s.count() == 101
    assert np.array_equal(served_ids(s), rows(tmp_path / "idx"))


def test_the_same_image_from_two_processes_makes_one_item(tiny_search, tiny_world, tmp_path):
    shutil.copytree(tiny_search / "index", tmp_path / "index")
    image = load_dataset(tiny_world).split("train")[0].path
    procs = [_start_adder(tmp_path / "index", tiny_search / "bundle", [image]) for _ in range(2)]
    _go(*procs)
    ids = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        ids += json.loads(out.strip().splitlines()[-1])
    assert ids[0] == ids[1]
    contents = _shas(tiny_search / "index")
    _check_exactly_once(tmp_path / "index", contents | {hashlib.sha256(image.read_bytes()).hexdigest()})


def test_a_cli_build_and_live_adds_from_another_process_share_one_folder(tiny_search, tiny_world, tmp_path):
    index = tmp_path / "index"
    shutil.copytree(tiny_search / "index", index)
    items = load_dataset(tiny_world)
    folder = tmp_path / "photos"
    folder.mkdir()
    for it in items.split("train"):
        shutil.copy(it.path, folder / it.path.name)
    # the live writer adds images of its own and, under other paths, images the build also indexes
    live = [it.path for it in items.split("val")[:12]] + sorted(folder.glob("*.png"))[::8]
    random.Random(0).shuffle(live)
    adder = _start_adder(index, tiny_search / "bundle", live)
    before = len(_shas(index))
    build = subprocess.Popen([sys.executable, "-m", "dsmd.cli", "index", "build", str(index), "--bundle",
                              str(tiny_search / "bundle"), "--folder", str(folder), "--batch", "4"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "TQDM_DISABLE": "1"})
    # the live adds start once the build writes rows (a batch of 4 at a time: most are still to come)
    _wait_for(lambda: len(_shas(index)) > before or build.poll() is not None, "the build's first rows")
    _go(adder)
    _, build_err = build.communicate(timeout=300)
    out, err = adder.communicate(timeout=300)
    assert build.returncode == 0, build_err[-2000:]
    assert adder.returncode == 0, err[-2000:]
    contents = _shas(tiny_search / "index")
    contents |= {hashlib.sha256(p.read_bytes()).hexdigest() for p in [*folder.glob("*.png"), *live]}
    s = _check_exactly_once(index, contents)
    assert len(set(json.loads(out.strip().splitlines()[-1]))) == len({p.read_bytes() for p in live})
    assert not list(index.glob(".*.tmp"))
    assert sorted(p.name for p in index.glob("*.faiss")) == sorted(s.manifest[t]["file"] for t in ("images", "texts"))


def test_searches_run_in_parallel_with_adds_and_removes(tmp_path):
    x = vector_index(tmp_path / "idx", 2000, "hnsw")
    s, fake = SearchIndex(tmp_path / "idx"), FakeBundle()
    removed: set[int] = set()
    done, errors, searches = threading.Event(), [], [0]

    def search() -> None:
        rng = np.random.default_rng()
        while not done.is_set():
            gone = set(removed)  # removals finished before this search began
            try:
                hits = s.search(x[rng.integers(0, 2000, 4)], 10)
                assert not {h.id for row in hits for h in row} & gone, "a removed item came back"
                assert all(len(row) == 10 for row in hits)
                searches[0] += 1
            except Exception as e:  # collected and asserted below
                errors.append(e)
                return

    readers = [threading.Thread(target=search) for _ in range(4)]
    for t in readers:
        t.start()
    try:
        for i in range(1, 151):
            if i % 10 == 1:  # searches run between the writes, however the threads are scheduled
                seen = searches[0]
                _wait_for(lambda: searches[0] > seen or errors, "a search")
            assert s.remove(i)
            removed.add(i)
            if i % 3 == 0:
                item = s.add_image(png(10_000 + i), fake)
                assert s.search(fake.vector(png(10_000 + i)), 1)[0][0].id == item["id"]
    finally:
        done.set()
        for t in readers:
            t.join()
    assert not errors, errors[0]
    assert searches[0] >= 15 and s.count() == 2000 - 150 + 50


def test_opening_while_a_finalize_swaps_the_files_retries(tmp_path, monkeypatch):
    vector_index(tmp_path / "idx", 300, "flat")
    manifest = tmp_path / "idx" / "manifest.json"
    good = manifest.read_text()
    m = json.loads(good)
    m["images"]["file"] = "images.g0-deleted-by-a-finalize.faiss"
    manifest.write_text(json.dumps(m))
    pauses = []

    class Retry:
        """index/search.py's `time` as the opener sees it: its pause between attempts, after finding a file
        missing, is when the finalize's new manifest lands."""

        def __getattr__(self, name):
            return getattr(time, name)

        def sleep(self, seconds: float) -> None:
            pauses.append(seconds)
            manifest.write_text(good)
            time.sleep(seconds)

    with monkeypatch.context() as patch:
        patch.setattr(search_module, "time", Retry())
        assert SearchIndex(tmp_path / "idx").count() == 300  # read the manifest again, found its files
    assert len(pauses) == 1
    manifest.write_text(json.dumps(m))
    monkeypatch.setattr(SearchIndex, "open_attempts", 3)
    with pytest.raises(Exception, match="images.g0-deleted-by-a-finalize.faiss, which is missing"):
        SearchIndex(tmp_path / "idx")
    manifest.write_text(good)
    # and for real: open again and again while finalize replaces every file, at least once between two
    fake, errors, opened, opened_since = FakeBundle(), [], [], threading.Event()

    def rebuild() -> None:
        try:
            for i in range(6):
                opened_since.clear()
                assert opened_since.wait(120), "no open between two finalizes"
                finalize(tmp_path / "idx", fake, kind=("hnsw", "flat")[i % 2], progress=False)
        except Exception as e:  # collected and asserted below
            errors.append(e)

    t = threading.Thread(target=rebuild, daemon=True)
    t.start()
    while t.is_alive():
        opened.append(SearchIndex(tmp_path / "idx").count())
        opened_since.set()
    t.join()
    assert not errors, errors[0]
    assert len(opened) >= 6 and set(opened) == {300}


LOCKER = """
import sys
from dsmd.index.lock import IndexBusy, folder_lock
try:
    with folder_lock(sys.argv[1], timeout=float(sys.argv[2])):
        print("got it")
except IndexBusy as e:
    print("busy:", e)
"""


def test_the_folder_lock_is_reentrant_and_excludes_threads_and_processes(tmp_path):
    vector_index(tmp_path / "idx", 50, "flat")
    s = SearchIndex(tmp_path / "idx")
    s.lock_timeout = 0.2
    locker = [sys.executable, "-c", LOCKER, str(tmp_path / "idx")]
    with folder_lock(tmp_path / "idx"):
        with folder_lock(tmp_path / "idx", timeout=0):  # nested in one thread: no deadlock
            pass
        out = subprocess.run([*locker, "0.3"], capture_output=True, text=True)
        assert out.stdout.startswith("busy: another process is writing to"), out.stderr[-2000:]
        errors = []
        t = threading.Thread(target=lambda: errors.append(_try(lambda: s.remove(1))))
        t.start()
        t.join()
        assert isinstance(errors[0], IndexBusy)
        assert s.item(1) is not None  # nothing was removed
    assert subprocess.run([*locker, "5"], capture_output=True, text=True).stdout.strip() == "got it"
    assert s.remove(1) and s.item(1) is None  # released: the write goes through


def _try(fn):
    try:
        fn()
    except Exception as e:
        return e
    return None
