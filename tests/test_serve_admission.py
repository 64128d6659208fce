"""Admission at the edges (issue 24): bodies read before a request takes an encoder slot, under a minimum
rate and a budget of bytes; a short bounded queue in front of each gate instead of an immediate 503;
thumbnails with a gate, a deadline and one render per item; writes that meet a held folder lock; a reload
that fails; clients that leave mid-upload; files that changed or leave their folder. Real uvicorn on
loopback each time.

No timing assertions: requests are held by bodies that stop (raw sockets), by a slow encoder
(`DSMD_ENCODE_DELAY_MS`), by named pipes the server blocks on, or by the folder lock held here; the
test waits for the server's own gauges in /metrics, and asserts statuses and counts."""

from __future__ import annotations

import asyncio
import fcntl
import io
import json
import os
import resource
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from PIL import Image
from serving import Server, copy_search, open_for_writing, pipe_opened

WAIT_S = 30  # how long a condition polled in /metrics may take to come true: generous, a shared machine
AUTH = {"authorization": "Bearer t"}


def _jpeg(side: int = 48, color: tuple[int, int, int] = (180, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), color).save(buf, "JPEG", quality=90)
    return buf.getvalue()


async def _until(condition: Callable[[], bool], what: str) -> None:
    """Poll `condition()` until it holds, sleeping on the event loop in between (the test's requests go on)."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"still not {what} after {WAIT_S} s"
        await asyncio.sleep(0.02)


def _poll(condition: Callable[[], bool], what: str) -> None:
    asyncio.run(_until(condition, what))


async def _slow_body(port: int, path: str = "/search/image", declared: int = 200_000) -> tuple[asyncio.StreamReader,
                                                                                            asyncio.StreamWriter]:
    """A multipart upload that announces `declared` bytes, sends its head and 100 bytes, then nothing."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: multipart/form-data; boundary=b\r\n"
            f"content-length: {declared}\r\n\r\n")
    part = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n'
    writer.write(head.encode() + (part + b"\xff" * 100)[:100])
    await writer.drain()
    return reader, writer


async def _status_of(reader: asyncio.StreamReader) -> int:
    line = await asyncio.wait_for(reader.readline(), 60)
    return int(line.split()[1])


def _fifo_item(s: Server, index: Path, image: bytes) -> tuple[int, Path]:
    """Add `image` with POST /items, then put a named pipe where its file was: the server blocks reading it
    until the test writes into the pipe."""
    item = httpx.post(f"{s.url}/items", files={"file": ("a.jpg", image)}, headers=AUTH, timeout=30).json()
    stored = index / "uploads" / f"{item['sha256'][:32]}.jpg"
    stored.unlink()
    os.mkfifo(stored)
    return item["id"], stored


def _feed(fifo: Path, data: bytes) -> bool:
    """Write `data` into the pipe if the server has it open for reading (else False: nobody reads it yet)."""
    fd = open_for_writing(fifo)
    if fd is None:
        return False
    os.set_blocking(fd, True)
    os.write(fd, data)
    os.close(fd)
    return True


# ---------------------------------------------------------------- item 1: slow bodies


def test_slow_bodies_do_not_starve_image_search_and_get_a_408(tiny_search, tmp_path):
    """Six uploads that announce 200 kB and stop after 100 bytes, three times the image slots: a normal
    client's image searches are all answered 200 meanwhile (the bodies are read before a request takes an
    image slot), and each slow one gets a 408 once it falls under the minimum rate after its grace."""
    bundle, index = copy_search(tiny_search, tmp_path)
    env = {"DSMD_MAX_IMAGE_REQUESTS": "2", "DSMD_REQUEST_TIMEOUT_S": "60", "DSMD_BODY_GRACE_S": "3"}
    with Server(bundle, index, env) as s:
        held = lambda: sum(s.metric(n, **lab) for n, lab in (  # noqa: E731
            ("dsmd_upload_bodies_reading", {}), ("dsmd_in_flight", {"gate": "image"}),
            ("dsmd_rejected_total", {"reason": "image"}), ("dsmd_rejected_total", {"reason": "body"})))

        async def main():
            slow = [await _slow_body(s.port) for _ in range(6)]
            await _until(lambda: held() == 6, "all six slow uploads held or refused")
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
                normal = [await c.post("/search/image", files={"file": ("q.jpg", _jpeg())}) for _ in range(5)]
            statuses = [await _status_of(reader) for reader, _ in slow]
            for _, writer in slow:
                writer.close()
            return normal, statuses

        normal, statuses = asyncio.run(main())
        assert [r.status_code for r in normal] == [200] * 5, [r.text[:120] for r in normal]
        assert statuses == [408] * 6
        assert s.metric("dsmd_requests_total", endpoint="/search/image", status="408") == 6
        assert s.metric("dsmd_upload_bodies_reading") == 0 and s.metric("dsmd_upload_body_bytes") == 0


