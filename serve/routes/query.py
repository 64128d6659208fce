"""Queries with a JSON body: by a raw vector, by a weighted mix of texts, items and vectors, many texts
in one request; and the encoders' vectors themselves (`/embed`) for integration.

Bodies are small (a vector, a few texts): read with a cap before parsing (serve/json_body.py).
Texts go through the same micro-batching encoder and text cache as GET /search, images through
the same upload limits as POST /search/image.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.concurrency import run_in_threadpool

from dsmd.errors import UserError
from dsmd.index.filters import Filter
from dsmd.serve import models
from dsmd.serve.admission import Deadline
from dsmd.serve.collections import Collection
from dsmd.serve.deps import CollectionDep, SearchOptions, StateDep, when
from dsmd.serve.json_body import body_of, json_spec
from dsmd.serve.routes.common import answered, ask_for, decode, encode_and_search, read_body, search, settle
from dsmd.serve.routes.search import check_text
from dsmd.serve.state import State
from dsmd.serve.uploads import check_content_type, upload_spec

router = APIRouter()
MAX_TEXTS = 64  # texts in one /search/batch or /embed request
Weight = Annotated[float, Field(ge=-10, le=10, allow_inf_nan=False)]


class FilterBody(BaseModel):
    """The filters of GET /search, as JSON."""

    model_config = ConfigDict(extra="forbid")
    folder: str | None = Field(None, max_length=1000)
    taken_from: float | str | None = Field(None, description="unix seconds or ISO date")
    taken_to: float | str | None = None
    tags_any: list[Annotated[str, Field(max_length=64)]] = Field([], max_length=50)
    tags_all: list[Annotated[str, Field(max_length=64)]] = Field([], max_length=50)
    min_bytes: int | None = Field(None, ge=0, le=2**62)
    min_side: int | None = Field(None, ge=0, le=1_000_000)
    has_captions: bool | None = None

    def to_filter(self) -> Filter:
        t0 = None if self.taken_from is None else when(str(self.taken_from), "taken_from")
        t1 = None if self.taken_to is None else when(str(self.taken_to), "taken_to", end_of_day=True)
        return Filter(self.folder, t0, t1, tuple(self.tags_any), tuple(self.tags_all), self.min_bytes,
                      self.min_side, self.has_captions)


class SearchBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: int | None = Field(None, description="how many results (a page)")
    offset: int = Field(0, ge=0, le=10_000)
    dedup: float | None = Field(None, gt=0, le=1)
    min_score: float | None = Field(None, allow_inf_nan=False)
    target: Literal["images", "texts"] = "images"
    filter: FilterBody | None = None

    def options(self) -> SearchOptions:
        try:
            where = self.filter.to_filter() if self.filter else Filter()
        except UserError as e:
            raise HTTPException(422, str(e)) from None
        return SearchOptions(where, self.offset, self.dedup, self.min_score)


class VectorBody(SearchBody):
    vector: list[Annotated[float, Field(allow_inf_nan=False)]] = Field(
        max_length=65_536, description="an embedding of the index's dimension (normalised here)")


class Term(BaseModel):
    """One part of a mixed query: exactly one of a text, an indexed item or a vector, with its weight."""

    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(None, max_length=10_000)
    item: int | None = Field(None, ge=1, le=2**63 - 1)
    vector: list[Annotated[float, Field(allow_inf_nan=False)]] | None = Field(None, max_length=65_536)
    weight: Weight = 1.0

    @model_validator(mode="after")
    def one_kind(self) -> Term:
        if sum(x is not None for x in (self.text, self.item, self.vector)) != 1:
            raise ValueError("each term has exactly one of text, item or vector")
        return self


class MixBody(SearchBody):
    terms: list[Term] = Field(min_length=1, max_length=16, description="summed with their weights in "
                              "embedding space, e.g. [{text: 'a red car'}, {text: 'night', weight: -0.5}]")


class BatchBody(SearchBody):
    texts: list[Annotated[str, Field(max_length=10_000)]] = Field(min_length=1, max_length=MAX_TEXTS)


class EmbedBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[Annotated[str, Field(max_length=10_000)]] = Field(min_length=1, max_length=MAX_TEXTS)


def unit(c: Collection, values: list[float], name: str) -> np.ndarray:
    v = np.asarray(values, np.float32)
    if v.shape != (c.index.dim,):
        raise HTTPException(422, f"{name} has {len(values)} numbers; this index's vectors have {c.index.dim}")
    norm = float(np.linalg.norm(v))
    if not math.isfinite(norm) or norm == 0:
        raise HTTPException(422, f"{name} is all zeros")
    return v / norm


async def text_vector(request: Request, s: State, c: Collection, text: str, deadline: Deadline) -> np.ndarray:
    """A text's embedding by the collection's bundle: from the cache, else from the encoder (no search)."""
    check_text(text)
    e = c.encoders
    cached = e.text_cache.lookup(text)
    if cached is not None:
        return cached[0]
    vector, truncated, _ = await encode_and_search(request, s, e.texts, (text, None, None), deadline)
    e.text_cache.put(text, (vector, truncated))
    return vector


def took(t0: float) -> float:
    return round(1000 * (time.perf_counter() - t0), 2)


@router.post("/search/vector", summary="Search by an embedding you have", response_model=models.VectorSearch,
             responses=models.errors(400, 404, 413, 415, 422, 503), openapi_extra=json_spec(VectorBody))
async def search_vector(request: Request, s: StateDep, c: CollectionDep) -> dict:
    t0 = time.perf_counter()
    body = await body_of(request, VectorBody)
    ask = ask_for(s, body.k, body.target, body.options())
    vector = unit(c, body.vector, "vector")
    deadline = Deadline(s.settings.request_timeout_s)
    async with s.gates["text"].admit(s.settings.queue_wait_s(deadline.left())):
        ans = await search(c, vector, ask, deadline)
    return {"query": {"dim": len(body.vector)}, "target": body.target, **answered(ans, ask, c),
            "took_ms": took(t0)}


@router.post("/search/mix", summary="Search by texts, items and vectors with weights (negative ones too)",
             response_model=models.MixSearch, responses=models.errors(400, 404, 413, 415, 422, 503),
             openapi_extra=json_spec(MixBody))
async def search_mix(request: Request, s: StateDep, c: CollectionDep) -> dict:
    """The query is the normalised sum of each term's unit embedding times its weight: `a red car` + 1
    and `night` - 0.5 looks for red cars away from night scenes."""
    t0 = time.perf_counter()
    body = await body_of(request, MixBody)
    ask = ask_for(s, body.k, body.target, body.options())
    deadline = Deadline(s.settings.request_timeout_s)
    async with s.gates["text"].admit(s.settings.queue_wait_s(deadline.left())):
        total = np.zeros(c.index.dim, np.float32)
        for i, term in enumerate(body.terms):
            if term.text is not None:
                v = await text_vector(request, s, c, term.text, deadline)
            elif term.item is not None:
                v = await run_in_threadpool(c.index.vector_of, term.item)
                if v is None:
                    raise HTTPException(404, f"terms.{i}: no item {term.item}")
            else:
                v = unit(c, term.vector, f"terms.{i}.vector")
            total += term.weight * v
        if float(np.linalg.norm(total)) < 1e-6:
            raise HTTPException(422, "the weighted terms cancel out: nothing is left to search for")
        ans = await search(c, total / np.linalg.norm(total), ask, deadline)
    return {"query": {"terms": len(body.terms)}, "target": body.target, **answered(ans, ask, c),
            "took_ms": took(t0)}


@router.post("/search/batch", summary="Many text queries in one request", response_model=models.BatchSearch,
             responses=models.errors(400, 404, 413, 415, 422, 503), openapi_extra=json_spec(BatchBody))
async def search_batch(request: Request, s: StateDep, c: CollectionDep) -> dict:
    """One answer per text, in order; the texts reach the encoder together (one micro-batch where
    they fit max_batch)."""
    t0 = time.perf_counter()
    body = await body_of(request, BatchBody)
    ask = ask_for(s, body.k, body.target, body.options())
    for text in body.texts:
        check_text(text)
    deadline = Deadline(s.settings.request_timeout_s)
    async with s.gates["text"].admit(s.settings.queue_wait_s(deadline.left())):
        index = c.index
        done = await asyncio.gather(*(encode_and_search(request, s, c.encoders.texts, (t, index, ask), deadline)
                                      for t in body.texts))
    return {"target": body.target, "answers": [{"text": t, "truncated": cut, **answered(settle(a), ask, c)}
                                                for t, (_, cut, a) in zip(body.texts, done)], "took_ms": took(t0)}


def bundle_id(c: Collection) -> str:
    return c.index.manifest["bundle"].get("fingerprint") or c.bundle.name


@router.post("/embed", summary="The text encoder's vectors of some texts", response_model=models.Embedding,
             responses=models.errors(400, 404, 413, 415, 422, 503), openapi_extra=json_spec(EmbedBody))
async def embed_texts(request: Request, s: StateDep, c: CollectionDep) -> dict:
    """Unit vectors in the index's space (comparable by dot product with /search/vector's input)."""
    body = await body_of(request, EmbedBody)
    deadline = Deadline(s.settings.request_timeout_s)
    for text in body.texts:
        check_text(text)
    async with s.gates["text"].admit(s.settings.queue_wait_s(deadline.left())):
        done = await asyncio.gather(*(encode_and_search(request, s, c.encoders.texts, (t, None, None), deadline)
                                      for t in body.texts))
    return {"bundle": bundle_id(c), "dim": c.bundle.dim, "vectors": [v.round(6).tolist() for v, _, _ in done],
            "truncated": [cut for _, cut, _ in done]}


@router.post("/embed/image", summary="The image encoder's vector of an image", openapi_extra=upload_spec(),
             response_model=models.Embedding, responses=models.errors(400, 404, 408, 413, 415, 422, 503))
async def embed_image(request: Request, s: StateDep, c: CollectionDep) -> dict:
    check_content_type(request)
    with s.bodies.hold() as hold:
        data = await read_body(request, s, hold)
        deadline = Deadline(s.settings.request_timeout_s)
        async with s.gates["image"].admit(s.settings.queue_wait_s(deadline.left())):
            pixels = await decode(s, c, data, deadline)
            vector, _ = await encode_and_search(request, s, c.encoders.images, (pixels, None, None), deadline)
    return {"bundle": bundle_id(c), "dim": c.bundle.dim, "vectors": [vector.round(6).tolist()], "truncated": [False]}
