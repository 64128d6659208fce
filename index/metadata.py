"""What an item is besides its vector: its file's size and time, the photo's capture time and camera
(EXIF), its folder in the collection, and the user's tags. Filters (index/filters.py) read them.

Columns of `items` (NULL where unknown; an index made before 2026-12-07 gains them, empty, the
first time it is opened with write access):
    bytes    the file's size
    mtime    the file's modification time (unix seconds; an upload's: when it arrived)
    taken    the EXIF capture time (DateTimeOriginal, else DateTime), unix seconds; the camera
             clock has no zone, so it is read as UTC unless the file gives its offset
    camera   the EXIF camera model
    folder   the file's folder relative to the indexed root ('' for the root, 'a/b' below it;
             'uploads' for images uploaded to the server)
Table `tags(item_id, tag)`: set and cleared through the API; deleted with their item.
Table `copies(uri, item_id)`: other paths a build found the item's exact bytes at (index/duplicates.py).
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import sqlite3
from pathlib import Path

from PIL import Image

from dsmd.errors import UserError
from dsmd.index import fulltext

COLUMNS = {"bytes": "INTEGER", "mtime": "REAL", "taken": "REAL", "camera": "TEXT", "folder": "TEXT"}
UPLOAD_FOLDER = "uploads"
MAX_TAGS, MAX_TAG_CHARS = 100, 64
SCHEMA = """
CREATE TABLE IF NOT EXISTS tags(item_id INTEGER NOT NULL REFERENCES items(id) ON DELETE CASCADE,
    tag TEXT NOT NULL, PRIMARY KEY(item_id, tag)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tags_tag ON tags(tag, item_id);
DROP INDEX IF EXISTS items_folder;
DROP INDEX IF EXISTS items_when;
DROP INDEX IF EXISTS items_bytes;
CREATE INDEX IF NOT EXISTS items_by_folder ON items(folder, vrow);
CREATE INDEX IF NOT EXISTS items_by_time ON items(COALESCE(taken, mtime), vrow);
CREATE INDEX IF NOT EXISTS items_by_bytes ON items(bytes, vrow);
CREATE TABLE IF NOT EXISTS copies(uri TEXT PRIMARY KEY,
    item_id INTEGER NOT NULL REFERENCES items(id) ON DELETE CASCADE);
CREATE INDEX IF NOT EXISTS copies_item ON copies(item_id);
"""
_EXIF_IFD, _DATETIME_ORIGINAL, _OFFSET_ORIGINAL, _DATETIME, _MODEL = 0x8769, 36867, 36881, 306, 272


def migrate(con: sqlite3.Connection) -> None:
    """Add the metadata columns, the tags table, their indexes and the full-text index where missing (one write
    transaction: two processes opening an old index at once do it once)."""
    if has_metadata(con) and con.execute("SELECT 1 FROM sqlite_master WHERE name='items_by_bytes'").fetchone() \
            and fulltext.present(con):
        return
    con.execute("BEGIN IMMEDIATE")
    try:
        have = _columns(con)
        for name, kind in COLUMNS.items():
            if name not in have:
                con.execute(f"ALTER TABLE items ADD COLUMN {name} {kind}")
        for statement in SCHEMA.split(";"):
            if statement.strip():
                con.execute(statement)
        fulltext.create(con)  # the words of file names, folders, captions and tags (index/fulltext.py)
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def has_metadata(con: sqlite3.Connection) -> bool:
    return set(COLUMNS) <= _columns(con)


def _columns(con: sqlite3.Connection) -> set[str]:
    return {r[1] for r in con.execute("PRAGMA table_info(items)")}


def select_list(con: sqlite3.Connection) -> str:
    """The metadata columns for a SELECT, as NULLs in an index that has not gained them (read-only)."""
    return ", ".join(COLUMNS) if has_metadata(con) else ", ".join(f"NULL AS {c}" for c in COLUMNS)


ROW = ("id", "uri", "sha256", "width", "height", "captions", "added", *COLUMNS)
BRIEF = ("id", "uri", "captions", "folder", "taken", "mtime")  # what a search result shows of its item


def rows(con: sqlite3.Connection, ids: list[int], select: str, tags: bool, brief: bool = False) -> dict[int, dict]:
    """Rows of these items by id: `select` from select_list(), `tags` whether the tags table exists;
    `brief`: only the BRIEF fields and the tags (a page of search results: every column read costs).

    One statement per call, on the hot path of every search: the tags come in it (a lookup in the
    tags table's primary key per row), and a short id list is bound as IN (?, ...), about 20% quicker
    than json_each for the ten-odd ids of a page; long lists go through json_each (SQLite's
    limit on bound variables)."""
    ids = [int(i) for i in ids]
    if not ids:
        return {}
    short = len(ids) <= SHORT_LIST
    sql = _statement(brief, select.startswith("NULL"), tags, len(ids) if short else 0)
    found = con.execute(sql, ids if short else (_json_ids(ids),))
    loads = json.loads
    if brief:
        return {r[0]: {"id": r[0], "uri": r[1], "captions": loads(r[2] or "[]"), "folder": r[3], "taken": r[4],
                       "mtime": r[5], "tags": sorted(r[6].split("\x1f")) if r[6] else []} for r in found}
    out = {}
    for r in found:
        row = out[r[0]] = dict(zip(ROW, r))
        row["captions"] = loads(r[5] or "[]")
        row["tags"] = sorted(r[-1].split("\x1f")) if r[-1] else []
    return out


@functools.lru_cache(maxsize=64)
def _statement(brief: bool, no_metadata: bool, tags: bool, bound: int) -> str:
    """rows()'s SELECT: `bound` ids as IN (?, ...), or 0 for one JSON list (json_each)."""
    names = BRIEF if brief else ROW
    columns = ", ".join(f"NULL AS {c}" if no_metadata and c in COLUMNS else c for c in names)
    held = "(SELECT group_concat(tag, char(31)) FROM tags WHERE item_id = items.id)" if tags else "NULL"
    where = f"IN ({','.join('?' * bound)})" if bound else "IN (SELECT value FROM json_each(?))"
    return f"SELECT {columns}, {held} FROM items WHERE id {where}"


SHORT_LIST = 256  # ids bound one by one up to this many


def has_tags(con: sqlite3.Connection) -> bool:
    return con.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='tags'").fetchone() is not None


def _json_ids(ids) -> str:
    return "[" + ",".join(str(int(i)) for i in ids) + "]"


def clean_tags(tags: list[str]) -> list[str]:
    """Tags as stored: trimmed, distinct, sorted; a UserError for empty or oversized ones, or ones with
    control characters (rows() joins an item's tags with one)."""
    out = sorted({t.strip() for t in tags})
    if "" in out:
        raise UserError("a tag is empty")
    odd = [t for t in out if any(ord(ch) < 32 or ord(ch) == 127 for ch in t)]
    if odd:
        raise UserError(f"a tag has a control character: {odd[0][:80]!r}")
    if len(out) > MAX_TAGS:
        raise UserError(f"at most {MAX_TAGS} tags per item, not {len(out)}")
    long = [t for t in out if len(t) > MAX_TAG_CHARS]
    if long:
        raise UserError(f"a tag is at most {MAX_TAG_CHARS} characters: {long[0][:80]!r}")
    return out


def set_tags(con: sqlite3.Connection, item_id: int, tags: list[str]) -> bool:
    """Replace the item's tags (inside the caller's transaction); False when there is no such item."""
    if con.execute("SELECT 1 FROM items WHERE id=?", (int(item_id),)).fetchone() is None:
        return False
    con.execute("DELETE FROM tags WHERE item_id=?", (int(item_id),))
    con.execute("INSERT INTO meta(key, value) VALUES('tags_version', '1') "
                "ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + 1")  # filter caches key on it
    con.executemany("INSERT INTO tags(item_id, tag) VALUES(?, ?)", [(int(item_id), t) for t in clean_tags(tags)])
    return True


def note_copies(con: sqlite3.Connection, found: list[tuple[str, str]]) -> None:
    """Record (uri, sha256) pairs a build skipped as already indexed under another path (one transaction)."""
    if not found:
        return
    con.execute("BEGIN IMMEDIATE")
    try:
        for uri, sha in found:
            row = con.execute("SELECT id FROM items WHERE sha256=? AND uri<>?", (sha, uri)).fetchone()
            if row is not None:
                con.execute("INSERT OR REPLACE INTO copies(uri, item_id) VALUES(?, ?)", (uri, row[0]))
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


# ---------------------------------------------------------------- reading them from a file


def file_facts(path: Path | None, size: int) -> dict:
    """Size and modification time of an indexed file (an upload has no path: now)."""
    import time

    mtime = time.time()
    if path is not None:
        try:
            mtime = path.stat().st_mtime
        except OSError:
            pass
    return {"bytes": int(size), "mtime": mtime}


def exif_facts(img: Image.Image) -> dict:
    """Capture time and camera model from an opened image's EXIF (empty where it has none or
    they cannot be read: a broken EXIF block never stops an image from being indexed)."""
    try:
        exif = img.getexif()
        sub = exif.get_ifd(_EXIF_IFD)
        when = sub.get(_DATETIME_ORIGINAL) or exif.get(_DATETIME)
        taken = _exif_time(when, sub.get(_OFFSET_ORIGINAL))
        camera = exif.get(_MODEL)
    except Exception:
        return {}
    out = {}
    if taken is not None:
        out["taken"] = taken
    if isinstance(camera, str) and camera.strip("\x00 "):
        out["camera"] = camera.strip("\x00 ")[:200]
    return out


def _exif_time(value, offset) -> float | None:
    """'YYYY:MM:DD HH:MM:SS' (and '+HH:MM' offset) as unix seconds; None when absent or malformed."""
    if not isinstance(value, str):
        return None
    try:
        t = dt.datetime.strptime(value.strip("\x00 ")[:19], "%Y:%m:%d %H:%M:%S")
    except ValueError:
        return None
    zone = dt.timezone.utc
    if isinstance(offset, str) and len(offset.strip()) == 6 and offset[0] in "+-":
        try:
            hours, minutes = int(offset[1:3]), int(offset[4:6])
            sign = 1 if offset[0] == "+" else -1
            zone = dt.timezone(sign * dt.timedelta(hours=hours, minutes=minutes))
        except ValueError:
            pass
    return t.replace(tzinfo=zone).timestamp()
