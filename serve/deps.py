"""The routes' typed dependencies and parameter types, declared once so every route says them alike.

`StateDep` hands a route what the app holds while it runs, `CollectionDep` the collection the
request names; `WriterDep` lets only callers with the token reach the write routes (and gives them
the collection to write). They are async: FastAPI runs a plain `def` dependency in the thread
pool, a hand-off every request would pay for nothing.
"""

from __future__ import annotations

import datetime as dt
import hmac
import math
import os
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Depends, HTTPException, Request
from fastapi import Path as PathParam

from dsmd.errors import UserError
from dsmd.index.filters import Filter
from dsmd.serve.collections import Collection
from dsmd.serve.state import State

# Where an image query looks: indexed images, or the captions and texts (listed as an enum in the spec).
Target = Literal["images", "texts"]
ItemId = Annotated[int, PathParam(ge=1, le=2**63 - 1, description="an item id from a search result")]


async def get_state(request: Request) -> State:
    """The app's State, set up by the lifespan before the first request."""
    return request.app.state.s


StateDep = Annotated[State, Depends(get_state)]


def collection_of(request: Request) -> Collection:
    """The collection the request names (`collection=`), else the server's first; a 404 naming those
    there are. Read by hand and described in the spec by the app (COLLECTION_SPEC): a validated query
    parameter costs CPU on every request (see OPTIONS below)."""
    s: State = request.app.state.s
    name = request.query_params.get("collection")
    if not name:
        return s.default
    c = s.collections.get(name)
    if c is None:
        raise HTTPException(404, f"no collection {name[:80]!r}: this server has {', '.join(s.collections)}")
    return c


async def get_collection(request: Request) -> Collection:
    return collection_of(request)


CollectionDep = Annotated[Collection, Depends(get_collection)]
COLLECTION_SPEC = {"name": "collection", "in": "query", "required": False, "schema": {"type": "string",
                   "maxLength": 64}, "description": "which collection (GET /info lists them); default: the first"}


async def require_token(request: Request, s: StateDep) -> Collection:
    """The write routes' dependency, the collection to write: it runs before their parameters are
    validated, so a caller without the token learns nothing but 401/403."""
    if not s.settings.token:
        raise HTTPException(403, "adding and removing items is off: start the server with a token "
                                 "(DSMD_TOKEN or --token-file)")
    sent = request.headers.get("authorization", "").encode("latin-1")  # the bytes sent (ASGI decodes latin-1)
    if not hmac.compare_digest(sent, f"Bearer {s.settings.token}".encode()):
        raise HTTPException(401, "missing or wrong token: send Authorization: Bearer <token>")
    c = collection_of(request)
    if not c.writes:
        raise read_only_error(c)
    return c


WriterDep = Annotated[Collection, Depends(require_token)]


