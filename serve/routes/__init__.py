"""The HTTP routes, one APIRouter per concern; `create_app` (serve/app.py) includes them in this order."""

from __future__ import annotations

from dsmd.serve.routes import items, ops, search

ROUTERS = (search.router, items.router, ops.router)
