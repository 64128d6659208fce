"""The search server, really started: uvicorn on loopback, real bundle, real index, real HTTP."""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image
from serving import copy_search, free_port

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def served(tiny_search, tiny_world, tmp_path_factory):
    """(base URL, index folder, world) of a server on a copy of the tiny test index."""
    root = tmp_path_factory.mktemp("serve")
    copy_search(tiny_search, root)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dsmd.cli", "serve", "--bundle", str(root / "bundle"), "--index",
                             str(root / "index"), "--port", str(port)],
                            env={**os.environ, "TQDM_DISABLE": "1", "DSMD_TOKEN": TOKEN}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail(f"server did not start: {proc.stdout.read()}")
    yield url, root / "index", tiny_world
    proc.terminate()
    proc.wait(10)


def png_bytes(path: Path) -> bytes:
    return path.read_bytes()


def test_text_search_returns_ranked_results(served):
    url, _, _ = served
    r = httpx.get(f"{url}/search", params={"text": "a red circle left of a blue square", "k": 5})
    assert r.status_code == 200
    body = r.json()
    scores = [x["score"] for x in body["results"]]
    assert len(scores) == 5 and scores == sorted(scores, reverse=True)
    first = body["results"][0]
    assert first["thumbnail_url"] == f"/items/{first['id']}/thumbnail" and len(first["captions"]) == 5
    assert body["query"]["truncated"] is False
    thumb = httpx.get(url + first["thumbnail_url"])
    assert thumb.headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(thumb.content)).size[0] <= 256
    assert httpx.get(url + first["image_url"]).status_code == 200
    assert httpx.get(f"{url}/items/{first['id']}").json()["id"] == first["id"]


def test_image_search_by_upload_and_by_base64_and_to_captions(served):
    url, _, world = served
    data = png_bytes(sorted((world / "images").glob("*.png"))[-1])
    a = httpx.post(f"{url}/search/image", params={"k": 3}, files={"file": ("x.png", data, "image/png")}).json()
    b64 = {"image_base64": base64.b64encode(data).decode()}
    b = httpx.post(f"{url}/search/image", params={"k": 3}, json=b64).json()
    assert [x["id"] for x in a["results"]] == [x["id"] for x in b["results"]]
    t = httpx.post(f"{url}/search/image", params={"k": 4, "target": "texts"}, files={"file": ("x.png", data)}).json()
    assert len(t["results"]) == 4 and all("text" in x for x in t["results"])
    more = httpx.get(f"{url}/items/{a['results'][0]['id']}/similar", params={"k": 3})
    assert more.status_code == 200 and len(more.json()["results"]) == 3


def _truncated_png(world: Path) -> bytes:
    data = png_bytes(sorted((world / "images").glob("*.png"))[0])
    return data[: len(data) // 2]


def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (9000, 8000)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("case,status,words", [
    ("k0", 422, "k must be between"), ("k_big", 422, "k must be between"), ("empty", 422, "text is empty"),
    ("not_image", 422, "not a usable image"), ("truncated", 422, "not a usable image"), ("bomb", 422, "over the limit"),
    ("too_big", 413, "over the limit"), ("wrong_type", 415, "multipart/form-data"), ("bad_json", 422, "image_base64"),
    ("no_file_field", 422, "field named 'file'"), ("unknown_item", 404, "no item"), ("bad_target", 422, "target"),
])
def test_bad_requests_get_a_clear_4xx_and_the_server_stays_up(served, case, status, words):
    url, _, world = served
    c = httpx.Client(base_url=url, timeout=30)
    r = {
        "k0": lambda: c.get("/search", params={"text": "a", "k": 0}),
        "k_big": lambda: c.get("/search", params={"text": "a", "k": 10_000}),
        "empty": lambda: c.get("/search", params={"text": "   "}),
        "not_image": lambda: c.post("/search/image", files={"file": ("a.png", b"hello, not an image")}),
        "truncated": lambda: c.post("/search/image", files={"file": ("a.png", _truncated_png(world))}),
        "bomb": lambda: c.post("/search/image", files={"file": ("a.png", _bomb())}),
        "too_big": lambda: c.post("/search/image", files={"file": ("a.png", os.urandom(11 * 2**20))}),
        "wrong_type": lambda: c.post("/search/image", content=b"abc", headers={"content-type": "text/plain"}),
        "bad_json": lambda: c.post("/search/image", json={"image": "x"}),
        "no_file_field": lambda: c.post("/search/image", files={"other": ("a.png", b"x")}),
        "unknown_item": lambda: c.get("/items/999999/thumbnail"),
        "bad_target": lambda: c.post("/search/image", params={"target": "nope"}, files={"file": ("a", b"x")}),
    }[case]()
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]
    assert c.get("/healthz").status_code == 200


