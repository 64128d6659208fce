"""dsmd.serve: the HTTP search server and its web page, without torch.

    cli.py             `dsmd serve`: settings from flags and DSMD_*, then uvicorn
    connection.py      uvicorn's HTTP protocol with a deadline for request headers (408, then closed)
    settings.py        the server's settings, checked at start-up, and the memory they allow
    app.py             `create_app(settings)`: lifespan, middleware, error handlers, the routers
    state.py           what the app holds while it runs: its collections, gates, caches, writer threads
    collections.py     the named indexes served (--index NAME=PATH), each with its bundle's encoders
    deps.py            the routes' typed dependencies (StateDep, CollectionDep, WriterDep) and parameter types
    routes/common.py   what several routes share: search, read and decode uploads, write the index
    routes/search.py   GET /search, POST /search/image, GET /items/{id}/similar
    routes/query.py    POST /search/vector, /search/mix, /search/batch, /embed, /embed/image
    routes/items.py    an item's metadata, image and thumbnail; POST /items, DELETE /items/{id}, its tags
    routes/ops.py      /healthz, /readyz, /info, /metrics and the web page at /
    models.py          the response bodies, so the OpenAPI spec describes every answer
    middleware.py      latency and status per route for /metrics, nosniff on every response
    admission.py       gates (a fast 503 past capacity), deadlines, clients that leave
    batcher.py         micro-batching of encoder calls off the event loop
    uploads.py         reading an uploaded image from a request, capped in size
    json_body.py       small JSON bodies (queries, tags): capped, validated, described in the spec
    memory.py          resident memory from /proc; malloc tuned so freed buffers do not stay resident
    cache.py           the LRU caches of text embeddings and thumbnails
    metrics.py         the Prometheus metrics
    static/index.html  the web page
"""
