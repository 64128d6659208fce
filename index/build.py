"""Building and updating an index folder (`dsmd index ...`, `make index`).

    INDEX/
      items.sqlite    items, caption texts and their vectors: the source of truth (index/db.py)
      images.*.faiss  image vectors, by item id          } derived from items.sqlite by
      texts.*.faiss   caption vectors, by text id        } `finalize`; new names each time
      manifest.json   bundle, index kinds with their measured recall@10, counts, generation

Adding embeds only what is new (by content hash) and commits each batch in one transaction,
so a killed build, started again, picks up where it stopped and never holds an image twice.
The FAISS files are then rebuilt from the database and the manifest written last: a kill at
any moment leaves the previous searchable index or the new one. Safe while nothing else
writes to the same folder.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dsmd.artifacts import read_manifest, sha256_json, versions, write_json
from dsmd.bundle import Bundle
from dsmd.errors import UserError
from dsmd.images import BadImage, open_image
from dsmd.index import ann
from dsmd.index.db import IndexDB, NewItem

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"}
INDEX_FORMAT = 1


@dataclass(frozen=True)
class Source:
    """One image to index: where it is (uri) and its captions when a data set gives them."""

    uri: str
    path: Path
    captions: tuple[str, ...] = ()


@dataclass
class Report:
    added: int = 0
    already: int = 0  # same content already in the index
    skipped: list[dict] = field(default_factory=list)  # unreadable files, with the reason
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"added": self.added, "already_indexed": self.already, "skipped": len(self.skipped),
                "skipped_files": self.skipped[:100], "seconds": round(self.seconds, 1)}


def bundle_fingerprint(b: Bundle) -> str:
    """What identifies an encoder: the hashes of its files (two exports of one student differ only if
    the graphs do)."""
    return sha256_json({k: v for k, v in b.manifest["files"].items() if not k.startswith(("image.", "text."))
                        or k in ("image.onnx", "text.onnx")})


def _quiet(progress: bool) -> dict:
    """tqdm keywords: hidden when asked, else as TQDM_DISABLE and the terminal say."""
    return {} if progress else {"disable": True}


# ---------------------------------------------------------------- sources


def folder_sources(root: str | Path) -> list[Source]:
    """Every image file under `root` (recursive; JPEG, PNG, WebP, GIF, BMP), in path order."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    return [Source(str(p.resolve()), p) for p in files]


def dataset_sources(data: str | Path, images: str | None = None, split: str | None = None) -> list[Source]:
    """The images of a Karpathy/JSONL data set (one split, or all) with their captions."""
    from dsmd.datasets import load_dataset

    ds = load_dataset(data, images=images)
    items = ds.split(split) if split else ds.items
    return [Source(str(it.path.resolve()), it.path, tuple(it.captions)) for it in items]


def shard_of(sources: list[Source], shard: tuple[int, int] | None) -> list[Source]:
    """The sources of shard i of n (by a hash of the uri), for builds split over processes or machines."""
    if shard is None:
        return sources
    i, n = shard
    if not 0 <= i < n:
        raise UserError(f"--shard takes i/n with 0 <= i < n, not {i}/{n}")
    return [s for s in sources if int(hashlib.sha1(s.uri.encode()).hexdigest()[:8], 16) % n == i]


# ---------------------------------------------------------------- adding


def _prepared(sources: Iterable[Source], bundle: Bundle, workers: int, prefetch: int) -> Iterator[tuple]:
    """(source, sha256, pixels | None, size | None, error | None), decoded in threads ahead of use."""
    def work(s: Source):
        try:
            data = s.path.read_bytes()
        except OSError as e:
            return s, None, None, None, f"cannot read ({e.strerror})"
        sha = hashlib.sha256(data).hexdigest()
        try:
            img = open_image(data)
        except BadImage as e:
            return s, sha, None, None, str(e).replace("upload: ", "")
        return s, sha, bundle.transform(img), img.size, None

    with ThreadPoolExecutor(max(1, workers)) as pool:
        pending: deque = deque()
        it = iter(sources)
        for s in it:
            pending.append(pool.submit(work, s))
            if len(pending) >= prefetch:
                break
        while pending:
            yield pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(work, nxt))


