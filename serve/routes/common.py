"""What more than one route does: search, read and decode an upload, write the index, shape the answers.

Nothing here runs heavy work on the event loop: searches go to the thread pool, encodings to the
encoders' micro-batching threads, index writes to the one writer thread. Upload bodies are read
before the request takes its gate's slot, charged to the body budget as they arrive and cut off
with a 408 when they fall under the minimum rate (admission.BodyHold.metered).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from fastapi import HTTPException, Request
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from dsmd.errors import UserError
from dsmd.images import BadImage
from dsmd.index.filtered import Answer, Ask, FilterUnavailable
from dsmd.index.lock import IndexBusy
from dsmd.index.search import SearchIndex
from dsmd.serve.admission import BodyHold, ClientGone, Deadline, busy, wait_or_give_up, within
from dsmd.serve.batcher import EncoderFailed, EncoderStopped, MicroBatcher, Overloaded
from dsmd.serve.collections import Collection, search_here, settled
from dsmd.serve.deps import SearchOptions, Target
from dsmd.serve.state import State
from dsmd.serve.uploads import body_limit, read_upload

log = logging.getLogger("dsmd.serve")
T = TypeVar("T")

# ---------------------------------------------------------------- searching


def check_k(s: State, k: int | None) -> int:
    """The number of results asked for, or the default; a 422 past the server's max_k."""
    k = s.settings.default_k if k is None else k
    if not 1 <= k <= s.settings.max_k:
        raise HTTPException(422, f"k must be between 1 and {s.settings.max_k}, not {k}")
    return k


def ask_for(s: State, k: int | None, target: Target = "images", opts: SearchOptions | None = None) -> Ask:
    """What the search is asked, from the request's k, target and options (a 422 when they clash)."""
    k = check_k(s, k)
    if opts is None:
        return Ask(k, target, min_score=s.settings.min_score)
    floor = opts.min_score if opts.min_score is not None else s.settings.min_score
    try:
        return Ask(k, target, None if opts.where.empty() else opts.where, opts.offset, opts.dedup, floor)
    except UserError as e:
        raise HTTPException(422, str(e)) from None


async def search(c: Collection, vector: np.ndarray, ask: Ask, deadline: Deadline) -> Answer:
    """The answer for a vector we have already (a cached text, an indexed item), from the thread pool."""
    index = c.index  # this object to the end, whatever swaps meanwhile
    return settle(await within(deadline, run_in_threadpool(settled, search_here, index, vector, ask), "search"))


def settle(ans: Answer | Exception | None) -> Answer | None:
    """A search's answer, or its failure as the HTTP error it is: a filter this index cannot take is a
    422, a database busy beyond its timeout a 503 to retry, anything else a 503 that says what failed."""
    if not isinstance(ans, Exception):
        return ans
    if isinstance(ans, FilterUnavailable):
        raise HTTPException(422, str(ans))
    if isinstance(ans, UserError):
        raise busy(str(ans))
    log.error("a search failed", exc_info=ans)
    raise HTTPException(503, f"the search failed ({type(ans).__name__}: {ans}); this is a fault of the server")


async def encode_and_search(request: Request, s: State, batcher: MicroBatcher, job_input: tuple,
                            deadline: Deadline) -> Any:
    """The encoder thread's answer for this input, (input, index, ask): its vector, then the search of
    that index done right there (none for ask None)."""
    try:
        job = batcher.submit_nowait(job_input)
    except Overloaded as e:
        s.metrics.rejected.labels("queue").inc()
        raise busy(f"the server is at capacity ({e}); retry shortly") from None
    except EncoderStopped as e:
        s.metrics.rejected.labels("stopped").inc()
        raise HTTPException(503, str(e)) from None  # no Retry-After: retrying here cannot help
    try:
        return await wait_or_give_up(request, job.future, deadline, lambda: setattr(job, "cancelled", True))
    except UserError as e:  # the database busy beyond its timeout
        raise busy(str(e)) from None
    except EncoderStopped as e:
        raise HTTPException(503, str(e)) from None
    except EncoderFailed as e:  # the model raised: a fault of this server, said as such, never a 500
        raise HTTPException(503, str(e)) from None


def answered(ans: Answer, ask: Ask, c: Collection) -> dict:
    """The page as answered: its results, where the next page starts (null at the end), how many
    results dedup folded away, and how the filter was honoured."""
    out = {"k": ask.k, "offset": ask.offset, "next_offset": ask.offset + ask.k if ans.more else None,
           "results": [result(h, ask.target, c.links) for h in ans.hits], "strategy": ans.strategy}
    if ask.dedup is not None:
        out["collapsed"] = ans.collapsed
        for r in out["results"]:
            r["duplicates"] = ans.duplicates.get(r["id"], 0)
    return out


