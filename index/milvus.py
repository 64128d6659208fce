"""Milvus as the search back end: the same index folder, with the vectors searched by Milvus.

    dsmd index build INDEX --backend milvus [--milvus-uri URI] ...   # SQLite rows as ever, vectors to Milvus
    dsmd serve --index INDEX                                  # the manifest says where the vectors are

SQLite stays the source of truth for the rows (what an id is: path, size, captions); Milvus
holds one collection per target (`<name>_images`, `<name>_texts`: int64 id, float vector,
inner product) and answers the searches. Each index has collections of its own: `<name>` is
`dsmd_<index id>` unless `--collection` names it, and a collection records the index it belongs
to (its description), so another index folder on the same Milvus is refused it rather than
mixing its ids in. A finalize makes each collection hold exactly the
rows (inserts the missing ids, deletes the gone ones: O(changes), not a rebuild) and measures
recall@10 against exact search on the same vectors, as the FAISS kinds are measured. Live adds
and removals of a server go to Milvus directly, so a Milvus index never needs compacting.

URI: a local file path (`INDEX/milvus.db` by default) runs Milvus Lite, the embedded engine
(one process at a time per file: stop the server before building into its file); an
`http://host:19530` address is a Milvus server or cluster, and `DSMD_MILVUS_TOKEN` its token.
Milvus Lite builds FLAT (exact) collections; a server builds HNSW, tuned like FAISS's.
"""

from __future__ import annotations

import os
import re
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from dsmd.errors import UserError

PAGE = 16_384  # Milvus caps one query's results (offset + limit) at 16,384
INSERT_BATCH = 2_000
TOKEN_ENV = "DSMD_MILVUS_TOKEN"
EF_GRID = (16, 32, 64, 128, 256, 512)


def default_uri(index: str | Path) -> str:
    return str(Path(index).resolve() / "milvus.db")


def is_lite(uri: str) -> bool:
    """A local file path (Milvus Lite) rather than a server address."""
    return not re.match(r"^[a-z]+://", uri)


_lite_users: dict[str, int] = {}  # Milvus Lite file -> clients of this process using it
_lite_lock = threading.Lock()


def connect(uri: str):
    """A MilvusClient for `uri`, or a UserError that says what to do. Give it back with `disconnect`:
    the last client of a Milvus Lite file stops the engine, so another process may open the file."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # milvus-lite 2.5's own import
    logging.getLogger("pymilvus.orm.iterator").setLevel(logging.ERROR)  # "failed to get mvccTs" on every id scan
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise UserError("the Milvus back end needs pymilvus (and milvus-lite for a local file): "
                        "pip install 'dsmd[milvus]'") from None
    try:
        # a connection of its own: pymilvus shares one per uri, and closing any client would end it for all
        client = MilvusClient(uri=uri, token=os.environ.get(TOKEN_ENV, ""), alias=f"dsmd-{uuid.uuid4().hex}")
    except Exception as e:  # pymilvus raises several kinds; each becomes one line
        hint = (" (Milvus Lite opens a file from one process at a time: stop the server or build using it)"
                if is_lite(uri) else "")
        raise UserError(f"could not open Milvus at {uri}: {e}{hint}") from None
    if is_lite(uri):
        with _lite_lock:
            key = str(Path(uri).resolve())
            _lite_users[key] = _lite_users.get(key, 0) + 1
    return client


def disconnect(client, uri: str) -> None:
    client.close()
    if not is_lite(uri):
        return
    from milvus_lite.server_manager import server_manager_instance

    with _lite_lock:
        key = str(Path(uri).resolve())
        _lite_users[key] = _lite_users.get(key, 1) - 1
        if _lite_users[key] <= 0:
            del _lite_users[key]
            server_manager_instance.release_server(key)


OWNER_PREFIX = "dsmd index "


def index_id(db) -> str:
    """The index's own id (SQLite meta `index_id`), made on first use: names and owns its collections."""
    meta = db.meta()
    if not meta.get("index_id"):
        db.set_meta("index_id", uuid.uuid4().hex[:16])
        meta = db.meta()
    return meta["index_id"]


def default_collection(db) -> str:
    return f"dsmd_{index_id(db)}"


def collection_name(base: str, target: str) -> str:
    name = f"{base}_{target}"
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,254}", name):
        raise UserError(f"--collection {base!r}: Milvus names take letters, digits and underscores only")
    return name


