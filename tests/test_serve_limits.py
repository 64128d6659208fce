"""The server as a hostile client and an operator meet it: big pixels, odd formats, floods, overload,
clients that leave, deadlines, read-only folders, bad settings. Real uvicorn on loopback each time.

Overload tests assert order and counts, never timings: a gate slot is held by a slow encoder
(`DSMD_ENCODE_DELAY_MS`), a named pipe the server reads or the index's folder lock held by the test,
body bytes by an upload whose body stops half-way; the test waits for the server's own gauges in
/metrics, and only then sends what must be refused. Tests of the refusal past a gate set
DSMD_ADMISSION_QUEUE=0 (no queue); the queue itself is tested in test_serve_admission.py."""

from __future__ import annotations

import asyncio
import base64
import fcntl
import io
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable

import httpx
import numpy as np
import pytest
from PIL import Image
from serving import Server, copy_search, pipe_opened

WAIT_S = 30  # how long a condition polled in /metrics may take to come true: generous, a shared machine


@pytest.fixture(scope="module")
def plain(tiny_search, tmp_path_factory):
    bundle, index = copy_search(tiny_search, tmp_path_factory.mktemp("limits"))
    with Server(bundle, index) as s:
        yield s


def _jpeg(side: int, quality: int = 30) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (180, 40, 40)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


async def _until(condition: Callable[[], bool], what: str) -> None:
    """Poll `condition()` until it holds, sleeping on the event loop in between (the test's requests go on)."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"still not {what} after {WAIT_S} s"
        await asyncio.sleep(0.02)


def _stalled(c: httpx.AsyncClient, url: str, body: bytes,
             headers: dict[str, str]) -> tuple[asyncio.Task, asyncio.Event]:
    """A POST whose body stops half-way until the event is set: it holds its gate slot for as long as
    the test wants, with no clock involved."""
    release = asyncio.Event()

    async def content():
        yield body[: len(body) // 2]
        await release.wait()
        yield body[len(body) // 2:]

    sent = c.post(url, content=content(), headers={**headers, "content-length": str(len(body))})
    return asyncio.create_task(sent), release


async def _head_only(port: int, method: str, path: str, headers: dict[str, str],
                     declared: int = 100000) -> tuple[int, dict[str, str], dict]:
    """Send a request's head declaring a body that never comes, and read the answer: only a server that
    answers before reading the body can answer at all (one that waited would time out here)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [f"{method} {path} HTTP/1.1", "host: x", "content-type: application/json", f"content-length: {declared}",
             *(f"{k}: {v}" for k, v in headers.items())]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 15)
        status_line, *fields = head.decode().strip().split("\r\n")
        got = {k.lower(): v.strip() for k, v in (f.split(":", 1) for f in fields)}
        body = await reader.readexactly(int(got["content-length"]))
    except asyncio.TimeoutError:
        raise AssertionError(f"no answer to {method} {path} in 15 s: the server is waiting for its body") from None
    finally:
        writer.close()
    return int(status_line.split()[1]), got, json.loads(body)


def _json_upload(image: bytes) -> bytes:
    return json.dumps({"image_base64": base64.b64encode(image).decode()}).encode()


def test_a_huge_jpeg_is_decoded_small(plain):
    """6300x6300 px in 0.6 MB: libjpeg decodes it at 1/8 scale (788x788), never at 40 Mpixel (151 MiB at
    Pillow's 4 bytes a pixel; 12 Mpixel is the limit, checked after the reduction, so a 200 says that too).
    The peak is reset just before the request, so it is this request's, not start-up's."""
    data = _jpeg(6300)
    reduced = math.ceil(6300 / 8) ** 2
    bound = 4 * len(data) + 2 * 4 * reduced + 16 * 2**20  # the upload's copies, the image and one copy, slack
    start = plain.reset_peak()
    r = httpx.post(f"{plain.url}/search/image", files={"file": ("big.jpg", data, "image/jpeg")}, timeout=30)
    assert r.status_code == 200, r.text
    rise = plain.memory()["VmHWM"] - start
    assert rise < bound, f"the peak rose by {rise / 2**20:.0f} MiB, over {bound / 2**20:.0f} MiB"


@pytest.mark.parametrize("fmt", ["TIFF", "ICO", "TGA", "PCX", "SGI", "PPM", "EPS"])
def test_formats_outside_the_list_are_never_decoded(plain, fmt):
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (0, 128, 255)).save(buf, fmt)
    r = httpx.post(f"{plain.url}/search/image", files={"file": ("x", buf.getvalue())})
    assert r.status_code == 422 and "accepted: JPEG, PNG, WEBP, GIF, BMP" in r.json()["detail"], r.text


