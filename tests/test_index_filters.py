"""Filters inside the search, paging and near-duplicates (index/filtered.py), on every index kind.

Real FAISS and SQLite: an index of a few thousand random unit vectors with metadata of our
choosing (folders, times, sizes, tags, captions), checked against an exact filtered scan done here
with numpy over the same vectors.
"""

from __future__ import annotations

import datetime as dt
import io
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_index_live import DIM, FakeBundle

from dsmd.errors import UserError
from dsmd.index import filtered
from dsmd.index.build import add_images, bundle_fingerprint, finalize, folder_sources
from dsmd.index.db import IndexDB, NewItem
from dsmd.index.filtered import Ask, answer
from dsmd.index.filters import Filter
from dsmd.index.metadata import exif_facts, set_tags
from dsmd.index.search import SearchIndex

N = 3000
FOLDERS = ["2023", "2023/june", "2023b", "2024", "uploads"]


def metadata_of(i: int) -> dict:
    """Item i's metadata: folder by i % 5, one item in 100 in '2024', EXIF time for even i, mtime always."""
    folder = "2024" if i % 100 == 7 else FOLDERS[i % 5 if i % 5 != 3 else 0]
    meta = {"folder": folder, "bytes": 1000 + i, "mtime": 1_600_000_000 + 3600 * i}
    if i % 2 == 0:
        meta["taken"] = 1_500_000_000 + 3600 * i
    return meta


def build(path: Path, kind: str, n: int = N, seed: int = 0, vectors: np.ndarray | None = None) -> np.ndarray:
    """An index of n clustered random unit vectors with metadata (ids 1..n), finalized as `kind`; returns
    the vectors as stored (float16), so that exact scans here rank as the index does."""
    rng = np.random.default_rng(seed)
    if vectors is None:
        x = rng.normal(size=(60, DIM))[rng.integers(0, 60, n)] + 0.4 * rng.normal(size=(n, DIM))
        vectors = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    path.mkdir(parents=True)
    fake = FakeBundle()
    db = IndexDB(path / "items.sqlite", DIM, bundle_fingerprint(fake), "fp32")
    db.replace([NewItem(f"mem://{i}", f"{i:064x}", 10 + i % 50, 20, ["a caption"] if i % 4 == 0 else [], v,
                        meta=metadata_of(i)) for i, v in enumerate(vectors)])
    with db.transaction():
        for i in range(0, len(vectors), 10):
            set_tags(db.con, i + 1, ["beach"] + (["sunset"] if i % 20 == 0 else []))
    db.close()
    finalize(path, fake, kind=kind, progress=False)
    return vectors.astype(np.float16).astype(np.float32)  # as the index stores them


def exact_filtered(index: SearchIndex, vectors: np.ndarray, q: np.ndarray, where: Filter, k: int) -> list[int]:
    """The top k of an exact scan over the items the filter keeps (ids are row + 1), ties by id."""
    cond, args = where.sql()
    keep = np.array([r[0] for r in index.db.con.execute(f"SELECT id FROM items WHERE {cond}", args)]) - 1
    scores = vectors[keep] @ q
    order = np.lexsort((keep, -scores))[:k]
    return [int(keep[o]) + 1 for o in order]


@pytest.fixture(scope="module", params=["flat", "hnsw"])
def kind_index(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"filters-{request.param}") / "idx"
    vectors = build(path, request.param)
    with SearchIndex(path) as s:
        yield request.param, s, vectors


def queries(vectors: np.ndarray, n: int = 8) -> np.ndarray:
    return vectors[np.random.default_rng(1).integers(0, len(vectors), n)]


def test_a_1_percent_filter_returns_k_results_as_an_exact_scan(kind_index):
    kind, s, vectors = kind_index
    where = Filter(folder="2024")  # i % 100 == 7: 1% of the items
    assert s.db.con.execute(f"SELECT COUNT(*) FROM items WHERE {where.sql()[0]}", where.sql()[1]).fetchone()[0] == 30
    for q in queries(vectors):
        ans = answer(s, q, Ask(10, where=where))
        assert ans.strategy == "exact"
        assert [h.id for h in ans.hits] == exact_filtered(s, vectors, q, where, 10)
        assert all(h.item["folder"] == "2024" for h in ans.hits)