def test_more_slow_header_connections_than_open_files_leave_other_clients_served(tiny_search, tmp_path):
    """The server is limited to 256 open files, then 300 connections send a request line and one header and
    stop there. uvicorn gives headers no deadline, so they held every descriptor for good and each new
    client was accepted and dropped at once (uvloop's answer to EMFILE). With a header deadline of 2 s
    (DSMD_HEADER_TIMEOUT_S) the stalled ones get a 408 and are closed, and a client that retries while
    it is dropped gets its search answered."""
    bundle, index = copy_search(tiny_search, tmp_path)
    with Server(bundle, index, {"DSMD_HEADER_TIMEOUT_S": "2"}) as s:
        limit = 256
        resource.prlimit(s.pid, resource.RLIMIT_NOFILE, (limit, limit))
        stalled = []
        try:
            for _ in range(limit + 44):
                c = socket.create_connection(("127.0.0.1", s.port))
                c.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                stalled.append(c)
            _poll(lambda: len(os.listdir(f"/proc/{s.pid}/fd")) >= limit - 1, "the server out of descriptors")
            answered, dropped = None, 0
            deadline = time.monotonic() + WAIT_S
            while answered is None and time.monotonic() < deadline:
                try:
                    answered = httpx.get(f"{s.url}/search", params={"text": "a red circle"}, timeout=30)
                except httpx.TransportError:
                    dropped += 1
                    time.sleep(0.1)
            assert answered is not None and answered.status_code == 200, f"dropped {dropped} times"
            stalled[0].settimeout(30)
            assert stalled[0].recv(100).startswith(b"HTTP/1.1 408 ")
        finally:
            for c in stalled:
                c.close()
        assert httpx.get(f"{s.url}/readyz", timeout=30).status_code == 200


# ---------------------------------------------------------------- item 4: a short queue, not a refusal


@pytest.mark.slow  # three rounds of a 3 s encoder
def test_within_slots_plus_queue_every_image_search_is_served_and_past_it_the_extras_get_a_fast_503(
        tiny_search, tmp_path):
    """Two image slots and a queue of four: six concurrent image searches (a slow encoder keeps them in)
    are all answered 200; three more, sent once two are inside and four wait, are refused at once."""
    bundle, index = copy_search(tiny_search, tmp_path)
    env = {"DSMD_MAX_IMAGE_REQUESTS": "2", "DSMD_ADMISSION_QUEUE": "4", "DSMD_ENCODE_DELAY_MS": "3000",
           "DSMD_MAX_BATCH": "2", "DSMD_REQUEST_TIMEOUT_S": "60"}
    with Server(bundle, index, env) as s:
        gate = lambda name: s.metric(name, gate="image")  # noqa: E731
        image = {"file": ("q.jpg", _jpeg())}

        async def main():
            async with httpx.AsyncClient(base_url=s.url, timeout=90) as c:
                six = [asyncio.create_task(c.post("/search/image", files=image)) for _ in range(6)]
                await _until(lambda: gate("dsmd_in_flight") + gate("dsmd_admission_queued")
                             + s.metric("dsmd_rejected_total", reason="image") == 6, "six inside, waiting or refused")
                extra = await asyncio.gather(*[c.post("/search/image", files=image) for _ in range(3)])
                return await asyncio.gather(*six), extra

        six, extra = asyncio.run(main())
        assert [r.status_code for r in six] == [200] * 6, [r.text[:120] for r in six]
        assert [r.status_code for r in extra] == [503] * 3
        assert all(r.headers["retry-after"] == "1" and "4 waiting" in r.json()["detail"] for r in extra), extra[0].text
        assert s.metric("dsmd_rejected_total", reason="image") == 3
        assert gate("dsmd_in_flight") == 0 and gate("dsmd_admission_queued") == 0


