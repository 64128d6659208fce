"""The routes' typed dependencies and parameter types, declared once so every route says them alike.

`StateDep` hands a route what the app holds while it runs; `WriterDep` lets only callers with the
token reach the write routes. Both are async: FastAPI runs a plain `def` dependency in the thread
pool, a hand-off every request would pay for nothing.
"""

from __future__ import annotations

import hmac
import os
from typing import Annotated, Literal

from fastapi import Depends, HTTPException, Request
from fastapi import Path as PathParam

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
