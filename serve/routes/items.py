"""The item routes: an item's metadata, image and thumbnail; adding and removing items with the token.

Files are only ever read from the index's own rows: no path and no URL from a request reaches
the disk, a file is served only while its bytes are those indexed (its row's sha256), and never
through a link that leaves the item's folder. Writes run on the index's writer thread, one at a
time; their bodies are read before they take a write slot.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from dsmd.artifacts import sha256_file
from dsmd.errors import UserError
from dsmd.images import BadImage, CostlyImage
from dsmd.index.metadata import MAX_TAG_CHARS, MAX_TAGS
from dsmd.index.search import ReadOnlyIndex
from dsmd.index.uploads import UploadRefused
from dsmd.serve import models
from dsmd.serve.admission import Deadline, busy
from dsmd.serve.collections import Collection
from dsmd.serve.deps import CollectionDep, ItemId, StateDep, WriterDep, read_only_error
from dsmd.serve.json_body import body_of, json_spec
from dsmd.serve.routes.common import after_write, decode, on_writer, public, read_body
from dsmd.serve.state import FileChanged, State
from dsmd.serve.uploads import check_content_type, upload_spec

router = APIRouter()


async def item_or_404(c: Collection, item_id: int) -> dict:
    """The item's row, read in the thread pool; a 404 when there is none."""
    item = await run_in_threadpool(c.index.item, item_id)
    if item is None:
        raise HTTPException(404, f"no item {item_id}")
    return item


@router.get("/items/{item_id}", summary="An item's metadata", response_model=models.Item,
            responses=models.errors(404, 422))
async def get_item(c: CollectionDep, item_id: ItemId) -> dict:
    return public(await item_or_404(c, item_id), c.links)


def inside_folder(item: dict, item_id: int) -> Path:
    """The item's file, resolved; a 404 when it is gone or is a link to a file outside its folder."""
    path = Path(item["uri"])  # from the index's own row, never from the request
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise HTTPException(404, f"item {item_id}'s file is gone") from None
    if not real.is_relative_to(path.parent.resolve()):
        raise HTTPException(404, f"item {item_id}'s file is a link to a file outside its folder, which is never "
                                 f"served; index the file itself")
    return real


def changed_error(item_id: int) -> HTTPException:
    return HTTPException(410, f"item {item_id}'s file has changed since it was indexed (its sha256 differs), so "
                              f"it is not served; index it again to serve the new file")


def verified_file(s: State, item: dict, item_id: int) -> tuple[Path, os.stat_result]:
    """The item's file and its stat, if its bytes are still those indexed (checked once per version of
    the file: path, inode, mtime, size); a 404 when gone or outside its folder, a 410 when changed."""
    real = inside_folder(item, item_id)
    st = real.stat()
    if not stat.S_ISREG(st.st_mode):
        raise HTTPException(404, f"item {item_id}'s file is gone (not a regular file)")
    version = (str(real), st.st_ino, st.st_mtime_ns, st.st_size)
    if s.verified.lookup(version) is None:
        if sha256_file(real) != item["sha256"]:
            raise changed_error(item_id)
        s.verified.put(version, True)
    return real, st


@router.get("/items/{item_id}/image", summary="The item's image file", response_class=FileResponse,
            responses={200: {"content": {"image/*": {}}, "description": "the file as indexed"},
                       **models.errors(404, 410, 422)})
async def get_image(s: StateDep, c: CollectionDep, item_id: ItemId) -> FileResponse:
    item = await item_or_404(c, item_id)
    path, st = await run_in_threadpool(verified_file, s, item, item_id)
    return FileResponse(path, stat_result=st)


@router.get("/items/{item_id}/thumbnail", summary="A JPEG thumbnail of the item (cached)",
            responses={200: {"content": {"image/jpeg": {}}, "description": "a JPEG thumbnail"},
                       **models.errors(404, 410, 422, 503)}, response_class=Response)
