"""Uploads that cost far more than they look: JSON bodies of another shape, progressive JPEGs, images that
decode slowly, long thin images. Each is refused from its first bytes or headers (422, saying what to send)
or handled at a bounded cost; floods of them keep the server's peak under a bound the test computes from
the settings it starts the server with (the peak is reset with /proc/PID/clear_refs just before), and its
thread count and resident size flat. No timings: order, counts and memory only."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from serving import Server, copy_search

from dsmd.images import MAX_COEFFICIENT_BYTES, BadImage, check_decode_cost
from dsmd.preprocess import PreprocessConfig, resize_image

MiB = 2**20
UPLOAD = 10 * MiB  # the server's default max_upload_bytes
BODY = UPLOAD * 4 // 3 + 65536  # the largest body that can carry such an image as base64
TOKEN = "decoding-test-token"
LIMITS = {"max_image_requests": 4, "max_write_requests": 2, "decode_slots": 2, "max_pixels": 12_000_000}


@pytest.fixture(scope="module")
def server(tiny_search, tmp_path_factory):
    """The server with its default limits (stated here, for the bounds), writes on, a long deadline (the
    floods below must end in refusals, not in timeouts)."""
    bundle, index = copy_search(tiny_search, tmp_path_factory.mktemp("decoding"))
    env = {f"DSMD_{k.upper()}": str(v) for k, v in LIMITS.items()}
    with Server(bundle, index, env | {"DSMD_TOKEN": TOKEN, "DSMD_REQUEST_TIMEOUT_S": "120"}) as s:
        yield s


def _rise(s: Server, send) -> tuple[list, int]:
    """Run `send()` (a coroutine function) with the server's peak reset just before; its answers and the
    peak's rise over the resident size at the reset."""
    start = s.reset_peak()
    answers = asyncio.run(send())
    return answers, s.memory()["VmHWM"] - start


