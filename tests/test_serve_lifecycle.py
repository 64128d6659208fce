"""The server over time: another process changes its index, its writes pile up and compact, it runs on an
index it may not write, it is killed in the middle of an upload. Real uvicorn in a subprocess each time;
what it should answer is computed here (test_serve.Truth: the bundle encodes, numpy ranks), and what is
on disk is read here with sqlite3 and the file system, not through the code under test."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from serving import Server, copy_search
from test_serve import TOKEN, Truth, assert_exact_top_k

from dsmd.index.search import SearchIndex

AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def truth(tiny_search, tiny_world) -> Truth:
    return Truth(tiny_search / "bundle", tiny_world)


def wait_for(condition, what: str, timeout: float = 30.0) -> None:
    """Poll `condition` until it holds; fail after `timeout` seconds (generous: the machine is shared)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:g} s")
        time.sleep(0.05)


def dsmd(*args: str) -> None:
    """The `dsmd` command line in its own process (another process than the server)."""
    done = subprocess.run([sys.executable, "-m", "dsmd.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    assert done.returncode == 0, done.stdout + done.stderr


def images_count(s: Server) -> int:
    return httpx.get(f"{s.url}/info").json()["index"]["images"]["count"]


def search_image(s: Server, data: bytes, k: int, **params) -> list[dict]:
    r = httpx.post(f"{s.url}/search/image", params={"k": k, **params}, files={"file": ("q.png", data)}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["results"]


def rows(index: Path) -> list[tuple[int, str]]:
    """(id, sha256) of every item, read with sqlite3 itself."""
    with sqlite3.connect(f"file:{index / 'items.sqlite'}?mode=ro", uri=True) as con:
        return con.execute("SELECT id, sha256 FROM items ORDER BY id").fetchall()


def test_the_server_serves_what_another_process_adds_to_or_removes_from_its_index(tiny_search, truth, tmp_path):
    """`dsmd index build` and `dsmd index remove` rewrite the manifest from other processes: the server
    opens the new index (count, generation) and finds the added image first, then never again."""
    bundle, index = copy_search(tiny_search, tmp_path)
    new = truth.new_images(1)[0]
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / new.name).write_bytes(new.read_bytes())
    exact = {**truth.scores(truth.encode([new.name])[0]), new.name: 1.0}
    with Server(bundle, index, {"DSMD_RELOAD_CHECK_S": "0.2"}) as s:
        generation = s.metric("dsmd_index_generation", collection="index")
        dsmd("index", "build", str(index), "--bundle", str(bundle), "--folder", str(tmp_path / "extra"))
        wait_for(lambda: images_count(s) == 25, "the server counting the image added by another process")
        assert s.metric("dsmd_index_generation", collection="index") > generation
        hits = search_image(s, new.read_bytes(), 5)
        assert hits[0]["name"] == new.name
        assert_exact_top_k(hits, exact, 5)

        dsmd("index", "remove", str(index), "--bundle", str(bundle), "--id", str(hits[0]["id"]))
        wait_for(lambda: images_count(s) == 24, "the server counting the removal by another process")
        del exact[new.name]
        assert_exact_top_k(search_image(s, new.read_bytes(), 25), exact, 25)


def test_writes_past_the_threshold_compact_in_the_background_while_searches_go_on(tiny_search, truth, tmp_path):
    """Removing items takes their captions with them: past SearchIndex.compaction_min dead captions the
    server rebuilds the index files in the background. Searches answer 200 all along, and the rebuilt
    files (manifest on disk) and the answers hold exactly the rows."""
    bundle, index = copy_search(tiny_search, tmp_path)
    added = truth.new_images(3)
    doomed: list[str] = []  # the first items whose captions, removed with them, pass the threshold
    while sum(len(truth.captions[n]) for n in doomed) <= SearchIndex.compaction_min:
        doomed.append(truth.names[len(doomed)])
    kept = [n for n in truth.names if n not in doomed]
    with Server(bundle, index, {"DSMD_TOKEN": TOKEN, "DSMD_REQUEST_TIMEOUT_S": "60"}) as s:
        generation = s.metric("dsmd_index_generation", collection="index")
        every = httpx.get(f"{s.url}/search", params={"text": "a", "k": 24}).json()["results"]
        ids = {h["name"]: h["id"] for h in every}
        statuses: list[int] = []
        stop = threading.Event()

        def search_all_along() -> None:
            with httpx.Client(base_url=s.url, timeout=30) as c:
                while not stop.is_set():
                    statuses.append(c.get("/search", params={"text": f"a shape {len(statuses) % 7}", "k": 5})
                                    .status_code)

        searcher = threading.Thread(target=search_all_along)
        searcher.start()
        try:
            served = {}  # image file -> (id, name) as served: an upload is named by its content
            for path in added:
                r = httpx.post(f"{s.url}/items", files={"file": ("a.png", path.read_bytes())}, headers=AUTH,
                               timeout=30)
                assert r.status_code == 201, r.text
                served[path.name] = r.json()["id"], r.json()["name"]
            for name in doomed:
                assert httpx.delete(f"{s.url}/items/{ids[name]}", headers=AUTH, timeout=30).status_code == 200
            wait_for(lambda: s.metric("dsmd_index_generation", collection="index") > generation, "a compaction")
        finally:
            stop.set()
            searcher.join()
        assert len(statuses) > 0 and set(statuses) == {200}, statuses

        manifest = json.loads((index / "manifest.json").read_text())
        assert manifest["images"]["count"] == len(kept) + len(added)
        assert manifest["texts"]["count"] == sum(len(truth.captions[n]) for n in kept)
        for path in added:
            assert search_image(s, path.read_bytes(), 1)[0]["id"] == served[path.name][0]
        vectors = truth.encode([p.name for p in added] + kept)
        exact = truth.scores(vectors[0], [served[p.name][1] for p in added] + kept, vectors)
        assert_exact_top_k(search_image(s, added[0].read_bytes(), 24), exact, 24)
        assert all(httpx.get(f"{s.url}/items/{ids[n]}").status_code == 404 for n in doomed)


def test_writes_are_answered_while_a_compaction_runs_and_reach_the_rebuilt_index(tiny_search, truth, tmp_path):
    """A compaction is a full rebuild; it once ran on the writer thread, so every write waited for it. With
    the rebuild held for 20 s (DSMD_COMPACT_DELAY_MS), an upload and a delete are answered while
    dsmd_index_compacting is still 1, and both are in the index the compaction swaps in."""
    bundle, index = copy_search(tiny_search, tmp_path)
    doomed: list[str] = []
    while sum(len(truth.captions[n]) for n in doomed) <= SearchIndex.compaction_min:
        doomed.append(truth.names[len(doomed)])
    env = {"DSMD_TOKEN": TOKEN, "DSMD_REQUEST_TIMEOUT_S": "60", "DSMD_COMPACT_DELAY_MS": "20000"}
    with Server(bundle, index, env) as s:
        generation = s.metric("dsmd_index_generation", collection="index")
        every = httpx.get(f"{s.url}/search", params={"text": "a", "k": 24}).json()["results"]
        ids = {h["name"]: h["id"] for h in every}
        for name in doomed:
            assert httpx.delete(f"{s.url}/items/{ids[name]}", headers=AUTH, timeout=30).status_code == 200
        wait_for(lambda: s.metric("dsmd_index_compacting") == 1, "a compaction")
        new = truth.new_images(1)[0]
        added = httpx.post(f"{s.url}/items", files={"file": ("a.png", new.read_bytes())}, headers=AUTH, timeout=60)
        gone = truth.names[len(doomed)]
        removed = httpx.delete(f"{s.url}/items/{ids[gone]}", headers=AUTH, timeout=60)
        assert s.metric("dsmd_index_compacting") == 1, "the writes waited for the compaction"
        assert added.status_code == 201 and removed.status_code == 200, (added.text, removed.text)
        wait_for(lambda: s.metric("dsmd_index_generation", collection="index") > generation, "the compaction",
                 timeout=90)
        assert search_image(s, new.read_bytes(), 1)[0]["id"] == added.json()["id"]
        assert httpx.get(f"{s.url}/items/{ids[gone]}").status_code == 404
        # one more removed, one added
        assert s.metric("dsmd_index_items", collection="index", part="images") == 24 - len(doomed)

def _floor(exact: dict) -> tuple[float, int]:
    """A score halfway between two neighbouring exact scores that are far apart compared with float16's
    error, and how many items score above it."""
    ranked = sorted(exact.values(), reverse=True)
    gaps = [i for i in range(3, len(ranked) - 3) if ranked[i - 1] - ranked[i] > 4e-3]
    assert gaps, f"no clear gap between the exact scores {ranked}"
    return (ranked[gaps[0] - 1] + ranked[gaps[0]]) / 2, gaps[0]


def test_min_score_returns_exactly_the_hits_at_or_above_it(tiny_search, truth, tmp_path):
    """The server's floor (DSMD_MIN_SCORE) and a request's own (which overrides it) each let exactly the
    items above them through: /search, /search/image and /items/{id}/similar."""
    bundle, index = copy_search(tiny_search, tmp_path)
    text, name = "a red circle left of a blue square", truth.names[5]
    by_text, by_image = truth.text(text), truth.image(name)
    (text_floor, text_n), (image_floor, image_n) = _floor(by_text), _floor(by_image)
    with Server(bundle, index, {"DSMD_MIN_SCORE": repr(image_floor)}) as s:
        answers = [
            (by_text, text_floor, text_n, httpx.get(f"{s.url}/search", params={"text": text, "k": 24,
                                                                              "min_score": text_floor})),
            (by_image, image_floor, image_n, httpx.post(f"{s.url}/search/image", params={"k": 24}, files={
                "file": ("q.png", (truth.world / "images" / name).read_bytes())}))]
        item = answers[1][3].json()["results"][0]["id"]
        answers.append((by_image, image_floor, image_n, httpx.get(f"{s.url}/items/{item}/similar",
                                                                   params={"k": 24})))
        for exact, floor, n, r in answers:
            results = r.json()["results"]
            assert {x["name"] for x in results} == {m for m, v in exact.items() if v > floor}, r.url
            assert len(results) == n
            assert_exact_top_k(results, exact, n)


def test_an_index_the_server_cannot_write_is_left_as_it_was(tiny_search, truth, tmp_path):
    """Served read-only because its folder cannot be written (found out at start-up, no flag): a DELETE and
    a POST get 403, and the rows, the vectors and the answers stay what they were.
    (tests/test_serve_limits.py checks the 403's wording.) Root may write anywhere, so the server sees the
    folder as another uid would: os.access says no."""
    bundle, index = copy_search(tiny_search, tmp_path)
    before = rows(index)
    files = {p.name: p.read_bytes() for p in (index / "vectors").iterdir()}
    s = Server(bundle, index, {"DSMD_TOKEN": TOKEN})
    deny = (f"import os, sys; real = os.access; os.access = lambda p, mode, **kw: not (mode & os.W_OK and "
            f"str(p).startswith({str(index)!r})) and real(p, mode, **kw); from dsmd.cli import main; "
            f"sys.exit(main(sys.argv[1:]))")
    s.cmd = [sys.executable, "-c", deny, *s.cmd[s.cmd.index("serve"):]]
    name = truth.most_distinct()
    data = (truth.world / "images" / name).read_bytes()
    with s:
        assert httpx.get(f"{s.url}/info").json()["index"]["writes"] is False
        hit = search_image(s, data, 1)[0]
        assert hit["name"] == name
        assert httpx.delete(f"{s.url}/items/{hit['id']}", headers=AUTH).status_code == 403
        new = truth.new_images(1)[0].read_bytes()
        assert httpx.post(f"{s.url}/items", files={"file": ("n.png", new)}, headers=AUTH).status_code == 403
        assert search_image(s, data, 1)[0]["id"] == hit["id"]
        assert httpx.get(f"{s.url}/items/{hit['id']}").status_code == 200
        assert images_count(s) == 24
    assert rows(index) == before
    assert {p.name: p.read_bytes() for p in (index / "vectors").iterdir()} == files
    assert not (index / "uploads").exists()


# ---------------------------------------------------------------- killed in the middle of an upload


def _waiting_for_the_folder_lock(s: Server, index: Path) -> bool:
    """Whether the server has the folder's lock file open: with the test holding the lock, it waits there."""
    lock = str((index / ".lock").resolve())
    fds = Path(f"/proc/{s.pid}/fd")
    return any(os.path.realpath(fd) == lock for fd in fds.iterdir())


def _upload_in_background(s: Server, data: bytes) -> tuple[threading.Thread, list]:
    answer: list = []

    def send() -> None:
        try:
            answer.append(httpx.post(f"{s.url}/items", files={"file": ("u.png", data)}, headers=AUTH, timeout=60))
        except httpx.HTTPError as e:  # the server was killed under it
            answer.append(e)

    thread = threading.Thread(target=send)
    thread.start()
    return thread, answer


def test_an_upload_killed_at_any_moment_is_stored_exactly_once_when_sent_again(tiny_search, truth, tmp_path):
    """SIGKILL the server during (or right after) a POST /items, at points found by polling and at random
    ones, restart it and send the same image again: each image ends up once in the rows and once in
    uploads/, an answered upload survives the kill, and no temporary file is left in the index folder."""
    bundle, index = copy_search(tiny_search, tmp_path)
    rng = random.Random(7)
    points = ["waiting for the lock", "just after the lock", "at random", "at random", "after the answer"]
    images = truth.new_images(len(points))
    ids: dict[str, int] = {}
    env = {"DSMD_TOKEN": TOKEN, "DSMD_REQUEST_TIMEOUT_S": "60"}
    s = Server(bundle, index, env).__enter__()
    try:
        for path, point in zip(images, points):
            data = path.read_bytes()
            with open(index / ".lock", "a+") as lock:
                if point in ("waiting for the lock", "just after the lock"):
                    fcntl.flock(lock, fcntl.LOCK_EX)  # the index's folder lock (index/lock.py), as another writer
                thread, answer = _upload_in_background(s, data)
                if point == "after the answer":
                    thread.join()
                elif point == "at random":
                    time.sleep(rng.uniform(0, 0.3))
                else:
                    wait_for(lambda: _waiting_for_the_folder_lock(s, index), "the upload waiting for the lock")
                    if point == "just after the lock":
                        fcntl.flock(lock, fcntl.LOCK_UN)
                        time.sleep(rng.uniform(0, 0.06))  # the server polls the lock every 50 ms at most
                os.kill(s.pid, signal.SIGKILL)
                s.__exit__(None, None, None)
            thread.join()
            if isinstance(answer[0], httpx.Response):
                assert answer[0].status_code == 201, answer[0].text
            acknowledged = answer[0].json()["id"] if isinstance(answer[0], httpx.Response) else None

            s = Server(bundle, index, env).__enter__()
            if acknowledged is not None:  # answered 201 before the kill: it is there before any retry
                assert httpx.get(f"{s.url}/items/{acknowledged}").status_code == 200
            r = httpx.post(f"{s.url}/items", files={"file": ("u.png", data)}, headers=AUTH, timeout=30)
            assert r.status_code == 201, r.text
            ids[path.name] = r.json()["id"]
            assert acknowledged in (None, ids[path.name])

        for path in images:
            assert search_image(s, path.read_bytes(), 1)[0]["id"] == ids[path.name]
        assert images_count(s) == 24 + len(images)
    finally:
        s.__exit__(None, None, None)
    shas = [hashlib.sha256(p.read_bytes()).hexdigest() for p in images]
    stored = [sha for _, sha in rows(index)]
    assert all(stored.count(sha) == 1 for sha in shas) and len(stored) == 24 + len(images)
    assert sorted(p.name for p in (index / "uploads").iterdir()) == sorted(f"{sha[:32]}.png" for sha in shas)
    assert all((index / "uploads" / f"{sha[:32]}.png").read_bytes() == p.read_bytes() for sha, p in zip(shas, images))
    assert [p for p in index.rglob("*") if p.name.endswith(".tmp")] == []
