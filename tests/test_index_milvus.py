"""The Milvus back end, against Milvus Lite (the embedded engine) on loopback: the same index folder,
the same API, the same results as exact FAISS search on the same vectors."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from serving import Server

from dsmd.bundle import Bundle
from dsmd.datasets import load_dataset
from dsmd.errors import UserError
from dsmd.index.build import build, dataset_sources, finalize, info
from dsmd.index.db import IndexDB
from dsmd.index.search import SearchIndex

pytest.importorskip("milvus_lite")


def _exact_top(index: Path, queries: np.ndarray, k: int, table: str = "items") -> tuple[np.ndarray, np.ndarray]:
    """Exact FAISS search over the vectors the index's SQLite holds."""
    import faiss

    db = IndexDB(index / "items.sqlite", readonly=True)
    ids, vecs = (np.concatenate(x) for x in zip(*db.vectors(table)))
    db.close()
    flat = faiss.IndexIDMap2(faiss.IndexFlatIP(vecs.shape[1]))
    flat.add_with_ids(vecs, ids)
    return flat.search(np.ascontiguousarray(queries, np.float32), k)


def _same_top(got_ids, got_scores, want_ids, want_scores) -> None:
    """The same top k: equal scores rank for rank, and the same ids except where two scores tie."""
    np.testing.assert_allclose(got_scores, want_scores, atol=1e-4)
    for g, w, s in zip(got_ids, want_ids, want_scores):
        tied = np.isclose(s[:, None], s[None, :], atol=1e-5).sum(1) > 1
        assert all(a == b for a, b, t in zip(g, w, tied) if not t), (g, w)


@pytest.fixture(scope="module")
def milvus_index(tiny_search, tiny_world, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("milvus")
    bundle = tiny_search / "bundle"
    backend = {"name": "milvus", "uri": str(root / "vectors.db"), "collection": "tiny"}
    build(root / "index", Bundle(bundle), dataset_sources(tiny_world, split="test"), progress=False, backend=backend)
    return bundle, root / "index"


def test_a_milvus_index_holds_no_faiss_file_and_reports_its_recall(milvus_index):
    _, index = milvus_index
    m = info(index)
    assert m["backend"]["name"] == "milvus" and not list(index.glob("*.faiss"))
    for part in ("images", "texts"):
        assert m[part]["collection"] == f"tiny_{part}" and m[part]["count"] > 0
        assert m[part]["index"]["kind"] == "milvus" and m[part]["index"]["recall_at_10"] >= 0.95
        assert m[part]["shortfall"] is None
    out = subprocess.run([sys.executable, "-m", "dsmd.cli", "index", "info", str(index)], capture_output=True,
                         text=True, check=True).stdout
    assert "vectors in milvus" in out and "collection tiny_images" in out and "recall@10 vs exact 1.000" in out


def test_milvus_returns_the_top_10_of_exact_search(milvus_index, tiny_world):
    bundle, index = milvus_index
    b = Bundle(bundle)
    caps = [c for it in load_dataset(tiny_world).split("test")[:8] for c in it.captions[:1]]
    q = b.encode_texts(caps)
    want_s, want_i = _exact_top(index, q, 10)
    with SearchIndex(index) as s:
        hits = s.search(q, 10, "images")
        image_q = s.db.vectors_of(np.array([h[0].id for h in hits]), "items")
        text_hits = s.search(image_q, 10, "texts")
    _same_top([[h.id for h in row] for row in hits], np.array([[h.score for h in row] for row in hits]), want_i, want_s)
    want_s, want_i = _exact_top(index, image_q, 10, "texts")
    _same_top([[h.id for h in row] for row in text_hits], np.array([[h.score for h in row] for row in text_hits]),
              want_i, want_s)


def test_closing_one_index_leaves_another_on_the_same_milvus_working(milvus_index):
    _, index = milvus_index
    a, b = SearchIndex(index), SearchIndex(index)
    q = a.db.vectors_of(np.array([1]))
    a.close()
    assert b.search(q, 3)[0] and b.count("images") > 0  # its own connection (pymilvus shares one per uri)
    b.close()


@pytest.mark.slow
def test_live_adds_and_removals_go_to_milvus_and_survive_reopening(milvus_index, tiny_world, tmp_path):
    bundle, built = milvus_index
    index = tmp_path / "index"
    shutil.copytree(built, index)
    vectors = tmp_path / "vectors.db"
    b = Bundle(bundle)
    # a copy of the folder points at its own copy of the vectors (the Milvus Lite file, as --milvus-uri would)
    with SearchIndex(built) as s:
        n = s.count("images")
    finalize(index, b, progress=False, backend={"name": "milvus", "uri": str(vectors), "collection": "copy"})
    upload = next((tiny_world / "images").glob("*.png")).read_bytes()
    with SearchIndex(index) as s:
        assert s.count("images") == n
        v = s.vector_of(1)
        gone = s.search(v[None], 1)[0][0].id
        assert s.remove(gone) and s.count("images") == n - 1
        assert gone not in [h.id for h in s.search(v[None], 10)[0]]
        item = s.add_image(_rotated(upload), b)
        assert s.count("images") == n
        # every hit, as the tiny model maps all images to nearly one point (scores agree to float16's 1e-3)
        hits = s.search(s.vector_of(item["id"])[None], n)[0]
        mine = next(h for h in hits if h.id == item["id"])
        assert mine.score == pytest.approx(1.0, abs=2e-3) and mine.score >= hits[0].score - 2e-3
    assert info(index)["pending_changes"] > 0
    with SearchIndex(index) as s:  # reopened: Milvus held the changes, nothing to reconcile
        assert s.count("images") == n and item["id"] in [h.id for h in s.search(s.vector_of(item["id"])[None], n)[0]]
        assert s.item(gone) is None and not s.needs_compaction()
    m = finalize(index, b, progress=False)  # the backend is remembered; a finalize only syncs
    assert m["backend"]["name"] == "milvus" and m["images"]["inserted"] == 0 and m["images"]["deleted"] == 0


def _rotated(png: bytes) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).rotate(90).save(buf, "PNG")
    return buf.getvalue()


def test_the_server_answers_from_milvus_as_exact_search_would(milvus_index, tiny_world):
    bundle, index = milvus_index
    texts = ["a red circle left of a blue square", "two yellow stars", "a green triangle"]
    with Server(bundle, index, args=("--backend", "milvus")) as srv:
        assert httpx.get(f"{srv.url}/info").json()["index"]["backend"] == "milvus"
        got = [httpx.get(f"{srv.url}/search", params={"text": t, "k": 10}).json()["results"] for t in texts]
    want_s, want_i = _exact_top(index, Bundle(bundle).encode_texts(texts), 10)
    _same_top([[r["id"] for r in row] for row in got], np.array([[r["score"] for r in row] for row in got]),
              want_i, want_s)


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
