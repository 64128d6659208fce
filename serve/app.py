"""The search server: `create_app(settings)` for uvicorn (`dsmd serve`, `make serve`).

The bundle and the index load at start-up (lifespan), so the first query is as fast as the
rest. Every request passes a gate (a fast 503 past capacity) and has a deadline; encoders run
in micro-batching threads, searches in the thread pool with no lock, index writes on a writer
thread: nothing heavy runs on the event loop. Every error a caller can cause is a 4xx with a
`detail` message, described in the OpenAPI spec; files are only ever read from the index's own
rows (no path and no URL from a request reaches the disk or the network).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from dsmd.errors import UserError
from dsmd.images import BadImage
from dsmd.index.uploads import UploadRefused
from dsmd.serve import models as M
from dsmd.serve.admission import ClientGone, Deadline, busy, wait_or_give_up, within
from dsmd.serve.batcher import Overloaded
from dsmd.serve.memory import peak_resident_bytes, resident_bytes
from dsmd.serve.settings import Settings
from dsmd.serve.state import State, search_here
from dsmd.serve.uploads import check_content_type, read_upload, upload_spec

STATIC = Path(__file__).parent / "static"
ItemId = PathParam(..., ge=1, le=2**63 - 1, description="an item id from a search result")
log = logging.getLogger("dsmd.serve")


class Measure:
    """Pure ASGI middleware: latency and status per route, and nosniff on every response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 500

        async def sending(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", []).append((b"x-content-type-options", b"nosniff"))
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            state = getattr(scope.get("app").state, "s", None) if scope.get("app") else None
            if state is not None:
                route = scope.get("route")
                state.metrics.observe(getattr(route, "path", "other"), status, time.perf_counter() - t0)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.s = State(settings)
        for part in ("images", "texts"):
            if app.state.s.index.manifest.get(part, {}).get("shortfall"):
                log.warning(app.state.s.index.manifest[part]["shortfall"])
        watcher = asyncio.create_task(_watch_index(app.state.s))
        yield
        watcher.cancel()
        app.state.s.close()

    app = FastAPI(title="dsmd search", version="1", lifespan=lifespan,
                  description="Text→image, image→image and image→text search over an index built with `dsmd index`.")
    app.add_middleware(Measure)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        parts = [f"{'.'.join(str(p) for p in err['loc'][1:]) or err['loc'][0]}: {err['msg']}" for err in e.errors()]
        return JSONResponse({"detail": "; ".join(parts)}, status_code=422)

    @app.exception_handler(ClientGone)
    async def gone(request: Request, e: ClientGone):
        return Response(status_code=499)  # nobody reads it; counted in the metrics

    def st(request: Request) -> State:
        return request.app.state.s

    # ---------------------------------------------------------------- search

    def check_k(s: State, k: int | None) -> int:
        k = s.settings.default_k if k is None else k
        if not 1 <= k <= s.settings.max_k:
            raise HTTPException(422, f"k must be between 1 and {s.settings.max_k}, not {k}")
        return k

    async def search(s: State, vector: np.ndarray, k: int, target: str, deadline: Deadline) -> list:
        """Hits of a vector we have already (a cached text, an indexed item), from the thread pool."""
        index = s.index  # this object to the end, whatever swaps meanwhile
        try:
            return await within(deadline, run_in_threadpool(search_here, index, vector, k, target), "search")
        except UserError as e:  # the database busy beyond its timeout
            raise busy(str(e)) from None

    async def encode_and_search(request: Request, batcher, job_input: tuple, deadline: Deadline):
        """The encoder thread's answer for this input: its vector, then the search done right there."""
        try:
            job = batcher.submit_nowait(job_input)
        except Overloaded as e:
            st(request).metrics.rejected.labels("queue").inc()
            raise busy(f"the server is at capacity ({e}); retry shortly") from None
        try:
            return await wait_or_give_up(request, job.future, deadline, lambda: setattr(job, "cancelled", True))
        except UserError as e:  # the database busy beyond its timeout
            raise busy(str(e)) from None

    def results(s: State, hits: list, target: str, min_score: float | None) -> list[dict]:
        floor = min_score if min_score is not None else s.settings.min_score
        return [_result(h, target) for h in hits if floor is None or h.score >= floor]

    @app.get("/search", summary="Text → images", response_model=M.TextSearch, responses=M.errors(413, 422, 503))
    async def search_text(request: Request, text: str = Query(..., description="what to look for"),
                          k: int | None = Query(None, description="how many results"),
                          min_score: float | None = Query(None, description="drop results scoring below this")):
        s = st(request)
        t0 = time.perf_counter()
        k = check_k(s, k)
        if not text.strip():
            raise HTTPException(422, "text is empty: say what to look for, e.g. /search?text=a+red+circle")
        if len(text) > 10_000:
            raise HTTPException(413, "text is longer than 10,000 characters")
        with s.gates["text"]:
            deadline = Deadline(s.settings.request_timeout_s)
            cached = s.text_cache.lookup(text)
            if cached is None:
                vector, truncated, hits = await encode_and_search(request, s.texts, (text, k, "images"), deadline)
                s.text_cache.put(text, (vector, truncated))
            else:
                (vector, truncated), hits = cached, await search(s, cached[0], k, "images", deadline)
        note = f"the text was cut to the model's {s.bundle.preprocess.max_tokens} tokens" if truncated else None
        # answered as built (the response model documents it; the tests check the answers against it)
        return JSONResponse({"query": {"text": text, "truncated": truncated, "note": note}, "target": "images",
                             "k": k, "results": results(s, hits, "images", min_score),
                             "took_ms": round(1000 * (time.perf_counter() - t0), 2)})

    @app.post("/search/image", summary="Image → images, or → captions with target=texts", openapi_extra=upload_spec(),
              response_model=M.ImageSearch, responses=M.errors(400, 408, 413, 415, 422, 503))
    async def search_image(request: Request, k: int | None = Query(None), target: str = Query("images"),
                           min_score: float | None = Query(None)):
        s = st(request)
        t0 = time.perf_counter()
        k = check_k(s, k)
        if target not in ("images", "texts"):
            raise HTTPException(422, "target must be images or texts")
        check_content_type(request)
        with s.gates["image"]:
            deadline = Deadline(s.settings.request_timeout_s)
            data = await _read(request, s, deadline)
            pixels = await _decode(s, data, deadline)
            _, hits = await encode_and_search(request, s.images, (pixels, k, target), deadline)
        return JSONResponse({"query": {"image_bytes": len(data)}, "target": target, "k": k,
                             "results": results(s, hits, target, min_score),
                             "took_ms": round(1000 * (time.perf_counter() - t0), 2)})

    @app.get("/items/{item_id}/similar", summary="More like this: images near an indexed image",
             response_model=M.SimilarSearch, responses=M.errors(404, 422, 503))
    async def similar(request: Request, item_id: int = ItemId, k: int | None = Query(None)):
        s = st(request)
        t0 = time.perf_counter()
        k = check_k(s, k)
        with s.gates["text"]:
            deadline = Deadline(s.settings.request_timeout_s)
            vector = await run_in_threadpool(s.index.vector_of, item_id)
            if vector is None:
                raise HTTPException(404, f"no item {item_id}")
            hits = await search(s, vector, k, "images", deadline)
        return {"query": {"item": item_id}, "target": "images", "k": k, "results": results(s, hits, "images", None),
                "took_ms": round(1000 * (time.perf_counter() - t0), 2)}

    # ---------------------------------------------------------------- items

    async def item_or_404(s: State, item_id: int) -> dict:
        item = await run_in_threadpool(s.index.item, item_id)
        if item is None:
            raise HTTPException(404, f"no item {item_id}")
        return item

    @app.get("/items/{item_id}", summary="An item's metadata", response_model=M.Item, responses=M.errors(404, 422))
    async def get_item(request: Request, item_id: int = ItemId):
        return _public(await item_or_404(st(request), item_id))

    @app.get("/items/{item_id}/image", summary="The item's image file", response_class=FileResponse,
             responses={200: {"content": {"image/*": {}}, "description": "the file as indexed"},
                        **M.errors(404, 422)})
    async def get_image(request: Request, item_id: int = ItemId):
        item = await item_or_404(st(request), item_id)
        path = Path(item["uri"])  # from the index's own row, never from the request
        if not path.is_file():
            raise HTTPException(404, f"item {item_id}'s file is gone")
        return FileResponse(path)

    @app.get("/items/{item_id}/thumbnail", summary="A JPEG thumbnail of the item (cached)",
             responses={200: {"content": {"image/jpeg": {}}, "description": "a JPEG thumbnail"},
                        **M.errors(404, 422, 503)}, response_class=Response)
    async def get_thumbnail(request: Request, item_id: int = ItemId):
        s = st(request)
        item = await item_or_404(s, item_id)

        def make() -> bytes:
            try:
                return s.thumbnail(item["uri"])
            except BadImage:
                raise HTTPException(404, f"item {item_id}'s file cannot be read") from None

        with s.gates["thumbnail"]:
            data = await run_in_threadpool(s.thumbs.get_or, (item_id, item["sha256"]), make)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=3600"})

    def authorised(request: Request) -> State:
        """The write endpoints' dependency: it runs before their parameters are validated, so a caller
        without the token learns nothing but 401/403."""
        s = st(request)
        if not s.settings.token:
            raise HTTPException(403, "adding and removing items is off: start the server with a token "
                                     "(DSMD_TOKEN or --token-file)")
        sent = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(sent, f"Bearer {s.settings.token}".encode()):
            raise HTTPException(401, "missing or wrong token: send Authorization: Bearer <token>")
        if not s.writes:
            raise HTTPException(403, "this server serves its index read-only (DSMD_WRITES=false, or its folder "
                                     "cannot be written)")
        return s

    @app.post("/items", summary="Add an image to the index (needs the token)", openapi_extra=upload_spec(),
              status_code=201, response_model=M.Item, responses=M.errors(400, 401, 403, 408, 413, 415, 422, 503))
    async def add_item(request: Request, s: State = Depends(authorised)):
        check_content_type(request)
        with s.gates["write"]:
            deadline = Deadline(s.settings.request_timeout_s)
            data = await _read(request, s, deadline)
            await _decode(s, data, deadline)  # refuse what is not an image before storing anything
            try:
                item = await _on_writer(s, lambda: s.index.add_image(data, s.bundle, s.upload_dir()))
            except UploadRefused as e:
                raise HTTPException(422, str(e)) from None
        _after_write(s)
        return _public(item)

    @app.delete("/items/{item_id}", summary="Remove an item from the index (needs the token)",
                response_model=M.Removed, responses=M.errors(401, 403, 404, 422, 503))
    async def delete_item(s: State = Depends(authorised), item_id: int = ItemId):
        with s.gates["write"]:
            removed = await _on_writer(s, lambda: s.index.remove(item_id))
        if not removed:
            raise HTTPException(404, f"no item {item_id}")
        _after_write(s)
        return {"removed": item_id}

    # ---------------------------------------------------------------- operations

    @app.get("/healthz", summary="The process is alive", response_model=M.Health)
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="Bundle and index are loaded and the encoders run", response_model=M.Ready,
             responses=M.errors(503))
    async def readyz(request: Request):
        s = getattr(request.app.state, "s", None)
        encoders = {"text": s.texts.healthy, "image": s.images.healthy} if s else {}
        ok = bool(s and s.ready)
        return JSONResponse({"ready": ok, "encoders": encoders}, status_code=200 if ok else 503)

    @app.get("/info", summary="Bundle, index, limits, memory and versions", response_model=M.Info)
    async def info(request: Request):
        from dsmd.artifacts import versions

        s = st(request)
        index, m = s.index, s.index.manifest
        cfg = s.settings
        return {"bundle": {"name": s.bundle.name, "dim": s.bundle.dim, "variant": s.bundle.variant,
                           "preprocess": s.bundle.preprocess.to_json()},
                "index": {**{part: {"count": index.count(part),
                                    "kind": m.get(part, {}).get("index", {}).get("kind"),
                                    "recall_at_10": m.get(part, {}).get("index", {}).get("recall_at_10"),
                                    "shortfall": m.get(part, {}).get("shortfall")}
                             for part in ("images", "texts")},
                          "generation": index.generation, "writes": s.writes, "backend": index.backend},
                "limits": {"max_k": cfg.max_k, "max_upload_bytes": cfg.max_upload_bytes, "max_pixels": cfg.max_pixels,
                           "max_tokens": s.bundle.preprocess.max_tokens, "request_timeout_s": cfg.request_timeout_s,
                           "max_text_requests": cfg.max_text_requests, "max_image_requests": cfg.max_image_requests,
                           "max_write_requests": cfg.max_write_requests, "max_queue": cfg.max_queue},
                "memory": {"resident_bytes": resident_bytes(), "peak_resident_bytes": peak_resident_bytes(),
                           "baseline_bytes": s.baseline_bytes, "budget_bytes": s.budget_bytes,
                           "ceiling_bytes": s.ceiling_bytes()},
                "uptime_s": round(time.time() - s.started, 1), "versions": versions()}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
    async def metrics(request: Request):
        s = st(request)
        s.refresh_gauges()
        s.metrics.queued.labels("text").set(s.texts.queued())
        s.metrics.queued.labels("image").set(s.images.queued())
        return Response(s.metrics.render(), media_type=s.metrics.content_type)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    return app


