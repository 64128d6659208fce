"""How an index folder looks from outside: whether its manifest changed, whether this process may write it."""

from __future__ import annotations

import os
from pathlib import Path

TABLES = ("images", "texts")


def stat_of(path: Path) -> tuple | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def identity(m: dict) -> tuple:
    """What makes two manifests serve differently: the rows' generation and the files."""
    return m.get("generation"), *(m.get(p, {}).get("file") for p in TABLES)


def not_writable(path: Path) -> bool:
    """Read-only mounts and others' folders: os.access with the effective ids (those that writes
    would run with) honours both; root passes permission bits, as its writes would."""
    eff = os.access in os.supports_effective_ids
    db = path / "items.sqlite"
    return not os.access(path, os.W_OK, effective_ids=eff) or (db.exists() and not os.access(db, os.W_OK,
                                                                                          effective_ids=eff))
