"""The server as a hostile client and an operator meet it: big pixels, odd formats, floods, overload,
clients that leave, deadlines, read-only folders, bad settings. Real uvicorn on loopback each time."""

from __future__ import annotations

import asyncio
import io
import os
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from serving import Server, copy_search


@pytest.fixture(scope="module")
def plain(tiny_search, tmp_path_factory):
    bundle, index = copy_search(tiny_search, tmp_path_factory.mktemp("limits"))
    with Server(bundle, index) as s:
        yield s


def _jpeg(side: int, quality: int = 30) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (180, 40, 40)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_a_huge_jpeg_is_decoded_small(plain):
    """6300x6300 px in 0.6 MB: decoded at 1/8 scale by libjpeg, not at 40 Mpixel (~120 MB of RGB)."""
    data = _jpeg(6300)
    before = plain.memory()["VmHWM"]
    r = httpx.post(f"{plain.url}/search/image", files={"file": ("big.jpg", data, "image/jpeg")}, timeout=30)
    assert r.status_code == 200, r.text
    assert plain.memory()["VmHWM"] - before < 40 * 2**20


@pytest.mark.parametrize("fmt", ["TIFF", "ICO", "TGA", "PCX", "SGI", "PPM", "EPS"])
def test_formats_outside_the_list_are_never_decoded(plain, fmt):
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (0, 128, 255)).save(buf, fmt)
    r = httpx.post(f"{plain.url}/search/image", files={"file": ("x", buf.getvalue())})
    assert r.status_code == 422 and "accepted: JPEG, PNG, WEBP, GIF, BMP" in r.json()["detail"], r.text


