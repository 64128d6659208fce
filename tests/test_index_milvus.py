"""The Milvus back end, against Milvus Lite (the embedded engine) on loopback: the same index folder,
the same API, the same results as exact search over vectors the tests embed themselves."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from milvus_lite.server_manager import server_manager_instance  # a broken install fails here, not skips
from pymilvus import MilvusClient
from serving import Server
from test_index import assert_exact_top

from dsmd.bundle import Bundle
from dsmd.datasets import load_dataset
from dsmd.errors import UserError
from dsmd.index.build import build, dataset_sources, finalize, info, remove
from dsmd.index.search import SearchIndex


@pytest.fixture(scope="module")
def embedded(tiny_search, tiny_world) -> dict[str, dict[str, np.ndarray]]:
    """The ground truth: the test split's images (by file name) and captions embedded here with the
    bundle, as the index stores them (float16)."""
    b = Bundle(tiny_search / "bundle")
    items = load_dataset(tiny_world).split("test")
    f16 = lambda v: v.astype(np.float16).astype(np.float32)  # noqa: E731
    captions = [c for it in items for c in it.captions]
    return {"images": dict(zip([it.path.name for it in items], f16(b.encode_images([it.path.read_bytes()
                                                                                    for it in items])))),
            "texts": dict(zip(captions, f16(b.encode_texts(captions))))}


def key(hit, target: str = "images") -> str:
    """What a hit is in the ground truth: an image's file name, a caption's text."""
    return Path(hit.item["uri"]).name if target == "images" else hit.item["text"]


def assert_exact_search(hits: list, queries: np.ndarray, truth: dict[str, np.ndarray], k: int,
                        target: str = "images") -> None:
    """Each row of hits is the exact top k of its query over the ground-truth vectors."""
    names, vectors = list(truth), np.stack(list(truth.values()))
    for q, row in zip(queries, hits):
        assert_exact_top([key(h, target) for h in row], [h.score for h in row], dict(zip(names, vectors @ q)), k)


def milvus_ids(uri: Path, collection: str, ids: list[int]) -> set[int]:
    """Which of `ids` the collection in the Milvus Lite file holds, asked with pymilvus itself (not through
    dsmd). The file's engine is stopped afterwards: no other client of it is open meanwhile."""
    client = MilvusClient(uri=str(uri))
    try:
        return {r["id"] for r in client.query(collection, filter=f"id in {ids}", output_fields=["id"])}
    finally:
        client.close()
        server_manager_instance.release_server(str(uri))


