"""The one middleware: latency and status per route for /metrics, and nosniff on every answer.

Pure ASGI rather than `@app.middleware("http")`: Starlette's BaseHTTPMiddleware passes every
response through a stream and a task of its own, a cost each request would pay.
"""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class Measure:
    """Pure ASGI middleware: latency and status per route, and nosniff on every response."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", []).append((b"x-content-type-options", b"nosniff"))
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            state = getattr(scope.get("app").state, "s", None) if scope.get("app") else None
            if state is not None:
                route = scope.get("route")
                state.metrics.observe(getattr(route, "path", "other"), status, time.perf_counter() - t0)
