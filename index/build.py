"""Building and updating an index folder (`dsmd index ...`, `make index`).

    INDEX/
      items.sqlite    items and caption texts, each with the row of its vector: the source of truth (index/db.py)
      vectors/*.f16   the image and caption vectors, float16, one file per table (index/vectors.py)
      images.*.faiss  image vectors, by item id          } derived from items.sqlite and vectors/
      texts.*.faiss   caption vectors, by text id        } by `finalize`; new names each time
      manifest.json   bundle, index kinds with their measured recall@10, counts, generation

Adding embeds only what is new (by content hash) and commits each batch in one transaction,
so a killed build, started again, picks up where it stopped and never holds an image twice.
The FAISS files are then rebuilt from the rows and their vectors, and the manifest written
last: a kill at any moment leaves the previous searchable index or the new one, and the next
finalize deletes what the killed one left behind.

Several writers may share a folder (builds, `dsmd index remove`, servers adding uploads):
every change to the rows holds INDEX/.lock (index/lock.py) for one batch, and a row is never
inserted twice for one content, whoever else inserted it meanwhile. One finalize runs at a
time; rows written while it runs are in the database, and an index opened afterwards
(index/search.py) reconciles its FAISS with them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dsmd.artifacts import MANIFEST, read_manifest, versions, write_json
from dsmd.bundle import Bundle
from dsmd.errors import UserError
from dsmd.index import ann, metadata
from dsmd.index import reclaim as reclaim_module
from dsmd.index.db import IndexDB, NewItem
from dsmd.index.identity import IndexMismatch, bundle_fingerprint, check_bundle
from dsmd.index.lock import finalize_lock, folder_lock
from dsmd.index.merging import merge, open_existing
from dsmd.index.sources import Source, dataset_sources, folder_sources, prepared, shard_of

__all__ = ["IndexMismatch", "Report", "Source", "add_images", "add_texts", "build", "bundle_fingerprint",
           "check_bundle", "dataset_sources", "finalize", "folder_sources", "info", "merge", "remove", "shard_of"]

INDEX_FORMAT = 1
CRASH_AT = "DSMD_INDEX_CRASH_AT"  # tests: kill finalize at a named point (see _crash_point)


@dataclass
class Report:
    added: int = 0
    already: int = 0  # same content already in the index
    skipped: list[dict] = field(default_factory=list)  # unreadable files, with the reason
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"added": self.added, "already_indexed": self.already, "skipped": len(self.skipped),
                "skipped_files": self.skipped[:100], "seconds": round(self.seconds, 1)}


def _quiet(progress: bool) -> dict:
    """tqdm keywords: hidden when asked, else as TQDM_DISABLE and the terminal say."""
    return {} if progress else {"disable": True}


# ---------------------------------------------------------------- adding


def add_images(path: str | Path, bundle: Bundle, sources: list[Source], batch: int = 64, workers: int = 2,
               progress: bool = True) -> Report:
    """Embed the sources not yet in the index at `path` into its database (then call `finalize`)."""
    t0 = time.time()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    db = IndexDB(path / "items.sqlite", bundle.dim, bundle_fingerprint(bundle), bundle.variant)
    report = Report()
    known = db.known_hashes()
    pending: list[tuple] = []
    copies: list[tuple[str, str]] = []  # (uri, sha256) of files whose bytes are indexed under another path

    def flush() -> None:
        if not pending:
            return
        vecs = bundle.encode_pixels(np.stack([p[2] for p in pending]))
        caps = [c for p in pending for c in p[0].captions]
        cap_vecs = bundle.encode_texts(caps) if caps else np.zeros((0, bundle.dim), np.float32)
        items, pos = [], 0
        for (s, sha, _, facts), v in zip(pending, vecs):
            n = len(s.captions)
            items.append(NewItem(s.uri, sha, facts["width"], facts["height"], list(s.captions), v,
                                 cap_vecs[pos:pos + n], facts))
            pos += n
        with folder_lock(path):  # one batch: a live upload waits for this commit, not for the build
            ids = db.replace(items)
        added = sum(i is not None for i in ids)
        report.added += added
        report.already += len(ids) - added  # added meanwhile by another writer
        pending.clear()

    bar = tqdm(total=len(sources), desc="index", unit="img", dynamic_ncols=True, **_quiet(progress))
    for s, sha, pixels, facts, error in prepared(sources, bundle, workers, prefetch=4 * batch):
        bar.update(1)
        if error is not None:
            db.skip(s.uri, error)
            report.skipped.append({"uri": s.uri, "reason": error})
        elif sha in known:
            report.already += 1
            copies.append((s.uri, sha))
        else:
            known.add(sha)
            pending.append((s, sha, pixels, facts))
            if len(pending) >= batch:
                flush()
        bar.set_postfix(added=report.added, skipped=len(report.skipped))
    flush()
    bar.close()
    with folder_lock(path):
        metadata.note_copies(db.con, copies)
    db.close()
    report.seconds = time.time() - t0
    return report


def add_texts(path: str | Path, bundle: Bundle, texts: list[str], batch: int = 256) -> int:
    """Add free texts (not captions of an indexed image) to the caption index's database."""
    db = IndexDB(Path(path) / "items.sqlite", bundle.dim, bundle_fingerprint(bundle), bundle.variant)
    texts = [t for t in texts if t.strip()]
    for i in range(0, len(texts), batch):
        vectors = bundle.encode_texts(texts[i:i + batch])
        with folder_lock(path):
            db.add_texts(texts[i:i + batch], vectors)
    db.close()
    return len(texts)


