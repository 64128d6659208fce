"""The search routes: text → images, image → images or captions, and more like an indexed image.

Each passes its gate (past capacity, a short wait in its queue; past the queue, a fast 503) and
answers within its deadline; an image upload is read before it takes its slot; a text query the
server has seen recently skips the encoder (its vector is cached).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from dsmd.errors import UserError
from dsmd.index.filtered import MODES
from dsmd.serve import models
from dsmd.serve.admission import Deadline
from dsmd.serve.deps import OPTIONS_SPEC, CollectionDep, ItemId, StateDep, Target, options_of
from dsmd.serve.routes.common import answered, ask_for, decode, encode_and_search, read_body, search, settle
from dsmd.serve.uploads import check_content_type, upload_spec

router = APIRouter()

K = Annotated[int | None, Query(description="how many results (a page)")]


MODE_SPEC = {"name": "mode", "in": "query", "required": False,
             "schema": {"type": "string", "enum": list(MODES), "default": "vector"},
             "description": "vector: by meaning (the embedding); text: by the words of file names, folders, captions "
                            "and tags (BM25); hybrid: both rankings fused (reciprocal rank fusion)"}


@router.get("/search", summary="Text → images", response_model=models.TextSearch,
            responses=models.errors(404, 413, 422, 503), openapi_extra={"parameters": [*OPTIONS_SPEC, MODE_SPEC]})
async def search_text(request: Request, s: StateDep, c: CollectionDep,
                      text: Annotated[str, Query(description="what to look for")], k: K = None) -> JSONResponse:
    t0 = time.perf_counter()
    ask = ask_for(s, k, "images", options_of(request))
    check_text(text)
    mode = request.query_params.get("mode") or "vector"
    if mode != "vector":  # read by hand, as the other options (serve/deps.py)
        try:
            ask = replace(ask, mode=mode, text=text)
        except UserError as e:
            raise HTTPException(422, str(e)) from None
    deadline = Deadline(s.settings.request_timeout_s)
    async with s.gates["text"].admit(s.settings.queue_wait_s(deadline.left())):
        e = c.encoders
        cached = e.text_cache.lookup(text)
        if mode == "text":  # words alone: no encoder
            (vector, truncated), ans = (None, False), await search(c, None, ask, deadline)
        elif cached is None:
            vector, truncated, ans = await encode_and_search(request, s, e.texts, (text, c.index, ask), deadline)
            e.text_cache.put(text, (vector, truncated))
            ans = settle(ans)
        else:
            (vector, truncated), ans = cached, await search(c, cached[0], ask, deadline)
    note = f"the text was cut to the model's {c.bundle.preprocess.max_tokens} tokens" if truncated else None
    # answered as built (the response model documents it; the tests check the answers against it)
    return JSONResponse({"query": {"text": text, "truncated": truncated, "note": note}, "target": "images",
                         **answered(ans, ask, c), "took_ms": round(1000 * (time.perf_counter() - t0), 2)})


def check_text(text: str) -> None:
    if not text.strip():
        raise HTTPException(422, "text is empty: say what to look for, e.g. /search?text=a+red+circle")
    if len(text) > 10_000:
        raise HTTPException(413, "text is longer than 10,000 characters")


@router.post("/search/image", summary="Image → images, or → captions with target=texts",
             openapi_extra={**upload_spec(), "parameters": OPTIONS_SPEC},
             response_model=models.ImageSearch, responses=models.errors(400, 404, 408, 413, 415, 422, 503))
async def search_image(request: Request, s: StateDep, c: CollectionDep, k: K = None,
                       target: Target = "images") -> JSONResponse:
    t0 = time.perf_counter()
    ask = ask_for(s, k, target, options_of(request))
    check_content_type(request)
    with s.bodies.hold() as hold:
        data = await read_body(request, s, hold)  # before the slot: a slow body holds bytes, not a slot
        deadline = Deadline(s.settings.request_timeout_s)
        async with s.gates["image"].admit(s.settings.queue_wait_s(deadline.left())):
            pixels = await decode(s, c, data, deadline)
            ans = settle((await encode_and_search(request, s, c.encoders.images, (pixels, c.index, ask),
                                                  deadline))[1])
    return JSONResponse({"query": {"image_bytes": len(data)}, "target": target, **answered(ans, ask, c),
                         "took_ms": round(1000 * (time.perf_counter() - t0), 2)})


@router.get("/items/{item_id}/similar", summary="More like this: images near an indexed image",
            response_model=models.SimilarSearch, responses=models.errors(404, 422, 503),
            openapi_extra={"parameters": OPTIONS_SPEC})
async def similar(request: Request, s: StateDep, c: CollectionDep, item_id: ItemId, k: K = None) -> dict:
    t0 = time.perf_counter()
    ask = ask_for(s, k, "images", options_of(request))
    deadline = Deadline(s.settings.request_timeout_s)
    async with s.gates["text"].admit(s.settings.queue_wait_s(deadline.left())):
        vector = await run_in_threadpool(c.index.vector_of, item_id)
        if vector is None:
            raise HTTPException(404, f"no item {item_id}")
        ans = await search(c, vector, ask, deadline)
    return {"query": {"item": item_id}, "target": "images", **answered(ans, ask, c),
            "took_ms": round(1000 * (time.perf_counter() - t0), 2)}