def test_a_request_that_would_wait_past_its_share_of_the_deadline_gets_a_503(tiny_search, tmp_path):
    """One text slot, held by a query in a 20 s encoder; a second query may wait a hundredth of its 60 s
    deadline (0.6 s) for the slot: it gets a 503 that says so, long before the first is answered."""
    bundle, index = copy_search(tiny_search, tmp_path)
    env = {"DSMD_MAX_TEXT_REQUESTS": "1", "DSMD_ENCODE_DELAY_MS": "20000", "DSMD_REQUEST_TIMEOUT_S": "60",
           "DSMD_QUEUE_WAIT_SHARE": "0.01"}
    with Server(bundle, index, env) as s:
        async def main():
            async with httpx.AsyncClient(base_url=s.url, timeout=90) as c:
                first = asyncio.create_task(c.get("/search", params={"text": "holds the slot"}))
                await _until(lambda: s.metric("dsmd_in_flight", gate="text") == 1, "the first inside")
                second = await c.get("/search", params={"text": "waits"})
                done = first.done()
                first.cancel()
                return second, done

        second, first_done = asyncio.run(main())
        assert not first_done
        assert second.status_code == 503 and second.headers["retry-after"] == "1"
        assert "no text slot came free within 0.6 s" in second.json()["detail"], second.text
        assert s.metric("dsmd_rejected_total", reason="text") == 1


# ---------------------------------------------------------------- item 6: thumbnails


def test_a_flood_of_uncached_thumbnails_leaves_search_answering(tiny_search, tmp_path):
    """48 thumbnail requests for six items whose files are named pipes (the server blocks reading them, as
    on a stalled disk): a text search whose vector is cached, which needs a worker thread to search,
    is still answered 200. Then the pipes are fed and no thumbnail answer is a 5xx."""
    bundle, index = copy_search(tiny_search, tmp_path)
    with Server(bundle, index, {"DSMD_TOKEN": "t"}) as s:
        images = [_jpeg(48, (20 * i, 200, 40)) for i in range(6)]
        items = [_fifo_item(s, index, image) for image in images]
        assert httpx.get(f"{s.url}/search", params={"text": "a red circle"}).status_code == 200  # now cached
        held = lambda: s.metric("dsmd_in_flight", gate="thumbnail") + s.metric("dsmd_thumbnail_waiting")  # noqa

        async def main():
            async with httpx.AsyncClient(base_url=s.url, timeout=60,
                                         limits=httpx.Limits(max_connections=64)) as c:
                flood = [asyncio.create_task(c.get(f"/items/{items[i % 6][0]}/thumbnail")) for i in range(48)]
                await _until(lambda: held() >= 48, "the 48 thumbnail requests in the server")
                search = await c.get("/search", params={"text": "a red circle"})
                for (_, fifo), image in zip(items, images):
                    if not _feed(fifo, image):
                        fifo.unlink()
                        fifo.write_bytes(image)
                return search, await asyncio.gather(*flood)

        search, thumbs = asyncio.run(main())
        assert search.status_code == 200, search.text
        assert {r.status_code for r in thumbs} <= {200, 503}, {r.status_code for r in thumbs}


def test_concurrent_requests_for_one_thumbnail_render_it_once_and_a_swap_keeps_it(tiny_search, tmp_path):
    """Eight requests at once for one uncached thumbnail (its file a named pipe, so all eight are in before
    it is read): one render, eight identical answers. After the index is swapped (a new manifest
    generation), the same thumbnail comes from the cache: still one render."""
    bundle, index = copy_search(tiny_search, tmp_path)
    with Server(bundle, index, {"DSMD_TOKEN": "t", "DSMD_RELOAD_CHECK_S": "0.2"}) as s:
        image = _jpeg(64, (10, 90, 200))
        item, fifo = _fifo_item(s, index, image)
        waiting = lambda: s.metric("dsmd_thumbnail_waiting")  # noqa: E731

        async def main():
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
                eight = [asyncio.create_task(c.get(f"/items/{item}/thumbnail")) for _ in range(8)]
                await _until(lambda: waiting() == 8 or s.metric("dsmd_in_flight", gate="thumbnail") == 8,
                             "the eight requests in the server")
                await _until(lambda: _feed(fifo, image), "the server reading the file")
                return await asyncio.gather(*eight)

        eight = asyncio.run(main())
        assert [r.status_code for r in eight] == [200] * 8
        assert len({r.content for r in eight}) == 1
        assert s.metric("dsmd_thumbnail_renders_total") == 1
        fifo.unlink()
        fifo.write_bytes(image)
        manifest = json.loads((index / "manifest.json").read_text())
        generation = manifest["generation"]
        manifest["generation"] = generation + 1
        (index / "manifest.json").write_text(json.dumps(manifest))
        _poll(lambda: s.metric("dsmd_index_generation", collection="index") == generation + 1,
              "the new generation served")
        again = httpx.get(f"{s.url}/items/{item}/thumbnail")
        assert again.status_code == 200 and again.content == eight[0].content
        assert s.metric("dsmd_thumbnail_renders_total") == 1


