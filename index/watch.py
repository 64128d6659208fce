"""`dsmd index sync ... --watch`: keep an index in step with a folder as files arrive, change and go.

The folder is watched with inotify (watchdog; its polling observer where inotify is missing). Events
are debounced: a sync runs once the folder has been quiet for `quiet_s` seconds (or after at most
ten times that, for a folder that never rests), and a file written within `quiet_s` of the sync is
left for the next round, which runs `quiet_s` later: a file being copied in is never indexed
half-way. One sync at a time, each one the same as `dsmd index sync` (index/sync.py).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from dsmd.bundle import Bundle
from dsmd.errors import UserError
from dsmd.index.sync import SyncReport, sync

CHANGES = {"created", "deleted", "moved", "modified", "closed"}  # watchdog's events that change a folder


def watch(path: str | Path, bundle: Bundle, root: str | Path, quiet_s: float = 2.0,
          on_report: Callable[[SyncReport], None] = lambda r: print(r.line(), flush=True),
          stop: threading.Event | None = None, **options) -> None:
    """Sync now, then after every burst of changes under `root`, until `stop` is set (or Ctrl-C)."""
    try:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer
    except ImportError:
        raise UserError("--watch needs watchdog: pip install 'dsmd[watch]' (or run dsmd index sync from cron)") \
            from None
    stop = stop or threading.Event()
    own = str(Path(path).resolve())
    changed = threading.Event()

    def ours(where: str) -> bool:
        return where == own or where.startswith(own + os.sep)

    class Changes(FileSystemEventHandler):
        def on_any_event(self, event) -> None:
            if event.event_type not in CHANGES:  # reads (opened, closed_no_write), by a sync or a server, are none
                return
            where = [str(getattr(event, "src_path", "")), str(getattr(event, "dest_path", "") or "")]
            if not all(ours(w) for w in where if w):
                changed.set()

    observer = Observer()
    observer.schedule(Changes(), str(Path(root).resolve()), recursive=True)
    observer.start()
    try:
        report = sync(path, bundle, root, settle_s=quiet_s, **options)
        on_report(report)
        while not stop.is_set():
            again = bool(report.settling)  # files still being written: look again once they rest
            if not changed.wait(timeout=quiet_s if again else 0.5) and not again:
                continue
            _quiet_period(changed, quiet_s, stop)
            if stop.is_set():
                break
            report = sync(path, bundle, root, settle_s=quiet_s, **options)
            on_report(report)
    finally:
        observer.stop()
        observer.join(timeout=5)


def _quiet_period(changed: threading.Event, quiet_s: float, stop: threading.Event) -> None:
    """Wait until no change has come for `quiet_s` seconds (at most 10 x quiet_s in all)."""
    until = time.monotonic() + 10 * quiet_s
    while not stop.is_set():
        changed.clear()
        if not changed.wait(timeout=quiet_s) or time.monotonic() > until:
            return
