"""`dsmd serve`: the search server and its web page under uvicorn."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def _serve(a: argparse.Namespace) -> int:
    import uvicorn

    from dsmd.serve.app import create_app
    from dsmd.serve.collections import check_backend, named_entry, specs
    from dsmd.serve.connection import http_protocol
    from dsmd.serve.settings import Settings

    bundles = a.bundle or []
    if bundles and all(named_entry(b) for b in bundles):  # named ones only: the others keep the default bundle
        bundles = [os.environ.get("DSMD_BUNDLE") or Settings.model_fields["bundle"].default, *bundles]
    indexes = a.index or []
    if len(indexes) > 1:  # several: each entry named (by its folder when not by the user), so commas split them
        indexes = [i if named_entry(i) else f"{Path(i).name}={i}" for i in indexes]
    joined = lambda values: ",".join(values) if values else None  # noqa: E731
    settings = Settings.from_env(bundle=joined(bundles), index=joined(indexes), token_file=a.token_file,
                                 variant=a.variant,
                                 threads=a.threads, writes=False if a.read_only else None,
                                 backend=a.backend, milvus_uri=a.milvus_uri)
    check_backend(settings)
    app = create_app(settings)
    served = ", ".join(f"{c.name} ({c.index} with {c.bundle})" for c in specs(settings.index, settings.bundle))
    print(f"serving {served} on http://{a.host}:{a.port}/  (API docs: /docs)", flush=True)
    uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level, access_log=False,
                http=http_protocol(settings.header_timeout_s))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    sv = sub.add_parser("serve", help="the search server and its web page",
                        description="Every setting also reads from a DSMD_* environment variable (DSMD_MAX_K, "
                        "DSMD_REQUEST_TIMEOUT_S, ...: see serve/settings.py); flags override them.",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sv.add_argument("--bundle", action="append", help="encoder bundle (default: $DSMD_BUNDLE or artifacts/bundle); "
                    "NAME=PATH gives collection NAME its own, a bare PATH serves the others")
    sv.add_argument("--index", action="append", help="index folder (default: $DSMD_INDEX or artifacts/index); "
                    "several collections: --index NAME=PATH once each (the first is the default; requests pick "
                    "one with ?collection=NAME)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--variant", help="bundle variant: fp32 (default), int8, fp16; the index must have been built "
                    "with the same one")
    sv.add_argument("--backend", choices=["faiss", "milvus"], help="where the index's vectors are searched (default: "
                    "what the index was built with; given, it must match)")
    sv.add_argument("--milvus-uri", help="a Milvus-backed index: the Milvus server or Milvus Lite file holding its "
                    "vectors, when not the one it was built with (token in DSMD_MILVUS_TOKEN)")
    sv.add_argument("--threads", type=int, help="ONNX Runtime threads per encoder (default: the usable cores)")
    sv.add_argument("--token-file", help="enable POST /items and DELETE /items/{id} for callers presenting the "
                    "token in this file (or set DSMD_TOKEN; a token on the command line would show in ps)")
    sv.add_argument("--read-only", action="store_true", help="never write the index (also automatic when its "
                    "folder cannot be written)")
    sv.add_argument("--log-level", default="warning")
    sv.set_defaults(run=_serve)