def test_heic_uploads_are_refused_with_the_reason(plain):
    """Folders may hold HEIC photos (indexed with pillow-heif), the upload allow-list does not."""
    import pillow_heif

    pillow_heif.register_heif_opener()
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (0, 128, 255)).save(buf, "HEIF")
    r = httpx.post(f"{plain.url}/search/image", files={"file": ("x.heic", buf.getvalue())})
    assert r.status_code == 422 and "a HEIC/HEIF photo; not accepted here" in r.json()["detail"], r.text


FLOOD_BODY = 4 * 2**20 * 4 // 3 + 65536  # the largest body that carries an image of max_upload_bytes (base64)
FLOOD_LIMITS = {"body_budget_bytes": 2 * FLOOD_BODY, "max_image_requests": 2, "decode_slots": 1,
                "max_upload_bytes": 4 * 2**20, "max_pixels": 2000 * 2000}


def test_a_flood_of_big_uploads_raises_the_peak_by_no_more_than_the_limits_allow(tiny_search, tmp_path):
    """32 clients at once, each sending a PNG as big as the limits allow (3.5 MB, 4 Mpixel, which PNG
    decodes in full). The peak may rise by at most: the body budget (two of the largest bodies) and up to
    three copies of each body while it is parsed; per decode slot, the decoded image and one copy at 4
    bytes a pixel (Pillow keeps RGB in 32 bits); and 32 MiB of slack: 106 MiB here. The same flood raised
    it by 300 to 420 MiB with the gates opened wide (1000 uploads, 1000 decodes, no pixel cap), by 200 MiB
    with only the upload gate open."""
    lim = FLOOD_LIMITS
    bound = 4 * lim["body_budget_bytes"] + lim["decode_slots"] * 2 * 4 * lim["max_pixels"] + 32 * 2**20
    pixels = np.full((2000, 2000, 3), (200, 30, 30), np.uint8)
    pixels[:600] = np.random.default_rng(0).integers(0, 256, (600, 2000, 3), dtype=np.uint8)  # a big file too
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", compress_level=1)
    data = buf.getvalue()
    assert 3 * 2**20 < len(data) <= lim["max_upload_bytes"] and pixels.shape[0] * pixels.shape[1] == lim["max_pixels"]
    bundle, index = copy_search(tiny_search, tmp_path)
    env = {f"DSMD_{k.upper()}": str(v) for k, v in lim.items()} | {"DSMD_REQUEST_TIMEOUT_S": "60"}
    with Server(bundle, index, env) as s:
        ceiling = httpx.get(f"{s.url}/info").json()["memory"]["ceiling_bytes"]

        async def flood():
            async with httpx.AsyncClient(base_url=s.url, timeout=60, limits=httpx.Limits(max_connections=32)) as c:
                return await asyncio.gather(*[c.post("/search/image", files={"file": ("big.png", data, "image/png")})
                                              for _ in range(32)])

        start = s.reset_peak()
        statuses = [r.status_code for r in asyncio.run(flood())]
        peak = s.memory()["VmHWM"]
        assert set(statuses) <= {200, 503} and statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
        refused = s.metric("dsmd_rejected_total", reason="body") + s.metric("dsmd_rejected_total", reason="image")
        assert refused == statuses.count(503)
        assert peak - start < bound, f"the peak rose by {(peak - start) / 2**20:.0f} MiB, over {bound / 2**20:.0f}"
        assert peak < ceiling, f"peak {peak / 2**20:.0f} MiB over the stated ceiling {ceiling / 2**20:.0f} MiB"
        assert httpx.get(f"{s.url}/readyz").status_code == 200


