"""Reading an uploaded image from a request: multipart (field `file`) or JSON base64, with a size cap
that holds whatever the client claims; and the OpenAPI description of that body."""

from __future__ import annotations

import base64
import binascii
import json

from fastapi import HTTPException, Request
from starlette.formparsers import MultiPartException

from dsmd.serve.settings import Settings


async def read_upload(request: Request, settings: Settings) -> bytes:
    """The image bytes of a multipart upload (field `file`) or a JSON body {"image_base64": ...},
    read with a size cap whatever the client claims."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in ("multipart/form-data", "application/json"):
        raise HTTPException(415, "send the image as multipart/form-data (field 'file') or as JSON "
                                 "{\"image_base64\": ...}")
    limit = settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit * 4 // 3 + 65536:
        raise HTTPException(413, f"the upload is over the limit of {limit:,} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit * 4 // 3 + 65536:
            raise HTTPException(413, f"the upload is over the limit of {limit:,} bytes")
    request._body = bytes(body)  # let Starlette parse the form from what we read
    if ctype == "application/json":
        try:
            payload = json.loads(body)
            data = base64.b64decode(payload["image_base64"], validate=True)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, binascii.Error, ValueError,
                RecursionError):
            raise HTTPException(422, "the JSON body must be {\"image_base64\": \"<base64 of the image file>\"}") \
                from None
    else:
        try:
            form = await request.form(max_files=1, max_fields=10)
        except (MultiPartException, ValueError, KeyError, AssertionError) as e:
            raise HTTPException(400, f"cannot parse the multipart body: {e}") from None
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise HTTPException(422, "the multipart body needs the image in a field named 'file'")
        data = await upload.read()
    if len(data) > limit:
        raise HTTPException(413, f"the image is {len(data):,} bytes, over the limit of {limit:,}")
    if not data:
        raise HTTPException(422, "the image is empty")
    return data


def upload_spec() -> dict:
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                           "properties": {"file": {"type": "string", "format": "binary"}}}},
        "application/json": {"schema": {"type": "object", "required": ["image_base64"],
                                        "properties": {"image_base64": {"type": "string", "format": "byte"}}}}}}}