def test_a_flood_of_big_uploads_stays_under_the_stated_memory_ceiling(plain):
    """64 clients at once, each sending a ~9 MB image: some are served, the rest get a fast 503, and the
    server's peak resident memory (VmHWM from /proc) stays under the ceiling it states in /info."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (2400, 2400, 3), dtype=np.uint8)).save(buf, "JPEG", quality=97)
    data = buf.getvalue()[: 10 * 2**20 - 1]
    info = httpx.get(f"{plain.url}/info").json()
    ceiling = info["memory"]["ceiling_bytes"]
    assert ceiling and len(data) > 5 * 2**20

    async def flood():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=plain.url, timeout=60, limits=limits) as c:
            return await asyncio.gather(*[c.post("/search/image", files={"file": ("big.jpg", data, "image/jpeg")})
                                          for _ in range(128)])

    statuses = [r.status_code for r in asyncio.run(flood())]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 4 and statuses.count(503) > 0
    peak = plain.memory()["VmHWM"]
    assert peak < ceiling, f"peak {peak / 2**20:.0f} MiB over the stated ceiling {ceiling / 2**20:.0f} MiB"
    assert httpx.get(f"{plain.url}/readyz").status_code == 200


def test_past_capacity_the_answer_is_a_fast_503(tiny_search, tmp_path):
    bundle, index = copy_search(tiny_search, tmp_path)
    env = {"DSMD_MAX_TEXT_REQUESTS": "2", "DSMD_ENCODE_DELAY_MS": "300", "DSMD_MAX_BATCH": "1"}
    with Server(bundle, index, env) as s:
        async def burst():
            async with httpx.AsyncClient(base_url=s.url, timeout=30) as c:
                async def one(i):
                    t0 = time.perf_counter()
                    r = await c.get("/search", params={"text": f"a red star {i}"})
                    return r, time.perf_counter() - t0
                return await asyncio.gather(*[one(i) for i in range(12)])

        answers = asyncio.run(burst())
        busy = [(r, dt) for r, dt in answers if r.status_code == 503]
        assert {r.status_code for r, _ in answers} == {200, 503} and len(busy) >= 8
        assert all(r.headers["retry-after"] == "1" and "capacity" in r.json()["detail"] for r, _ in busy)
        assert max(dt for _, dt in busy) < 0.25  # refused at the door, not after waiting
        assert s.metric("dsmd_rejected_total", reason="text") >= 8


def test_a_request_past_its_deadline_gets_a_503(tiny_search, tmp_path):
    bundle, index = copy_search(tiny_search, tmp_path)
    with Server(bundle, index, {"DSMD_REQUEST_TIMEOUT_S": "0.3", "DSMD_ENCODE_DELAY_MS": "1500"}) as s:
        t0 = time.perf_counter()
        r = httpx.get(f"{s.url}/search", params={"text": "a slow query"}, timeout=10)
        assert r.status_code == 503 and "within 0.3 s" in r.json()["detail"]
        assert time.perf_counter() - t0 < 1.0


def test_a_client_that_leaves_is_not_encoded(tiny_search, tmp_path):
    """While the encoder is busy, five clients send a query and hang up: their inputs are dropped."""
    bundle, index = copy_search(tiny_search, tmp_path)
    with Server(bundle, index, {"DSMD_ENCODE_DELAY_MS": "600", "DSMD_MAX_BATCH": "1"}) as s:
        async def main():
            async with httpx.AsyncClient(base_url=s.url, timeout=30) as c:
                first = asyncio.create_task(c.get("/search", params={"text": "keeps the encoder busy"}))
                await asyncio.sleep(0.2)
                for i in range(5):
                    with socket.create_connection(("127.0.0.1", s.port)) as sock:
                        sock.sendall(f"GET /search?text=gone+{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                        await asyncio.sleep(0.05)
                return await first

        assert asyncio.run(main()).status_code == 200
        time.sleep(1.0)
        assert s.metric("dsmd_encoder_dropped_total", encoder="text") == 5
        assert s.metric("dsmd_encoder_batch_size_count", encoder="text") == 1  # only the first (warm-up is direct)


def test_read_only_serving(tiny_search, tmp_path):
    bundle, index = copy_search(tiny_search, tmp_path)
    with Server(bundle, index, {"DSMD_TOKEN": "t"}, args=("--read-only",)) as s:
        assert httpx.get(f"{s.url}/search", params={"text": "a blue star"}).status_code == 200
        r = httpx.post(f"{s.url}/items", files={"file": ("a.jpg", _jpeg(32))}, headers={"authorization": "Bearer t"})
        assert r.status_code == 403 and "read-only" in r.json()["detail"] and "--read-only" in r.json()["detail"]
        assert httpx.get(f"{s.url}/info").json()["index"]["writes"] is False


def test_an_index_folder_the_server_cannot_write_gets_a_403_that_says_why(tiny_search, tmp_path):
    """A host folder owned by another user is read-only to the container's uid: the 403 says so, and what to
    do. Root may write anywhere, so the server here sees the folder as another uid would (os.access says no)."""
    bundle, index = copy_search(tiny_search, tmp_path)
    s = Server(bundle, index, {"DSMD_TOKEN": "t"})
    deny = (f"import os, sys; real = os.access; os.access = lambda p, mode, **kw: not (mode & os.W_OK and "
            f"str(p).startswith({str(index)!r})) and real(p, mode, **kw); from dsmd.cli import main; "
            f"sys.exit(main(sys.argv[1:]))")
    s.cmd = [sys.executable, "-c", deny, *s.cmd[s.cmd.index("serve"):]]
    with s:
        assert httpx.get(f"{s.url}/info").json()["index"]["writes"] is False
        r = httpx.post(f"{s.url}/items", files={"file": ("a.jpg", _jpeg(32))}, headers={"authorization": "Bearer t"})
        detail = r.json()["detail"]
        assert r.status_code == 403 and "read-only" in detail and str(index) in detail, detail
        assert f"uid {os.geteuid()}" in detail and "owned by another user" in detail and "mount it writable" in detail
        assert httpx.delete(f"{s.url}/items/1", headers={"authorization": "Bearer t"}).status_code == 403
        assert httpx.post(f"{s.url}/items", files={"file": ("a.jpg", _jpeg(32))}).status_code == 401  # token first


def test_writes_check_the_token_before_the_parameters(plain):
    for r in (httpx.delete(f"{plain.url}/items/not-a-number"), httpx.delete(f"{plain.url}/items/0"),
              httpx.post(f"{plain.url}/items", content=b"x", headers={"content-type": "text/plain"})):
        assert r.status_code == 403, r.text  # no token configured on this server: writes are off


def test_small_leaks_are_closed(plain, tiny_world):
    first = httpx.get(f"{plain.url}/search", params={"text": "a red circle", "k": 1}).json()["results"][0]
    image = httpx.get(plain.url + first["image_url"])
    assert image.headers["x-content-type-options"] == "nosniff"
    missing = httpx.get(f"{plain.url}/items/999999/thumbnail")
    assert missing.status_code == 404 and "/" not in missing.json()["detail"]


def test_a_bad_setting_stops_start_up_with_a_clear_message(tiny_search):
    done = subprocess.run([sys.executable, "-m", "dsmd.cli", "serve", "--bundle", str(tiny_search / "bundle"),
                           "--index", str(tiny_search / "index")], env={**os.environ, "DSMD_MAX_K": "-1"},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "DSMD_MAX_K" in done.stderr and "Traceback" not in done.stderr


def test_the_token_comes_from_a_file(tiny_search, tmp_path):
    bundle, index = copy_search(tiny_search, tmp_path)
    (tmp_path / "token").write_text("from-a-file\n")
    with Server(bundle, index, args=("--token-file", str(tmp_path / "token"))) as s:
        assert httpx.delete(f"{s.url}/items/1").status_code == 401
        assert httpx.delete(f"{s.url}/items/not-a-number").status_code == 401  # authentication before validation
        assert httpx.delete(f"{s.url}/items/1", headers={"authorization": "Bearer from-a-file"}).status_code == 200
