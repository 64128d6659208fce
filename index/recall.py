"""How well the index's own captions find their images: from the vectors directly, and through FAISS."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dsmd.errors import UserError


def text_to_image_recall(path: str | Path,
                         ks: tuple[int, ...] = (1, 5, 10)) -> tuple[dict[int, float], dict[int, float]]:
    """Text→image R@K of the index's captions: (computed directly from the stored vectors,
    found through the FAISS index). Equal for an exact index; an approximate one may lose a little."""
    from dsmd.index.search import SearchIndex
    from dsmd.retrieval import evaluate

    s = SearchIndex(path)
    item_ids, item_vecs = (np.concatenate(x) for x in zip(*s.db.vectors("items")))
    rows = s.db.con.execute("SELECT id, item_id FROM texts WHERE item_id IS NOT NULL ORDER BY id").fetchall()
    if not rows:
        raise UserError(f"{path} has no captions of its images: build it from a data set to measure recall")
    text_ids = np.array([r[0] for r in rows])
    owner_ids = np.array([r[1] for r in rows])
    text_vecs = s.db.vectors_of(text_ids, "texts")
    owner_rows = np.searchsorted(item_ids, owner_ids)
    direct = evaluate(item_vecs, text_vecs, owner_rows).t2i
    hits = s.search(text_vecs, max(ks), "images")
    via = {k: 100 * float(np.mean([any(h.id == o for h in row[:k]) for row, o in zip(hits, owner_ids)])) for k in ks}
    s.close()
    return {k: direct[k] for k in ks}, via
