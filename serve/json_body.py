"""Small JSON request bodies (queries, tags): read with a cap before parsing, validated by a
pydantic model, and described in the OpenAPI spec as that model.

FastAPI's own body parameters read the whole body before anything can refuse it; these are read
here instead, so no request can make the server parse more than BODY_LIMIT bytes.
"""

from __future__ import annotations

import json
from typing import TypeVar

from fastapi import HTTPException, Request
from pydantic import BaseModel, ValidationError

BODY_LIMIT = 256 * 1024
M = TypeVar("M", bound=BaseModel)


async def body_of(request: Request, model: type[M]) -> M:
    """The request's JSON body as `model`: a 415 when it is not JSON, a 413 past BODY_LIMIT, a 400 when it
    does not parse, a 422 that names the field when it does not fit the model."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise HTTPException(415, "send a JSON body (Content-Type: application/json)")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > BODY_LIMIT:
        raise HTTPException(413, f"the body is over the limit of {BODY_LIMIT:,} bytes")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > BODY_LIMIT:
            raise HTTPException(413, f"the body is over the limit of {BODY_LIMIT:,} bytes")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: [[[[... nested too deep
        raise HTTPException(400, f"the body is not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise HTTPException(422, f"{where}: {first['msg']}" if where else first["msg"]) from None


def json_spec(model: type[BaseModel]) -> dict:
    """`openapi_extra=` of a route that reads `model` with body_of: its request body in the spec, the
    model's schema with its definitions inlined (the spec's references point elsewhere)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[1]])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}
