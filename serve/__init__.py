"""dsmd.serve: the HTTP search server and its web page, without torch.

    app.py       `create_app(settings)`: the FastAPI routes and what the app holds while it runs
    batcher.py   micro-batching of encoder calls off the event loop
    uploads.py   reading an uploaded image from a request, capped in size
    cache.py, metrics.py, settings.py, static/index.html (the web page)
"""