def remove(path: str | Path, ids: list[int] = (), uris: list[str] = (), bundle: Bundle | None = None) -> int:
    """Delete items by id or path (their captions go with them); returns how many. Opened indexes
    leave them out of their results at once (their rows are gone) and drop them when reopened.
    `bundle`: the one the caller will finalize with, refused before anything is removed if not the index's."""
    db = open_existing(path)
    if bundle is not None:
        check_bundle(path, bundle, db)
    with folder_lock(path):
        n = db.remove(ids, [str(Path(u).resolve()) if Path(u).exists() else u for u in uris])
    db.close()
    return n


# ---------------------------------------------------------------- the searchable files


def finalize(path: str | Path, bundle: Bundle, kind: str | None = None, target: float = ann.TARGET_RECALL,
             memory_bytes: int | None = None, progress: bool = True, report: Report | None = None,
             backend: dict | None = None, reclaim: bool | None = None, tune_queries: list[str] | None = None
             ) -> dict:
    """(Re)build the FAISS files from the database, tune them, and write the manifest last.

    New FAISS files get new names; the manifest (replaced atomically) names the ones to use.
    A kill at any moment leaves either the previous manifest with its files or the new one with
    its. One finalize runs at a time (INDEX/.finalize.lock); it holds the folder lock only to write
    the manifest, delete what no manifest names (older FAISS files, upload files of removed items,
    temporary files of killed runs) and switch the vector files (rewritten without removed rows:
    `reclaim` True, or None past index/reclaim.py's thresholds), so rows may be written meanwhile.
    `bundle` must be the index's own (else IndexMismatch). `kind` overrides the choice by size and is
    remembered; so is `backend` ({"name": "milvus", "uri": URI, "collection": NAME}, or {"name": "faiss"}).
    """
    path = Path(path)
    t0 = time.time()
    with finalize_lock(path):
        db = open_existing(path)
        try:
            check_bundle(path, bundle, db)
            with folder_lock(path):
                _clean(path, read_manifest(path))  # what killed runs left: disk space before new files
            if reclaim or (reclaim is None and reclaim_module.should_rewrite(db)):
                for table in ("items", "texts") if db.dim else ():
                    reclaim_module.rewrite_vectors(db, table, lambda: folder_lock(path))
            manifest = _rebuild(path, db, bundle, kind, target, memory_bytes, progress, report, t0, backend,
                                tune_queries)
            with folder_lock(path):
                write_json(path / MANIFEST, manifest)
                _crash_point("manifest-written")
                _clean(path, manifest)
                reclaim_module.delete_orphan_uploads(db, path)
        finally:
            db.close()
    return manifest