async def _post_all(s: Server, requests: list[tuple[str, bytes, dict]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=s.url, timeout=120, limits=httpx.Limits(max_connections=64)) as c:
        return await asyncio.gather(*[c.post(path, content=body, headers=headers) for path, body, headers in requests])


def _json(image: bytes) -> bytes:
    return json.dumps({"image_base64": base64.b64encode(image).decode()}).encode()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


JSON = {"content-type": "application/json"}
WRITE = JSON | {"authorization": f"Bearer {TOKEN}"}

# ---------------------------------------------------------------- item 2: JSON bodies of another shape


def test_a_flood_of_json_bodies_of_another_shape_stays_under_the_bound(server):
    """16 clients post 13 MiB of `[{},{},...]` to /search/image and 16 to POST /items, at once. json.loads
    made 4.6 million dicts of each (330 MiB; 1,497 MiB resident for 16 clients); now a body that does not
    start as {"image_base64": "...} is refused at its first 4 KiB. Every answer is a 422 that says what to
    send, or a 503 at the gate; the peak rises by less than the bodies the gates let in (4 image requests,
    2 writes), each with its decoded image, and 32 MiB."""
    body = b"[" + b"{}," * ((13 * MiB) // 3) + b"{}]"
    assert 13 * MiB < len(body) <= BODY
    bound = (LIMITS["max_image_requests"] + LIMITS["max_write_requests"]) * (BODY + UPLOAD) + 32 * MiB
    flood = [("/search/image", body, JSON)] * 16 + [("/items", body, WRITE)] * 16
    answers, rise = _rise(server, lambda: _post_all(server, flood))
    statuses = [r.status_code for r in answers]
    assert set(statuses) <= {422, 503} and statuses.count(422) >= 2, statuses
    assert all('{"image_base64": "<base64 of the image file>"}' in r.json()["detail"]
               for r in answers if r.status_code == 422)
    assert rise < bound, f"the peak rose by {rise / MiB:.0f} MiB, over {bound / MiB:.0f} MiB"
    assert httpx.get(f"{server.url}/readyz").status_code == 200


@pytest.mark.parametrize("shape", ["spaces", "escaped_slashes", "compact"])
def test_the_one_json_shape_is_read_with_json_whitespace_and_escaped_slashes(server, shape, tiny_world):
    """{"image_base64": ...} as any JSON encoder writes it (PHP's escapes "/" as "\\/") is the image."""
    image = next((tiny_world / "images").iterdir()).read_bytes()
    text = base64.b64encode(image).decode()
    body = {"spaces": f' \n{{ "image_base64" :\t"{text}"\r\n}} ',
            "escaped_slashes": '{"image_base64":"' + text.replace("/", "\\/") + '"}',
            "compact": '{"image_base64":"' + text + '"}'}[shape].encode()
    assert shape != "escaped_slashes" or b"\\/" in body
    r = httpx.post(f"{server.url}/search/image", content=body, headers=JSON, params={"k": 1}, timeout=60)
    assert r.status_code == 200 and r.json()["query"]["image_bytes"] == len(image), r.text


@pytest.mark.parametrize("body", [b'{"image_base64": "QUJD", "other": 1}', b'{"other": 1, "image_base64": "QUJD"}',
                                  b'[{"image_base64": "QUJD"}]', b'{"image_base64": ["QUJD"]}',
                                  b'{"image_base64": "QU\\nJD"}', b'{"image_base64": "QUJ"}', b'{}'])
def test_any_other_json_body_is_a_422_that_says_what_to_send(server, body):
    r = httpx.post(f"{server.url}/search/image", content=body, headers=JSON)
    assert r.status_code == 422 and '{"image_base64": "<base64 of the image file>"}' in r.json()["detail"], r.text


# ---------------------------------------------------------------- item 3: progressive JPEGs


@pytest.fixture(scope="module")
def jpegs_9400() -> dict[str, bytes]:
    """A 9400x9400 JPEG (88 Mpixel), progressive (0.5 MB) and baseline (1.4 MB), made once."""
    img = Image.new("RGB", (9400, 9400), (120, 90, 60))
    out = {}
    for kind in ("progressive", "baseline"):
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=5, progressive=kind == "progressive")
        out[kind] = buf.getvalue()
    return out


def test_a_huge_progressive_jpeg_is_refused_from_its_header_and_a_flood_of_them_stays_under_the_bound(
        server, jpegs_9400):
    """A progressive JPEG is decoded at 1/8 scale like any JPEG, under the pixel limit, but libjpeg holds all
    of its coefficients at full size: 9400x9400 at 4:2:0 is 253 MiB, and 16 clients took the server to
    670 MiB. Refused from the header now, with the dimensions said; 16 at once raise the peak by less than
    all 16 bodies, each with its image, and 32 MiB (one decode would take 253 MiB)."""
    data = jpegs_9400["progressive"]
    r = httpx.post(f"{server.url}/search/image", files={"file": ("p.jpg", data, "image/jpeg")}, timeout=120)
    assert r.status_code == 422 and "9400x9400" in r.json()["detail"] and "progressive" in r.json()["detail"], r.text
    flood = [("/search/image", _json(data), JSON)] * 16
    bound = 16 * (len(flood[0][1]) + len(data)) + 32 * MiB
    answers, rise = _rise(server, lambda: _post_all(server, flood))
    statuses = [a.status_code for a in answers]
    assert set(statuses) <= {422, 503} and 422 in statuses, statuses
    assert rise < bound, f"the peak rose by {rise / MiB:.0f} MiB, over {bound / MiB:.0f} MiB"


def test_a_huge_baseline_jpeg_still_decodes_small(server, jpegs_9400):
    """The same 9400x9400 as a baseline JPEG: one scan, decoded by libjpeg at 1/8 scale (1175x1175) with no
    full-size buffer; the peak rises by the upload's copies, that image and one copy, and 16 MiB."""
    data = jpegs_9400["baseline"]
    bound = 4 * len(data) + 2 * 4 * 1175**2 + 16 * MiB
    answers, rise = _rise(server, lambda: _post_all(server, [("/search/image", _json(data), JSON)]))
    assert answers[0].status_code == 200, answers[0].text
    assert rise < bound, f"the peak rose by {rise / MiB:.0f} MiB, over {bound / MiB:.0f} MiB"


def _progressive_header(width: int, height: int, subsampling: int) -> bytes:
    """A small progressive JPEG whose frame header says width x height: enough for a check that reads
    headers only (libjpeg would find its scans short)."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(buf, "JPEG", progressive=True, subsampling=subsampling)
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc2")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.mark.parametrize("width,height,subsampling,refused", [
    (6000, 4000, 0, False),  # a 24 Mpixel photo saved progressive at 4:4:4: 137 MiB of coefficients
    (6000, 4000, 2, False),  # at 4:2:0 (what cameras and the web use): 69 MiB
    (8660, 5774, 2, False),  # 50 Mpixel at 4:2:0: 143 MiB
    (9400, 9400, 2, True),  # the issue's: 253 MiB
    (8660, 5774, 0, True),  # 50 Mpixel at 4:4:4: 286 MiB
])
def test_the_coefficient_limit_lets_camera_photos_through(width, height, subsampling, refused):
    """The limit is on libjpeg's coefficient memory (2 bytes a coefficient, by the sampling in the header),
    computed here from the pixels: 3 full planes at 4:4:4, one and two quarter planes at 4:2:0."""
    planes = 3 if subsampling == 0 else 1.5
    assert (width * height * planes * 2 > MAX_COEFFICIENT_BYTES) == refused
    data = _progressive_header(width, height, subsampling)
    if refused:
        with pytest.raises(BadImage, match=f"progressive JPEG of {width}x{height} pixels"):
            check_decode_cost(data)
    else:
        check_decode_cost(data)


# ---------------------------------------------------------------- item 5: slow decodes


def _bmp_rle(width: int, height: int, rle4: bool, rows: bytes) -> bytes:
    """A BMP (BITMAPINFOHEADER, grey palette) with the given RLE data."""
    palette = b"".join(bytes((i, i, i, 0)) for i in range(16 if rle4 else 256))
    data = rows + b"\x00\x01"
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 4 if rle4 else 8, 2 if rle4 else 1, len(data),
                       2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(data), 0, 0, offset) + info + palette + data


def _chunk(ctype: bytes, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload)) + ctype + payload + struct.pack(">I", zlib.crc32(ctype + payload))


def slow_inputs() -> dict[str, tuple[bytes, str]]:
    """Files that take Pillow or libjpeg seconds to decode for a few KB or MB each (the time measured
    before the checks, on one core of this machine), with the words of their refusal."""
    small = io.BytesIO()
    Image.new("P", (8, 8)).save(small, "GIF")
    gif = small.getvalue()
    header = 13 + 3 * 2 ** ((gif[10] & 7) + 1)
    png = _png(Image.new("RGB", (8, 8), (1, 2, 3)))
    progressive = io.BytesIO()
    Image.new("RGB", (3000, 4000), (120, 60, 30)).save(progressive, "JPEG", progressive=True, quality=20)
    jpeg = progressive.getvalue()
    last_scan = jpeg[jpeg.rfind(b"\xff\xda"):-2]
    return {
        # 12 Mpixel in runs of 255, decoded pixel by pixel in Python (0.6 s, 96 KB)
        "bmp_rle4": (_bmp_rle(3000, 4000, True, (b"\xff\x12" * 11 + b"\x00\x00") * 4000), "RLE-compressed BMP"),
        # one pixel then end-of-line on each row of 12,000: Python pads the row a byte at a time (0.8 s, 5 KB)
        "bmp_rle8": (_bmp_rle(12000, 1000, False, b"\x01\x05\x00\x00" * 1000), "RLE-compressed BMP"),
        # 500,000 empty ancillary chunks, each read and CRC-checked in Python (1.4 s, 6 MB)
        "png_chunks": (png[:33] + _chunk(b"xxYz") * 500_000 + png[33:], "chunks"),
        # 3 million empty comment extensions before the first frame (0.7 s, 9 MB)
        "gif_blocks": (gif[:header] + b"!\xfe\x00" * 3_000_000 + gif[header:], "blocks"),
        # a 12 Mpixel progressive JPEG whose last scan is repeated 500 times (3.7 s, 84 KB)
        "jpeg_scans": (jpeg[:-2] + last_scan * 500 + b"\xff\xd9", "scans"),
    }


@pytest.fixture(scope="module")
def slow() -> dict[str, tuple[bytes, str]]:
    return slow_inputs()


@pytest.mark.parametrize("kind", ["bmp_rle4", "bmp_rle8", "png_chunks", "gif_blocks", "jpeg_scans"])
def test_an_input_slow_to_decode_for_its_size_is_refused_from_its_headers(server, slow, kind):
    data, words = slow[kind]
    r = httpx.post(f"{server.url}/search/image", files={"file": ("x", data)}, timeout=120)
    assert r.status_code == 422 and words in r.json()["detail"], r.text


def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def test_a_flood_of_slow_inputs_leaves_threads_and_memory_flat(server, slow):
    """Ten rounds of the five slow inputs, four requests at a time: a decode that ran on after its request
    gave up would hold a thread and its upload each; refused from their headers, the thread count stays
    within the four requests in flight (and two for the server's own) of what it was, and the resident size
    within their bodies and 32 MiB."""
    files = [data for data, _ in slow.values()]

    async def rounds():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            sem, statuses = asyncio.Semaphore(4), []

            async def one(data: bytes) -> None:
                async with sem:
                    statuses.append((await c.post("/search/image", files={"file": ("x", data)})).status_code)

            await asyncio.gather(*[one(data) for _ in range(10) for data in files])
            return statuses

    asyncio.run(rounds())  # the thread pool warms up to what four requests at a time need
    threads, rss = _status(server.pid, "Threads"), _status(server.pid, "VmRSS") * 1024
    statuses = asyncio.run(rounds())
    assert statuses == [422] * len(statuses) and len(statuses) == 50, statuses
    grown = _status(server.pid, "Threads") - threads
    assert grown <= 4 + 2, f"{grown} more threads after the flood"
    bound = 4 * 2 * max(len(f) for f in files) + 32 * MiB
    rise = _status(server.pid, "VmRSS") * 1024 - rss
    assert rise < bound, f"resident size rose by {rise / MiB:.0f} MiB, over {bound / MiB:.0f} MiB"


def test_a_thumbnail_of_an_indexed_file_slow_to_decode_is_refused_from_its_headers(tiny_search, slow, tmp_path):
    """A folder build takes what Pillow can open, so an index may hold a file slow to decode, or one over the
    server's pixel limit: its thumbnail is refused (404, saying why) as an upload would be (a thumbnail was
    decoded up to 64 Mpx before), while a plain one renders."""
    from dsmd.bundle import Bundle
    from dsmd.index.build import build
    from dsmd.index.sources import folder_sources

    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "plain.png").write_bytes(_png(Image.new("RGB", (64, 48), (200, 40, 40))))
    (photos / "chunks.png").write_bytes(slow["png_chunks"][0])
    (photos / "large.png").write_bytes(_png(_waves(1400, 1000, 37.0)))  # 1.4 Mpx, over the server's 1 Mpx
    build(tmp_path / "index", Bundle(tiny_search / "bundle"), folder_sources(photos), progress=False)
    with Server(tiny_search / "bundle", tmp_path / "index", {"DSMD_MAX_PIXELS": "1000000"}) as s:
        ids = {it["name"]: it["id"] for it in (httpx.get(f"{s.url}/items/{i}").json() for i in (1, 2, 3))}
        refused = httpx.get(f"{s.url}/items/{ids['chunks.png']}/thumbnail", timeout=60)
        large = httpx.get(f"{s.url}/items/{ids['large.png']}/thumbnail", timeout=60)
        made = httpx.get(f"{s.url}/items/{ids['plain.png']}/thumbnail", timeout=60)
    assert refused.status_code == 404 and "cost far more to decode" in refused.json()["detail"], refused.status_code
    assert large.status_code == 404 and "over the pixel limit" in large.json()["detail"], large.status_code
    assert made.status_code == 200 and made.headers["content-type"] == "image/jpeg"


# ---------------------------------------------------------------- item 7: long thin images


def _peak_rise(fn):
    """fn()'s result, and how far this process's peak resident size rose while it ran (clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")
    start = _status("self", "VmHWM") * 1024
    out = fn()
    return out, _status("self", "VmHWM") * 1024 - start


def _waves(width: int, height: int, period: float) -> Image.Image:
    """A smooth RGB pattern along the width, so resizing one region or its neighbourhood agree closely."""
    x = np.arange(width, dtype=np.float32)
    row = np.stack([128 + 100 * np.sin(2 * np.pi * x / period + p) for p in (0, 2, 4)], axis=-1)
    return Image.fromarray(np.broadcast_to(row, (height, width, 3)).round().astype(np.uint8))


@pytest.mark.parametrize("tall", [False, True])
def test_shortest_crop_of_a_long_thin_image_resizes_only_the_crop(tall):
    """A 60000x20 image (or 20x60000) under shortest_crop at 224 px was resized whole to 672000x224 (600 MB)
    to keep its centre 224x224. Now only the centre is resized: the peak rises by a few MB, and the result
    is what resizing the centre 20x20 square itself gives (within rounding; the two differ at the square's
    edges, where one sees the neighbouring pixels and the other does not)."""
    cfg = PreprocessConfig(size=224, resize="shortest_crop", interpolation="bicubic")
    img, centre_box = _waves(60000, 20, 37.0), (29990, 0, 30010, 20)
    if tall:
        img, centre_box = img.transpose(Image.Transpose.TRANSPOSE), (0, 29990, 20, 30010)
    out, rise = _peak_rise(lambda: np.asarray(resize_image(img, cfg), dtype=np.float32))
    assert out.shape == (224, 224, 3)
    assert rise < 16 * MiB, f"the peak rose by {rise / MiB:.0f} MiB"
    centre = np.asarray(resize_image(img.crop(centre_box), cfg), dtype=np.float32)
    inner = (slice(16, -16), slice(16, -16))  # away from the edges of the reference square
    assert np.abs(out[inner] - centre[inner]).max() <= 2 and np.abs(out - centre).mean() < 2


def test_a_long_thin_upload_to_a_shortest_crop_bundle_costs_its_pixels_only(tiny_search, tmp_path):
    """The test bundle with its preprocessing switched to shortest_crop (the server reads the spec from the
    manifest) and a 500000x4 PNG (2 Mpixel): its 32-px model input was a 4,000,000x32 resize (512 MB). Now
    the upload is answered and the peak rises by less than the image decoded and copied, its body, 32 MiB."""
    bundle, index = copy_search(tiny_search, tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["preprocess"]["resize"] = "shortest_crop"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    data = _png(_waves(500_000, 4, 50.0))
    bound = 2 * 4 * 500_000 * 4 + 4 * len(data) + 32 * MiB
    with Server(bundle, index, {"DSMD_REQUEST_TIMEOUT_S": "120"}) as s:
        answers, rise = _rise(s, lambda: _post_all(s, [("/search/image", _json(data), JSON)]))
        assert answers[0].status_code == 200, answers[0].text
        assert rise < bound, f"the peak rose by {rise / MiB:.0f} MiB, over {bound / MiB:.0f} MiB"
