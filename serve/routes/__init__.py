"""The HTTP routes, one APIRouter per concern; the app includes them in this order.

    search.py   GET /search, POST /search/image, GET /items/{id}/similar
    query.py    POST /search/vector, /search/mix, /search/batch, /embed, /embed/image (JSON bodies)
    items.py    an item's metadata, image and thumbnail; POST /items, DELETE /items/{id}, its tags
    ops.py      /healthz, /readyz, /info, /metrics and the web page at /
    common.py   what several routes share: search, read and decode uploads, write the index
"""

from __future__ import annotations

from dsmd.serve.routes import items, ops, query, search

ROUTERS = (search.router, query.router, items.router, ops.router)
