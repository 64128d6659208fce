"""`dsmd index sync INDEX --folder DIR`: make an index match a folder, embedding only what changed.

A photo folder lives: files arrive, are edited, move, vanish. A sync compares the folder with the
index's rows under it and applies the difference:

- unchanged (same size and modification time): nothing is read;
- new or changed in size or time: the file is hashed; the same bytes as before only update the row's
  size and time; the bytes of an item whose file has left its place are that item moved (its row
  takes the new path: nothing is embedded); other new bytes are embedded (`build.add_images`, which
  records a second path of bytes already indexed as a copy, index/duplicates.py);
- gone from the folder: the row is removed (its vector rows are reclaimed by the next rebuild), unless
  a recorded copy of its bytes is still there, which the row then points to;
- unreadable (not an image, truncated, no permission): reported and recorded as skipped, and tried
  again once the file changes (its time or status: a chmod, a copy that keeps old times), or when
  a decoder it needed is there now (pillow-heif for HEIC);
- a recorded copy (another path of an item's bytes) is hashed again each time, nothing more;
- written in the last `settle_s` seconds: left for the next round (a file being copied is never
  indexed half-way; `--watch` runs that round).

Then the search files are rebuilt (`build.finalize`) and a new manifest written, which a running
server picks up. Each step commits as it goes, so a killed sync is resumed by running it again: what
was applied is in the database, and a database newer than its manifest is finalized even when the
folder shows nothing more to do.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from dsmd.artifacts import read_manifest, sha256_file
from dsmd.bundle import Bundle
from dsmd.errors import UserError
from dsmd.images import heif_formats
from dsmd.index.build import _quiet, add_images, finalize
from dsmd.index.db import IndexDB
from dsmd.index.identity import bundle_fingerprint
from dsmd.index.lock import folder_lock
from dsmd.index.reclaim import upload_dirs
from dsmd.index.sources import IMAGE_EXTENSIONS, Source, _folder

log = logging.getLogger("dsmd.index")


@dataclass
class SyncReport:
    """What a sync did, counted; `line()` is its one-line summary."""

    added: int = 0  # items embedded: new files and changed ones
    changed: int = 0  # files whose bytes changed (their old rows replaced)
    moved: int = 0
    touched: int = 0  # same bytes, new size or time on record
    removed: int = 0
    unchanged: int = 0
    unreadable: list[dict] = field(default_factory=list)
    settling: list[str] = field(default_factory=list)
    finalized: bool = False
    seconds: float = 0.0

    def line(self) -> str:
        parts = [f"{self.added} embedded ({self.changed} of them changed files)" if self.changed else
                 f"{self.added} embedded", f"{self.moved} moved", f"{self.removed} removed",
                 f"{len(self.unreadable)} unreadable", f"{self.unchanged} unchanged"]
        if self.settling:
            parts.append(f"{len(self.settling)} still being written (next round)")
        return "sync: " + ", ".join(parts) + f" in {self.seconds:.1f} s" + ("" if self.finalized else
                                                                            "; the index was already up to date")

    def to_json(self) -> dict:
        return {"added": self.added, "changed": self.changed, "moved": self.moved, "touched": self.touched,
                "removed": self.removed, "unchanged": self.unchanged, "unreadable": self.unreadable[:100],
                "settling": self.settling[:100], "finalized": self.finalized, "seconds": round(self.seconds, 2)}


@dataclass
class Plan:
    """The difference between a folder and the index's rows under it (see the module's docstring)."""

    embed: list[Source] = field(default_factory=list)  # new bytes (new paths and changed files)
    replaced: list[int] = field(default_factory=list)  # rows whose file now holds other bytes
    moves: list[tuple[int, Source, os.stat_result]] = field(default_factory=list)
    touches: list[tuple[int, os.stat_result]] = field(default_factory=list)
    gone: list[int] = field(default_factory=list)
    unchanged: int = 0
    unreadable: list[dict] = field(default_factory=list)
    settling: list[str] = field(default_factory=list)


def scan(root: Path, skip: tuple[Path, ...] = ()) -> dict[str, tuple[Path, os.stat_result]]:
    """Every image file under `root` by its resolved path (links followed as a build follows them),
    with its stat; nothing under `skip` (the index's own folder and its upload folders, when inside)."""
    out = {}
    for dirpath, dirs, files in os.walk(root, followlinks=False):
        here = Path(dirpath)
        if any(here == s or s in here.parents for s in skip):
            dirs[:] = []
            continue
        dirs.sort()
        for name in sorted(files):
            p = here / name
            if p.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            try:
                st = p.stat()
                real = p.resolve()
            except OSError:
                continue  # vanished between the listing and now, or a dangling link
            if os.path.isfile(real):
                out[str(real)] = (p, st)
    return out


def plan(db: IndexDB, root: Path, index_path: Path, settle_s: float = 0.0, progress: bool = True) -> Plan:
    """Compare the folder with the index (reads only the files whose size or time changed)."""
    root = root.resolve()
    own = (index_path.resolve(), *(p.resolve() for p in upload_dirs(db, index_path)))  # never the folder's
    files = scan(root, skip=own)
    prefix = str(root) + os.sep
    columns = "SELECT id, uri, sha256, bytes, mtime FROM items WHERE "
    rows = {uri: (i, sha, size, mtime) for i, uri, sha, size, mtime in db.con.execute(
        columns + "substr(uri, 1, ?) = ?", (len(prefix), prefix)) if not any(Path(uri).is_relative_to(o) for o in own)}
    outside = [u for u in files if not u.startswith(prefix)]  # links to files elsewhere, indexed at their target
    if outside:
        rows.update({uri: (i, sha, size, mtime) for i, uri, sha, size, mtime in db.con.execute(
            columns + "uri IN (SELECT value FROM json_each(?))", (json.dumps(outside),))})
    skipped = {u: (at, reason) for u, at, reason in db.con.execute(
        "SELECT uri, at, reason FROM skipped WHERE substr(uri, 1, ?) = ?", (len(prefix), prefix))}
    heif = bool(heif_formats())
    copies = dict(db.con.execute("SELECT c.uri, i.sha256 FROM copies c JOIN items i ON i.id = c.item_id "
                                 "WHERE substr(c.uri, 1, ?) = ?", (len(prefix), prefix)))
    p, now = Plan(), time.time()
    look: list[tuple[str, Path, os.stat_result]] = []
    for uri, (path, st) in files.items():
        row = rows.get(uri)
        if row is not None and row[2] == st.st_size and row[3] == st.st_mtime:
            p.unchanged += 1
        elif 0 <= now - st.st_mtime < settle_s:  # (a time in the future is a camera's clock, not a copy)
            p.settling.append(uri)
        elif row is None and uri in skipped and max(st.st_mtime, st.st_ctime) <= skipped[uri][0] \
                and not (heif and "pillow-heif" in skipped[uri][1]):  # retried once it or its decoders change
            p.unreadable.append({"uri": uri, "reason": f"{skipped[uri][1]} (when last tried; unchanged since)"})
        else:
            look.append((uri, path, st))
    gone = {sha: i for uri, (i, sha, _, _) in rows.items() if uri not in files}
    for uri, path, st in tqdm(look, desc="sync: hash", unit="file", dynamic_ncols=True, **_quiet(progress)):
        try:
            sha = sha256_file(path)
        except OSError as e:
            p.unreadable.append({"uri": uri, "reason": f"cannot read ({e.strerror})"})
            continue
        row = rows.get(uri)
        source = Source(uri, path, folder=_folder(path.parent.relative_to(root).as_posix()))
        if row is None and copies.get(uri) == sha:  # a second path of an item's bytes, as recorded
            p.unchanged += 1
        elif row is not None and row[1] == sha:
            p.touches.append((row[0], st))
        elif sha in gone:
            p.moves.append((gone.pop(sha), source, st))
            if row is not None:
                p.replaced.append(row[0])
        else:
            if row is not None:
                p.replaced.append(row[0])
            p.embed.append(source)
    p.gone = list(gone.values())
    return p


def _same_bytes(path: str, sha: str) -> bool:
    try:
        return os.path.isfile(path) and sha256_file(Path(path)) == sha
    except OSError:
        return False


def _apply(db: IndexDB, p: Plan, root: Path) -> tuple[int, int]:
    """Moves, touches and removals in one transaction: (moved, removed from the folder). A gone item
    with a recorded copy still on disk points to the copy instead."""
    removed = moved = 0
    with db.transaction():
        for i in p.replaced:  # its file's new bytes are embedded next (or are a copy of another item's)
            db.con.execute("DELETE FROM items WHERE id=?", (i,))
        for source in p.embed:  # a recorded copy whose bytes changed is an item of its own now
            db.con.execute("DELETE FROM copies WHERE uri=?", (source.uri,))
        for i, source, st in p.moves:
            db.con.execute("DELETE FROM copies WHERE uri=?", (source.uri,))
            moved += db.con.execute("UPDATE items SET uri=?, folder=?, bytes=?, mtime=? WHERE id=?",
                                    (source.uri, source.folder, st.st_size, st.st_mtime, i)).rowcount
        for i, st in p.touches:
            db.con.execute("UPDATE items SET bytes=?, mtime=? WHERE id=?", (st.st_size, st.st_mtime, i))
        for i in p.gone:
            sha = db.con.execute("SELECT sha256 FROM items WHERE id=?", (i,)).fetchone()
            copy = next((u for (u,) in db.con.execute("SELECT uri FROM copies WHERE item_id=? ORDER BY uri", (i,))
                         if sha is not None and _same_bytes(u, sha[0])), None)
            if copy is not None:
                st = os.stat(copy)
                db.con.execute("DELETE FROM copies WHERE uri=?", (copy,))
                db.con.execute("UPDATE items SET uri=?, folder=?, bytes=?, mtime=? WHERE id=?",
                               (copy, _folder(Path(copy).parent.relative_to(root).as_posix())
                                if Path(copy).is_relative_to(root) else None, st.st_size, st.st_mtime, i))
                moved += 1
            else:
                removed += db.con.execute("DELETE FROM items WHERE id=?", (i,)).rowcount
        prefix = str(root) + os.sep
        for (uri,) in db.con.execute("SELECT uri FROM copies WHERE substr(uri, 1, ?) = ?",
                                     (len(prefix), prefix)).fetchall():
            if not os.path.isfile(uri):
                db.con.execute("DELETE FROM copies WHERE uri=?", (uri,))
        if p.replaced or removed or moved or p.touches:
            db._bump()  # the rows changed: the manifest is stale until finalize
    return moved, removed


def _note_skips(path: Path, root: Path, failed: list[str], tried_at: float) -> int:
    """The skipped files of this run stamped with the time before they were read; skips of files now
    indexed or gone forgotten. Returns the rows' generation after it all."""
    db = IndexDB(path / "items.sqlite")
    prefix = str(root) + os.sep
    try:
        with folder_lock(path), db.transaction():
            db.con.executemany("UPDATE skipped SET at = ? WHERE uri = ?", [(tried_at, u) for u in failed])
            db.con.execute("DELETE FROM skipped WHERE uri IN (SELECT uri FROM items)")
            for (uri,) in db.con.execute("SELECT uri FROM skipped WHERE substr(uri, 1, ?) = ?",
                                         (len(prefix), prefix)).fetchall():
                if not os.path.exists(uri):
                    db.con.execute("DELETE FROM skipped WHERE uri = ?", (uri,))
        return db.generation
    finally:
        db.close()


def sync(path: str | Path, bundle: Bundle, root: str | Path, kind: str | None = None, batch: int = 64,
         workers: int = 2, progress: bool = True, settle_s: float = 0.0, memory_bytes: int | None = None,
         backend: dict | None = None, tune_queries: list[str] | None = None) -> SyncReport:
    """Make the index at `path` match the folder `root` (see the module's docstring); returns what it did."""
    t0 = time.time()  # before any file is read: a file changed after it is tried again next time
    path, root = Path(path), Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder: give the folder of images to keep indexed (--folder DIR)")
    path.mkdir(parents=True, exist_ok=True)
    db = IndexDB(path / "items.sqlite", bundle.dim, bundle_fingerprint(bundle), bundle.variant)
    try:
        p = plan(db, root, path, settle_s, progress)
        r = SyncReport(unchanged=p.unchanged, unreadable=list(p.unreadable), settling=p.settling,
                       touched=len(p.touches), changed=len(p.replaced))
        with folder_lock(path):
            r.moved, r.removed = _apply(db, p, root.resolve())
    finally:
        db.close()
    if p.embed:
        added = add_images(path, bundle, p.embed, batch=batch, workers=workers, progress=progress)
        r.added = added.added
        r.unreadable += added.skipped
    failed = [u["uri"] for u in r.unreadable if "unchanged since" not in u["reason"]]
    generation = _note_skips(path, root.resolve(), failed, t0)
    manifest = read_manifest(path)
    if manifest is None or manifest.get("generation") != generation:  # the rows changed, now or in a killed run
        finalize(path, bundle, kind=kind, progress=progress, memory_bytes=memory_bytes, backend=backend,
                 tune_queries=tune_queries)
        r.finalized = True
    r.seconds = time.time() - t0
    return r
