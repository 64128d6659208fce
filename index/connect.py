"""How the index opens its SQLite database: durability of a commit, and the read-only rules.

Durability: WAL with synchronous=NORMAL by default: a committed write survives a killed process,
a power loss may take the last transactions with it; DSMD_INDEX_SYNCHRONOUS=full syncs the WAL
at every commit (a power loss then loses nothing acknowledged; each write pays one more fsync).

Read-only connections create no file when asked (`create_files` False: a read-only server on a
writable folder): SQLite's `mode=ro` still creates the -wal and -shm files of a WAL database
when none is there, so with no writer's -wal present the database is opened `immutable` (the
WAL then holds nothing to read) and `state()` tells when a writer has arrived since. Only a
folder that cannot be written falls back to `immutable` after `mode=ro` failed; a busy lock or
any other error is raised: an `immutable` connection would ignore every later write.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from dsmd.errors import UserError
from dsmd.index.lock import IndexBusy

BUSY_TIMEOUT = 30.0  # seconds a statement waits for another connection's lock, then IndexBusy (read-only opening)
SYNCHRONOUS = "DSMD_INDEX_SYNCHRONOUS"  # normal (default) or full


def synchronous() -> str:
    """The PRAGMA synchronous value DSMD_INDEX_SYNCHRONOUS asks for (NORMAL by default)."""
    value = os.environ.get(SYNCHRONOUS, "normal").strip().lower()
    if value not in ("normal", "full"):
        raise UserError(f"{SYNCHRONOUS}={value!r}: use normal (a commit survives a killed process; a power loss "
                        f"may lose the last ones) or full (each commit synced to disk)")
    return value.upper()


def state(path: Path) -> tuple:
    """What tells a writer has been at the database: its -wal file, the file's identity and size/time."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None, os.path.exists(f"{path}-wal")
    return (st.st_ino, st.st_size, st.st_mtime_ns), os.path.exists(f"{path}-wal")


def connect_readonly(path: Path, create_files: bool = True) -> tuple[sqlite3.Connection, bool]:
    """(a read-only connection, whether it is `immutable`). `mode=ro` reads the WAL of live writers (and
    creates -wal/-shm when none is there); without `create_files`, no writer's -wal there means
    `immutable` (the WAL holds nothing to read; IndexDB.stale() says when that changes). Only a folder
    that cannot be written falls back to `immutable` when `mode=ro` fails (no -shm can be made there);
    any other failure, a busy lock first, is raised: an `immutable` connection would ignore later writes."""
    if not path.exists():
        raise UserError(f"{path} does not exist: build the index first (dsmd index build)")
    eff = os.access in os.supports_effective_ids
    writable = os.access(path.parent, os.W_OK, effective_ids=eff)
    wal = Path(f"{path}-wal").exists()
    tries = ["mode=ro&immutable=1"] if not (wal or create_files) else ["mode=ro"]
    if tries == ["mode=ro"] and not writable:
        tries.append("mode=ro&immutable=1")
    for flags in tries:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?{flags}", uri=True, timeout=busy_timeout(),
                              isolation_level=None, check_same_thread=False)
        try:
            con.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return con, "immutable" in flags
        except sqlite3.OperationalError as e:
            con.close()
            if e.sqlite_errorcode in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise IndexBusy(f"the index database {path} is busy: another connection held its lock for over "
                                f"{busy_timeout():g} s ({e}); try again shortly") from None
            if flags == tries[-1]:
                raise UserError(f"cannot read {path} ({e}): check its permissions and that the process may "
                                f"open more files (ulimit -n)") from None
    raise AssertionError("unreachable")



def busy_timeout() -> float:
    """BUSY_TIMEOUT, read at each call (tests shorten it on dsmd.index.db or here)."""
    from dsmd.index import db

    return float(getattr(db, "BUSY_TIMEOUT", BUSY_TIMEOUT))


class Transaction:
    """BEGIN (IMMEDIATE by default) ... COMMIT, or ROLLBACK on an exception."""

    def __init__(self, con: sqlite3.Connection, begin: str = "BEGIN IMMEDIATE"):
        self.con, self.begin = con, begin

    def __enter__(self):
        self.con.execute(self.begin)
        return self.con

    def __exit__(self, exc_type, exc, tb):
        self.con.execute("ROLLBACK" if exc_type else "COMMIT")
        return False