def ensure_collection(client, name: str, dim: int, uri: str, owner: str = "", adopt: bool = False) -> dict:
    """Create the collection if missing (strong consistency: a search sees the writes before it), owned by
    index `owner`; an existing one must be that index's (or, with `adopt`, one the index's manifest already
    names, made before collections recorded their owner). Returns its index description (type and
    parameters) as the manifest records it."""
    from pymilvus import DataType

    if not client.has_collection(name):
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False,
                                      description=f"{OWNER_PREFIX}{owner}" if owner else "")
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        params = client.prepare_index_params()
        kind = "FLAT" if is_lite(uri) else "HNSW"
        params.add_index(field_name="vector", index_type=kind, metric_type="IP",
                         params={} if kind == "FLAT" else {"M": 32, "efConstruction": 200})
        client.create_collection(name, schema=schema, index_params=params, consistency_level="Strong")
    else:
        have = client.describe_collection(name)
        description = have.get("description") or ""
        held_by = description.removeprefix(OWNER_PREFIX)
        if owner and held_by != owner and not adopt:
            whose = f"index {held_by}" if description.startswith(OWNER_PREFIX) else "something else (no index recorded)"
            raise UserError(f"the Milvus collection {name} belongs to {whose}, not to this index ({owner}): two "
                            f"indexes in one collection overwrite each other's ids. Leave out --collection (each "
                            f"index gets its own), give another name, or drop {name} if nothing uses it")
        field = next((f for f in have["fields"] if f["name"] == "vector"), None)
        got = int(field["params"].get("dim", -1)) if field else -1
        if got != dim:
            raise UserError(f"the Milvus collection {name} holds {got}-dim vectors, this index {dim}: "
                            f"give another --collection, or drop it")
    client.load_collection(name)
    desc = client.describe_index(name, "vector")
    return {"index_type": desc.get("index_type"),
            **{k: desc[k] for k in ("M", "efConstruction") if k in desc}}


def all_ids(client, name: str) -> np.ndarray:
    """Every id in the collection, ascending (an iterator: no cap on how many)."""
    it = client.query_iterator(name, filter="", output_fields=["id"], batch_size=PAGE)
    out = []
    try:
        while batch := it.next():
            out.append(np.fromiter((r["id"] for r in batch), np.int64, len(batch)))
    finally:
        it.close()
    return np.sort(np.concatenate(out)) if out else np.zeros(0, np.int64)


def sync(client, name: str, ids: np.ndarray, vectors_of, progress=None, ids_now=None) -> tuple[int, int]:
    """Make the collection hold exactly `ids` (ascending): upsert the missing ones (their vectors from
    `vectors_of`), delete the others, except those `ids_now()` (a fresh read of the rows, when `ids`
    is a snapshot) has: a live writer added them meanwhile. Returns (inserted, deleted)."""
    have = all_ids(client, name)
    missing = np.setdiff1d(ids, have, assume_unique=True)
    gone = np.setdiff1d(have, ids, assume_unique=True)
    if ids_now is not None and len(gone):
        gone = np.setdiff1d(gone, ids_now(), assume_unique=True)
    for i in range(0, len(missing), INSERT_BATCH):
        chunk = missing[i:i + INSERT_BATCH]
        insert(client, name, chunk, vectors_of(chunk))  # upsert: a live writer may have added it meanwhile
        if progress:
            progress(len(chunk))
    for i in range(0, len(gone), INSERT_BATCH):
        client.delete(name, ids=[int(x) for x in gone[i:i + INSERT_BATCH]])
    if len(missing):
        client.flush(name)
    return len(missing), len(gone)


def insert(client, name: str, ids, vectors: np.ndarray, upsert: bool = True) -> None:
    """Write vectors under their ids; `upsert` replaces an id written meanwhile by another writer."""
    rows = [{"id": int(i), "vector": v} for i, v in zip(ids, np.asarray(vectors, np.float32).tolist())]
    (client.upsert if upsert else client.insert)(name, rows)


def search(client, name: str, queries: np.ndarray, k: int, params: dict) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of the top k per query, best first; -1 ids (score -inf) pad short rows."""
    got = client.search(name, data=np.asarray(queries, np.float32).tolist(), limit=k, output_fields=[],
                        search_params={"metric_type": "IP", "params": params})
    scores = np.full((len(queries), k), -np.inf, np.float32)
    ids = np.full((len(queries), k), -1, np.int64)
    for row, hits in enumerate(got):
        for col, h in enumerate(hits[:k]):
            scores[row, col], ids[row, col] = h["distance"], h["id"]
    return scores, ids


def tune(client, name: str, index_type: str, queries: np.ndarray, kth_exact: np.ndarray, vectors_of,
         total: int) -> tuple[dict, float]:
    """The cheapest search setting reaching the target, measured as ann.tune measures FAISS (recall@10
    against the exact k-th score): FLAT has none to choose; HNSW takes the smallest ef that reaches it."""
    from dsmd.index import ann

    def recall(params: dict) -> float:
        return ann.recall_at_k(search(client, name, queries, 10, params)[1], queries, kth_exact, vectors_of, total)

    if index_type != "HNSW":
        return {}, recall({})
    best, best_recall = {"ef": EF_GRID[-1]}, -1.0
    for ef in EF_GRID:
        r = recall({"ef": ef})
        if r >= ann.TARGET_RECALL:
            return {"ef": ef}, r
        if r > best_recall:
            best, best_recall = {"ef": ef}, r
    return best, best_recall


def _fresh_ids(db, table: str) -> np.ndarray:
    """The rows' ids now, outside the snapshot `db` is reading (a second, read-only connection)."""
    from dsmd.index.db import IndexDB

    fresh = IndexDB(db.path, readonly=True)
    try:
        return fresh.ids(table)
    finally:
        fresh.close()