def test_uploads_that_wait_past_their_deadline_for_a_decode_slot_are_dropped_undecoded(tiny_search, tmp_path):
    """One decode slot, held by a thumbnail render whose file is a named pipe the server is reading. Four
    image searches with a 2 s deadline wait for the slot and get 503s, and the threads that waited give
    up at that deadline too: when the slot comes free, none of the four is decoded (their threads used to
    wait on and decode each upload long after its answer). The thumbnail gets its 503 at its deadline."""
    bundle, index = copy_search(tiny_search, tmp_path)
    env = {"DSMD_TOKEN": "t", "DSMD_DECODE_SLOTS": "1", "DSMD_REQUEST_TIMEOUT_S": "2", "DSMD_ADMISSION_QUEUE": "0"}
    with Server(bundle, index, env) as s:
        image = _jpeg(64, (30, 160, 90))
        item, fifo = _fifo_item(s, index, image)
        decoded = s.metric("dsmd_upload_decodes_total")
        async def main():
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
                thumb = asyncio.create_task(c.get(f"/items/{item}/thumbnail"))
                writer = await pipe_opened(fifo)  # the thumbnail render holds the decode slot
                searches = await asyncio.gather(*[c.post("/search/image", files={"file": ("q.jpg", _jpeg(40 + i))})
                                                  for i in range(4)])
                await _until(lambda: s.metric("dsmd_decode_waiting") == 0, "the waiting decodes gone")
                os.write(writer, image)
                os.close(writer)
                await _until(lambda: s.metric("dsmd_thumbnail_renders_total") == 1
                             and s.metric("dsmd_in_flight", gate="thumbnail") == 0, "the render done")
                freed = s.metric("dsmd_upload_decodes_total")
                return await thumb, searches, freed, await c.post("/search/image", files={"file": ("q.jpg", _jpeg(48))})

        thumb, searches, freed, after = asyncio.run(main())
        assert [r.status_code for r in searches] == [503] * 4, [r.text for r in searches]
        assert thumb.status_code == 503
        assert freed == decoded  # the slot came free and none of the four was decoded
        assert after.status_code == 200 and s.metric("dsmd_upload_decodes_total") == decoded + 1


# ---------------------------------------------------------------- item 11: a held folder lock


