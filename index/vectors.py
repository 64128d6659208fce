"""The index's vectors: one float16 matrix file per table, memory-mapped for reading.

    INDEX/vectors/items.f16   row r = bytes [r·2·dim, (r+1)·2·dim): an image's vector
    INDEX/vectors/texts.f16   the same for caption and free-text vectors

SQLite keeps the metadata and, per row, the row number of its vector here (`vrow`). Keeping the
vectors out of SQLite halves them (float16: 1.5 KB at 768 dims, instead of a 3 KB float32 blob
inside the database) and lets a reader page in only the rows it touches. float16 keeps 11
significant bits: inner products of unit vectors move by about 1e-3, far below the gaps
retrieval depends on.

Appending happens inside the caller's SQLite write transaction (`BEGIN IMMEDIATE`), which already
serialises writers across processes: the rows are written and synced first, the rows that point
to them committed after, so a committed row never points to a vector that is not on disk. A
writer killed in between leaves rows at the end that no row points to; the next append writes
after them. Removed items leave their rows in place (dead bytes, reported by `dsmd index info`)
until a compaction copies the live rows into the next generation's file (index/db.py, vrow).
"""

from __future__ import annotations

import mmap
import os
import threading
from pathlib import Path

import numpy as np

DTYPE = np.float16
GEN_SHIFT = 40  # a row's vrow in SQLite: file generation << GEN_SHIFT | row (2^40 rows per file)


def sync_dir(path: Path) -> None:
    """fsync a folder, so that the files just created or renamed in it are on disk by name."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


class VectorFile:
    """Appends float16 rows to one file and reads any rows back through a memory map."""

    def __init__(self, path: Path, dim: int, writable: bool):
        self.path, self.dim, self.writable = Path(path), int(dim), writable
        self.row_bytes = 2 * self.dim
        self._map: np.ndarray | None = None
        self._lock = threading.Lock()

    def rows(self) -> int:
        """Whole rows in the file (a killed append may have left a partial one at the end)."""
        try:
            return os.stat(self.path).st_size // self.row_bytes
        except FileNotFoundError:
            return 0

    def append(self, vectors: np.ndarray) -> np.ndarray:
        """Write the vectors after the last row (whole or partial) and sync them; returns their row numbers.
        Call it inside the SQLite write transaction that stores the row numbers."""
        if not self.writable:
            raise PermissionError(f"{self.path} is open read-only")
        v = np.ascontiguousarray(np.asarray(vectors, np.float32).reshape(-1, self.dim).astype(DTYPE))
        created = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            first = -(-os.fstat(fd).st_size // self.row_bytes)  # past a partial row, if any
            os.pwrite(fd, v.tobytes(), first * self.row_bytes)
            getattr(os, "fdatasync", os.fsync)(fd)  # macOS has no fdatasync
        finally:
            os.close(fd)
        if created:  # the new file's name must survive a power loss as its rows do
            sync_dir(self.path.parent)
        return np.arange(first, first + len(v), dtype=np.int64)

    def read(self, rows: np.ndarray, raw: bool = False) -> np.ndarray:
        """The vectors of these row numbers, as float32 (`raw`: float16, as stored), in the given order."""
        rows = np.asarray(rows, np.int64)
        if not len(rows):
            return np.zeros((0, self.dim), DTYPE if raw else np.float32)
        m = self._map
        if m is None or int(rows.max()) >= len(m):
            m = self._remap()
            if int(rows.max()) >= len(m):
                raise ValueError(f"{self.path} holds {len(m)} rows; row {int(rows.max())} was asked for: the "
                                 f"vector file is shorter than the database says (copied without it?)")
        return np.asarray(m[rows]) if raw else m[rows].astype(np.float32)

    def _remap(self) -> np.ndarray:
        """Map the file's whole rows again (it has grown since the last map)."""
        with self._lock:
            if not self.path.exists():  # deleted by a compaction: the caller reads the rows' vrows again
                raise FileNotFoundError(2, "vector file gone (compacted)", str(self.path))
            n = self.rows()
            m = (np.memmap(self.path, DTYPE, "r", shape=(n, self.dim)) if n
                 else np.zeros((0, self.dim), DTYPE))
            if n and hasattr(m, "_mmap") and hasattr(mmap, "MADV_RANDOM"):
                # rows are read a shortlist at a time, scattered: no read-ahead of the pages around each
                m._mmap.madvise(mmap.MADV_RANDOM)
            self._map = m
            return m

    def close(self) -> None:
        self._map = None


def vector_path(index: Path, table: str, gen: int) -> Path:
    """INDEX/vectors/TABLE.f16 for generation 0 (before any compaction), TABLE.gN.f16 after."""
    return Path(index) / "vectors" / (f"{table}.f16" if gen == 0 else f"{table}.g{gen}.f16")


def vector_generations(index: Path, table: str) -> list[int]:
    """The generations whose vector files are on disk, ascending."""
    folder = Path(index) / "vectors"
    gens = [0] if (folder / f"{table}.f16").exists() else []
    for p in folder.glob(f"{table}.g*.f16"):
        tag = p.name[len(table) + 2:-4]
        if tag.isdigit():
            gens.append(int(tag))
    return sorted(gens)


def retrying(query, attempts: int = 5):
    """Run a query that reads vrows then vectors again when a compaction deleted the file they named."""
    for attempt in range(attempts):
        try:
            return query()
        except FileNotFoundError:
            if attempt == attempts - 1:
                raise
