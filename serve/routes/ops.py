"""The operator's routes: liveness, readiness, what the server runs with, Prometheus metrics; and the
web page at `/`. None of them passes a gate: probes must answer while the server is at capacity.
"""

from __future__ import annotations

import time
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse

from dsmd.serve import models
from dsmd.serve.collections import Collection
from dsmd.serve.deps import CollectionDep, StateDep
from dsmd.serve.memory import peak_resident_bytes, resident_bytes

STATIC = Path(__file__).parent.parent / "static"
router = APIRouter()


@router.get("/healthz", summary="The process is alive", response_model=models.Health)
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="Bundle and index are loaded and the encoders run", response_model=models.Ready,
            responses=models.errors(503))
async def readyz(request: Request) -> JSONResponse:
    s = getattr(request.app.state, "s", None)  # not StateDep: asked before start-up is done, it answers 503
    health = [e.healthy for e in s.encoders.values()] if s else []
    encoders = {"text": all(t for t, _ in health), "image": all(i for _, i in health)} if s else {}
    ok = bool(s and s.ready)
    body = {"ready": ok, "encoders": encoders}
    if s and s.reload_errors:  # still ready: it serves the index it has
        body["reload_error"] = "; ".join(f"{name}: {e}" if len(s.collections) > 1 else e
                                         for name, e in s.reload_errors.items())
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/info", summary="Bundle, index (of the collection asked for), the collections, limits, memory and "
            "versions", response_model=models.Info, responses=models.errors(404))
async def info(s: StateDep, c: CollectionDep) -> dict:
    from dsmd.artifacts import versions

    cfg = s.settings
    return {"bundle": {"name": c.bundle.name, "dim": c.bundle.dim, "variant": c.bundle.variant,
                       "preprocess": c.bundle.preprocess.to_json()},
            "index": index_info(c), "collection": c.name,
            "collections": [{"name": x.name, "default": x is s.default, "bundle": x.bundle.name, "dim": x.bundle.dim,
                             "images": x.index.count("images"), "texts": x.index.count("texts"),
                             "generation": x.index.generation, "writes": x.writes, "reload_error": x.reload_error}
                            for x in s.collections.values()],
            "limits": {"max_k": cfg.max_k, "max_upload_bytes": cfg.max_upload_bytes, "max_pixels": cfg.max_pixels,
                       "max_tokens": c.bundle.preprocess.max_tokens, "request_timeout_s": cfg.request_timeout_s,
                       "max_text_requests": cfg.max_text_requests, "max_image_requests": cfg.max_image_requests,
                       "max_write_requests": cfg.max_write_requests, "max_queue": cfg.max_queue,
                       "max_thumbnail_requests": cfg.max_thumbnail_requests, "admission_queue": cfg.admission_queue,
                       "queue_wait_share": cfg.queue_wait_share, "body_budget_bytes": cfg.body_budget_bytes,
                       "body_grace_s": cfg.body_grace_s, "min_upload_rate": cfg.min_upload_rate},
            "memory": {"resident_bytes": resident_bytes(), "peak_resident_bytes": peak_resident_bytes(),
                       "baseline_bytes": s.baseline_bytes, "budget_bytes": s.budget_bytes,
                       "ceiling_bytes": s.ceiling_bytes()},
            "uptime_s": round(time.time() - s.started, 1), "versions": versions()}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
async def metrics(s: StateDep) -> Response:
    for c in s.collections.values():
        c.refresh_gauges()
    s.metrics.queued.labels("text").set(sum(e.texts.queued() for e in s.encoders.values()))
    s.metrics.queued.labels("image").set(sum(e.images.queued() for e in s.encoders.values()))
    return Response(s.metrics.render(), media_type=s.metrics.content_type)


def index_info(c: Collection) -> dict:
    index, m = c.index, c.index.manifest
    return {**{part: {"count": index.count(part), "kind": m.get(part, {}).get("index", {}).get("kind"),
                      "recall_at_10": m.get(part, {}).get("index", {}).get("recall_at_10"),
                      "shortfall": m.get(part, {}).get("shortfall"),
                      "text_queries": m.get(part, {}).get("text_queries")}
               for part in ("images", "texts")},
            "generation": index.generation, "writes": c.writes, "backend": index.backend,
            "reload_error": c.reload_error}


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))