def test_an_upload_without_a_declared_length_is_cut_off_at_the_limit(served):
    url, _, _ = served

    def body():  # chunked transfer: no Content-Length to refuse up front
        yield b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\n"
        for _ in range(16):
            yield os.urandom(2**20)
        yield b"\r\n--x--\r\n"

    r = httpx.post(f"{url}/search/image", content=body(), headers={"content-type": "multipart/form-data; boundary=x"},
                   timeout=60)
    assert r.status_code == 413 and "over the limit" in r.json()["detail"]
    assert httpx.get(f"{url}/healthz").status_code == 200


def test_over_long_text_is_cut_and_says_so(served):
    url, _, _ = served
    body = httpx.get(f"{url}/search", params={"text": "a red circle " * 200, "k": 1}).json()
    assert body["query"]["truncated"] is True and "tokens" in body["query"]["note"]


def test_adding_and_removing_items_needs_the_token(served):
    url, index, world = served
    c = httpx.Client(base_url=url, timeout=60)
    img = Image.open(sorted((world / "images").glob("*.png"))[0]).rotate(90)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    files = {"file": ("new.png", buf.getvalue(), "image/png")}
    assert c.post("/items", files=files).status_code == 401
    assert c.post("/items", files=files, headers={"authorization": "Bearer wrong"}).status_code == 401
    before = c.get("/info").json()["index"]["images"]["count"]
    r = c.post("/items", files=files, headers={"authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 201, r.text
    new_id = r.json()["id"]
    assert c.get("/info").json()["index"]["images"]["count"] == before + 1
    # all hits: the tiny model maps every image to nearly one point, and the index keeps float16 vectors
    query = {"file": ("q.png", buf.getvalue())}
    hits = c.post("/search/image", params={"k": before + 1}, files=query).json()["results"]
    found = next(h for h in hits if h["id"] == new_id)
    assert found["score"] > 0.998 and found["score"] >= hits[0]["score"] - 2e-3
    assert c.delete(f"/items/{new_id}").status_code == 401
    assert c.delete(f"/items/{new_id}", headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert c.get(f"/items/{new_id}").status_code == 404
    assert c.get("/info").json()["index"]["images"]["count"] == before


def test_operations_endpoints(served):
    url, _, _ = served
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{url}/readyz").json() == {"ready": True, "encoders": {"text": True, "image": True}}
    info = httpx.get(f"{url}/info").json()
    assert info["bundle"]["dim"] == 16 and info["index"]["images"]["kind"] == "flat"
    httpx.get(f"{url}/search", params={"text": "two stars"})
    metrics = httpx.get(f"{url}/metrics").text
    assert 'dsmd_requests_total{endpoint="/search",status="200"}' in metrics
    assert 'dsmd_encoder_batch_size_count{encoder="text"}' in metrics and 'dsmd_index_items{part="images"}' in metrics
    assert "process_resident_memory_bytes" in metrics
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "dsmd search" in page.text
    spec = httpx.get(f"{url}/openapi.json").json()
    target = next(p for p in spec["paths"]["/search/image"]["post"]["parameters"] if p["name"] == "target")
    assert target["schema"]["enum"] == ["images", "texts"]  # the spec lists the allowed values


def test_concurrent_text_queries_are_batched_together(served):
    import asyncio

    url, _, _ = served

    async def many():
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            rs = await asyncio.gather(*[c.get("/search", params={"text": f"a red circle number {i}"})
                                        for i in range(32)])
        return rs

    rs = asyncio.run(many())
    assert all(r.status_code == 200 for r in rs)
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    value = lambda name: next(float(x.split()[-1]) for x in lines if x.startswith(name))  # noqa: E731
    singles = value('dsmd_encoder_batch_size_bucket{encoder="text",le="1.0"}')
    calls = value('dsmd_encoder_batch_size_count{encoder="text"}')
    assert calls < 32 and singles < calls, (singles, calls)  # some calls carried more than one query


# ---------------------------------------------------------------- the web page, in a real browser


def _browser_or_skip() -> None:
    """The browser test needs Debian's chromium and chromedriver, which `make test` installs with apt where it
    can (Debian, as root). Elsewhere it is skipped with the reason, unless DSMD_REQUIRE_BROWSER=1
    (set by .ci/run) makes a missing browser a failure."""
    missing = [name for name in ("chromium", "chromedriver") if not shutil.which(name)]
    if not missing:
        return
    reason = (f"{' and '.join(missing)} not found: install them (apt-get install chromium chromium-driver) to "
              "run the web-page test")
    if os.environ.get("DSMD_REQUIRE_BROWSER") == "1":
        pytest.fail(reason + " (DSMD_REQUIRE_BROWSER=1 requires it)")
    pytest.skip(reason)


def test_web_page_in_headless_chromium(served, tmp_path):
    """Type a query, see results; upload an image, see neighbours and captions; 'more like this'."""
    _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    url, _, world = served
    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        opts.add_argument(arg)
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=opts)
    try:
        wait = WebDriverWait(driver, 20)
        driver.get(url + "/")
        box = driver.find_element(By.ID, "q")
        box.send_keys("a red circle left of a blue square")
        driver.find_element(By.ID, "go").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#grid .result")) == 24)
        assert "results for" in driver.find_element(By.ID, "status").text
        wait.until(lambda d: all(img.get_property("naturalWidth") > 0
                                 for img in d.find_elements(By.CSS_SELECTOR, "#grid .result img")))
        driver.save_screenshot(str(tmp_path / "text-search.png"))

        image = sorted((world / "images").glob("*.png"))[3]
        driver.find_element(By.ID, "file").send_keys(str(image))
        wait.until(EC.text_to_be_present_in_element((By.ID, "status"), f"images like {image.name}"))
        assert len(driver.find_elements(By.CSS_SELECTOR, "#captions .caption")) == 5
        assert len(driver.find_elements(By.CSS_SELECTOR, "#grid .result")) == 24
        driver.save_screenshot(str(tmp_path / "image-search.png"))

        driver.find_elements(By.CSS_SELECTOR, "#grid .result .more")[0].click()
        wait.until(EC.text_to_be_present_in_element((By.ID, "status"), "images like #"))
        assert (tmp_path / "text-search.png").stat().st_size > 10_000
        if os.environ.get("DSMD_SCREENSHOTS"):  # refresh the screenshots kept in docs/
            shots = Path(__file__).resolve().parent.parent / "docs"
            shots.mkdir(exist_ok=True)
            shutil.copy(tmp_path / "text-search.png", shots / "web-text-search.png")
            shutil.copy(tmp_path / "image-search.png", shots / "web-image-search.png")
    finally:
        driver.quit()


# ---------------------------------------------------------------- fuzzing from the OpenAPI spec


@pytest.mark.slow
def test_fuzzing_the_api_from_its_openapi_spec_finds_no_5xx_and_answers_as_documented(served):
    """schemathesis generates requests from /openapi.json (valid and invalid): none may get a 5xx, and every
    answer, errors included, must have a status code, content type, headers and body the spec declares."""
    url, _, _ = served
    checks = ("not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,"
              "response_schema_conformance,missing_required_header,unsupported_method")
    done = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{url}/openapi.json", "--checks", checks,
         "--max-examples", "100", "--seed", "1", "--exclude-method", "DELETE", "--request-timeout", "20",
         "--no-color"],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert httpx.get(f"{url}/healthz").status_code == 200


def test_the_server_runs_without_torch(served):
    """The serving image has no torch: the server must not import it (or transformers)."""
    url, index, _ = served
    bundle = index.parent / "bundle"
    port = free_port()
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "
            "from dsmd.cli import main; "
            f"main(['serve', '--bundle', {str(bundle)!r}, '--index', {str(index)!r}, '--port', '{port}'])")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/search", params={"text": "a blue star", "k": 2}, timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        assert proc.poll() is None, proc.stdout.read()
        assert r.status_code == 200 and len(r.json()["results"]) == 2
    finally:
        proc.terminate()
        proc.wait(10)