def test_broad_filters_post_filter_the_ann_ranking(kind_index, monkeypatch):
    """Past EXACT_MAX matches the ANN ranking is filtered afterwards: on a flat index it is exact, on
    HNSW its recall@10 is that of the index (>= 0.9 here)."""
    kind, s, vectors = kind_index
    monkeypatch.setattr(filtered, "EXACT_MAX", 50)
    for where in (Filter(folder="2023"), Filter(tags_any=("beach",)), Filter(taken_from=1_500_000_000 + 3600 * 1000)):
        found = 0
        for q in queries(vectors):
            ans = answer(s, q, Ask(10, where=where))
            assert ans.strategy == "post-filter" and len(ans.hits) == 10
            exact = exact_filtered(s, vectors, q, where, 10)
            found += len({h.id for h in ans.hits} & set(exact))
            if kind == "flat":
                assert [h.id for h in ans.hits] == exact
        assert found / 80 >= 0.9, (where, found)


def test_a_filter_far_from_the_query_falls_back_to_an_exact_scan(kind_index, monkeypatch):
    kind, s, vectors = kind_index
    monkeypatch.setattr(filtered, "EXACT_MAX", 10)
    monkeypatch.setattr(filtered, "ANN_MAX", 60)
    where = Filter(folder="2023/june")  # 20% of the items: more than EXACT_MAX, and 60 candidates cannot hold 10
    q = vectors[0]  # an item in '2023' (not june): its neighbours are mostly elsewhere
    ans = answer(s, q, Ask(40, where=where))
    assert ans.strategy == "scan"
    assert [h.id for h in ans.hits] == exact_filtered(s, vectors, q, where, 40)


@pytest.mark.parametrize("where, check", [
    (Filter(folder="2023"), lambda it: it["folder"] in ("2023", "2023/june")),  # not '2023b'
    (Filter(folder="2023/june/"), lambda it: it["folder"] == "2023/june"),
    (Filter(tags_all=("beach", "sunset")), lambda it: set(it["tags"]) == {"beach", "sunset"}),
    (Filter(tags_any=("sunset", "nothing")), lambda it: "sunset" in it["tags"]),
    (Filter(min_bytes=3500), lambda it: it["bytes"] >= 3500),
    (Filter(min_side=15), lambda it: min(it["width"], it["height"]) >= 15),
    (Filter(has_captions=True), lambda it: it["captions"] == ["a caption"]),
    (Filter(has_captions=False), lambda it: it["captions"] == []),
    # the capture time, else the file's time: odd items have no EXIF time and count by mtime
    (Filter(taken_from=1_600_000_000, taken_to=1_600_000_000 + 3600 * 99),
     lambda it: it["taken"] is None and 1_600_000_000 <= it["mtime"] <= 1_600_000_000 + 3600 * 99),
])
def test_each_filter_keeps_exactly_its_items(kind_index, where, check):
    kind, s, vectors = kind_index
    hits = answer(s, vectors[0], Ask(200, where=where)).hits
    assert hits and all(check(s.item(h.id)) for h in hits)
    cond, args = where.sql()
    total = s.db.con.execute(f"SELECT COUNT(*) FROM items WHERE {cond}", args).fetchone()[0]
    assert len(hits) == min(200, total)


def test_pages_never_overlap_or_skip(kind_index):
    """Pages of 7 read one after another are the first 70 of a single ranking, filtered or not."""
    kind, s, vectors = kind_index
    for where in (None, Filter(folder="2023"), Filter(folder="2024")):
        q = vectors[5]
        pages, offset = [], 0
        while offset is not None and offset < 70:
            ans = answer(s, q, Ask(7, where=where, offset=offset))
            pages += [h.id for h in ans.hits]
            offset = offset + 7 if ans.more else None
        whole = [h.id for h in answer(s, q, Ask(70, where=where)).hits]
        assert pages == whole and len(set(pages)) == len(pages)
    last = answer(s, vectors[5], Ask(10, where=Filter(folder="2024"), offset=25))
    assert [h.id for h in last.hits] == exact_filtered(s, vectors, vectors[5], Filter(folder="2024"), 30)[25:]
    assert not last.more


def test_min_score_applies_before_paging(kind_index):
    kind, s, vectors = kind_index
    q = vectors[3]
    scores = [h.score for h in answer(s, q, Ask(100)).hits]
    floor = scores[14] - 1e-6  # 15 results pass
    first = answer(s, q, Ask(10, min_score=floor))
    second = answer(s, q, Ask(10, min_score=floor, offset=10))
    assert len(first.hits) == 10 and first.more and len(second.hits) == 5 and not second.more