def test_past_capacity_a_search_is_refused_at_once_and_the_admitted_ones_are_served(tiny_search, tmp_path):
    """Two searches fill the text gate (a slow encoder keeps them inside) and there is no queue; ten more,
    sent once the gauge says they are inside, all get a 503 with Retry-After (decided while the two were
    inside, so before either was answered: a gate is left before the answer is sent); then both are served."""
    bundle, index = copy_search(tiny_search, tmp_path)
    env = {"DSMD_MAX_TEXT_REQUESTS": "2", "DSMD_ENCODE_DELAY_MS": "1500", "DSMD_ADMISSION_QUEUE": "0"}
    with Server(bundle, index, env) as s:
        async def main():
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
                inside = [asyncio.create_task(c.get("/search", params={"text": f"admitted {i}"})) for i in range(2)]
                await _until(lambda: s.metric("dsmd_in_flight", gate="text") == 2, "two searches inside")
                refused = await asyncio.gather(*[c.get("/search", params={"text": f"refused {i}"}) for i in range(10)])
                return refused, await asyncio.gather(*inside)

        refused, admitted = asyncio.run(main())
        assert [r.status_code for r in refused] == [503] * 10
        assert all(r.headers["retry-after"] == "1" and "capacity (2 text requests at once, 0 waiting)"
                   in r.json()["detail"] for r in refused)
        assert [r.status_code for r in admitted] == [200, 200]
        assert s.metric("dsmd_rejected_total", reason="text") == 10
        assert s.metric("dsmd_in_flight", gate="text") == 0
        assert httpx.get(f"{s.url}/search", params={"text": "admitted 0"}).status_code == 200  # cached: no encoder


