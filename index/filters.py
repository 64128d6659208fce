"""Which items a search may return: a folder, a time range, tags, a size, captions or not.

A `Filter` becomes one SQL condition over `items` (with its indexes: folder, capture time,
bytes, tags); index/filtered.py decides how the vector search honours it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from dsmd.errors import UserError


@dataclass(frozen=True)
class Filter:
    """Every field is optional; an item must meet all that are given.

    folder         the item's folder or one below it ('2023' keeps '2023' and '2023/june', not '2023b')
    taken_from/_to capture time range, unix seconds, inclusive (EXIF time, else the file's mtime)
    tags_any       at least one of these tags
    tags_all       every one of these tags
    min_bytes      file size at least this
    min_side       shorter side at least this many pixels
    has_captions   True: only items with captions; False: only items without
    """

    folder: str | None = None
    taken_from: float | None = None
    taken_to: float | None = None
    tags_any: tuple[str, ...] = ()
    tags_all: tuple[str, ...] = ()
    min_bytes: int | None = None
    min_side: int | None = None
    has_captions: bool | None = None

    def __post_init__(self) -> None:
        if self.taken_from is not None and self.taken_to is not None and self.taken_from > self.taken_to:
            raise UserError(f"taken_from ({self.taken_from}) is after taken_to ({self.taken_to})")
        if len(self.tags_any) + len(self.tags_all) > 50:
            raise UserError("at most 50 tags in a filter")

    def empty(self) -> bool:
        return self == Filter()

    def key(self) -> str:
        """A stable text for this filter (cache keys, logs)."""
        return json.dumps({k: v for k, v in asdict(self).items() if v not in (None, ())}, sort_keys=True)

    def sql(self) -> tuple[str, list]:
        """(condition over `items`, its parameters); '1' for an empty filter."""
        where, args = [], []
        if self.folder is not None:
            folder = self.folder.strip("/")
            if folder:  # the folder itself, or below it: one range on the index ('/' + 1 is '0'), then a check
                where.append("folder >= ? AND folder < ? AND (length(folder) = ? OR substr(folder, ?, 1) = '/')")
                args += [folder, folder + "0", len(folder), len(folder) + 1]
        if self.taken_from is not None:
            where.append("COALESCE(taken, mtime) >= ?")
            args.append(float(self.taken_from))
        if self.taken_to is not None:
            where.append("COALESCE(taken, mtime) <= ?")
            args.append(float(self.taken_to))
        if self.tags_any:
            where.append("id IN (SELECT item_id FROM tags WHERE tag IN (SELECT value FROM json_each(?)))")
            args.append(json.dumps(sorted(set(self.tags_any))))
        if self.tags_all:
            tags = sorted(set(self.tags_all))
            where.append("id IN (SELECT item_id FROM tags WHERE tag IN (SELECT value FROM json_each(?)) "
                         "GROUP BY item_id HAVING COUNT(*) = ?)")
            args += [json.dumps(tags), len(tags)]
        if self.min_bytes is not None:
            where.append("bytes >= ?")
            args.append(int(self.min_bytes))
        if self.min_side is not None:
            where.append("MIN(width, height) >= ?")
            args.append(int(self.min_side))
        if self.has_captions is not None:
            where.append("COALESCE(captions, '[]') " + ("<>" if self.has_captions else "=") + " '[]'")
        return (" AND ".join(where) or "1"), args
