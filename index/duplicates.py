"""Duplicates in an index: exact ones (the same bytes under several paths) and near ones (burst shots,
re-encodings, crops: vectors closer than a cosine threshold).

Exact: an index holds each content once (sha256 is unique), so a build that meets the same bytes
again under another path records that path as a copy of the item (table `copies`); removing the
item removes its copies' rows. Near: each item's nearest neighbours (the index's own search, `k`
deep) closer than the threshold join its group (transitively: a chain of near shots is one group).
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from dsmd.index.search import SearchIndex


def exact_groups(index: SearchIndex) -> list[dict]:
    """Items whose bytes were also found under other paths: {id, uri, copies} each, by id."""
    con = index.db.con
    if not con.execute("SELECT 1 FROM sqlite_master WHERE name='copies'").fetchone():
        return []
    groups: dict[int, dict] = {}
    rows = con.execute("SELECT c.item_id, i.uri, c.uri FROM copies c JOIN items i ON i.id = c.item_id "
                       "ORDER BY c.item_id, c.uri")
    for item_id, uri, copy in rows:
        groups.setdefault(item_id, {"id": item_id, "uri": uri, "copies": []})["copies"].append(copy)
    return list(groups.values())


def near_groups(index: SearchIndex, threshold: float = 0.95, k: int = 16, batch: int = 1024,
                progress: bool = True) -> list[dict]:
    """Groups of two or more items linked by cosine >= threshold: {ids, uris, max_cosine}, largest first."""
    ids = index.db.ids("items")
    parent = {int(i): int(i) for i in ids}

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    edges: list[tuple[int, float]] = []  # (an item of the pair, their cosine)
    for start in tqdm(range(0, len(ids), batch), desc="duplicates", unit="batch", disable=not progress):
        chunk = ids[start:start + batch]
        vectors = index.db.vectors_of(chunk, "items", missing_ok=True)
        have = ~np.isnan(vectors).any(axis=1)
        scores, found = index.ranked(np.nan_to_num(vectors), k + 1, "images")
        for i, srow, frow, ok in zip(chunk, scores, found, have):
            if not ok:
                continue
            for s, j in zip(srow, frow):
                j = int(j)
                if j < 0 or j == int(i) or s < threshold or j not in parent:
                    continue
                a, b = root(int(i)), root(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
                edges.append((int(i), float(s)))
    members: dict[int, list[int]] = {}
    for i in parent:
        members.setdefault(root(i), []).append(i)
    best: dict[int, float] = {}
    for i, s in edges:
        best[root(i)] = max(best.get(root(i), -1.0), s)
    rows = index.rows([i for m in members.values() if len(m) > 1 for i in m])
    groups = []
    for r, m in members.items():
        if len(m) > 1:
            m.sort()
            groups.append({"ids": m, "uris": [rows[i]["uri"] for i in m if i in rows],
                           "max_cosine": round(best[r], 6)})
    groups.sort(key=lambda g: (-len(g["ids"]), g["ids"][0]))
    return groups
