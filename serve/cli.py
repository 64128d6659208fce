"""`dsmd serve`: the search server and its web page under uvicorn."""

from __future__ import annotations

import argparse


def _serve(a: argparse.Namespace) -> int:
    import uvicorn

    from dsmd.serve.app import create_app
    from dsmd.serve.settings import Settings

    settings = Settings.from_env(bundle=a.bundle, index=a.index, token=a.token, variant=a.variant, threads=a.threads)
    app = create_app(settings)
    print(f"serving {settings.index} with {settings.bundle} on http://{a.host}:{a.port}/  (API docs: /docs)",
          flush=True)
    uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level, access_log=False)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    sv = sub.add_parser("serve", help="the search server and its web page")
    sv.add_argument("--bundle", help="encoder bundle (default: $DSMD_BUNDLE or artifacts/bundle)")
    sv.add_argument("--index", help="index folder (default: $DSMD_INDEX or artifacts/index)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--variant", help="bundle variant: fp32 (default), int8, fp16")
    sv.add_argument("--threads", type=int, help="ONNX Runtime threads per encoder (default: all cores)")
    sv.add_argument("--token", help="enable POST /items and DELETE /items/{id} for callers with this token")
    sv.add_argument("--log-level", default="warning")
    sv.set_defaults(run=_serve)
