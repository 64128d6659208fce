"""Cross-modal retrieval metrics, exactly as the DSMD paper's protocol (METHOD.md §5).

- image→text: for each image, rank all captions; a hit at K if *any* of its captions is in
  the top K. Its rank is the rank of its best-placed caption.
- text→image: for each caption, rank all images; a hit at K if its image is in the top K.
- R@1/5/10 in percent, RSUM (the sum of the six), and the median rank (1 = first).

Ties count against the query: a positive's rank is 1 + the number of *negatives* scoring at
least as high as it. A collapsed model whose scores are all equal therefore gets the worst
recall (R@1 = 0), not 100%, and the result does not depend on the order of the gallery.

Scores are computed in chunks of queries so that MSCOCO 5K (5,000 x 25,000) and larger fit
in a bounded amount of memory; nothing here needs torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

KS = (1, 5, 10)


@dataclass(frozen=True)
class Recall:
    """Recall table of one model on one split (percentages)."""

    i2t: dict[int, float]
    t2i: dict[int, float]
    i2t_medr: float
    t2i_medr: float
    n_images: int
    n_captions: int

    @property
    def rsum(self) -> float:
        return sum(self.i2t.values()) + sum(self.t2i.values())

    def to_json(self) -> dict:
        """Our keys, plus CLIP_benchmark's (fractions) so numbers compare across tools."""
        out = {f"i2t_R@{k}": v for k, v in self.i2t.items()}
        out.update({f"t2i_R@{k}": v for k, v in self.t2i.items()})
        out.update({"rsum": self.rsum, "i2t_medr": self.i2t_medr, "t2i_medr": self.t2i_medr,
                    "n_images": self.n_images, "n_captions": self.n_captions})
        # CLIP_benchmark: "image retrieval" = text→image, "text retrieval" = image→text.
        out["clip_benchmark"] = {f"image_retrieval_recall@{k}": v / 100 for k, v in self.t2i.items()}
        out["clip_benchmark"].update({f"text_retrieval_recall@{k}": v / 100 for k, v in self.i2t.items()})
        return out

    def row(self, name: str) -> str:
        """One Markdown table row: name | i2t R@1/5/10 | t2i R@1/5/10 | RSUM."""
        i, t = self.i2t, self.t2i
        return (f"| {name} | {i[1]:.1f} | {i[5]:.1f} | {i[10]:.1f} | {t[1]:.1f} | {t[5]:.1f} | {t[10]:.1f} "
                f"| {self.rsum:.1f} |")


TABLE_HEADER = (
    "| model | i→t R@1 | R@5 | R@10 | t→i R@1 | R@5 | R@10 | RSUM |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|"
)


def format_table(rows: dict[str, Recall]) -> str:
    """A Markdown recall table, one row per model."""
    return "\n".join([TABLE_HEADER] + [r.row(name) for name, r in rows.items()])


def ranks_of_positives(
    queries: np.ndarray, gallery: np.ndarray, positives: list[np.ndarray], chunk_bytes: int = 256 << 20
) -> np.ndarray:
    """1-based rank of each query's best positive in the gallery (ties count against it).

    Args:
        queries: (Q, D) embeddings.
        gallery: (G, D) embeddings; score = dot product.
        positives: for each query, the gallery rows that are correct answers (at least one).
        chunk_bytes: scores held in memory at once.
    """
    q_n, g_n = len(queries), len(gallery)
    if len(positives) != q_n:
        raise ValueError(f"{q_n} queries but {len(positives)} positive lists")
    gallery = np.ascontiguousarray(gallery, dtype=np.float32)
    step = max(1, chunk_bytes // (4 * max(g_n, 1)))
    ranks = np.empty(q_n, dtype=np.int64)
    for start in range(0, q_n, step):
        stop = min(start + step, q_n)
        scores = np.asarray(queries[start:stop], dtype=np.float32) @ gallery.T
        pos = positives[start:stop]
        lengths = np.array([len(p) for p in pos])
        if (lengths == 0).any():
            raise ValueError(f"query {start + int(np.argmin(lengths))} has no positive")
        is_pos = np.zeros(scores.shape, dtype=bool)
        is_pos[np.repeat(np.arange(stop - start), lengths), np.concatenate(pos)] = True
        best = np.where(is_pos, scores, -np.inf).max(axis=1, keepdims=True)
        ranks[start:stop] = 1 + ((scores >= best) & ~is_pos).sum(axis=1)
    return ranks


def recall_from_ranks(ranks: np.ndarray) -> dict[int, float]:
    return {k: float(100.0 * (ranks <= k).mean()) for k in KS}


def evaluate(image_emb: np.ndarray, caption_emb: np.ndarray, caption_image: np.ndarray) -> Recall:
    """Recall table for image and caption embeddings of one split.

    Args:
        image_emb: (N, D) image embeddings (L2-normalised for cosine scores).
        caption_emb: (M, D) caption embeddings.
        caption_image: (M,) for each caption, the row of its image in `image_emb`.
    """
    caption_image = np.asarray(caption_image, dtype=np.int64)
    n, m = len(image_emb), len(caption_emb)
    if len(caption_image) != m:
        raise ValueError(f"{m} captions but {len(caption_image)} caption→image entries")
    if m and (caption_image.min() < 0 or caption_image.max() >= n):
        raise ValueError("caption→image map points outside the image rows")
    order = np.argsort(caption_image, kind="stable")
    bounds = np.searchsorted(caption_image[order], np.arange(n + 1))
    caps_of = [order[bounds[i]:bounds[i + 1]] for i in range(n)]
    if any(len(c) == 0 for c in caps_of):
        missing = [i for i, c in enumerate(caps_of) if len(c) == 0]
        raise ValueError(f"{len(missing)} images have no caption (rows {missing[:5]})")

    i2t = ranks_of_positives(image_emb, caption_emb, caps_of)
    t2i = ranks_of_positives(caption_emb, image_emb, [np.array([c]) for c in caption_image])
    return Recall(
        i2t=recall_from_ranks(i2t),
        t2i=recall_from_ranks(t2i),
        i2t_medr=float(np.median(i2t)),
        t2i_medr=float(np.median(t2i)),
        n_images=n,
        n_captions=m,
    )


def chance_rsum(n_images: int, captions_per_image: list[int]) -> float:
    """Expected RSUM of random embeddings (percentages), to tell a collapsed model at a glance.

    Text→image R@K is K/N; image→text R@K is the chance that at least one of an image's c
    captions lands in the top K of all captions: 1 - C(M-c, K) / C(M, K), averaged over images.
    """
    m = sum(captions_per_image)
    t2i = sum(min(k, n_images) / n_images for k in KS)
    i2t = 0.0
    for k in KS:
        miss = [math.prod((m - c - j) / (m - j) for j in range(min(k, m))) if m - c >= k else 0.0
                for c in captions_per_image]
        i2t += 1 - sum(miss) / len(miss)
    return 100 * (t2i + i2t)