def add_images(path: str | Path, bundle: Bundle, sources: list[Source], batch: int = 64, workers: int = 2,
               progress: bool = True) -> Report:
    """Embed the sources not yet in the index at `path` into its database (then call `finalize`)."""
    t0 = time.time()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    db = IndexDB(path / "items.sqlite", bundle.dim, bundle_fingerprint(bundle))
    report = Report()
    known = db.known_hashes()
    pending: list[tuple] = []

    def flush() -> None:
        if not pending:
            return
        vecs = bundle.encode_pixels(np.stack([p[2] for p in pending]))
        caps = [c for p in pending for c in p[0].captions]
        cap_vecs = bundle.encode_texts(caps) if caps else np.zeros((0, bundle.dim), np.float32)
        items, pos = [], 0
        for (s, sha, _, size), v in zip(pending, vecs):
            n = len(s.captions)
            items.append(NewItem(s.uri, sha, size[0], size[1], list(s.captions), v, cap_vecs[pos:pos + n]))
            pos += n
        db.replace(items)
        report.added += len(items)
        pending.clear()

    bar = tqdm(total=len(sources), desc="index", unit="img", dynamic_ncols=True, **_quiet(progress))
    for s, sha, pixels, size, error in _prepared(sources, bundle, workers, prefetch=4 * batch):
        bar.update(1)
        if error is not None:
            db.skip(s.uri, error)
            report.skipped.append({"uri": s.uri, "reason": error})
        elif sha in known:
            report.already += 1
        else:
            known.add(sha)
            pending.append((s, sha, pixels, size))
            if len(pending) >= batch:
                flush()
        bar.set_postfix(added=report.added, skipped=len(report.skipped))
    flush()
    bar.close()
    db.close()
    report.seconds = time.time() - t0
    return report


def add_texts(path: str | Path, bundle: Bundle, texts: list[str], batch: int = 256) -> int:
    """Add free texts (not captions of an indexed image) to the caption index's database."""
    db = IndexDB(Path(path) / "items.sqlite", bundle.dim, bundle_fingerprint(bundle))
    texts = [t for t in texts if t.strip()]
    for i in range(0, len(texts), batch):
        db.add_texts(texts[i:i + batch], bundle.encode_texts(texts[i:i + batch]))
    db.close()
    return len(texts)


def remove(path: str | Path, ids: list[int] = (), uris: list[str] = ()) -> int:
    db = _open_existing(path)
    n = db.remove(ids, [str(Path(u).resolve()) if Path(u).exists() else u for u in uris])
    db.close()
    return n