def test_past_the_body_budget_an_upload_is_refused_before_its_body_is_read(tiny_search, tmp_path):
    """Two uploads whose bodies stop half-way hold 40 kB of a 150 kB budget for bodies, and no image slot:
    a whole small upload is served meanwhile, and one whose head declares 120 kB is answered 503 at once
    (before its body, which never comes, was read). Once the two bodies arrive both are served."""
    bundle, index = copy_search(tiny_search, tmp_path)
    env = {"DSMD_MAX_UPLOAD_BYTES": "60000", "DSMD_BODY_BUDGET_BYTES": "150000", "DSMD_BODY_GRACE_S": "60",
           "DSMD_MAX_IMAGE_REQUESTS": "1", "DSMD_REQUEST_TIMEOUT_S": "60"}
    with Server(bundle, index, env) as s:
        noise = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 100, 3), dtype=np.uint8)).save(noise, "PNG")
        big, small = _json_upload(noise.getvalue()), _json_upload(_jpeg(64))
        json_type = {"content-type": "application/json"}
        assert 38_000 < len(big) < 45_000

        async def main():
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
                held = [_stalled(c, "/search/image", big, json_type) for _ in range(2)]
                await _until(lambda: s.metric("dsmd_upload_body_bytes") >= 2 * (len(big) // 2), "two half bodies in")
                whole = await c.post("/search/image", content=small, headers=json_type)
                head_only = await _head_only(s.port, "POST", "/search/image", {}, declared=120_000)
                assert not any(task.done() for task, _ in held)
                for _, release in held:
                    release.set()
                served = await asyncio.gather(*(task for task, _ in held))
                return head_only, whole, served

        (status, headers, detail), whole, served = asyncio.run(main())
        assert whole.status_code == 200, whole.text
        assert status == 503 and headers["retry-after"] == "1", detail
        assert "150,000-byte budget for bodies" in detail["detail"]
        assert [r.status_code for r in served] == [200, 200], [r.text for r in served]
        assert s.metric("dsmd_rejected_total", reason="body") == 1
        assert s.metric("dsmd_upload_body_bytes") == 0 and s.metric("dsmd_upload_bodies_reading") == 0


def test_past_the_encoder_queue_the_answer_is_a_503(tiny_search, tmp_path):
    """One input in the (slow) encoder, one waiting in a queue of one: the next search is admitted by its
    gate but refused by the queue, at once; the two before it are served."""
    bundle, index = copy_search(tiny_search, tmp_path)
    env = {"DSMD_MAX_QUEUE": "1", "DSMD_MAX_BATCH": "1", "DSMD_ENCODE_DELAY_MS": "1500"}
    with Server(bundle, index, env) as s:
        async def main():
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
                first = asyncio.create_task(c.get("/search", params={"text": "in the encoder"}))
                await _until(lambda: s.metric("dsmd_in_flight", gate="text") == 1
                             and s.metric("dsmd_encoder_queued", encoder="text") == 0, "the first one taken")
                second = asyncio.create_task(c.get("/search", params={"text": "in the queue"}))
                await _until(lambda: s.metric("dsmd_encoder_queued", encoder="text") == 1, "the second one queued")
                third = await c.get("/search", params={"text": "one too many"})
                return third, await first, await second

        third, first, second = asyncio.run(main())
        assert third.status_code == 503 and third.headers["retry-after"] == "1", third.text[:200]
        assert "the text encoder has 1 inputs waiting" in third.json()["detail"]
        assert first.status_code == second.status_code == 200
        assert s.metric("dsmd_rejected_total", reason="queue") == 1
        assert s.metric("dsmd_encoder_batch_size_sum", encoder="text") == 2  # the third was never encoded


def test_a_request_past_its_deadline_gets_a_503_and_its_input_is_not_encoded(tiny_search, tmp_path):
    """A 0.3 s deadline and an encoder that takes 1.5 s: the answer is the deadline's 503 (had the
    server waited for the encoder, it would have had the result and answered 200), and the encoder,
    when it gets to the input, drops it instead of encoding it."""
    bundle, index = copy_search(tiny_search, tmp_path)
    with Server(bundle, index, {"DSMD_REQUEST_TIMEOUT_S": "0.3", "DSMD_ENCODE_DELAY_MS": "1500"}) as s:
        r = httpx.get(f"{s.url}/search", params={"text": "a slow query"}, timeout=30)
        assert r.status_code == 503 and "within 0.3 s" in r.json()["detail"] and r.headers["retry-after"] == "1"
        assert s.metric("dsmd_in_flight", gate="text") == 0
        dropped = lambda: s.metric("dsmd_encoder_dropped_total", encoder="text")  # noqa: E731
        encoded = lambda: s.metric("dsmd_encoder_batch_size_sum", encoder="text")  # noqa: E731
        asyncio.run(_until(lambda: dropped() + encoded() == 1, "the input dropped or encoded"))
        assert (dropped(), encoded()) == (1, 0)


def test_a_client_that_leaves_is_not_encoded(tiny_search, tmp_path):
    """While the (slow) encoder works on one query, five clients send theirs and hang up: once the
    server has seen them go, all five inputs are dropped, none encoded."""
    bundle, index = copy_search(tiny_search, tmp_path)
    with Server(bundle, index, {"DSMD_ENCODE_DELAY_MS": "1500", "DSMD_MAX_BATCH": "1"}) as s:
        inside = lambda: s.metric("dsmd_in_flight", gate="text")  # noqa: E731

        async def main():
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
                first = asyncio.create_task(c.get("/search", params={"text": "keeps the encoder busy"}))
                await _until(lambda: inside() == 1, "the first one inside")
                gone = [await asyncio.open_connection("127.0.0.1", s.port) for _ in range(5)]
                for i, (_, writer) in enumerate(gone):
                    writer.write(f"GET /search?text=gone+{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                await _until(lambda: inside() == 6, "all five inside")
                for _, writer in gone:
                    writer.close()
                await _until(lambda: inside() == 1, "all five seen gone")
                return await first

        assert asyncio.run(main()).status_code == 200
        dropped = lambda: s.metric("dsmd_encoder_dropped_total", encoder="text")  # noqa: E731
        encoded = lambda: s.metric("dsmd_encoder_batch_size_sum", encoder="text")  # noqa: E731
        asyncio.run(_until(lambda: dropped() + encoded() == 6, "all six inputs dropped or encoded"))
        assert (dropped(), encoded()) == (5, 1)  # only the first (the warm-up runs the model directly)


def test_a_dead_encoder_makes_the_server_unready_but_it_stays_up(tiny_search, tmp_path):
    """The text encoder's worker thread dies on its first input (an encode delay no clock can sleep:
    time.sleep raises). /readyz turns 503 and says which encoder, the process lives on, and what needs no
    text encoder still works. The request the thread held when it died, and every text search after, is
    answered 503 "stopped" at once (a 60 s deadline: waiting it out would trip the client's 30 s timeout)."""
    bundle, index = copy_search(tiny_search, tmp_path)
    # the one way to kill it in a real server: errors raised by the model are handed to the requests
    with Server(bundle, index, {"DSMD_ENCODE_DELAY_MS": "1e30", "DSMD_REQUEST_TIMEOUT_S": "60"}) as s:
        r = httpx.get(f"{s.url}/search", params={"text": "kills it"}, timeout=30)
        assert r.status_code == 503 and "the text encoder has stopped" in r.json()["detail"], r.text
        assert "retry-after" not in r.headers  # retrying cannot help: it needs a restart
        asyncio.run(_until(lambda: httpx.get(f"{s.url}/readyz").status_code == 503, "unready"))
        assert httpx.get(f"{s.url}/readyz").json() == {"ready": False, "encoders": {"text": False, "image": True}}
        assert s.proc.poll() is None and httpx.get(f"{s.url}/healthz").status_code == 200
        r = httpx.get(f"{s.url}/search", params={"text": "after it died"}, timeout=30)
        assert r.status_code == 503 and "the text encoder has stopped" in r.json()["detail"], r.text
        assert httpx.get(f"{s.url}/items/1/similar", params={"k": 1}).json()["results"][0]["id"] == 1


def test_past_the_write_gate_writes_get_a_503_and_below_it_they_are_done(tiny_search, tmp_path):
    """One write at a time and no queue: while an upload to POST /items is inside (waiting for the index's
    folder lock, which the test holds as another writer would), another upload and a delete get a 503 and
    change nothing; a caller without the token still gets its 401 first. Then the lock is let go, the
    upload is added and the delete goes through."""
    bundle, index = copy_search(tiny_search, tmp_path)
    auth = {"authorization": "Bearer t"}
    env = {"DSMD_TOKEN": "t", "DSMD_MAX_WRITE_REQUESTS": "1", "DSMD_REQUEST_TIMEOUT_S": "60",
           "DSMD_ADMISSION_QUEUE": "0"}
    with Server(bundle, index, env) as s:
        async def main():
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
                headers = {**auth, "content-type": "application/json"}
                with open(index / ".lock", "a+") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                    try:
                        task = asyncio.create_task(c.post("/items", content=_json_upload(_jpeg(48)), headers=headers))
                        await _until(lambda: s.metric("dsmd_in_flight", gate="write") == 1, "an upload inside")
                        upload = await c.post("/items", content=_json_upload(_jpeg(40)), headers=headers)
                        delete, anonymous = await c.delete("/items/1", headers=auth), await c.delete("/items/1")
                        assert not task.done()
                    finally:
                        fcntl.flock(lock, fcntl.LOCK_UN)
                added = await task
                return upload, delete, anonymous, added, await c.delete(f"/items/{added.json()['id']}", headers=auth)

        upload, delete, anonymous, added, removed = asyncio.run(main())
        assert upload.status_code == 503 and upload.headers["retry-after"] == "1", upload.text
        assert "capacity (1 write requests at once, 0 waiting)" in upload.json()["detail"]
        assert delete.status_code == 503 and delete.json() == upload.json() and anonymous.status_code == 401
        assert added.status_code == 201, added.text
        assert removed.status_code == 200 and removed.json() == {"removed": added.json()["id"]}
        assert httpx.get(f"{s.url}/items/1").status_code == 200  # the refused delete did nothing
        assert s.metric("dsmd_rejected_total", reason="write") == 2


def test_past_the_thumbnail_gate_thumbnails_get_a_503(tiny_search, tmp_path):
    """Thumbnails have a gate of their own (DSMD_MAX_THUMBNAIL_REQUESTS), here of one and no queue. An item
    whose file is a named pipe holds it while the server waits to read the file; meanwhile another
    thumbnail is refused, a text search is not; once the file arrives both thumbnails are made."""
    bundle, index = copy_search(tiny_search, tmp_path)
    auth = {"authorization": "Bearer t"}
    env = {"DSMD_TOKEN": "t", "DSMD_MAX_THUMBNAIL_REQUESTS": "1", "DSMD_ADMISSION_QUEUE": "0"}
    with Server(bundle, index, env) as s:
        image = _jpeg(48)
        item = httpx.post(f"{s.url}/items", files={"file": ("a.jpg", image)}, headers=auth).json()
        stored = index / "uploads" / f"{item['sha256'][:32]}.jpg"
        stored.unlink()
        os.mkfifo(stored)

        async def main():
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
                held = asyncio.create_task(c.get(f"/items/{item['id']}/thumbnail"))
                await _until(lambda: s.metric("dsmd_in_flight", gate="thumbnail") == 1, "a thumbnail inside")
                refused = await c.get("/items/1/thumbnail")
                search = await c.get("/search", params={"text": "a red circle"})
                assert not held.done()
                writer = await pipe_opened(stored)
                os.write(writer, image)
                os.close(writer)
                return refused, search, await held, await c.get("/items/1/thumbnail")

        refused, search, made, after = asyncio.run(main())
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "capacity (1 thumbnail requests at once, 0 waiting)" in refused.json()["detail"]
        assert search.status_code == 200
        assert made.status_code == after.status_code == 200 and made.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(after.content)).format == "JPEG"
        assert s.metric("dsmd_rejected_total", reason="thumbnail") == 1


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