def finalize_parts(db, backend: dict, counts: dict, target: float, progress: bool, known: dict | None = None) -> dict:
    """A finalize on Milvus: make the collections hold exactly the rows (one snapshot of `db`), measure
    their recall as FAISS files are measured, and return the manifest's parts. `known`: the manifest
    before, whose collections are this index's even if made before collections recorded an owner."""
    from tqdm import tqdm

    from dsmd.index import ann
    from dsmd.index.build import _quiet, _sample_queries, shortfall_message

    owner = index_id(db)
    had = ((known or {}).get("images") or {}).get("collection", "")
    base = backend.get("collection") or had.removesuffix("_images") or default_collection(db)
    client = connect(backend["uri"])
    parts = {}
    try:
        for table, name in (("items", "images"), ("texts", "texts")):
            collection = collection_name(base, name)
            adopt = collection == ((known or {}).get(name) or {}).get("collection")
            params = ensure_collection(client, collection, db.dim, backend["uri"], owner, adopt)
            n = counts[table]
            bar = tqdm(total=n, desc=f"milvus {name}", unit="vec", leave=False, **_quiet(progress))
            t1 = time.time()
            inserted, deleted = sync(client, collection, db.ids(table), lambda ids, t=table: db.vectors_of(ids, t),
                                     bar.update, lambda t=table: _fresh_ids(db, t))
            bar.close()
            if n == 0:
                parts[name] = {"count": 0, "collection": collection}
                continue
            other = "texts" if table == "items" else "items"
            q_table = other if counts[other] else table
            queries = _sample_queries(lambda t=q_table: db.vectors(t), counts[q_table])
            kth = ann.exact_kth_score(lambda t=table: db.vectors(t), queries)
            search, recall = tune(client, collection, params["index_type"], queries, kth,
                                  lambda ids, t=table: db.vectors_of(ids, t), n)
            spec = ann.IndexSpec("milvus", params, search, recall, len(queries))
            parts[name] = {"count": n, "collection": collection, "index": spec.to_json(),
                           "build_seconds": round(time.time() - t1, 1), "inserted": inserted, "deleted": deleted,
                           "bytes": None, "tuned_with_queries_from": q_table, "target_recall": target,
                           "tried": [{"kind": "milvus", "recall_at_10": round(recall, 4)}],
                           "shortfall": None if recall >= target else shortfall_message(name, spec, target, [
                               {"kind": f"milvus {params['index_type']}", "recall_at_10": recall}])}
    finally:
        disconnect(client, backend["uri"])
    return parts


class MilvusPart:
    """One target's vectors in a Milvus collection, with the interface of live.LivePart: adds and
    removals go to Milvus at once, so nothing piles up for a compaction."""

    COUNT_TTL_S = 1.0  # how stale the count may be: other writers (and replicas' writers) add and remove

    def __init__(self, client, name: str, dim: int, spec: dict):
        self.client, self.name, self.dim, self.spec = client, name, dim, spec
        self.params = dict(spec.get("search", {}))
        self.added: set[int] = set()  # never grows: needs_compaction() stays False
        self.dead: frozenset[int] = frozenset()
        self._count, self._counted_at = self._server_count(), time.monotonic()

    def _server_count(self) -> int:
        return int(self.client.query(self.name, filter="", output_fields=["count(*)"])[0]["count(*)"])

    @property
    def base_count(self) -> int:
        return self.count()

    def count(self) -> int:
        """The collection's size, read again from Milvus at most every COUNT_TTL_S: a read-only server
        follows what another process's server adds and removes."""
        if time.monotonic() - self._counted_at > self.COUNT_TTL_S:
            self._count, self._counted_at = self._server_count(), time.monotonic()
        return self._count

    def all_ids(self) -> np.ndarray:
        return all_ids(self.client, self.name)

    def holds(self, item_id: int) -> bool:
        return bool(self.client.query(self.name, filter=f"id == {int(item_id)}", output_fields=["id"]))

    def contains(self, item_id: int) -> bool:
        return self.holds(item_id)

    def add(self, ids, vectors: np.ndarray) -> int:
        ids = np.asarray(ids, np.int64)
        if not len(ids):
            return 0
        held = {r["id"] for r in self.client.query(self.name, filter=f"id in {[int(i) for i in ids]}",
                                                   output_fields=["id"])}
        fresh = np.array([int(i) not in held for i in ids], bool)
        if fresh.any():
            insert(self.client, self.name, ids[fresh], np.asarray(vectors, np.float32)[fresh])
            self._count += int(fresh.sum())
        return int(fresh.sum())

    def tombstone(self, ids) -> None:
        ids = [int(i) for i in ids]
        if ids:
            held = self.client.query(self.name, filter=f"id in {ids}", output_fields=["id"])
            if held:
                self.client.delete(self.name, ids=[r["id"] for r in held])
                self._count -= len(held)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Not capped at the count: a row another writer added a moment ago is found all the same
        (Milvus answers fewer hits when it holds fewer; the caller pads)."""
        return search(self.client, self.name, queries, max(1, min(k, PAGE)), self.params)
