"""Words as well as meaning: a full-text index (SQLite FTS5) over each item's file name, folder,
captions and tags, and the searches that use it (`mode=` of GET /search).

- `mode=text`: the items whose words match the query's, ranked by BM25 (score: minus the BM25
  value, so higher is better as everywhere else).
- `mode=hybrid`: that ranking fused with the vector ranking by reciprocal rank fusion (each list
  gives 1 / (60 + rank); score: the sum), so a photo found by its file name (`kayak-trip-2023.jpg`)
  and one found by what it shows both come up. The embedding knows nothing of file names, and
  the words know nothing of pixels: each covers what the other misses.

The FTS table is kept by triggers on `items` and `tags`, so every writer (build, sync, uploads,
tags, removals) keeps it in step without knowing of it. Filters apply to both rankings.
"""

from __future__ import annotations

import re
import sqlite3

import numpy as np

TABLE = "items_fts"
RRF_K = 60  # reciprocal rank fusion's constant (Cormack et al. 2009): 1 / (60 + rank)


def _name(col: str) -> str:
    """The file name of a stored path, in SQL (what follows the last '/')."""
    return f"replace({col}, rtrim({col}, replace({col}, '/', '')), '')"


def _tags(item: str) -> str:
    return f"coalesce((SELECT group_concat(tag, ' ') FROM tags WHERE item_id = {item}), '')"


SCHEMA = [
    f"CREATE VIRTUAL TABLE IF NOT EXISTS {TABLE} USING fts5(name, folder, captions, tags, "
    "tokenize = 'unicode61 remove_diacritics 2')",
    f"""CREATE TRIGGER IF NOT EXISTS items_fts_insert AFTER INSERT ON items BEGIN
        INSERT INTO {TABLE}(rowid, name, folder, captions, tags)
        VALUES (new.id, {_name('new.uri')}, coalesce(new.folder, ''), coalesce(new.captions, ''), '');
    END""",
    f"""CREATE TRIGGER IF NOT EXISTS items_fts_delete AFTER DELETE ON items BEGIN
        DELETE FROM {TABLE} WHERE rowid = old.id;
    END""",
    f"""CREATE TRIGGER IF NOT EXISTS items_fts_update AFTER UPDATE OF uri, folder, captions ON items BEGIN
        UPDATE {TABLE} SET name = {_name('new.uri')}, folder = coalesce(new.folder, ''),
            captions = coalesce(new.captions, '') WHERE rowid = new.id;
    END""",
    f"""CREATE TRIGGER IF NOT EXISTS tags_fts_insert AFTER INSERT ON tags BEGIN
        UPDATE {TABLE} SET tags = {_tags('new.item_id')} WHERE rowid = new.item_id;
    END""",
    f"""CREATE TRIGGER IF NOT EXISTS tags_fts_delete AFTER DELETE ON tags BEGIN
        UPDATE {TABLE} SET tags = {_tags('old.item_id')} WHERE rowid = old.item_id;
    END""",
]


def present(con: sqlite3.Connection) -> bool:
    return con.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (TABLE,)).fetchone() is not None


def create(con: sqlite3.Connection) -> None:
    """The table, its triggers, and the rows of the items already indexed (inside the caller's transaction)."""
    fresh = not present(con)
    try:
        con.execute(SCHEMA[0])
    except sqlite3.OperationalError as e:  # a SQLite built without FTS5: searches by words are refused (422)
        if "fts5" not in str(e):
            raise
        return
    for statement in SCHEMA[1:]:
        con.execute(statement)
    if fresh:
        con.execute(f"INSERT INTO {TABLE}(rowid, name, folder, captions, tags) SELECT id, {_name('uri')}, "
                    f"coalesce(folder, ''), coalesce(captions, ''), {_tags('id')} FROM items")


def match(text: str) -> str | None:
    """An FTS5 query for a user's words: any of them (words of 3+ letters also as prefixes: 'sunset'
    finds 'sunsets'), never FTS5 syntax from the user. None when the text has no words."""
    words = re.findall(r"\w+", text.lower())[:32]
    if not words:
        return None
    return " OR ".join(f'"{w}"*' if len(w) >= 3 else f'"{w}"' for w in dict.fromkeys(words))


def ranking(con: sqlite3.Connection, text: str, n: int, cond: str = "1", args: list = ()
            ) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of the best n items by BM25 (minus BM25: higher is better) among those matching
    the filter condition over `items`."""
    query = match(text)
    if query is None or n <= 0:
        return np.zeros(0, np.float32), np.zeros(0, np.int64)
    where = "" if cond == "1" else f" AND rowid IN (SELECT id FROM items WHERE {cond})"
    rows = con.execute(f"SELECT rowid, bm25({TABLE}) FROM {TABLE} WHERE {TABLE} MATCH ?{where} "
                       f"ORDER BY bm25({TABLE}) LIMIT ?", [query, *args, n]).fetchall()
    return (np.array([-r[1] for r in rows], np.float32), np.array([r[0] for r in rows], np.int64))


def fuse(*rankings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reciprocal rank fusion of id rankings (best first each): (scores, ids), best first."""
    score: dict[int, float] = {}
    for ids in rankings:
        for rank, i in enumerate(ids.tolist()):
            score[i] = score.get(i, 0.0) + 1.0 / (RRF_K + rank + 1)
    order = sorted(score.items(), key=lambda kv: (-kv[1], kv[0]))
    return (np.array([s for _, s in order], np.float32), np.array([i for i, _ in order], np.int64))
