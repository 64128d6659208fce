"""Reading an uploaded image from a request: multipart (field `file`) or JSON base64.

The body is read with a size cap that holds whatever the client declares (a chunked upload
is cut off at the limit), through Starlette's public `request.stream()`; parsing it (base64,
multipart) runs in a worker thread, so a 13 MiB body never stalls the event loop.

A JSON body has one valid shape, `{"image_base64": "<base64>"}`, and it is matched as bytes,
never handed to `json.loads`: 13 MiB of `[{},{},...]` would build 4 million dicts (330 MiB) before
anyone looked at them. A body that does not start that way is refused after its first bytes.
"""

from __future__ import annotations

import binascii
import re

from fastapi import HTTPException, Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

CONTENT_TYPES = ("multipart/form-data", "application/json")
JSON_SHAPE = "the JSON body must be {\"image_base64\": \"<base64 of the image file>\"} and nothing else"
_WS = rb"[ \t\r\n]*"  # JSON's whitespace
_JSON_HEAD = re.compile(_WS + rb'\{' + _WS + rb'"image_base64"' + _WS + rb":" + _WS + rb'"')
_JSON_BODY = re.compile(_JSON_HEAD.pattern + rb'([A-Za-z0-9+/=\\]*)"' + _WS + rb"\}" + _WS)
HEAD_BYTES = 4096  # a JSON body whose first 4 KiB are not the head of that shape is refused there


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
    body, checked = bytearray(), ctype != "application/json"
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, f"the upload is over the limit of {max_upload_bytes:,} bytes")
        if not checked and len(body) >= HEAD_BYTES:
            check_json_head(body)
            checked = True
    header = request.headers.get("content-type", "")
    data = await run_in_threadpool(parse_body, body, ctype, header)
    del body
    if len(data) > max_upload_bytes:
        raise HTTPException(413, f"the image is {len(data):,} bytes, over the limit of {max_upload_bytes:,}")
    if not data:
        raise HTTPException(422, "the image is empty")
    return data


def check_json_head(body: bytearray) -> None:
    """A 422 unless the body starts as `{"image_base64": "` (with JSON whitespace anywhere between)."""
    if not _JSON_HEAD.match(body):
        raise HTTPException(422, JSON_SHAPE)


def parse_body(body: bytearray, ctype: str, header: str) -> bytes:
    """The image bytes out of a JSON or multipart body (runs in a worker thread)."""
    if ctype == "application/json":
        return json_image(body)
    return _multipart_file(body, header)


def json_image(body: bytearray) -> bytes:
    """The image of a `{"image_base64": "..."}` body, matched over the raw bytes and decoded from a view
    of them: no Python objects for whatever else a body holds, and one copy (the image's bytes).
    JSON's escaped slash (`\\/`, which some encoders write) is the only escape a base64 string needs."""
    m = _JSON_BODY.fullmatch(body)
    if m is None:
        raise HTTPException(422, JSON_SHAPE)
    start, end = m.span(1)
    del m  # a match holds its subject
    escapes = body.count(b"\\", start, end)
    if escapes != body.count(b"\\/", start, end):
        raise HTTPException(422, f"image_base64 holds a JSON escape other than \\/: {JSON_SHAPE}")
    # the shape has no backslash outside the string: dropping them all leaves the string where it was
    clean = body.translate(None, b"\\") if escapes else body
    with memoryview(clean) as view:  # released on leaving, or the body could not be freed
        try:
            return binascii.a2b_base64(view[start:end - escapes], strict_mode=True)
        except (binascii.Error, ValueError):
            pass
    raise HTTPException(422, f"image_base64 is not valid base64 (RFC 4648, with its padding): {JSON_SHAPE}")


def _multipart_file(body: bytearray, header: str) -> bytes:
    """The content of the part named `file` (python-multipart's streaming parser, fed the whole body);
    parts are kept as views of the body, so the body and the file's bytes are all it holds."""
    _, params = parse_options_header(header)
    boundary = params.get(b"boundary")
    if not boundary:
        raise HTTPException(400, "cannot parse the multipart body: no boundary in its content type")
    parts: list[dict] = []
    state: dict = {}

    def on_part_begin() -> None:
        state.update(headers={}, field=b"", value=b"", data=[])

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["field"].lower()] = state["value"]
        state["field"], state["value"] = b"", b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        state["data"].append(memoryview(data)[start:end])  # views of the body: one copy in all, at the end

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
            return b"".join(part["data"])
    raise HTTPException(422, "the multipart body needs the image in a field named 'file'")


def upload_spec() -> dict:
    """The request body of the upload endpoints, for the OpenAPI spec."""
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                           "properties": {"file": {"type": "string", "format": "binary"}}}},
        "application/json": {"schema": {"type": "object", "required": ["image_base64"],
                                        "properties": {"image_base64": {"type": "string", "format": "byte"}}}}}}}
