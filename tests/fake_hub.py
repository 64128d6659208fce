"""A loopback HTTP server that stands in for the Hugging Face Hub and for plain file hosting.

It speaks the part of the Hub's protocol that `huggingface_hub.snapshot_download` uses (repo
info, the recursive tree listing, HEAD and GET on resolve URLs with the commit and ETag headers)
and serves files under /files/ with HTTP Range support, so downloads by name are tested for
real, over a socket, without the internet. Point HF_ENDPOINT (or DSMD_BEIT3_URL) at `url`.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class FakeHub:
    """Repositories are local folders: `add_repo("owner/name", folder)`; plain files: `add_file(name, path)`."""

    def __init__(self) -> None:
        self.repos: dict[str, Path] = {}
        self.files: dict[str, Path] = {}
        self.requests: list[str] = []
        self.cut_after: int | None = None  # serve at most this many bytes of a file, then drop the connection
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                hub._handle(self, body=False)

            def do_GET(self) -> None:
                hub._handle(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add_repo(self, repo: str, folder: Path) -> None:
        self.repos[repo] = Path(folder)

    def add_file(self, name: str, path: Path) -> None:
        self.files[name] = Path(path)

    @staticmethod
    def sha(repo: str) -> str:
        return hashlib.sha1(repo.encode()).hexdigest()  # a stable 40-hex "commit"

    def _handle(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(h.path).path)
        self.requests.append(f"{h.command} {path}")
        if m := re.fullmatch(r"/api/models/(.+?)/revision/([^/]+)", path):
            repo = m[1]
            if repo not in self.repos:
                return self._send(h, 404, b'{"error":"Repository not found"}', {"X-Error-Code": "RepoNotFound"},
                                  body)
            files = self._files(repo)
            info = {"id": repo, "sha": self.sha(repo), "siblings": [{"rfilename": f} for f in files]}
            return self._json(h, info, body)
        if m := re.fullmatch(r"/api/models/(.+?)/tree/([^/]+)", path):
            repo = m[1]
            if repo not in self.repos:
                return self._send(h, 404, b'{"error":"Repository not found"}', {"X-Error-Code": "RepoNotFound"},
                                  body)
            listing = [{"type": "file", "path": f, "size": p.stat().st_size,
                        "oid": hashlib.sha1(p.read_bytes()).hexdigest()} for f, p in self._files(repo).items()]
            return self._json(h, listing, body)
        if m := re.fullmatch(r"/(.+?)/resolve/([^/]+)/(.+)", path):
            repo, filename = m[1], m[3]
            file = self._files(repo).get(filename) if repo in self.repos else None
            if file is None:
                return self._send(h, 404, b"not found", {"X-Error-Code": "EntryNotFound"}, body)
            data = file.read_bytes()
            headers = {"X-Repo-Commit": self.sha(repo), "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
            return self._send(h, 200, data, headers, body)
        if path.startswith("/files/") and (file := self.files.get(path.removeprefix("/files/"))) is not None:
            return self._ranged(h, file.read_bytes(), body)
        return self._send(h, 404, b"not found", {}, body)

    def _files(self, repo: str) -> dict[str, Path]:
        root = self.repos[repo]
        return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}

    def _json(self, h: BaseHTTPRequestHandler, obj, body: bool) -> None:
        self._send(h, 200, json.dumps(obj).encode(), {"Content-Type": "application/json"}, body)

    def _ranged(self, h: BaseHTTPRequestHandler, data: bytes, body: bool) -> None:
        start = 0
        if m := re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range", "")):
            start = int(m[1])
            if start >= len(data):
                return self._send(h, 416, b"", {"Content-Range": f"bytes */{len(data)}"}, body)
        status = 206 if start else 200
        headers = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"} if start else {}
        chunk = data[start:]
        if self.cut_after is not None and body:  # announce the whole length, send part of it, hang up
            h.send_response(status)
            for k, v in headers.items():
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(chunk)))
            h.end_headers()
            h.wfile.write(chunk[:self.cut_after])
            h.wfile.flush()
            h.close_connection = True
            return
        self._send(h, status, chunk, headers, body)

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if body:
            h.wfile.write(data)
