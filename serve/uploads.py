"""Reading an uploaded image from a request: multipart (field `file`) or JSON base64.

The body is read with a size cap that holds whatever the client declares (a chunked upload
is cut off at the limit), through Starlette's public `request.stream()`; parsing it (JSON,
base64, multipart) runs in a worker thread, so a 13 MiB body never stalls the event loop.
"""

from __future__ import annotations

import base64
import binascii
import json

from fastapi import HTTPException, Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

CONTENT_TYPES = ("multipart/form-data", "application/json")


def body_limit(max_upload_bytes: int) -> int:
    """The largest body that can carry an image of `max_upload_bytes` (base64 grows it by a third)."""
    return max_upload_bytes * 4 // 3 + 65536


def check_content_type(request: Request) -> str:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in CONTENT_TYPES:
        raise HTTPException(415, "send the image as multipart/form-data (field 'file') or as JSON "
                                 "{\"image_base64\": ...}")
    return ctype


async def read_upload(request: Request, max_upload_bytes: int) -> bytes:
    """The image bytes of the request, or a 4xx that says what is wrong with it."""
    ctype = check_content_type(request)
    limit = body_limit(max_upload_bytes)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"the upload is over the limit of {max_upload_bytes:,} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, f"the upload is over the limit of {max_upload_bytes:,} bytes")
    header = request.headers.get("content-type", "")
    data = await run_in_threadpool(parse_body, body, ctype, header)
    del body
    if len(data) > max_upload_bytes:
        raise HTTPException(413, f"the image is {len(data):,} bytes, over the limit of {max_upload_bytes:,}")
    if not data:
        raise HTTPException(422, "the image is empty")
    return data


def parse_body(body: bytearray, ctype: str, header: str) -> bytes:
    """The image bytes out of a JSON or multipart body (runs in a worker thread)."""
    if ctype == "application/json":
        try:
            payload = json.loads(body)
            return base64.b64decode(payload["image_base64"], validate=True)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, binascii.Error, ValueError,
                RecursionError):
            raise HTTPException(422, "the JSON body must be {\"image_base64\": \"<base64 of the image file>\"}") \
                from None
    return _multipart_file(body, header)


def _multipart_file(body: bytearray, header: str) -> bytes:
    """The content of the part named `file` (python-multipart's streaming parser, fed the whole body)."""
    _, params = parse_options_header(header)
    boundary = params.get(b"boundary")
    if not boundary:
        raise HTTPException(400, "cannot parse the multipart body: no boundary in its content type")
    parts: list[dict] = []
    state: dict = {}

    def on_part_begin() -> None:
        state.update(headers={}, field=b"", value=b"", data=bytearray())

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["field"].lower()] = state["value"]
        state["field"], state["value"] = b"", b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        state["data"] += data[start:end]

    def on_part_end() -> None:
        parts.append({"headers": state["headers"], "data": state["data"]})
        if len(parts) > 10:
            raise HTTPException(400, "cannot parse the multipart body: more than 10 parts")

    parser = MultipartParser(boundary, {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                                        "on_header_value": on_header_value, "on_header_end": on_header_end,
                                        "on_part_data": on_part_data, "on_part_end": on_part_end})
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as e:
        raise HTTPException(400, f"cannot parse the multipart body: {e}") from None
    for part in parts:
        _, disposition = parse_options_header(part["headers"].get(b"content-disposition", b""))
        if disposition.get(b"name") == b"file":
            return bytes(part["data"])
    raise HTTPException(422, "the multipart body needs the image in a field named 'file'")


def upload_spec() -> dict:
    """The request body of the upload endpoints, for the OpenAPI spec."""
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                           "properties": {"file": {"type": "string", "format": "binary"}}}},
        "application/json": {"schema": {"type": "object", "required": ["image_base64"],
                                        "properties": {"image_base64": {"type": "string", "format": "byte"}}}}}}}