def merge(out: str | Path, inputs: list[str | Path]) -> int:
    """Copy the items and texts of shard indexes into `out` (same bundle only); then `finalize` it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    first = _open_existing(inputs[0])
    meta = first.meta()
    first.close()
    db = IndexDB(out / "items.sqlite", int(meta["dim"]), meta.get("bundle"))
    added = 0
    for src in inputs:
        s = _open_existing(src)
        if s.meta().get("bundle") != meta.get("bundle"):
            raise UserError(f"{src} was built with another bundle than {inputs[0]}: shards must share one")
        known = db.known_hashes()
        rows = s.con.execute("SELECT id, uri, sha256, width, height, captions, vector FROM items ORDER BY id").fetchall()
        items = []
        for r in rows:
            if r[2] in known:
                continue
            caps = s.con.execute("SELECT text, vector FROM texts WHERE item_id=? ORDER BY id", (r[0],)).fetchall()
            import json

            items.append(NewItem(r[1], r[2], r[3], r[4], json.loads(r[5] or "[]"), np.frombuffer(r[6], np.float32),
                                 np.stack([np.frombuffer(c[1], np.float32) for c in caps]) if caps else None))
            known.add(r[2])
        for i in range(0, len(items), 1000):
            db.replace(items[i:i + 1000])
        free = s.con.execute("SELECT text, vector FROM texts WHERE item_id IS NULL").fetchall()
        if free:
            db.add_texts([f[0] for f in free], np.stack([np.frombuffer(f[1], np.float32) for f in free]))
        added += len(items)
        s.close()
    db.close()
    return added


def _open_existing(path: str | Path) -> IndexDB:
    p = Path(path) / "items.sqlite"
    if not p.exists():
        raise UserError(f"{path} is not an index folder (no items.sqlite)")
    return IndexDB(p)


# ---------------------------------------------------------------- the searchable files


def finalize(path: str | Path, bundle: Bundle, kind: str | None = None, target: float = ann.TARGET_RECALL,
             memory_bytes: int | None = None, progress: bool = True, report: Report | None = None) -> dict:
    """(Re)build the FAISS files from the database, tune them, and write the manifest last.

    New FAISS files get new names; the manifest (replaced atomically) names the ones to use;
    files it no longer names are deleted afterwards. A kill at any moment leaves either the
    previous manifest with its files or the new one with its. `kind` overrides the choice by
    size and is remembered for later updates (POST /items, remove, add-texts).
    """
    path = Path(path)
    t0 = time.time()
    db = _open_existing(path)
    for stale in path.glob(".*.faiss.*.tmp"):  # left by a finalize that was killed while writing
        stale.unlink(missing_ok=True)
    if kind is not None:
        db.set_meta("index_kind", kind)
    kind = kind or db.meta().get("index_kind")
    parts = {}
    stamp = time.time_ns()
    with db.snapshot():  # one consistent state of the rows for every pass below
        generation = db.generation
        counts = {"items": db.count("items"), "texts": db.count("texts")}
        for table, name in (("items", "images"), ("texts", "texts")):
            n = counts[table]
            if n == 0:
                parts[name] = {"count": 0}
                continue
            chosen = kind or ann.choose_kind(n, db.dim, memory_bytes)
            refine = ann.choose_refine(n, db.dim, memory_bytes)
            chunks = lambda table=table: db.vectors(table)  # noqa: E731
            bar = tqdm(total=n, desc=f"faiss {name} ({chosen})", unit="vec", leave=False, **_quiet(progress))
            t1 = time.time()
            index, params = ann.build(chosen, db.dim, chunks, n, progress=bar.update, refine=refine)
            bar.close()
            build_s = time.time() - t1
            # tune with the queries this index will answer: captions for images, images for captions
            other = "texts" if table == "items" else "items"
            q_table = other if counts[other] else table
            queries = _sample_queries(lambda t=q_table: db.vectors(t), counts[q_table])
            kth = ann.exact_kth_score(chunks, queries)
            search, recall = ann.tune(index, chosen, queries, kth, lambda ids, t=table: db.vectors_of(ids, t), target)
            file = path / f"{name}.g{generation}-{stamp}.faiss"
            ann.write(index, file)
            spec = ann.IndexSpec(chosen, params, search, recall, len(queries))
            parts[name] = {"count": n, "file": file.name, "index": spec.to_json(), "build_seconds": round(build_s, 1),
                           "bytes": file.stat().st_size, "tuned_with_queries_from": q_table}
        skipped = db.count("skipped")
    manifest = {
        "artifact": "index", "format": INDEX_FORMAT, "generation": generation,
        "bundle": {"name": bundle.name, "path": str(bundle.path), "fingerprint": bundle_fingerprint(bundle),
                   "dim": bundle.dim},
        **parts,
        "skipped": skipped,
        "last_build": report.to_json() if report else None,
        "finalize_seconds": round(time.time() - t0, 1),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": versions(),
    }
    db.close()
    write_json(path / "manifest.json", manifest)
    keep = {p.get("file") for p in parts.values()}
    for old in path.glob("*.faiss"):
        if old.name not in keep:
            old.unlink(missing_ok=True)
    return manifest


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
          workers: int = 2, progress: bool = True) -> dict:
    """Add the new sources, then rebuild the searchable files; returns the manifest."""
    report = add_images(path, bundle, sources, batch=batch, workers=workers, progress=progress)
    return finalize(path, bundle, kind=kind, progress=progress, report=report)


def info(path: str | Path) -> dict:
    m = read_manifest(Path(path))
    if m is None:
        raise UserError(f"{path} is not a finished index (no manifest.json): run dsmd index build")
    db = _open_existing(path)
    m = dict(m)
    m["pending_changes"] = db.generation - m["generation"]
    db.close()
    return m