# ---------------------------------------------------------------- helpers


async def _read(request: Request, s: State, deadline: Deadline) -> bytes:
    try:
        return await asyncio.wait_for(read_upload(request, s.settings.max_upload_bytes), timeout=deadline.left())
    except asyncio.TimeoutError:
        raise HTTPException(408, f"the upload did not arrive within {deadline.seconds:g} s") from None


async def _decode(s: State, data: bytes, deadline: Deadline) -> np.ndarray:
    try:
        return await within(deadline, run_in_threadpool(s.decode, data), "decode the image")
    except BadImage as e:
        raise HTTPException(422, f"not a usable image: {str(e).replace('upload: ', '')}") from None


async def _on_writer(s: State, fn):
    """Run an index write on the writer thread (one at a time, never on the searches' pool)."""
    return await asyncio.get_running_loop().run_in_executor(s.writer, fn)


def _after_write(s: State) -> None:
    """Compact in the background once deletions or growth pass the index's threshold."""
    s.refresh_gauges()
    with contextlib.suppress(RuntimeError):  # the writer is shut down: the server is stopping
        s.writer.submit(_logged, s.compact_if_due)


async def _watch_index(s: State) -> None:
    """Every few seconds: has another process rebuilt the index? Then serve the new one."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(s.settings.reload_check_s)
        with contextlib.suppress(RuntimeError):
            await loop.run_in_executor(s.writer, _logged, s.reload_if_changed)


def _logged(fn) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001 - a background task: log it, keep serving the index we have
        log.exception("index maintenance failed; serving the index as it was")


def _public(item: dict) -> dict:
    return {"id": item["id"], "name": Path(item["uri"]).name, "width": item["width"], "height": item["height"],
            "captions": item["captions"], "added": item["added"], "sha256": item["sha256"],
            "image_url": f"/items/{item['id']}/image", "thumbnail_url": f"/items/{item['id']}/thumbnail"}


def _result(h, target: str) -> dict:
    if target == "images":
        return {"id": h.id, "score": round(h.score, 6), "name": Path(h.item["uri"]).name,
                "image_url": f"/items/{h.id}/image", "thumbnail_url": f"/items/{h.id}/thumbnail",
                "captions": h.item["captions"]}
    out = {"id": h.id, "score": round(h.score, 6), "text": h.item["text"], "item_id": h.item["item_id"]}
    if h.item["item_id"] is not None:
        out["thumbnail_url"] = f"/items/{h.item['item_id']}/thumbnail"
    return out