def _rebuild(path: Path, db: IndexDB, bundle: Bundle, kind: str | None, target: float, memory_bytes: int | None,
             progress: bool, report: Report | None, t0: float, backend: dict | None = None,
             tune_queries: list[str] | None = None) -> dict:
    """Write new FAISS files from one snapshot of the rows; returns the manifest that names them."""
    # given settings are remembered for later finalizes, once this one has succeeded with them
    given = {"index_kind": kind, "memory_bytes": None if memory_bytes is None else str(int(memory_bytes)),
             "backend": None if backend is None else json.dumps(backend),
             "tune_queries": json.dumps(tune_queries[:1000]) if tune_queries else None}
    meta = {**db.meta(), **{k: v for k, v in given.items() if k == "tune_queries" and v}}
    kind = kind or meta.get("index_kind")
    memory_bytes = memory_bytes or int(meta.get("memory_bytes", 0)) or None
    backend = backend or json.loads(meta.get("backend") or '{"name": "faiss"}')
    previous = read_manifest(path) or {}
    if backend["name"] == "milvus":  # its id (a write) first, outside the snapshot: it names and owns the collections
        from dsmd.index import milvus
        milvus.index_id(db)
    parts = {}
    stamp = time.time_ns()
    with db.snapshot():  # one consistent state of the rows for every pass below
        generation = db.generation
        variant = IndexDB.variant(db.meta()) or bundle.variant
        counts = {"items": db.count("items"), "texts": db.count("texts")}
        if backend["name"] == "milvus":
            parts = milvus.finalize_parts(db, backend, counts, target, progress, known=previous)
        for table, name in (("items", "images"), ("texts", "texts")) if backend["name"] == "faiss" else ():
            n = counts[table]
            if n == 0:
                parts[name] = {"count": 0}
                continue
            # tune with the queries this index will answer: captions for images, images for captions
            other = "texts" if table == "items" else "items"
            q_table = other if counts[other] else table
            queries = _sample_queries(lambda t=q_table: db.vectors(t), counts[q_table])
            # no captions: the images are asked in words all the same, and text vectors sit elsewhere
            words = _text_queries(bundle, meta) if table == "items" and q_table == table else None
            # a kind a previous build fell back to is where this one starts (compactions repeat no failure),
            # while it is still one this size and memory would try
            by_size = ann.choose_kind(n, db.dim, memory_bytes)
            settled = previous.get(name, {}).get("settled_kind")
            if settled not in [by_size, *ann.fallbacks(by_size, n, db.dim, memory_bytes)]:
                settled = None
            stem = path / f"{name}.g{generation}-{stamp}"
            index, spec, build_s, tried, by_set = _build_tuned(db, table, name, n, kind, target, memory_bytes,
                                                               queries, progress, settled, stem, words)
            file = stem.with_name(stem.name + ".faiss")
            ann.write(index, file, before_replace=lambda: _crash_point("faiss-temp"))
            _crash_point("faiss-written")
            del index
            parts[name] = {"count": n, "file": file.name, "index": spec.to_json(), "build_seconds": round(build_s, 1),
                           "bytes": file.stat().st_size, "tuned_with_queries_from": q_table, "target_recall": target,
                           "text_queries": None if words is None else {
                               "from": "operator" if meta.get("tune_queries") else "built-in", "count": len(words),
                               "recall_at_10": by_set[1], "image_queries_recall_at_10": by_set[0]},
                           "tried": tried, "settled_kind": None if kind or spec.recall_at_10 < target
                           or spec.kind == by_size else spec.kind,
                           "shortfall": None if spec.recall_at_10 >= target else shortfall_message(name, spec, target,
                                                                                                   tried)}
        skipped = db.count("skipped")
    for key, value in given.items():
        if value is not None:
            db.set_meta(key, value)
    return {
        "artifact": "index", "format": INDEX_FORMAT, "generation": generation, "backend": backend,
        "bundle": {"name": bundle.name, "path": str(bundle.path), "fingerprint": bundle_fingerprint(bundle),
                   "dim": bundle.dim, "variant": variant},
        **parts,
        "skipped": skipped,
        "last_build": report.to_json() if report else None,
        "finalize_seconds": round(time.time() - t0, 1),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": versions(),
    }


def _build_tuned(db: IndexDB, table: str, name: str, n: int, kind: str | None, target: float,
                 memory_bytes: int | None, queries: np.ndarray, progress: bool, settled: str | None = None,
                 stem: Path | None = None, text_queries: np.ndarray | None = None):
    """Build and tune the kind chosen by size (or `kind`, when the user forced one); while it falls
    short of `target`, try the next kind that fits (ann.fallbacks) and keep the first that reaches
    it, else the best. `settled`: the kind an earlier build fell back to, tried first; `text_queries`:
    a second query set the target holds for too (captionless images, index/tune_queries.py). Returns
    (index, IndexSpec, build seconds, every attempt's kind and recall)."""

    def chunks():
        return db.vectors(table)

    first = kind or settled or ann.choose_kind(n, db.dim, memory_bytes)
    order = [first] + ([] if kind else ann.fallbacks(first, n, db.dim, memory_bytes))
    kth = ann.exact_kth_score(chunks, queries)
    also = () if text_queries is None else ((text_queries, ann.exact_kth_score(chunks, text_queries)),)
    best, tried = None, []
    for chosen in order:
        refine = ann.choose_refine(n, db.dim, memory_bytes)
        bar = tqdm(total=n, desc=f"faiss {name} ({chosen})", unit="vec", leave=False, **_quiet(progress))
        t1 = time.time()

        def vectors_of(ids):
            return db.vectors_of(ids, table)

        index, params = ann.build(chosen, db.dim, chunks, n, progress=bar.update, refine=refine, vectors_of=vectors_of,
                                  data_path=stem.with_name(stem.name + ".ivfdata") if stem else None)
        bar.close()
        search, recall = ann.tune(index, chosen, queries, kth, vectors_of, target, also=also)
        build_s = time.time() - t1
        tried.append({"kind": chosen, "recall_at_10": round(recall, 4), "seconds": round(build_s, 1)})
        if best is None or recall > best[1].recall_at_10:
            best = (index, ann.IndexSpec(chosen, params, search, recall, len(queries)), build_s)
        del index
        if recall >= target:
            break
        if progress and chosen != order[-1]:
            tqdm.write(f"{name}: {chosen} reaches recall@10 {recall:.3f} at most, short of {target}: "
                       f"trying {order[order.index(chosen) + 1]}")
    by_set = None  # the recall of each query set at the setting kept (images, then texts)
    if also:
        index, spec = best[0], best[1]
        ann.apply_search_params(index, spec.kind, spec.search)
        by_set = [round(ann.recall_at_k(index.search(q, 10)[1], q, kq, lambda i: db.vectors_of(i, table), index.ntotal),
                        4) for q, kq in ((queries, kth), *also)]
    return (*best, tried, by_set)