def read_only_error(c: Collection) -> HTTPException:
    """The 403 of a write to an index this server may not change, saying why and what to do.

    A host folder bind-mounted into the container keeps its owner: one owned by another user is
    read-only to the server's uid, and SearchIndex then opens it read-only on its own.
    """
    if not c.settings.writes:
        return HTTPException(403, "this server serves its index read-only (started with --read-only or "
                                  "DSMD_WRITES=false): start it without them to add and remove items")
    uid = os.geteuid() if hasattr(os, "geteuid") else None
    who = f"user uid {uid}" if uid is not None else "its user"
    fix = (f"mount it writable and let uid {uid} write the host folder (e.g. chown -R {uid} FOLDER on the host)"
           if uid is not None else "mount it writable and let the server's user write the folder")
    return HTTPException(403, f"the index at {c.path} is read-only to this server: {who} cannot write "
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


# The search options of the query string, parsed here rather than as FastAPI parameters: FastAPI's
# validation of 11 optional parameters cost about 1 ms of CPU per request (a third of a tiny model's
# whole text query: bench/results/text-ab-25). They are documented in the spec all the same.
OPTIONS = {  # name: (JSON schema, description)
    "folder": ({"type": "string", "maxLength": 1000}, "only this folder and those below it, relative to the "
               "indexed root, e.g. 2023/june ('uploads' for uploads)"),
    "taken_from": ({"type": "string", "maxLength": 40}, "capture time from (EXIF, else the file's time): unix "
                   "seconds or ISO date"),
    "taken_to": ({"type": "string", "maxLength": 40}, "capture time up to, inclusive"),
    "tag": ({"type": "array", "items": {"type": "string"}}, "any of these tags (repeat: tag=a&tag=b)"),
    "tag_all": ({"type": "array", "items": {"type": "string"}}, "every one of these tags (repeat)"),
    "min_bytes": ({"type": "integer", "minimum": 0, "maximum": 2**62}, "file size at least"),
    "min_side": ({"type": "integer", "minimum": 0, "maximum": 1_000_000}, "shorter side at least (pixels)"),
    "has_captions": ({"type": "boolean"}, "only items with (true) or without (false) captions"),
    "offset": ({"type": "integer", "minimum": 0, "maximum": 10_000, "default": 0}, "skip this many results "
               "(paging)"),
    "dedup": ({"type": "number", "exclusiveMinimum": 0, "maximum": 1}, "fold results whose cosine to a better "
              "one is at least this (e.g. 0.95); off by default"),
    "min_score": ({"type": "number"}, "drop results scoring below this, before paging"),
}
OPTIONS_SPEC = [{"name": n, "in": "query", "required": False, "schema": schema, "description": d,
                 **({"style": "form", "explode": True} if schema["type"] == "array" else {})}
                for n, (schema, d) in OPTIONS.items()]
NO_OPTIONS = SearchOptions(Filter(), 0, None, None)


def options_of(request: Request) -> SearchOptions:
    """The request's search options (OPTIONS), a 422 that names the parameter when one is not valid."""
    q = request.query_params
    if not any(name in q for name in OPTIONS):
        return NO_OPTIONS  # the common case costs one look per option

    def number(name: str, kind: type, low: float | None = None, high: float | None = None,
               above: float | None = None):
        raw = q.get(name)
        if raw is None:
            return None
        try:
            value = kind(raw)
        except ValueError:
            raise HTTPException(422, f"{name} must be {'an integer' if kind is int else 'a number'}, "
                                     f"not {raw[:40]!r}") from None
        if kind is float and not math.isfinite(value):
            raise HTTPException(422, f"{name} must be a finite number, not {raw[:40]!r}")
        if (low is not None and value < low) or (high is not None and value > high) or \
                (above is not None and value <= above):
            bounds = f"more than {above:g}" if above is not None else f"at least {low:g}"
            raise HTTPException(422, f"{name} must be {bounds}" + (f" and at most {high:g}" if high is not None
                                                                     else "") + f", not {raw[:40]}")
        return value

    def text(name: str, limit: int) -> str | None:
        raw = q.get(name)
        if raw is not None and len(raw) > limit:
            raise HTTPException(422, f"{name} is longer than {limit} characters")
        return raw

    captions = q.get("has_captions")
    if captions is not None:
        truth = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False,
                 "off": False}
        if captions.lower() not in truth:
            raise HTTPException(422, f"has_captions must be true or false, not {captions[:40]!r}")
        captions = truth[captions.lower()]
    try:
        where = Filter(text("folder", 1000), when(text("taken_from", 40), "taken_from"),
                       when(text("taken_to", 40), "taken_to", end_of_day=True), tuple(q.getlist("tag")),
                       tuple(q.getlist("tag_all")), number("min_bytes", int, 0, 2**62),
                       number("min_side", int, 0, 1_000_000), captions)
    except UserError as e:
        raise HTTPException(422, str(e)) from None
    return SearchOptions(where, number("offset", int, 0, 10_000) or 0, number("dedup", float, None, 1, above=0),
                         number("min_score", float))
