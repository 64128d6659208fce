"""The routes' typed dependencies and parameter types, declared once so every route says them alike.

`StateDep` hands a route what the app holds while it runs; `WriterDep` lets only callers with the
token reach the write routes. Both are async: FastAPI runs a plain `def` dependency in the thread
pool, a hand-off every request would pay for nothing.
"""

from __future__ import annotations

import datetime as dt
import hmac
import math
import os
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Depends, HTTPException, Query, Request
from fastapi import Path as PathParam

from dsmd.errors import UserError
from dsmd.index.filters import Filter
from dsmd.serve.state import State

# Where an image query looks: indexed images, or the captions and texts (listed as an enum in the spec).
Target = Literal["images", "texts"]
ItemId = Annotated[int, PathParam(ge=1, le=2**63 - 1, description="an item id from a search result")]


async def get_state(request: Request) -> State:
    """The app's State, set up by the lifespan before the first request."""
    return request.app.state.s


StateDep = Annotated[State, Depends(get_state)]


async def require_token(request: Request, s: StateDep) -> State:
    """The write routes' dependency: it runs before their parameters are validated, so a caller
    without the token learns nothing but 401/403."""
    if not s.settings.token:
        raise HTTPException(403, "adding and removing items is off: start the server with a token "
                                 "(DSMD_TOKEN or --token-file)")
    sent = request.headers.get("authorization", "").encode("latin-1")  # the bytes sent (ASGI decodes latin-1)
    if not hmac.compare_digest(sent, f"Bearer {s.settings.token}".encode()):
        raise HTTPException(401, "missing or wrong token: send Authorization: Bearer <token>")
    if not s.writes:
        raise read_only_error(s)
    return s


WriterDep = Annotated[State, Depends(require_token)]


def read_only_error(s: State) -> HTTPException:
    """The 403 of a write to an index this server may not change, saying why and what to do.

    A host folder bind-mounted into the container keeps its owner: one owned by another user is
    read-only to the server's uid, and SearchIndex then opens it read-only on its own.
    """
    if not s.settings.writes:
        return HTTPException(403, "this server serves its index read-only (started with --read-only or "
                                  "DSMD_WRITES=false): start it without them to add and remove items")
    uid = os.geteuid() if hasattr(os, "geteuid") else None
    who = f"user uid {uid}" if uid is not None else "its user"
    fix = (f"mount it writable and let uid {uid} write the host folder (e.g. chown -R {uid} FOLDER on the host)"
           if uid is not None else "mount it writable and let the server's user write the folder")
    return HTTPException(403, f"the index at {s.settings.index} is read-only to this server: {who} cannot write "
                              f"its folder or items.sqlite (a read-only mount, or a folder owned by another user); "
                              f"{fix}, then restart the server")


# ---------------------------------------------------------------- search options


@dataclass(frozen=True)
class SearchOptions:
    """A search's filter, page and de-duplication, from the query string."""

    where: Filter
    offset: int
    dedup: float | None
    min_score: float | None


def when(value: str | None, name: str, end_of_day: bool = False) -> float | None:
    """A time parameter: unix seconds, or an ISO date or date-time (UTC unless it says its zone); a
    bare date as `taken_to` means the end of that day, so a range of dates includes both."""
    if value is None or value == "":
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            raise HTTPException(422, f"{name} must be a finite number of seconds or an ISO date, not {value!r}")
        return seconds
    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError:
        raise HTTPException(422, f"{name} must be unix seconds or an ISO date (2024-06-30, 2024-06-30T18:00), "
                                 f"not {value[:40]!r}") from None
    if len(value) <= 10 and end_of_day:
        t += dt.timedelta(days=1, microseconds=-1)
    return (t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)).timestamp()


async def search_options(
        folder: Annotated[str | None, Query(max_length=1000, description="only this folder and those below it, "
                                            "relative to the indexed root, e.g. 2023/june")] = None,
        taken_from: Annotated[str | None, Query(max_length=40, description="capture time from (EXIF, else the "
                                                "file's time): unix seconds or ISO date")] = None,
        taken_to: Annotated[str | None, Query(max_length=40, description="capture time up to, inclusive")] = None,
        tag: Annotated[list[str] | None, Query(description="any of these tags (repeat: tag=a&tag=b)")] = None,
        tag_all: Annotated[list[str] | None, Query(description="every one of these tags (repeat)")] = None,
        min_bytes: Annotated[int | None, Query(ge=0, le=2**62, description="file size at least")] = None,
        min_side: Annotated[int | None, Query(ge=0, le=1_000_000, description="shorter side at least (pixels)")] = None,
        has_captions: Annotated[bool | None, Query(description="only items with (true) or without captions")] = None,
        offset: Annotated[int, Query(ge=0, le=10_000, description="skip this many results (paging)")] = 0,
        dedup: Annotated[float | None, Query(gt=0, le=1, description="fold results whose cosine to a better one is "
                                             "at least this (e.g. 0.95); off by default")] = None,
        min_score: Annotated[float | None, Query(description="drop results scoring below this, "
                                                 "before paging")] = None,
) -> SearchOptions:
    try:
        where = Filter(folder, when(taken_from, "taken_from"), when(taken_to, "taken_to", end_of_day=True),
                       tuple(tag or ()), tuple(tag_all or ()), min_bytes, min_side, has_captions)
    except UserError as e:
        raise HTTPException(422, str(e)) from None
    return SearchOptions(where, offset, dedup, min_score)


OptionsDep = Annotated[SearchOptions, Depends(search_options)]
