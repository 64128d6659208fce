"""The API's response bodies, so the OpenAPI spec describes every answer, errors included."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class Error(BaseModel):
    detail: str = Field(description="what went wrong, and what to do about it")


class ImageHit(BaseModel):
    id: int
    score: float
    name: str
    image_url: str
    thumbnail_url: str
    captions: list[str]
    folder: str | None = Field(None, description="its folder relative to the indexed root")
    taken: float | None = Field(None, description="capture time (EXIF, else the file's), unix seconds")
    tags: list[str] = []
    duplicates: int | None = Field(None, description="with dedup: results folded into this one")


class TextHit(BaseModel):
    id: int
    score: float
    text: str
    item_id: int | None = Field(description="the image this text is a caption of (null for a free text)")
    thumbnail_url: str | None = None


class Paged(BaseModel):
    """A page of one ranking: what every search answers besides its query."""

    k: int
    offset: int = Field(description="results skipped before this page")
    next_offset: int | None = Field(description="the offset of the next page; null when this is the last")
    strategy: str = Field(description="how the search ran: ann, exact, post-filter (ANN, then the filter) "
                          "or scan (every item the filter keeps, scored exactly); text or hybrid for those "
                          "modes of /search")
    collapsed: int | None = Field(None, description="with dedup: results folded into better ones")
    results: list[ImageHit] | list[TextHit]


class TextQuery(BaseModel):
    text: str
    truncated: bool
    note: str | None = None


class TextSearch(Paged):
    query: TextQuery
    target: str
    results: list[ImageHit]
    took_ms: float


class ImageQuery(BaseModel):
    image_bytes: int


class ImageSearch(Paged):
    query: ImageQuery
    target: str
    took_ms: float


class SimilarQuery(BaseModel):
    item: int


class SimilarSearch(Paged):
    query: SimilarQuery
    target: str
    results: list[ImageHit]
    took_ms: float


class VectorQuery(BaseModel):
    dim: int


class VectorSearch(Paged):
    query: VectorQuery
    target: str
    took_ms: float


class MixQuery(BaseModel):
    terms: int


class MixSearch(Paged):
    query: MixQuery
    target: str
    took_ms: float


class BatchAnswer(Paged):
    text: str
    truncated: bool


class BatchSearch(BaseModel):
    target: str
    answers: list[BatchAnswer]
    took_ms: float


class Embedding(BaseModel):
    bundle: str = Field(description="the bundle whose encoder made the vectors (its fingerprint)")
    dim: int
    vectors: list[list[float]] = Field(description="unit vectors, one per input, in input order")
    truncated: list[bool] = Field(description="per text: cut to the model's max_tokens")


class Tags(BaseModel):
    id: int
    tags: list[str]


class Item(BaseModel):
    id: int
    name: str
    width: int | None
    height: int | None
    captions: list[str]
    added: float
    sha256: str
    bytes: int | None = Field(description="file size")
    mtime: float | None = Field(description="the file's modification time (an upload's: when it arrived)")
    taken: float | None = Field(description="EXIF capture time, unix seconds (UTC unless the file says its zone)")
    camera: str | None = Field(description="EXIF camera model")
    folder: str | None = Field(description="folder relative to the indexed root; 'uploads' for uploads")
    tags: list[str]
    image_url: str
    thumbnail_url: str


class Removed(BaseModel):
    removed: int


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    ready: bool
    encoders: dict[str, bool] = Field(description="whether each encoder's worker thread is alive")
    reload_error: str | None = Field(None, description="present when the index was rebuilt into one this server "
                                     "cannot serve: it goes on serving the one it has")


class CollectionInfo(BaseModel):
    name: str
    default: bool = Field(description="the one searched when a request names none")
    bundle: str
    dim: int
    images: int
    texts: int
    generation: int
    writes: bool
    reload_error: str | None = None


class Info(BaseModel):
    bundle: dict[str, Any] = Field(description="the bundle of the collection asked for (default: the first)")
    index: dict[str, Any] = Field(description="the index of the collection asked for")
    collection: str
    collections: list[CollectionInfo]
    limits: dict[str, Any]
    memory: dict[str, Any]
    uptime_s: float
    versions: dict[str, Any]


def errors(*codes: int) -> dict:
    """`responses=` of a route: these status codes answer with an Error body."""
    return {code: {"model": Error, "description": DESCRIPTIONS[code]} for code in codes}


DESCRIPTIONS = {
    400: "the body cannot be parsed",
    401: "missing or wrong token",
    403: "writes are off on this server",
    404: "no such collection or item, or the item's file is gone (or is a link out of its folder)",
    408: "the upload arrived too slowly (under the minimum rate after its grace period)",
    409: "the item changed while the request ran",
    410: "the item's file has changed since it was indexed",
    413: "the upload or text is over the limit",
    415: "the body is not multipart/form-data or JSON",
    422: "a parameter or the image is not valid",
    503: "over capacity or not ready: retry after the Retry-After seconds",
}