@pytest.fixture(scope="module")
def milvus_index(tiny_search, tiny_world, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("milvus")
    bundle = tiny_search / "bundle"
    backend = {"name": "milvus", "uri": str(root / "vectors.db"), "collection": "tiny"}
    build(root / "index", Bundle(bundle), dataset_sources(tiny_world, split="test"), progress=False, backend=backend)
    return bundle, root / "index"


def recall_at_10(hits: list, queries: np.ndarray, truth: dict[str, np.ndarray], target: str) -> float:
    """Recall@10 against the ground truth: the share of hits scoring at least the exact 10th best (to 1e-5)."""
    vectors = np.stack(list(truth.values()))
    found = []
    for q, row in zip(queries, hits):
        scores = dict(zip(truth, vectors @ q))
        tenth = np.sort(vectors @ q)[-10]
        found.append(sum(scores[key(h, target)] >= tenth - 1e-5 for h in row) / 10)
    return float(np.mean(found))


def test_a_milvus_index_holds_no_faiss_file_and_reports_the_recall_it_has(milvus_index, embedded):
    _, index = milvus_index
    m = info(index)
    assert m["backend"]["name"] == "milvus" and not list(index.glob("*.faiss"))
    with SearchIndex(index) as s:
        for part, other in (("images", "texts"), ("texts", "images")):  # captions query images, and back
            queries = np.stack(list(embedded[other].values()))
            measured = recall_at_10(s.search(queries, 10, part), queries, embedded[part], part)
            assert m[part]["collection"] == f"tiny_{part}" and m[part]["count"] == len(embedded[part])
            # Milvus Lite searches exhaustively (FLAT): all of the exact top 10, and the manifest says so
            assert m[part]["index"]["kind"] == "milvus" and m[part]["index"]["recall_at_10"] == measured == 1.0
            assert m[part]["shortfall"] is None
    out = subprocess.run([sys.executable, "-m", "dsmd.cli", "index", "info", str(index)], capture_output=True,
                         text=True, check=True).stdout
    assert "vectors in milvus" in out and "collection tiny_images" in out and "recall@10 vs exact 1.000" in out


def test_milvus_returns_the_exact_top_10_and_each_image_as_its_own_first_hit(milvus_index, embedded):
    _, index = milvus_index
    images, captions = embedded["images"], embedded["texts"]
    image_q = np.stack(list(images.values()))
    caption_q = np.stack(list(captions.values())[::5])  # one caption of each image
    with SearchIndex(index) as s:
        assert_exact_search(s.search(caption_q, 10, "images"), caption_q, images, 10)
        assert_exact_search(s.search(image_q, 10, "texts"), image_q, captions, 10, "texts")
        firsts = s.search(image_q, 1)
    assert [[key(h) for h in row] for row in firsts] == [[name] for name in images]
    assert all(row[0].score == pytest.approx(1.0, abs=2e-3) for row in firsts)


def test_closing_one_index_leaves_another_on_the_same_milvus_working(milvus_index):
    _, index = milvus_index
    a, b = SearchIndex(index), SearchIndex(index)
    q = a.db.vectors_of(np.array([1]))
    a.close()
    assert [h.id for h in b.search(q, 1)[0]] == [1]  # its own connection (pymilvus shares one per uri)
    b.close()


def _copy_on_its_own_milvus(built: Path, tmp_path: Path, bundle: Bundle, collection: str) -> tuple[Path, Path, dict]:
    """A copy of the index folder with its own Milvus Lite file (as --milvus-uri would give), filled by a
    finalize: (folder, Milvus file, manifest)."""
    index, vectors = tmp_path / "index", tmp_path / "vectors.db"
    shutil.copytree(built, index)
    m = finalize(index, bundle, progress=False, backend={"name": "milvus", "uri": str(vectors),
                                                          "collection": collection})
    return index, vectors, m


@pytest.mark.slow
def test_live_adds_and_removals_go_to_milvus_and_survive_reopening(milvus_index, embedded, tiny_world, tmp_path):
    bundle, built = milvus_index
    b = Bundle(bundle)
    index, _, _ = _copy_on_its_own_milvus(built, tmp_path, b, "copy")
    n = len(embedded["images"])
    name, v = next(iter(embedded["images"].items()))
    upload = _rotated(next((tiny_world / "images").glob("*.png")).read_bytes())
    with SearchIndex(index) as s:
        assert s.count("images") == n
        gone = s.search(v[None], 1)[0][0]
        assert key(gone) == name and s.remove(gone.id) and s.count("images") == n - 1
        assert gone.id not in [h.id for h in s.search(v[None], 10)[0]]
        item = s.add_image(upload, b)
        assert s.count("images") == n
        found = s.search(b.encode_images([upload]), 1)[0]
        assert [h.id for h in found] == [item["id"]] and found[0].score == pytest.approx(1.0, abs=2e-3)
    assert info(index)["pending_changes"] > 0
    with SearchIndex(index) as s:  # reopened: Milvus held the changes, nothing to reconcile
        assert s.count("images") == n and [h.id for h in s.search(b.encode_images([upload]), 1)[0]] == [item["id"]]
        assert s.item(gone.id) is None and not s.needs_compaction()
    m = finalize(index, b, progress=False)  # the backend is remembered; a finalize only syncs
    assert m["backend"]["name"] == "milvus" and m["images"]["inserted"] == 0 and m["images"]["deleted"] == 0


def test_a_finalize_deletes_from_milvus_what_was_removed_from_the_rows(milvus_index, tmp_path):
    """`dsmd index remove` changes the rows only (SQLite, the source of truth); the finalize after it syncs
    the collections to them: the item and its captions leave Milvus."""
    bundle, built = milvus_index
    b = Bundle(bundle)
    index, vectors, m = _copy_on_its_own_milvus(built, tmp_path, b, "sync")
    assert (m["images"]["inserted"], m["texts"]["inserted"]) == (24, 120)
    con = sqlite3.connect(index / "items.sqlite")
    victim, kept = (r[0] for r in con.execute("SELECT id FROM items ORDER BY id LIMIT 2"))
    captions = {i: [r[0] for r in con.execute("SELECT id FROM texts WHERE item_id = ?", (i,))] for i in (victim, kept)}
    con.close()
    assert len(captions[victim]) == 5 and remove(index, ids=[victim]) == 1
    assert milvus_ids(vectors, "sync_images", [victim, kept]) == {victim, kept}  # not synced yet
    m = finalize(index, b, progress=False)
    assert (m["images"]["inserted"], m["images"]["deleted"], m["texts"]["deleted"]) == (0, 1, 5)
    assert milvus_ids(vectors, "sync_images", [victim, kept]) == {kept}
    assert milvus_ids(vectors, "sync_texts", captions[victim] + captions[kept]) == set(captions[kept])


def test_a_finalize_given_no_collection_name_keeps_the_collections_the_index_has(milvus_index, tmp_path):
    """`--backend milvus --milvus-uri URI` again without `--collection`: the index goes on with the
    collections its manifest names (nothing re-inserted), not a new default pair beside them."""
    bundle, built = milvus_index
    b = Bundle(bundle)
    index, vectors, _ = _copy_on_its_own_milvus(built, tmp_path, b, "kept")
    m = finalize(index, b, progress=False, backend={"name": "milvus", "uri": str(vectors)})
    assert (m["images"]["collection"], m["texts"]["collection"]) == ("kept_images", "kept_texts")
    assert (m["images"]["inserted"], m["texts"]["inserted"]) == (0, 0)


def _rotated(png: bytes) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).rotate(90).save(buf, "PNG")
    return buf.getvalue()


