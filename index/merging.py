"""Merging shard indexes (`dsmd index build --shard i/n` on several machines) into one folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dsmd.bundle import Bundle
from dsmd.errors import UserError
from dsmd.index import metadata
from dsmd.index.db import IndexDB, NewItem
from dsmd.index.identity import check_bundle
from dsmd.index.lock import folder_lock


def merge(out: str | Path, inputs: list[str | Path], bundle: Bundle | None = None) -> int:
    """Copy the items and texts of shard indexes into `out` (same bundle only, `bundle` if given); then
    `finalize` it. The folder lock is held one batch at a time, as a build holds it."""
    out = Path(out)
    for src in inputs if bundle is not None else ():
        check_bundle(src, bundle)
    if bundle is not None and (out / "items.sqlite").exists():
        check_bundle(out, bundle)
    first = open_existing(inputs[0])
    meta = first.meta()
    first.close()
    out.mkdir(parents=True, exist_ok=True)
    return _merge(out, inputs, meta)


def _merge(out: Path, inputs: list[str | Path], meta: dict[str, str]) -> int:
    db = IndexDB(out / "items.sqlite", int(meta["dim"]), meta.get("bundle"), IndexDB.variant(meta))
    added = 0
    for src in inputs:
        s = open_existing(src)
        if s.meta().get("bundle") != meta.get("bundle") or IndexDB.variant(s.meta()) != IndexDB.variant(meta):
            raise UserError(f"{src} was built with another bundle (or variant) than {inputs[0]}: shards must share one")
        known = db.known_hashes()
        rows = s.con.execute(f"SELECT id, uri, sha256, width, height, captions, {metadata.select_list(s.con)} "
                             f"FROM items ORDER BY id").fetchall()
        items = []
        for start in range(0, len(rows), 1000):
            batch = [r for r in rows[start:start + 1000] if r[2] not in known]
            if not batch:
                continue
            vecs = s.vectors_of(np.array([r[0] for r in batch]), "items")
            for r, v in zip(batch, vecs):
                caps = s.con.execute("SELECT id, text FROM texts WHERE item_id=? ORDER BY id", (r[0],)).fetchall()
                cap_vecs = s.vectors_of(np.array([c[0] for c in caps]), "texts") if caps else None
                items.append(NewItem(r[1], r[2], r[3], r[4], json.loads(r[5] or "[]"), v, cap_vecs,
                                     dict(zip(metadata.COLUMNS, r[6:]))))
                known.add(r[2])
        for i in range(0, len(items), 1000):
            with folder_lock(out):
                db.replace(items[i:i + 1000])
        free = s.con.execute("SELECT id, text FROM texts WHERE item_id IS NULL ORDER BY id").fetchall()
        if free:
            with folder_lock(out):
                db.add_texts([f[1] for f in free], s.vectors_of(np.array([f[0] for f in free]), "texts"))
        added += len(items)
        s.close()
    db.close()
    return added


def open_existing(path: str | Path) -> IndexDB:
    p = Path(path) / "items.sqlite"
    if not p.exists():
        raise UserError(f"{path} is not an index folder (no items.sqlite)")
    return IndexDB(p)