def result(h: Any, target: Target, links: str = "") -> dict:
    """One hit as answered: links to the image (`links`: the collection's query string), never its
    path on disk."""
    if target == "images":
        return {"id": h.id, "score": round(h.score, 6), "name": file_name(h.item["uri"]),
                "image_url": f"/items/{h.id}/image{links}", "thumbnail_url": f"/items/{h.id}/thumbnail{links}",
                "captions": h.item["captions"], "folder": h.item.get("folder"), "taken": taken(h.item),
                "tags": h.item.get("tags", [])}
    out = {"id": h.id, "score": round(h.score, 6), "text": h.item["text"], "item_id": h.item["item_id"]}
    if h.item["item_id"] is not None:
        out["thumbnail_url"] = f"/items/{h.item['item_id']}/thumbnail{links}"
    return out


def file_name(uri: str) -> str:
    """The last part of a stored path (as Path(uri).name, at a tenth of its cost: it runs per hit)."""
    return uri.rpartition("/")[2] or Path(uri).name


def taken(item: dict) -> float | None:
    """When the photo was taken: its EXIF time, else its file's modification time."""
    return item.get("taken") if item.get("taken") is not None else item.get("mtime")


def public(item: dict, links: str = "") -> dict:
    """An item's row as answered: its file's name, metadata and links, never its path on disk."""
    return {"id": item["id"], "name": file_name(item["uri"]), "width": item["width"], "height": item["height"],
            "captions": item["captions"], "added": item["added"], "sha256": item["sha256"],
            "bytes": item.get("bytes"), "mtime": item.get("mtime"), "taken": item.get("taken"),
            "camera": item.get("camera"), "folder": item.get("folder"), "tags": item.get("tags", []),
            "image_url": f"/items/{item['id']}/image{links}", "thumbnail_url": f"/items/{item['id']}/thumbnail{links}"}


# ---------------------------------------------------------------- uploads


async def read_body(request: Request, s: State, hold: BodyHold) -> bytes:
    """The uploaded image's bytes, read before any gate: a fast 503 when the declared length does not
    fit the body budget, a 408 when the body falls under the minimum rate, ClientGone (499) when the
    client leaves half-way. Its bytes stay charged to `hold` until the request ends."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) <= body_limit(s.settings.max_upload_bytes) \
            and not s.bodies.fits(int(declared)):
        raise s.bodies.refuse()
    cfg = s.settings
    metered = Request(request.scope, hold.metered(request.receive, cfg.body_grace_s, cfg.min_upload_rate))
    try:
        return await read_upload(metered, cfg.max_upload_bytes)
    except ClientDisconnect:
        raise ClientGone() from None
    finally:
        hold.reading_body(False)


async def decode(s: State, c: Collection, data: bytes, deadline: Deadline) -> np.ndarray:
    """The model input of an upload for the collection's bundle, decoded in the thread pool; a 422 when
    it is not a usable image."""
    try:
        until = time.monotonic() + deadline.left()  # the deadline on the clock the decoding thread can read
        return await within(deadline, run_in_threadpool(s.decode, data, c.bundle, until), "decode the image")
    except BadImage as e:
        raise HTTPException(422, f"not a usable image: {str(e).replace('upload: ', '')}") from None
    except TimeoutError:  # from the thread: no decode slot before the deadline (Python 3.10 keeps it apart)
        raise deadline.expired() from None


# ---------------------------------------------------------------- index writes


async def on_writer(s: State, c: Collection, fn: Callable[[SearchIndex, float], T], deadline: Deadline) -> T:
    """Run an index write on the writer thread (one at a time, never on the searches' pool), within the
    deadline: a write still queued then is dropped, one waiting for the folder lock (another process
    writing: `dsmd index merge`, a build) gives up before the deadline; both are a 503 with Retry-After.
    `fn(index, lock_timeout)` runs on the collection's index being served."""
    at = time.monotonic() + deadline.left()

    def write() -> T:
        left = at - time.monotonic()
        if left <= 0:
            raise IndexBusy("the index writer was busy until this request's deadline; try again shortly")
        return fn(c.index, 0.8 * left)  # the folder lock's wait: a 503 before the deadline, not a 500

    try:
        return await within(deadline, asyncio.get_running_loop().run_in_executor(s.writer, write),
                            "write to the index")
    except IndexBusy as e:
        raise busy(str(e)) from None


def after_write(s: State, c: Collection) -> None:
    """Compact in the background once deletions or growth pass the index's threshold."""
    c.refresh_gauges()
    with contextlib.suppress(RuntimeError):  # the compactor is shut down: the server is stopping
        s.compactor.submit(logged, c.compact_if_due)


def logged(fn: Callable[[], object]) -> None:
    """Run a background task; a failure is logged and the server keeps serving the index it has."""
    try:
        fn()
    except Exception:
        log.exception("index maintenance failed; serving the index as it was")
