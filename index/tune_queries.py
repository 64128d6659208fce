"""Text queries to tune a captionless collection's image index with (`dsmd index ... --tune-queries`
gives the operator's own instead).

A collection without captions has no text vectors to tune with, so its images' own vectors were
the queries. But its users ask in words, and text vectors sit elsewhere in the embedding space
than image vectors (the modality gap): an ANN setting that finds an image's neighbours may miss a
text's. These 320 generic queries of everyday photos, written for this project, stand in for what
people type; the tuner keeps the cheapest setting that reaches the recall target for both.
"""

from __future__ import annotations

from pathlib import Path

from dsmd.errors import UserError

SUBJECTS = ("a dog", "a cat", "a child", "two friends", "an old man", "a woman", "a family", "a baby", "a horse",
            "a bird", "a red car", "a bicycle", "a boat", "a train", "a house", "a bridge", "a tree", "flowers",
            "a birthday cake", "a plate of food", "a mountain", "a lake", "a city street", "a crowd", "a wedding",
            "a football match", "a snowman", "a tent", "a book", "a guitar", "a laptop", "a cup of coffee")
PLACES = ("on a beach", "in a park", "at night", "in the snow", "in the rain", "at sunset", "in a kitchen",
          "in the mountains", "next to a river", "in a city")

QUERIES: tuple[str, ...] = tuple(f"{s} {p}" for s in SUBJECTS for p in PLACES)


def read(path: str | Path) -> list[str]:
    """The operator's queries (--tune-queries FILE): one a line, blank lines skipped."""
    try:
        lines = [x.strip() for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]
    except OSError as e:
        raise UserError(f"--tune-queries {path}: cannot read it ({e.strerror})") from None
    if not lines:
        raise UserError(f"--tune-queries {path} has no queries: one a line")
    return lines
