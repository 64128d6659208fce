"""The search server: `create_app(settings)` for uvicorn (`dsmd serve`, `make serve`).

The bundle and the index load at start-up (lifespan), so the first query is as fast as the
rest. Encoders run in micro-batching threads (serve/batcher.py), searches in the thread
pool behind one lock: nothing heavy runs on the event loop. Every error a caller can cause
is a 4xx with a `detail` message; files are only ever read from the index's own rows (no
path and no URL from a request reaches the disk or the network).
"""

from __future__ import annotations

import hmac
import io
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool

from dsmd.bundle import Bundle, RuntimeOptions
from dsmd.errors import UserError
from dsmd.images import BadImage, open_image
from dsmd.index.uploads import UploadRefused, item_id_of, remove_items, store_upload
from dsmd.serve.batcher import MicroBatcher
from dsmd.serve.cache import LRU
from dsmd.serve.metrics import Metrics
from dsmd.serve.settings import Settings
from dsmd.serve.uploads import read_upload, upload_spec

STATIC = Path(__file__).parent / "static"
ItemId = PathParam(..., ge=1, le=2**63 - 1, description="an item id from a search result")


class State:
    """What the app holds while it runs."""

    def __init__(self, settings: Settings):
        import faiss

        from dsmd.index.search import SearchIndex

        faiss.omp_set_num_threads(1)  # one query at a time per search; the encoders take the cores
        self.settings = settings
        self.metrics = Metrics()
        self.bundle = Bundle(settings.bundle, settings.variant, RuntimeOptions(threads=settings.threads))
        self.index_lock = threading.Lock()  # around every use of self.index (FAISS + its SQLite connection)
        self.write_lock = threading.Lock()  # one index update (POST /items, DELETE) at a time
        self.index = SearchIndex(settings.index)
        self.index.check_bundle(self.bundle)
        self.text_cache = LRU(settings.text_cache)
        self.thumbs = LRU(settings.thumb_cache)
        self.in_flight = {"text": 0, "image": 0}  # requests inside the search handlers, per encoder
        self.texts = MicroBatcher(self.bundle.encode_texts, settings.batch_wait_ms, settings.max_batch, "text-encoder",
                                  lambda n: self.metrics.batch("text", n), lambda: self.in_flight["text"])
        self.images = MicroBatcher(lambda xs: self.bundle.encode_pixels(np.stack(xs)), settings.batch_wait_ms,
                                   settings.max_batch, "image-encoder", lambda n: self.metrics.batch("image", n),
                                   lambda: self.in_flight["image"])
        # warm-up: the first real query must not pay for lazy initialisation
        self.bundle.encode_texts(["warm up"])
        self.bundle.encode_pixels(np.zeros((1, 3, self.bundle.preprocess.size, self.bundle.preprocess.size),
                                           np.float32))
        self.started = time.time()
        self.ready = True

    def close(self) -> None:
        self.texts.close()
        self.images.close()
        self.index.close()

    def swap_index(self) -> None:
        """Open the index as its manifest now says, then swap it in: searches wait only for the swap."""
        import faiss

        from dsmd.index.search import SearchIndex

        fresh = SearchIndex(self.settings.index)
        faiss.omp_set_num_threads(1)
        with self.index_lock:
            old, self.index = self.index, fresh
        old.close()
        with self.thumbs.lock:
            self.thumbs.clear()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.s = State(settings)
        yield
        app.state.s.close()

    app = FastAPI(title="dsmd search", version="1", lifespan=lifespan,
                  description="Text→image, image→image and image→text search over an index built with `dsmd index`.")

    def st(request: Request) -> State:
        return request.app.state.s

    @app.middleware("http")
    async def measure(request: Request, call_next):
        t0 = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:  # noqa: BLE001 - never a stack trace to the caller; counted as 500
            response = JSONResponse({"detail": "internal error"}, status_code=500)
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "other")
        if hasattr(request.app.state, "s"):
            request.app.state.s.metrics.observe(endpoint, response.status_code, time.perf_counter() - t0)
        return response

    # ---------------------------------------------------------------- search

    def check_k(s: State, k: int | None) -> int:
        k = s.settings.default_k if k is None else k
        if not 1 <= k <= s.settings.max_k:
            raise HTTPException(422, f"k must be between 1 and {s.settings.max_k}, not {k}")
        return k

    async def search(s: State, vector: np.ndarray, k: int, target: str, min_score: float | None) -> list[dict]:
        def run():
            with s.index_lock:
                return s.index.search(vector[None], k, target)[0]

        try:
            hits = await run_in_threadpool(run)
        except UserError as e:  # the database busy beyond its timeout
            raise HTTPException(503, str(e)) from None
        floor = min_score if min_score is not None else s.settings.min_score
        out = []
        for h in hits:
            if floor is not None and h.score < floor:
                continue
            out.append(_result(h, target))
        return out

    @app.get("/search", summary="Text → images")
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
        truncated = s.bundle.truncated(text)
        s.in_flight["text"] += 1  # the event loop is one thread: no lock needed
        try:
            vector = await _cached_text(s, text)
        finally:
            s.in_flight["text"] -= 1
        results = await search(s, vector, k, "images", min_score)
        return {"query": {"text": text, "truncated": truncated,
                          **({"note": f"the text was cut to the model's {s.bundle.preprocess.max_tokens} tokens"}
                             if truncated else {})},
                "target": "images", "k": k, "results": results, "took_ms": round(1000 * (time.perf_counter() - t0), 2)}

    @app.post("/search/image", summary="Image → images, or → captions with target=texts", openapi_extra=upload_spec())
    async def search_image(request: Request, k: int | None = Query(None), target: str = Query("images"),
                           min_score: float | None = Query(None)):
        s = st(request)
        t0 = time.perf_counter()
        k = check_k(s, k)
        if target not in ("images", "texts"):
            raise HTTPException(422, "target must be images or texts")
        s.in_flight["image"] += 1
        try:
            data = await read_upload(request, s.settings)
            pixels = await run_in_threadpool(decode, s, data)
            vector = await s.images.submit(pixels)
        finally:
            s.in_flight["image"] -= 1
        results = await search(s, vector, k, target, min_score)
        return {"query": {"image_bytes": len(data)}, "target": target, "k": k, "results": results,
                "took_ms": round(1000 * (time.perf_counter() - t0), 2)}

    @app.get("/items/{item_id}/similar", summary="More like this: images near an indexed image")
    async def similar(request: Request, item_id: int = ItemId, k: int | None = Query(None)):
        s = st(request)
        k = check_k(s, k)

        def vec():
            with s.index_lock:
                if s.index.item(item_id) is None:
                    raise HTTPException(404, f"no item {item_id}")
                return s.index.db.vectors_of(np.array([item_id]))[0]

        results = await search(s, await run_in_threadpool(vec), k, "images", None)
        return {"query": {"item": item_id}, "target": "images", "k": k, "results": results}

    # ---------------------------------------------------------------- items

    def item_or_404(s: State, item_id: int) -> dict:
        with s.index_lock:
            item = s.index.item(item_id)
        if item is None:
            raise HTTPException(404, f"no item {item_id}")
        return item

    @app.get("/items/{item_id}", summary="An item's metadata")
    async def get_item(request: Request, item_id: int = ItemId):
        item = await run_in_threadpool(item_or_404, st(request), item_id)
        return _public(item)

    @app.get("/items/{item_id}/image", summary="The item's image file", response_class=FileResponse)
    async def get_image(request: Request, item_id: int = ItemId):
        item = await run_in_threadpool(item_or_404, st(request), item_id)
        path = Path(item["uri"])  # from the index's own row, never from the request
        if not path.is_file():
            raise HTTPException(404, f"item {item_id}'s file is gone from {path.parent.name}/")
        return FileResponse(path)

    @app.get("/items/{item_id}/thumbnail", summary="A JPEG thumbnail of the item (cached)")
    async def get_thumbnail(request: Request, item_id: int = ItemId):
        s = st(request)
        item = await run_in_threadpool(item_or_404, s, item_id)

        def make() -> bytes:
            try:
                img = open_image(item["uri"])
            except BadImage as e:
                raise HTTPException(404, f"item {item_id}'s file cannot be read: {e}") from None
            img.thumbnail((s.settings.thumb_size, s.settings.thumb_size))
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=85)
            return buf.getvalue()

        data = await run_in_threadpool(s.thumbs.get_or, (item_id, item["sha256"]), make)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=3600"})

    def authorise(request: Request, s: State) -> None:
        if not s.settings.token:
            raise HTTPException(403, "adding and removing items is off: start the server with a token (--token)")
        sent = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(sent, f"Bearer {s.settings.token}".encode()):
            raise HTTPException(401, "missing or wrong token: send Authorization: Bearer <token>")

    @app.post("/items", summary="Add an image to the index (needs the token)", openapi_extra=upload_spec(),
              status_code=201)
    async def add_item(request: Request):
        s = st(request)
        authorise(request, s)
        data = await read_upload(request, s.settings)
        await run_in_threadpool(decode, s, data)  # refuse what is not an image before storing anything
        item = await run_in_threadpool(_store_and_index, s, data)
        return _public(item)

    @app.delete("/items/{item_id}", summary="Remove an item from the index (needs the token)")
    async def delete_item(request: Request, item_id: int = ItemId):
        s = st(request)
        authorise(request, s)
        await run_in_threadpool(item_or_404, s, item_id)
        await run_in_threadpool(_remove, s, item_id)
        return {"removed": item_id}

    # ---------------------------------------------------------------- operations

    @app.get("/healthz", summary="The process is alive")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="Bundle and index are loaded")
    async def readyz(request: Request):
        ok = getattr(getattr(request.app.state, "s", None), "ready", False)
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/info", summary="Bundle, index and versions")
    async def info(request: Request):
        s = st(request)
        m = s.index.manifest
        from dsmd.artifacts import versions

        return {"bundle": {"name": s.bundle.name, "dim": s.bundle.dim, "variant": s.bundle.variant,
                           "preprocess": s.bundle.preprocess.to_json()},
                "index": {part: {"count": m.get(part, {}).get("count", 0),
                                 "kind": m.get(part, {}).get("index", {}).get("kind"),
                                 "recall_at_10": m.get(part, {}).get("index", {}).get("recall_at_10")}
                          for part in ("images", "texts")},
                "limits": {"max_k": s.settings.max_k, "max_upload_bytes": s.settings.max_upload_bytes,
                           "max_pixels": s.settings.max_pixels, "max_tokens": s.bundle.preprocess.max_tokens},
                "uptime_s": round(time.time() - s.started, 1), "versions": versions()}

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def metrics(request: Request):
        s = st(request)
        s.metrics.gauges["dsmd_index_images"] = s.index.count("images")
        s.metrics.gauges["dsmd_index_texts"] = s.index.count("texts")
        return PlainTextResponse(s.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    return app


# ---------------------------------------------------------------- helpers


async def _cached_text(s: State, text: str) -> np.ndarray:
    vector = s.text_cache.lookup(text)
    if vector is None:
        vector = await s.texts.submit(text)
        s.text_cache.put(text, vector)
    return vector


def decode(s: State, data: bytes) -> np.ndarray:
    try:
        img = open_image(data, max_pixels=s.settings.max_pixels)
    except BadImage as e:
        raise HTTPException(422, f"not a usable image: {str(e).replace('upload: ', '')}") from None
    return s.bundle.transform(img)


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


def _store_and_index(s: State, data: bytes) -> dict:
    """Store and index an upload (dsmd.index.uploads); searches go on meanwhile and see the new
    item once the rebuilt files are swapped in."""
    with s.write_lock:
        try:
            sha = store_upload(s.settings.index, s.bundle, data, s.settings.upload_dir)
        except UploadRefused as e:
            raise HTTPException(422, str(e)) from None
        s.swap_index()
    with s.index_lock:
        item_id = item_id_of(s.index.db, sha)
        item = s.index.item(item_id) if item_id is not None else None
    if item is None:
        raise HTTPException(409, "the image was removed again while it was being added")
    return item


def _remove(s: State, item_id: int) -> None:
    with s.write_lock:
        remove_items(s.settings.index, s.bundle, [item_id])
        s.swap_index()