def test_dedup_folds_near_duplicates_and_keeps_the_best_of_each_group(tmp_path):
    rng = np.random.default_rng(3)
    base = rng.normal(size=(100, DIM))
    # groups of 4 near-copies (a burst of shots) of 100 distinct images
    x = np.repeat(base, 4, axis=0) + 0.01 * rng.normal(size=(400, DIM))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    build(tmp_path / "idx", "flat", vectors=x)
    with SearchIndex(tmp_path / "idx") as s:
        q = x[0] + 0.5 * x[8]
        q /= np.linalg.norm(q)
        plain = answer(s, q, Ask(400)).hits
        ans = answer(s, q, Ask(10, dedup=0.95))
        group = lambda i: (i - 1) // 4  # noqa: E731 - ids are row + 1
        assert len(ans.hits) == 10 and len({group(h.id) for h in ans.hits}) == 10
        best = {}
        for h in plain:  # the best-ranked member of each group in the plain ranking
            best.setdefault(group(h.id), h.id)
        assert [h.id for h in ans.hits] == [best[group(h.id)] for h in ans.hits]
        assert ans.collapsed == sum(ans.duplicates.values()) >= 10
        assert ans.hits[0].id == plain[0].id
        page2 = answer(s, q, Ask(10, dedup=0.95, offset=10)).hits
        assert not {group(h.id) for h in page2} & {group(h.id) for h in ans.hits}


def test_asking_wrong_is_a_clear_error():
    with pytest.raises(UserError, match="image results"):
        Ask(10, target="texts", where=Filter(folder="a"))
    with pytest.raises(UserError, match="cosine"):
        Ask(10, dedup=1.5)
    with pytest.raises(UserError, match="after"):
        Filter(taken_from=10, taken_to=5)


def test_an_index_made_before_metadata_gains_it_on_opening(tmp_path):
    """Old items.sqlite files have no metadata columns: a writer adds them (items keep NULLs), a
    read-only reader of an old file reads NULLs instead of failing."""
    path = tmp_path / "items.sqlite"
    db = IndexDB(path, DIM, "f" * 64, "fp32")
    db.replace([NewItem("a", "x", 1, 2, [], np.ones(DIM, np.float32) / 4)])
    db.close()
    con = sqlite3.connect(path)  # back to the schema of 2026-12-06
    con.executescript("""DROP TABLE items_fts; DROP TRIGGER items_fts_insert; DROP TRIGGER items_fts_delete;
        DROP TRIGGER items_fts_update; DROP TRIGGER tags_fts_insert; DROP TRIGGER tags_fts_delete;
        DROP INDEX items_by_folder; DROP INDEX items_by_time; DROP INDEX items_by_bytes;
        DROP TABLE tags; DROP TABLE copies; ALTER TABLE items DROP COLUMN bytes;
        ALTER TABLE items DROP COLUMN mtime; ALTER TABLE items DROP COLUMN taken;
        ALTER TABLE items DROP COLUMN camera; ALTER TABLE items DROP COLUMN folder;""")
    con.close()
    ro = IndexDB(path, readonly=True)
    assert ro.items([1])[1]["folder"] is None and ro.items([1])[1]["tags"] == []
    assert ro.items([1], brief=True)[1]["folder"] is None and ro.items([1], brief=True)[1]["tags"] == []
    ro.close()
    db = IndexDB(path)
    assert {"bytes", "mtime", "taken", "camera", "folder"} <= {r[1] for r in db.con.execute("PRAGMA table_info(items)")}
    with db.transaction():
        assert set_tags(db.con, 1, [" b ", "a", "b"]) and not set_tags(db.con, 99, ["a"])
    assert db.items([1])[1]["tags"] == ["a", "b"]
    assert db.items(list(range(1, 300)), brief=True)[1]["tags"] == ["a", "b"]  # a long list: bound as JSON
    with pytest.raises(UserError, match="control character"), db.transaction():
        set_tags(db.con, 1, ["a\x1fb"])  # rows() joins tags with that one
    db.remove([1])
    assert db.con.execute("SELECT COUNT(*) FROM tags").fetchone()[0] == 0  # gone with their item
    db.close()


def photo(path: Path, when: str | None = None, camera: str | None = None, offset: str | None = None) -> None:
    exif = Image.Exif()
    if when:
        exif.get_ifd(0x8769)[36867] = when
        if offset:
            exif.get_ifd(0x8769)[36881] = offset
    if camera:
        exif[272] = camera
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(len(str(path))).integers(0, 256, (24, 32, 3), np.uint8)).save(
        path, "JPEG", exif=exif.tobytes())


