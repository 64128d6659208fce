"""The Milvus back end against a real standalone Milvus server (the PyPI package `milvus`, which runs
`milvus-server --data DIR` on loopback), not only Milvus Lite: HNSW collections tuned by ef, several
index folders on one Milvus, a read-only reader following a writer, and `dsmd serve` end to end."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from serving import Server

from dsmd.bundle import Bundle
from dsmd.datasets import load_dataset
from dsmd.errors import UserError
from dsmd.index.build import build, dataset_sources
from dsmd.index.search import SearchIndex

PORTS = ("etcd", "root-coord", "proxy", "proxy-internal", "query-coord", "query-node", "index-coord", "index-node",
         "data-coord", "data-node")
ETCD_PEER_PORT = 2380  # not configurable through milvus-server's flags

pytestmark = pytest.mark.slow  # about two minutes: a Milvus server starts, and HNSW builds are tuned


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return False
        except OSError:
            return True


@pytest.fixture(scope="module")
def milvus_server(tmp_path_factory) -> str:
    """A standalone Milvus on free loopback ports for this module; its URI.

    The wrapper stops its `milvus run standalone` child on SIGINT only (SIGTERM orphans it), and the
    embedded etcd always takes peer port 2380, so one such server runs at a time."""
    exe = shutil.which("milvus-server") or str(Path(os.sys.executable).parent / "milvus-server")
    if not Path(exe).exists():
        pytest.skip("milvus-server is not installed (the `milvus` package exists for Linux x86-64 only)")
    if _port_taken(ETCD_PEER_PORT):
        pytest.skip(f"port {ETCD_PEER_PORT} is taken: milvus-server's embedded etcd needs it (another Milvus?)")
    ports = dict(zip(PORTS, _free_ports(len(PORTS))))
    data = tmp_path_factory.mktemp("milvus-server")
    cmd = [exe, "--data", str(data), *[a for name, p in ports.items() for a in (f"--{name}-port", str(p))]]
    with open(data / "server.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{ports['proxy']}"
    try:
        from pymilvus import MilvusClient

        deadline = time.monotonic() + 180
        while True:
            try:
                MilvusClient(uri=uri, timeout=5).list_collections()
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"milvus-server did not start ({' '.join(cmd)}); "
                                       f"its logs: {data}/server.log and {data}/logs") from None
                time.sleep(1)
        yield uri
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        subprocess.run(["pkill", "-KILL", "-f", str(data / "bin" / "milvus")], check=False)


def _build(root: Path, tiny_search: Path, tiny_world: Path, split: str, server: str, collection: str | None = None):
    backend = {"name": "milvus", "uri": server} | ({"collection": collection} if collection else {})
    return build(root, Bundle(tiny_search / "bundle"), dataset_sources(tiny_world, split=split), progress=False,
                 backend=backend)


def _images(tiny_world: Path, split: str) -> list[Path]:
    return [it.path for it in load_dataset(tiny_world).split(split)]


def _finds_itself_first(index: Path, bundle: Bundle, images: list[Path]) -> int:
    """How many of `images` the index answers with themselves at k=1 (hits named by file)."""
    s = SearchIndex(index)
    try:
        hits = s.search(bundle.encode_images([p.read_bytes() for p in images]), 1)
        return sum(Path(h[0].item["uri"]).name == p.name for h, p in zip(hits, images))
    finally:
        s.close()


def test_two_indexes_on_one_milvus_keep_their_own_collections(milvus_server, tiny_search, tiny_world, tmp_path):
    """With default settings two index folders once shared the collection `dsmd_*` and overwrote each other's
    ids (the second index's images then found themselves first 0 times in 50). Each index now names its
    collections after its own id, and a collection of another index is refused."""
    bundle = Bundle(tiny_search / "bundle")
    first = _build(tmp_path / "test", tiny_search, tiny_world, "test", milvus_server)
    second = _build(tmp_path / "val", tiny_search, tiny_world, "val", milvus_server)
    assert first["images"]["collection"] != second["images"]["collection"]
    assert _finds_itself_first(tmp_path / "test", bundle, _images(tiny_world, "test")) == 24
    assert _finds_itself_first(tmp_path / "val", bundle, _images(tiny_world, "val")) == 24
    taken = first["images"]["collection"].removesuffix("_images")
    with pytest.raises(UserError, match=f"collection {taken}_images belongs to index"):
        _build(tmp_path / "third", tiny_search, tiny_world, "val", milvus_server, collection=taken)
    assert _finds_itself_first(tmp_path / "test", bundle, _images(tiny_world, "test")) == 24  # untouched


def test_a_server_collection_is_hnsw_tuned_by_ef_to_the_recall_it_reports(milvus_server, tiny_search, tiny_world,
                                                                          tmp_path):
    """Milvus Lite only builds FLAT; a server builds HNSW and the finalize picks ef. The recall is measured
    here: caption queries against exact top-10 over vectors this test encodes."""
    m = _build(tmp_path / "idx", tiny_search, tiny_world, "test", milvus_server)
    spec = m["images"]["index"]
    assert spec["params"]["index_type"] == "HNSW" and spec["search"]["ef"] in (16, 32, 64, 128, 256, 512)
    bundle = Bundle(tiny_search / "bundle")
    items = load_dataset(tiny_world).split("test")
    images = bundle.encode_images([it.path.read_bytes() for it in items]).astype(np.float16).astype(np.float32)
    queries = bundle.encode_texts([c for it in items for c in it.captions])
    exact = np.argsort(-(queries @ images.T), axis=1)[:, :10]
    names = [it.path.name for it in items]
    s = SearchIndex(tmp_path / "idx")
    try:
        hits = s.search(queries, 10)
    finally:
        s.close()
    found = [len({Path(h.item["uri"]).name for h in row} & {names[j] for j in top}) / 10
             for row, top in zip(hits, exact)]
    assert np.mean(found) >= 0.95
    assert abs(np.mean(found) - spec["recall_at_10"]) <= 0.05


def test_a_read_only_reader_follows_a_writers_live_adds(milvus_server, tiny_search, tiny_world, tmp_path):
    """A replica opened read-only once read the count at open and capped its searches there: it never
    saw a live add. Now it counts again (at most a second stale) and searches are not capped."""
    _build(tmp_path / "idx", tiny_search, tiny_world, "test", milvus_server)
    bundle = Bundle(tiny_search / "bundle")
    writer, reader = SearchIndex(tmp_path / "idx", readonly=False), SearchIndex(tmp_path / "idx", readonly=True)
    try:
        new = _images(tiny_world, "val")[0].read_bytes()
        writer.add_image(new, bundle)
        deadline = time.monotonic() + 30
        while reader.count() != 25:
            assert time.monotonic() < deadline, f"the reader still counts {reader.count()}"
            time.sleep(0.2)
        everything = reader.search(bundle.encode_images([new]), 25)[0]
        assert len(everything) == 25 and everything[0].score == pytest.approx(1.0, abs=2e-3)
    finally:
        writer.close()
        reader.close()


def test_the_server_answers_from_a_milvus_server(milvus_server, tiny_search, tiny_world, tmp_path):
    _build(tmp_path / "idx", tiny_search, tiny_world, "test", milvus_server)
    image = _images(tiny_world, "test")[5]
    with Server(tiny_search / "bundle", tmp_path / "idx") as s:
        r = httpx.post(f"{s.url}/search/image", params={"k": 1}, files={"file": (image.name, image.read_bytes())},
                       timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["name"] == image.name
        assert httpx.get(f"{s.url}/info").json()["index"]["backend"] == "milvus"
