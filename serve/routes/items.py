"""The item routes: an item's metadata, image and thumbnail; adding and removing items with the token.

Files are only ever read from the index's own rows: no path and no URL from a request reaches
the disk. Writes run on the index's writer thread, one at a time.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from dsmd.images import BadImage
from dsmd.index.search import ReadOnlyIndex
from dsmd.index.uploads import UploadRefused
from dsmd.serve import models
from dsmd.serve.admission import Deadline
from dsmd.serve.deps import ItemId, StateDep, WriterDep, read_only_error
from dsmd.serve.routes.common import after_write, decode, on_writer, public, read_body
from dsmd.serve.state import State
from dsmd.serve.uploads import check_content_type, upload_spec

router = APIRouter()


async def item_or_404(s: State, item_id: int) -> dict:
    """The item's row, read in the thread pool; a 404 when there is none."""
    item = await run_in_threadpool(s.index.item, item_id)
    if item is None:
        raise HTTPException(404, f"no item {item_id}")
    return item


@router.get("/items/{item_id}", summary="An item's metadata", response_model=models.Item,
            responses=models.errors(404, 422))
async def get_item(s: StateDep, item_id: ItemId) -> dict:
    return public(await item_or_404(s, item_id))


@router.get("/items/{item_id}/image", summary="The item's image file", response_class=FileResponse,
            responses={200: {"content": {"image/*": {}}, "description": "the file as indexed"},
                       **models.errors(404, 422)})
async def get_image(s: StateDep, item_id: ItemId) -> FileResponse:
    item = await item_or_404(s, item_id)
    path = Path(item["uri"])  # from the index's own row, never from the request
    if not path.is_file():
        raise HTTPException(404, f"item {item_id}'s file is gone")
    return FileResponse(path)


@router.get("/items/{item_id}/thumbnail", summary="A JPEG thumbnail of the item (cached)",
            responses={200: {"content": {"image/jpeg": {}}, "description": "a JPEG thumbnail"},
                       **models.errors(404, 422, 503)}, response_class=Response)
async def get_thumbnail(s: StateDep, item_id: ItemId) -> Response:
    item = await item_or_404(s, item_id)

    def make() -> bytes:
        try:
            return s.thumbnail(item["uri"])
        except BadImage:
            raise HTTPException(404, f"item {item_id}'s file cannot be read") from None

    with s.gates["thumbnail"]:
        data = await run_in_threadpool(s.thumbs.get_or, (item_id, item["sha256"]), make)
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=3600"})


@router.post("/items", summary="Add an image to the index (needs the token)", openapi_extra=upload_spec(),
             status_code=201, response_model=models.Item,
             responses=models.errors(400, 401, 403, 408, 413, 415, 422, 503))
async def add_item(request: Request, s: WriterDep) -> dict:
    check_content_type(request)
    with s.gates["write"]:
        deadline = Deadline(s.settings.request_timeout_s)
        data = await read_body(request, s, deadline)
        await decode(s, data, deadline)  # refuse what is not an image before storing anything
        try:
            item = await on_writer(s, lambda: s.index.add_image(data, s.bundle, s.upload_dir()))
        except ReadOnlyIndex:  # the index reopened read-only since start-up (a rebuild by another user)
            raise read_only_error(s) from None
        except UploadRefused as e:
            raise HTTPException(422, str(e)) from None
    after_write(s)
    return public(item)


@router.delete("/items/{item_id}", summary="Remove an item from the index (needs the token)",
               response_model=models.Removed, responses=models.errors(401, 403, 404, 422, 503))
async def delete_item(s: WriterDep, item_id: ItemId) -> dict:
    with s.gates["write"]:
        try:
            removed = await on_writer(s, lambda: s.index.remove(item_id))
        except ReadOnlyIndex:
            raise read_only_error(s) from None
    if not removed:
        raise HTTPException(404, f"no item {item_id}")
    after_write(s)
    return {"removed": item_id}