def test_a_folder_build_records_folder_size_time_and_camera(tmp_path):
    root = tmp_path / "photos"
    photo(root / "top.jpg")
    photo(root / "2023" / "june" / "a.jpg", "2023:06:30 18:00:00", "Pixel 8")
    photo(root / "2023" / "b.jpg", "2023:01:02 03:04:05", offset="+02:00")
    add_images(tmp_path / "idx", FakeBundle(), folder_sources(root), progress=False)
    db = IndexDB(tmp_path / "idx" / "items.sqlite", readonly=True)
    rows = {Path(it["uri"]).name: it for it in db.items(list(range(1, 4))).values()}
    db.close()
    assert rows["top.jpg"]["folder"] == "" and rows["top.jpg"]["taken"] is None
    assert rows["a.jpg"]["folder"] == "2023/june" and rows["a.jpg"]["camera"] == "Pixel 8"
    utc = dt.timezone.utc
    assert rows["a.jpg"]["taken"] == dt.datetime(2023, 6, 30, 18, tzinfo=utc).timestamp()  # no zone: read as UTC
    assert rows["b.jpg"]["taken"] == dt.datetime(2023, 1, 2, 1, 4, 5, tzinfo=utc).timestamp()  # its own +02:00
    assert rows["b.jpg"]["bytes"] == (root / "2023" / "b.jpg").stat().st_size
    assert rows["b.jpg"]["mtime"] == pytest.approx((root / "2023" / "b.jpg").stat().st_mtime)


def test_a_broken_exif_block_never_stops_an_image():
    img = Image.new("RGB", (4, 4))
    img.info["exif"] = b"Exif\x00\x00garbage"
    assert exif_facts(img) == {}
    buf = io.BytesIO()
    img.save(buf, "PNG")
    assert exif_facts(Image.open(buf)) == {}


def test_duplicates_lists_exact_copies_apart_from_near_groups(tmp_path):
    import json
    import subprocess
    import sys

    rng = np.random.default_rng(5)
    root = tmp_path / "photos"
    (root / "copy").mkdir(parents=True)
    pixels = [rng.integers(0, 256, (8, 8, 3)).astype(np.int16) for _ in range(4)]
    near = np.clip(pixels[0] + rng.integers(-6, 7, (8, 8, 3)), 0, 255)  # a burst shot of image 0
    for name, p in (("a.png", pixels[0]), ("b.png", near), ("c.png", pixels[1]), ("d.png", pixels[2]),
                    ("e.png", pixels[3])):
        Image.fromarray(p.astype(np.uint8)).resize((32, 32), Image.NEAREST).save(root / name)
    (root / "copy" / "a.png").write_bytes((root / "a.png").read_bytes())
    fake = FakeBundle()
    report = add_images(tmp_path / "idx", fake, folder_sources(root), progress=False)
    assert report.added == 5 and report.already == 1
    finalize(tmp_path / "idx", fake, progress=False)
    out = subprocess.run([sys.executable, "-m", "dsmd.cli", "index", "duplicates", str(tmp_path / "idx"), "--json"],
                         capture_output=True, text=True, check=True).stdout
    found = json.loads(out)
    assert [(Path(g["uri"]).name, [Path(c).parent.name for c in g["copies"]]) for g in found["exact"]] == \
        [("a.png", ["copy"])]
    assert [sorted(Path(u).name for u in g["uris"]) for g in found["near"]] == [["a.png", "b.png"]]
    assert found["near"][0]["max_cosine"] >= 0.95
    text = subprocess.run([sys.executable, "-m", "dsmd.cli", "index", "duplicates", str(tmp_path / "idx"),
                           "--threshold", "2"], capture_output=True, text=True)
    assert text.returncode != 0 and "--threshold" in text.stderr


def test_a_search_deeper_than_efsearch_still_returns_k(kind_index):
    """HNSW keeps efSearch candidates (tuned small here): asked for more (a deep page, a filter's
    over-fetch), it must search deeper, not return fewer (it returned fewer than 300 before)."""
    kind, s, vectors = kind_index
    q = vectors[9][None]
    assert len(s.search(q, 300)[0]) == 300
    exact = np.argsort(-(vectors @ vectors[9]))[:300] + 1
    got = [h.id for h in s.search(q, 300)[0]]
    assert len(set(got) & set(exact.tolist())) >= 0.95 * 300