def test_the_server_answers_from_milvus_as_exact_search_would(milvus_index, embedded):
    bundle, index = milvus_index
    texts = ["a red circle left of a blue square", "two yellow stars", "a green triangle"]
    with Server(bundle, index, args=("--backend", "milvus")) as srv:
        assert httpx.get(f"{srv.url}/info").json()["index"]["backend"] == "milvus"
        got = [httpx.get(f"{srv.url}/search", params={"text": t, "k": 10}).json()["results"] for t in texts]
    names, vectors = list(embedded["images"]), np.stack(list(embedded["images"].values()))
    for q, row in zip(Bundle(bundle).encode_texts(texts), got):  # exact search over the vectors embedded here
        assert_exact_top([r["name"] for r in row], [r["score"] for r in row], dict(zip(names, vectors @ q)), 10)


def test_serving_a_faiss_index_as_milvus_is_refused_with_the_fix(tiny_search):
    done = subprocess.run([sys.executable, "-m", "dsmd.cli", "serve", "--bundle", str(tiny_search / "bundle"),
                           "--index", str(tiny_search / "index"), "--backend", "milvus"], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode != 0 and "dsmd index build --backend milvus" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_an_unreachable_milvus_fails_before_the_embedding(tiny_search, tiny_world, tmp_path):
    backend = {"name": "milvus", "uri": "http://127.0.0.1:9", "collection": "x"}
    with pytest.raises(UserError, match="could not open Milvus at http://127.0.0.1:9"):
        build(tmp_path / "i", Bundle(tiny_search / "bundle"), dataset_sources(tiny_world, split="test"),
              progress=False, backend=backend)
    assert not (tmp_path / "i" / "items.sqlite").exists()