async def get_thumbnail(s: StateDep, c: CollectionDep, item_id: ItemId) -> Response:
    deadline = Deadline(s.settings.request_timeout_s)
    item = await item_or_404(c, item_id)
    try:
        data = await s.thumbnail((c.name, item_id, item["sha256"]), lambda: inside_folder(item, item_id), deadline)
    except FileChanged:
        raise changed_error(item_id) from None
    except BadImage as e:
        why = ("it would cost far more to decode than its size (its headers say so)" if isinstance(e, CostlyImage)
               else "it is over the pixel limit" if "over the limit" in str(e) else "it cannot be read as an image")
        raise HTTPException(404, f"item {item_id}'s file cannot be made into a thumbnail: {why}") from None
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=3600"})


@router.post("/items", summary="Add an image to the index (needs the token)", openapi_extra=upload_spec(),
             status_code=201, response_model=models.Item,
             responses=models.errors(400, 401, 403, 404, 408, 413, 415, 422, 503))
async def add_item(request: Request, s: StateDep, c: WriterDep) -> dict:
    check_content_type(request)
    with s.bodies.hold() as hold:
        data = await read_body(request, s, hold)
        deadline = Deadline(s.settings.request_timeout_s)
        async with s.gates["write"].admit(s.settings.queue_wait_s(deadline.left())):
            await decode(s, c, data, deadline)  # refuse what is not an image before storing anything
            try:
                item = await on_writer(s, c, lambda index, wait: index.add_image(data, c.bundle, c.upload_dir,
                                                                                 timeout=wait), deadline)
            except ReadOnlyIndex:  # the index reopened read-only since start-up (a rebuild by another user)
                raise read_only_error(c) from None
            except UploadRefused as e:
                raise HTTPException(422, str(e)) from None
            except UserError as e:  # the database busy beyond its timeout
                raise busy(str(e)) from None
    after_write(s, c)
    return public(item, c.links)


@router.delete("/items/{item_id}", summary="Remove an item from the index (needs the token)",
               response_model=models.Removed, responses=models.errors(401, 403, 404, 422, 503))
async def delete_item(s: StateDep, c: WriterDep, item_id: ItemId) -> dict:
    deadline = Deadline(s.settings.request_timeout_s)
    async with s.gates["write"].admit(s.settings.queue_wait_s(deadline.left())):
        try:
            removed = await on_writer(s, c, lambda index, wait: index.remove(item_id, timeout=wait), deadline)
        except ReadOnlyIndex:
            raise read_only_error(c) from None
        except UserError as e:  # the database busy beyond its timeout
            raise busy(str(e)) from None
    if not removed:
        raise HTTPException(404, f"no item {item_id}")
    after_write(s, c)
    return {"removed": item_id}


class TagsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tags: list[Annotated[str, Field(max_length=MAX_TAG_CHARS)]] = Field(max_length=MAX_TAGS)


@router.put("/items/{item_id}/tags", summary="Set an item's tags (needs the token); [] clears them",
            response_model=models.Tags, responses=models.errors(400, 401, 403, 404, 413, 415, 422, 503),
            openapi_extra=json_spec(TagsBody))
async def put_tags(request: Request, s: StateDep, c: WriterDep, item_id: ItemId) -> dict:
    body = await body_of(request, TagsBody)
    deadline = Deadline(s.settings.request_timeout_s)
    async with s.gates["write"].admit(s.settings.queue_wait_s(deadline.left())):
        try:
            tags = await on_writer(s, c, lambda index, wait: index.set_tags(item_id, body.tags, timeout=wait),
                                   deadline)
        except ReadOnlyIndex:
            raise read_only_error(c) from None
        except UserError as e:  # an empty tag, or the database busy beyond its timeout
            if "tag" in str(e):
                raise HTTPException(422, str(e)) from None
            raise busy(str(e)) from None
    if tags is None:
        raise HTTPException(404, f"no item {item_id}")
    return {"id": item_id, "tags": tags}