def test_a_write_that_meets_a_held_folder_lock_gets_a_503_then_is_done(tiny_search, tmp_path):
    """Another writer holds INDEX/.lock (as `dsmd index merge` would): POST /items is answered 503 with
    Retry-After within its deadline instead of a 500 after a minute; once the lock is free, 201."""
    bundle, index = copy_search(tiny_search, tmp_path)
    with Server(bundle, index, {"DSMD_TOKEN": "t", "DSMD_REQUEST_TIMEOUT_S": "2"}) as s:
        image = _jpeg(48, (0, 0, 250))
        with open(index / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                busy = httpx.post(f"{s.url}/items", files={"file": ("a.jpg", image)}, headers=AUTH, timeout=90)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1", busy.text
        assert "is writing to" in busy.json()["detail"]
        done = httpx.post(f"{s.url}/items", files={"file": ("a.jpg", image)}, headers=AUTH, timeout=90)
        assert done.status_code == 201, done.text


# ---------------------------------------------------------------- item 12: a reload that fails


def test_a_failed_reload_is_logged_once_and_the_index_it_has_is_served(tiny_search, tmp_path):
    """The served folder's manifest is rewritten as if rebuilt with another bundle: the server logs it once
    (however many checks follow), says so in /info and /readyz (still ready), and searches on the index it
    has; when the manifest changes again, to one it can serve, it reloads and the error is gone."""
    bundle, index = copy_search(tiny_search, tmp_path)
    s = Server(bundle, index, {"DSMD_RELOAD_CHECK_S": "0.05"})
    with s:
        good = json.loads((index / "manifest.json").read_text())
        other = {**good, "generation": good["generation"] + 1,
                 "bundle": {**good["bundle"], "fingerprint": "0" * 64}}
        (index / "manifest.json").write_text(json.dumps(other))
        error = lambda: httpx.get(f"{s.url}/info").json()["index"].get("reload_error")  # noqa: E731
        _poll(lambda: error() is not None, "the reload error in /info")
        assert "not the one the index" in error()
        checks = s.metric("dsmd_index_reload_checks_total")
        _poll(lambda: s.metric("dsmd_index_reload_checks_total") >= checks + 20, "twenty more checks")
        ready = httpx.get(f"{s.url}/readyz")
        assert ready.status_code == 200 and ready.json()["reload_error"] == error()
        r = httpx.get(f"{s.url}/items/1/similar", params={"k": 1})
        assert r.status_code == 200 and r.json()["results"][0]["id"] == 1
        assert s.metric("dsmd_index_generation", collection="index") == good["generation"]
        (index / "manifest.json").write_text(json.dumps({**good, "generation": good["generation"] + 2}))
        _poll(lambda: s.metric("dsmd_index_generation", collection="index") == good["generation"] + 2,
              "the good manifest served")
        assert error() is None and "reload_error" not in httpx.get(f"{s.url}/readyz").json()
    log = s.proc.stdout.read()
    assert log.count("cannot reload the index") == 1, log[-3000:]
    assert "Traceback" not in log


# ---------------------------------------------------------------- item 17: gone clients, changed files


def test_a_client_that_leaves_mid_upload_is_a_499_with_no_traceback(tiny_search, tmp_path):
    bundle, index = copy_search(tiny_search, tmp_path)
    s = Server(bundle, index)
    with s:
        async def leave():
            _, writer = await _slow_body(s.port, declared=10_000)
            await _until(lambda: s.metric("dsmd_upload_bodies_reading") == 1
                         or s.metric("dsmd_in_flight", gate="image") == 1, "the upload being read")
            writer.close()

        asyncio.run(leave())
        answered = lambda st: s.metric("dsmd_requests_total", endpoint="/search/image", status=st)  # noqa: E731
        _poll(lambda: answered("499") + answered("500") == 1, "the request ended")
        assert (answered("499"), answered("500")) == (1, 0)
        assert httpx.post(f"{s.url}/search/image", files={"file": ("q.jpg", _jpeg())}).status_code == 200
    log = s.proc.stdout.read()
    assert "Traceback" not in log, log[-3000:]


def test_an_item_file_is_served_only_unchanged_and_from_its_own_folder(tiny_search, tmp_path):
    """GET /items/{id}/image and /thumbnail: a stored upload whose bytes changed since it was indexed is 410
    (a thumbnail was made of the new bytes and cached as the item's); one replaced by a link to a copy
    outside its folder (same bytes) is 404; no answer shows a path."""
    bundle, index = copy_search(tiny_search, tmp_path)
    with Server(bundle, index, {"DSMD_TOKEN": "t"}) as s:
        images = [_jpeg(48, (250, 250, 0)), _jpeg(48, (0, 250, 250))]
        items = [httpx.post(f"{s.url}/items", files={"file": ("a.jpg", im)}, headers=AUTH).json() for im in images]
        stored = [index / "uploads" / f"{it['sha256'][:32]}.jpg" for it in items]
        assert httpx.get(f"{s.url}/items/{items[0]['id']}/image").content == images[0]
        stored[0].write_bytes(images[1])  # changed in place
        outside = tmp_path / "outside.jpg"
        outside.write_bytes(images[1])
        stored[1].unlink()
        stored[1].symlink_to(outside)  # the same bytes, but outside the item's folder
        changed = httpx.get(f"{s.url}/items/{items[0]['id']}/image")
        linked = httpx.get(f"{s.url}/items/{items[1]['id']}/image")
        assert changed.status_code == 410 and "changed since it was indexed" in changed.json()["detail"], changed.text
        assert linked.status_code == 404 and "outside" in linked.json()["detail"], linked.text
        assert "/" not in changed.json()["detail"] + linked.json()["detail"]
        thumbs = [httpx.get(f"{s.url}/items/{it['id']}/thumbnail", timeout=30) for it in items]
        assert [t.status_code for t in thumbs] == [410, 404], [t.text[:200] for t in thumbs]
        assert "changed since it was indexed" in thumbs[0].json()["detail"]
        assert "/" not in thumbs[0].json()["detail"] + thumbs[1].json()["detail"]


def test_a_token_with_non_ascii_characters_matches_when_sent_as_utf8(tiny_search, tmp_path):
    """Header values arrive as latin-1 text; re-encoding them as UTF-8 turned a non-ASCII token into other
    bytes, so it never matched. The raw bytes are compared now: the right token passes, a near one not."""
    bundle, index = copy_search(tiny_search, tmp_path)
    token = "clé-Ωmega-密码"
    (tmp_path / "token").write_text(token + "\n", encoding="utf-8")
    with Server(bundle, index, {"DSMD_TOKEN_FILE": str(tmp_path / "token")}) as s:
        def delete(sent: str) -> int:
            return httpx.delete(f"{s.url}/items/999999", headers={"authorization": b"Bearer " + sent.encode()},
                                timeout=30).status_code

        assert delete(token) == 404  # past the token check: no such item
        assert delete(token.replace("Ω", "O")) == 401
        assert delete(token[:-1]) == 401