def shortfall_message(name: str, spec: ann.IndexSpec, target: float, tried: list[dict]) -> str:
    """One sentence for the build's end, `dsmd index info` and the server's /info."""
    attempts = ", ".join(f"{t['kind']} {t['recall_at_10']:.3f}" for t in tried)
    return (f"the {name} index reaches recall@10 {spec.recall_at_10:.3f} against exact search, short of the "
            f"target {target} (tried {attempts}): searches miss some true neighbours; exact search "
            f"(--index-type flat) is the remedy where memory allows")


TEMP_PATTERNS = (".*.faiss.*.tmp", f".{MANIFEST}.*.tmp", "uploads/.*.tmp", ".*.ivfdata.*.blocks.tmp")


def _clean(path: Path, manifest: dict | None) -> None:
    """Delete the FAISS files `manifest` does not name and the temporary files of killed runs.

    Only ever called holding both the finalize lock (no other finalize is writing files) and the
    folder lock (no upload is being stored), so nothing deleted here is still being written.
    """
    parts = [p for p in (manifest or {}).values() if isinstance(p, dict)]
    keep = {p.get("file") for p in parts} | {(p.get("index") or {}).get("params", {}).get("data_file") for p in parts}
    for old in (*path.glob("*.faiss"), *path.glob("*.ivfdata")):
        if old.name not in keep:
            old.unlink(missing_ok=True)
    for pattern in TEMP_PATTERNS:
        for stale in path.glob(pattern):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def _crash_point(name: str) -> None:
    """Kill this process here when the environment asks for it (${CRASH_AT}=name): the kill tests
    stop a finalize at exact points instead of at moments a loaded machine would make random."""
    if os.environ.get(CRASH_AT) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _text_queries(bundle: Bundle, meta: dict) -> np.ndarray | None:
    """The text queries a captionless image index is tuned with too: the operator's (--tune-queries,
    remembered) or the built-in ones, encoded by the bundle (None for a bundle without a text encoder)."""
    from dsmd.index.tune_queries import QUERIES

    if not hasattr(bundle, "encode_texts"):
        return None
    texts = json.loads(meta.get("tune_queries") or "null") or list(QUERIES)
    return np.ascontiguousarray(bundle.encode_texts(texts), np.float32)


def _sample_queries(chunks, n: int, size: int = 1000) -> np.ndarray:
    step = max(1, n // size)
    out = []
    pos = 0
    for _, vecs in chunks():
        idx = np.arange((-pos) % step, len(vecs), step)
        out.append(vecs[idx])
        pos += len(vecs)
    return np.ascontiguousarray(np.concatenate(out)[:size], np.float32)


def build(path: str | Path, bundle: Bundle, sources: list[Source], kind: str | None = None, batch: int = 64,
          workers: int = 2, progress: bool = True, backend: dict | None = None,
          memory_bytes: int | None = None, tune_queries: list[str] | None = None) -> dict:
    """Add the new sources, then rebuild the searchable files (or sync Milvus: `backend`); returns the manifest."""
    if backend is not None and backend["name"] == "milvus":
        from dsmd.index import milvus

        milvus.disconnect(milvus.connect(backend["uri"]), backend["uri"])  # unreachable: fail now, not after embedding
    report = add_images(path, bundle, sources, batch=batch, workers=workers, progress=progress)
    return finalize(path, bundle, kind=kind, progress=progress, report=report, backend=backend,
                    memory_bytes=memory_bytes, tune_queries=tune_queries)


def info(path: str | Path) -> dict:
    m = read_manifest(Path(path))
    if m is None:
        raise UserError(f"{path} is not a finished index (no manifest.json): run dsmd index build")
    db = open_existing(path)
    m = dict(m)
    m["pending_changes"] = db.generation - m["generation"]
    m["dead_vector_rows"] = db.dead_rows()
    m["reclaimable"] = reclaim_module.reclaimable(db, Path(path))
    db.close()
    return m
