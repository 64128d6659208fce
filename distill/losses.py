"""The four DSMD distillation losses (METHOD.md §2), plus the peers' losses for the ablation.

All embeddings are L2-normalised rows. `ids` are image ids: two rows with the same image id
(two captions of one image, in a batch or in a queue) are never used as each other's
negatives — the released prototype did not mask them; we do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")


def contrastive_distill(
    student: torch.Tensor, teacher: torch.Tensor, queue: torch.Tensor, ids: torch.Tensor, queue_ids: torch.Tensor,
    tau: float = 0.05,
) -> torch.Tensor:
    """Queue-based contrastive distillation for one modality (Eq. 5-7).

    For row b: positive s_b·t_b, negatives s_b·q for the teacher embeddings q in the queue
    (same modality), InfoNCE at temperature tau with the positive as class 0. Queue entries
    of the same image as row b are masked out. Empty queue slots carry id -1 and are masked too.

    Args:
        student, teacher: (B, D). queue: (K, D). ids: (B,) image ids. queue_ids: (K,).
    """
    pos = (student * teacher).sum(dim=-1, keepdim=True)
    neg = student @ queue.T
    neg = neg.masked_fill((queue_ids[None, :] == ids[:, None]) | (queue_ids[None, :] < 0), NEG_INF)
    logits = torch.cat([pos, neg], dim=1) / tau
    return F.cross_entropy(logits, torch.zeros(len(student), dtype=torch.long, device=student.device))


def feature_distill(s_img: torch.Tensor, t_img: torch.Tensor, s_txt: torch.Tensor, t_txt: torch.Tensor) -> torch.Tensor:
    """L1 feature distillation (Eq. 8): mean |s - t| per modality, summed."""
    return (s_img - t_img).abs().mean() + (s_txt - t_txt).abs().mean()


def similarity_distill(s_img: torch.Tensor, t_img: torch.Tensor, s_txt: torch.Tensor,
                       t_txt: torch.Tensor) -> torch.Tensor:
    """Cosine similarity distillation (Eq. 9): 1 - (mean cos + 1) / 2 per modality, summed."""
    def one(s, t):
        return 1 - (F.cosine_similarity(s, t, dim=-1).mean() + 1) / 2

    return one(s_img, t_img) + one(s_txt, t_txt)


def hardest_triplet(a: torch.Tensor, b: torch.Tensor, ids: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """VSE++ max-violation triplet H(a, b) (Eq. 10-13), summed over the batch, both directions.

    Scores S = a bᵀ with positives on the diagonal; for each row the hardest negative column
    and for each column the hardest negative row; pairs of the same image are not negatives.
    """
    scores = a @ b.T
    positive = scores.diagonal()
    same = ids[:, None] == ids[None, :]  # includes the diagonal
    masked = scores.masked_fill(same, NEG_INF)
    hardest_col = masked.max(dim=1).values  # per row i: max_{j≠i} S_ij
    hardest_row = masked.max(dim=0).values  # per column j: max_{i≠j} S_ij
    # a row with no negative at all (-inf) clamps to 0: no violation
    row_cost = (margin + hardest_col - positive).clamp(min=0)
    col_cost = (margin + hardest_row - positive).clamp(min=0)
    return row_cost.sum() + col_cost.sum()


def hard_negative_distill(s_img: torch.Tensor, t_img: torch.Tensor, s_txt: torch.Tensor, t_txt: torch.Tensor,
                          ids: torch.Tensor, margin: float = 0.0, img_ids: torch.Tensor | None = None,
                          txt_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Hard-negative distillation (Eq. 14) over the four pairs (sI,tI), (sT,tT), (sI,tT), (sT,tI).

    The first len(ids) image and text rows are pairs; rows past them (unpaired, with their own
    `img_ids`/`txt_ids`) join the within-modality terms only."""
    n = len(ids)
    img_ids = ids if img_ids is None else img_ids
    txt_ids = ids if txt_ids is None else txt_ids
    return (hardest_triplet(s_img, t_img, img_ids, margin) + hardest_triplet(s_txt, t_txt, txt_ids, margin)
            + hardest_triplet(s_img[:n], t_txt[:n], ids, margin) + hardest_triplet(s_txt[:n], t_img[:n], ids, margin))


def similarity_kl(s_img: torch.Tensor, s_txt: torch.Tensor, t_img: torch.Tensor, t_txt: torch.Tensor,
                  s_scale: float = 1 / 0.05, t_scale: float = 1 / 0.05) -> torch.Tensor:
    """KL between the teacher's and the student's in-batch image-text similarity distributions,
    both directions (the distillation loss of open_clip's distiller and TinyCLIP). Off by default."""
    s = s_img @ s_txt.T * s_scale
    t = t_img @ t_txt.T * t_scale
    kl = lambda sl, tl: F.kl_div(F.log_softmax(sl, dim=1), F.log_softmax(tl, dim=1), log_target=True,  # noqa: E731
                                 reduction="batchmean")
    return (kl(s, t) + kl(s.T, t.T)) / 2


def clip_contrastive(img: torch.Tensor, txt: torch.Tensor, ids: torch.Tensor, scale: float = 1 / 0.05) -> torch.Tensor:
    """Symmetric InfoNCE on image-caption pairs: the "without distillation" baseline.

    Other rows of the same image are masked out of the negatives.
    """
    logits = img @ txt.T * scale
    same = (ids[:, None] == ids[None, :]) & ~torch.eye(len(ids), dtype=torch.bool, device=ids.device)
    logits = logits.masked_fill(same, NEG_INF)
    labels = torch.arange(len(ids), device=img.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
