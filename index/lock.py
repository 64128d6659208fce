"""Locks: one writer at a time on an index folder, across processes; many readers in one process.

    folder_lock(INDEX)      flock on INDEX/.lock: every change to the rows (a batch of a build,
                            a live add or remove, a merge), and the moments `finalize` writes its
                            manifest and deletes the files no manifest names. Held for milliseconds
                            to seconds, so a server's POST /items never waits for a whole build.
    finalize_lock(INDEX)    flock on INDEX/.finalize.lock: one finalize at a time (minutes at 1M
                            vectors), so no finalize deletes the files another is still writing.

Always take finalize_lock before folder_lock, never the other way round (no deadlock). Both are
reentrant within a thread (a depth count per thread and file), and flock works between the
threads of one process too: each acquisition opens its own file description.

The holder writes who it is into the lock file (pid and command) and empties it on release, so
a writer that gives up (IndexBusy) can say who held the folder.
"""

from __future__ import annotations

import fcntl
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dsmd.errors import UserError

LOCK = ".lock"
FINALIZE_LOCK = ".finalize.lock"

_held = threading.local()  # {lock file path: [fd, depth]} of the locks this thread holds


class IndexBusy(UserError):
    """Another writer held the index folder for longer than the caller would wait."""


@contextmanager
def folder_lock(index: str | Path, timeout: float | None = None) -> Iterator[None]:
    """Exclusive lock on INDEX/.lock for a change to the rows; `timeout` None waits as long as it takes.

    Raises:
        IndexBusy: the lock stayed taken for `timeout` seconds.
    """
    with _flock(Path(index) / LOCK, timeout, "writing to"):
        yield


@contextmanager
def finalize_lock(index: str | Path) -> Iterator[None]:
    """Exclusive lock on INDEX/.finalize.lock for one rebuild of the FAISS files."""
    with _flock(Path(index) / FINALIZE_LOCK, None, "rebuilding"):
        yield


@contextmanager
def _flock(file: Path, timeout: float | None, doing: str) -> Iterator[None]:
    held: dict = _held.__dict__.setdefault("locks", {})
    key = str(file.resolve())
    if key in held:  # this thread holds it already: nested use
        held[key][1] += 1
        try:
            yield
        finally:
            held[key][1] -= 1
        return
    try:
        fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise UserError(f"cannot take the lock {file} ({e.strerror}): changing an index needs its folder "
                        f"writable") from None
    try:
        _acquire(fd, timeout, file, doing)
        held[key] = [fd, 1]
        _note_holder(fd)
        try:
            yield
        finally:
            del held[key]
            _note_holder(fd, clear=True)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _note_holder(fd: int, clear: bool = False) -> None:
    """Write who holds the lock into its file (emptied on release); best effort: the flock is the lock."""
    try:
        os.ftruncate(fd, 0)
        if not clear:
            cmd = " ".join([os.path.basename(sys.argv[0] or "python"), *sys.argv[1:]])[:300]
            os.pwrite(fd, f"pid {os.getpid()} thread {threading.get_ident()}: {cmd}\n".encode(), 0)
    except OSError:
        pass


def holder(file: Path) -> str | None:
    """Who holds the lock, as its holder wrote it, or None when unknown."""
    try:
        text = Path(file).read_text(errors="replace").strip()
    except OSError:
        return None
    return text or None


def _acquire(fd: int, timeout: float | None, file: Path, doing: str) -> None:
    if timeout is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                who = f"held by {holder(file)}" if holder(file) else "holder unknown"
                raise IndexBusy(f"another process is {doing} {file.parent} ({who}), and it held the lock for over "
                                f"{timeout:g} s; try again shortly") from None
            time.sleep(delay)
            delay = min(0.05, delay * 2)


class RWLock:
    """Many readers or one writer, writers first (a stream of searches cannot starve an add).

    Not reentrant: a thread holding it must not take it again.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting_writers += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()
