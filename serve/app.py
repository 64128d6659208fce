"""The search server: `create_app(settings)` for uvicorn (`dsmd serve`, `make serve`).

The bundle and the index load at start-up (lifespan), so the first query is as fast as the
rest. Every request passes a gate (a short queue past capacity, a fast 503 past the queue) and has a
deadline; upload bodies are read before the gate, under a byte budget and a minimum rate; encoders run
in micro-batching threads, searches in the thread pool with no lock, index writes on a writer
thread: nothing heavy runs on the event loop. Every error a caller can cause is a 4xx with a
`detail` message, described in the OpenAPI spec; files are only ever read from the index's own
rows (no path and no URL from a request reaches the disk or the network).

This module assembles the app; the routes are in serve/routes/, their dependencies in serve/deps.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect

from dsmd.serve.admission import ClientGone
from dsmd.serve.deps import COLLECTION_SPEC, get_collection, require_token
from dsmd.serve.middleware import Measure
from dsmd.serve.routes import ROUTERS
from dsmd.serve.routes.common import logged
from dsmd.serve.settings import Settings
from dsmd.serve.state import State

log = logging.getLogger("dsmd.serve")


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app for uvicorn; nothing loads until its lifespan starts (so building it is cheap)."""
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.s = State(settings)
        for c in app.state.s.collections.values():
            for part in ("images", "texts"):
                if c.index.manifest.get(part, {}).get("shortfall"):
                    log.warning("%s: %s", c.name, c.index.manifest[part]["shortfall"])
        watcher = asyncio.create_task(_watch_index(app.state.s))
        yield
        watcher.cancel()
        app.state.s.close()

    app = FastAPI(title="dsmd search", version="1", lifespan=lifespan,
                  description="Text→image, image→image and image→text search over an index built with `dsmd index`.")
    app.add_middleware(Measure)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(ClientGone, _gone)
    app.add_exception_handler(ClientDisconnect, _gone)
    for router in ROUTERS:
        app.include_router(router)
    for route in app.routes:  # every route that serves a collection says so in the spec
        if isinstance(route, APIRoute) and _takes_collection(route.dependant):
            extra = route.openapi_extra or {}
            route.openapi_extra = {**extra, "parameters": [*extra.get("parameters", []), COLLECTION_SPEC]}
    return app


def _takes_collection(dependant: Dependant) -> bool:
    return any(d.call in (get_collection, require_token) or _takes_collection(d) for d in dependant.dependencies)


async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
    """A 422 whose `detail` is one readable line naming each bad parameter, like every other error's."""
    parts = [f"{'.'.join(str(p) for p in err['loc'][1:]) or err['loc'][0]}: {err['msg']}" for err in e.errors()]
    return JSONResponse({"detail": "; ".join(parts)}, status_code=422)


async def _gone(request: Request, e: Exception) -> Response:
    """The client left before its answer: 499 in the metrics and an info line, no traceback."""
    log.info("%s %s: the client disconnected before the answer (499)", request.method, request.url.path)
    return Response(status_code=499)  # nobody reads it


async def _watch_index(s: State) -> None:
    """Every few seconds: has another process rebuilt an index? Then serve the new one (a rebuild
    it cannot serve is reported once by Collection.reload_if_changed, never retried in a loop)."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(s.settings.reload_check_s)
        s.extra["reload_checks"].inc()
        for c in s.collections.values():
            with contextlib.suppress(RuntimeError):
                await loop.run_in_executor(s.writer, logged, c.reload_if_changed)
