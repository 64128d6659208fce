"""Giving back what removed items leave behind: their vector rows and their upload files.

A removal deletes rows only (O(1)); the float16 vector files keep the removed rows' bytes, and an
upload's image file stays where it was stored. Compaction (finalize with `reclaim`) gives both
back:

    vector rows   the live rows' vectors are copied into the next generation's file
                  (INDEX/vectors/TABLE.gN.f16) from a snapshot, without the folder lock; the rows
                  added meanwhile, the switch of every row's vrow and the deletion of the older
                  files run under it (one transaction). Readers read each row from the file its
                  vrow names; one that meets a deleted file reads the row again (index/db.py).
    upload files  the paths of deleted items are recorded by a trigger (table `removed`); a file is
                  deleted when no row names it any more, it lies in an upload folder (INDEX/uploads
                  or one add_image was given, remembered in meta) and has a content-hash name:
                  the files of a collection that was built from a folder are never touched.

`dsmd index info` reports what a compaction would free (`reclaimable`).
"""

from __future__ import annotations

import json
from pathlib import Path

from dsmd.index.db import GEN_SHIFT, TABLES, IndexDB
from dsmd.index.vectors import vector_generations, vector_path

DEAD_MIN = 64  # a finalize without `reclaim` rewrites the vector files only past these many dead rows
DEAD_FRACTION = 0.10  # ... and past this share of the live rows


def reclaimable(db: IndexDB, index: Path) -> dict:
    """What a compaction would free: dead vector rows per table, upload files of removed items, bytes."""
    dead = db.dead_rows()
    files = orphan_uploads(db, index)
    size = sum(f.stat().st_size for f in files if f.exists())
    return {"vector_rows": dead, "upload_files": len(files), "bytes": sum(dead.values()) * 2 * (db.dim or 0) + size}


def upload_dirs(db: IndexDB, index: Path) -> list[Path]:
    return [Path(index) / "uploads", *(Path(p) for p in json.loads(db.meta().get("upload_dirs", "[]")))]


def note_upload_dir(db: IndexDB, folder: Path, index: Path) -> None:
    """Remember a folder uploads were stored in (compaction deletes the files of removed uploads there)."""
    folder = Path(folder).resolve()
    dirs = [str(p) for p in upload_dirs(db, index)[1:]]
    if folder != (Path(index) / "uploads").resolve() and str(folder) not in dirs:
        db.set_meta("upload_dirs", json.dumps(sorted({*dirs, str(folder)})))


def orphan_uploads(db: IndexDB, index: Path) -> list[Path]:
    """Upload files (content-named, in an upload folder) of removed items that no row names."""
    from dsmd.index.uploads import is_upload_name

    dirs = {p.resolve() for p in upload_dirs(db, Path(index))}
    out = []
    for (uri,) in db.con.execute("SELECT uri FROM removed WHERE uri NOT IN (SELECT uri FROM items)").fetchall():
        p = Path(uri)
        if is_upload_name(p.name) and p.parent.resolve() in dirs and p.exists():
            out.append(p)
    return out


def delete_orphan_uploads(db: IndexDB, index: Path) -> int:
    """Delete the upload files of removed items and forget the paths; the caller holds the folder lock
    (an upload is stored and its row inserted under it, so no file deleted here is being added)."""
    files = orphan_uploads(db, index)
    for f in files:
        f.unlink(missing_ok=True)
    with db.transaction():
        db.con.execute("DELETE FROM removed")  # the folder lock keeps removals out until this commits
    return len(files)


def should_rewrite(db: IndexDB) -> bool:
    """Whether dead rows are worth a rewrite when no compaction asked for one."""
    dead = db.dead_rows()
    return any(dead[t] >= max(DEAD_MIN, DEAD_FRACTION * db.count(t)) for t in TABLES)


def rewrite_vectors(db: IndexDB, table: str, lock) -> int:
    """Copy the vectors of the rows into a new generation's file, point the rows at it and delete the
    older files; returns the rows dropped. `lock`: the folder lock's context manager, held for the
    rows added since the snapshot, the switch and the deletion only."""
    index = db.path.parent
    gen = max(vector_generations(index, table), default=0) + 1
    new = db.vector_file(table, gen)
    placed: dict[int, int] = {}
    with db.snapshot():
        rows = db.con.execute(f"SELECT id, vrow FROM {table} ORDER BY id").fetchall()
        for i in range(0, len(rows), 100_000):
            part = rows[i:i + 100_000]
            placed.update(zip((r[0] for r in part), new.append(db._read(table, (r[1] for r in part))).tolist()))
    with lock():
        with db.transaction():
            now = db.con.execute(f"SELECT id, vrow FROM {table} ORDER BY id").fetchall()
            late = [r for r in now if r[0] not in placed]
            if late:
                placed.update(zip((r[0] for r in late), new.append(db._read(table, (r[1] for r in late))).tolist()))
            db.con.executemany(f"UPDATE {table} SET vrow=? WHERE id=?",
                               [((gen << GEN_SHIFT) | placed[r[0]], r[0]) for r in now])
            db.con.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET "
                           "value=excluded.value", (f"vectors_{table}", str(gen)))
        older = [g for g in vector_generations(index, table) if g < gen]
        dropped = sum(db.vector_file(table, g).rows() for g in older) - new.rows()
        for g in older:  # committed: no row names them now
            vector_path(index, table, g).unlink(missing_ok=True)
    return dropped
