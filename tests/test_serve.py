"""The search server, really started: uvicorn on loopback, real bundle, real index, real HTTP.

What a search should return is computed here, outside the server (`Truth`): the bundle encodes the
indexed images and the query, numpy ranks them. The tiny test model tells images apart (median
cosine 0.95 between different test images), so an image finds itself and the top k is one list.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from serving import Server, copy_search, free_port

from dsmd.bundle import Bundle

TOKEN = "s3cret"
# How far a served score may be from the exact one: the index keeps float16 vectors (about 1e-4 off)
TOL = 1e-3


class Truth:
    """Exact search over the test split, computed here: the bundle encodes, numpy ranks."""

    def __init__(self, bundle: Path, world: Path):
        self.bundle, self.world = Bundle(bundle), world
        rows = json.loads((world / "dataset_world.json").read_text())["images"]
        self.captions = {r["filename"]: [s["raw"] for s in r["sentences"]] for r in rows}
        self.names = [r["filename"] for r in rows if r["split"] == "test"]
        self.unindexed = [r["filename"] for r in rows if r["split"] != "test"]
        self.vectors = self.encode(self.names)

    def encode(self, names: list[str]) -> np.ndarray:
        return self.bundle.encode_images([(self.world / "images" / n).read_bytes() for n in names])

    def scores(self, query: np.ndarray, names: list[str] | None = None, vectors: np.ndarray | None = None) -> dict:
        """name -> exact score of `query` for each indexed image (or for `names` with their `vectors`)."""
        names, vectors = (self.names, self.vectors) if names is None else (names, vectors)
        return dict(zip(names, (vectors @ query).tolist()))

    def text(self, text: str) -> dict:
        return self.scores(self.bundle.encode_texts([text])[0])

    def image(self, name: str) -> dict:
        return self.scores(self.encode([name])[0])

    def most_distinct(self) -> str:
        """The indexed image farthest from its nearest other one (finding itself needs no luck)."""
        sims = self.vectors @ self.vectors.T
        np.fill_diagonal(sims, -1)
        return self.names[int(sims.max(axis=1).argmin())]

    def new_images(self, n: int, apart: float = 0.999) -> list[Path]:
        """`n` images of the world that are not indexed, each below cosine `apart` to every indexed image
        and to each other, so that each finds itself first once added."""
        vectors = self.encode(self.unindexed)
        picked, kept = [], [self.vectors]
        for i in np.argsort((vectors @ self.vectors.T).max(axis=1)):
            if max(float((k @ vectors[i]).max()) for k in kept) < apart:
                picked.append(self.world / "images" / self.unindexed[i])
                kept.append(vectors[i][None])
            if len(picked) == n:
                return picked
        raise AssertionError(f"the test world has fewer than {n} images the model tells apart")


def assert_exact_top_k(results: list[dict], exact: dict, k: int) -> None:
    """`results` are the k best of `exact` (name -> score) with their scores. Only items whose exact scores
    are within TOL of each other may change places (float16 vectors in the index)."""
    got = [r["name"] for r in results]
    assert len(got) == len(set(got)) == min(k, len(exact)), got
    assert set(got) <= set(exact), set(got) - set(exact)
    for r in results:
        assert r["score"] == pytest.approx(exact[r["name"]], abs=TOL), r["name"]
    kth = sorted(exact.values(), reverse=True)[len(got) - 1]
    assert all(exact[n] >= kth - TOL for n in got), "a result below the exact k-th best"
    assert all(n in got for n, v in exact.items() if v > kth + TOL), "a better item left out"
    assert all(exact[a] >= exact[b] - TOL for a, b in zip(got, got[1:])), "out of order"


@pytest.fixture(scope="module")
def served(tiny_search, tiny_world, tmp_path_factory):
    """(base URL, index folder, world) of a server on a copy of the tiny test index."""
    bundle, index = copy_search(tiny_search, tmp_path_factory.mktemp("serve"))
    with Server(bundle, index, {"DSMD_TOKEN": TOKEN}) as s:
        yield s.url, index, tiny_world


@pytest.fixture(scope="module")
def truth(served) -> Truth:
    _, index, world = served
    return Truth(index.parent / "bundle", world)


def png_bytes(path: Path) -> bytes:
    return path.read_bytes()


def test_text_search_returns_the_exact_top_k_with_links_to_each_hit(served, truth):
    url, _, _ = served
    text = "a red circle left of a blue square"
    r = httpx.get(f"{url}/search", params={"text": text, "k": 5})
    assert r.status_code == 200
    body = r.json()
    assert_exact_top_k(body["results"], truth.text(text), 5)
    first = body["results"][0]
    assert first["thumbnail_url"] == f"/items/{first['id']}/thumbnail"
    assert first["captions"] == truth.captions[first["name"]]
    assert body["query"]["truncated"] is False
    thumb = httpx.get(url + first["thumbnail_url"])
    assert thumb.headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(thumb.content)).size[0] <= 256
    image = httpx.get(url + first["image_url"])
    assert image.content == (truth.world / "images" / first["name"]).read_bytes()
    assert httpx.get(f"{url}/items/{first['id']}").json()["name"] == first["name"]


def test_image_search_by_upload_and_by_base64_and_to_captions(served, truth):
    """An indexed image finds itself first, then the exact neighbours; base64 answers the same; the
    captions found are the exact nearest captions; "more like this" starts with the item itself."""
    url, _, world = served
    name = truth.most_distinct()
    data = png_bytes(world / "images" / name)
    a = httpx.post(f"{url}/search/image", params={"k": 3}, files={"file": ("x.png", data, "image/png")}).json()
    assert a["results"][0]["name"] == name
    assert_exact_top_k(a["results"], truth.image(name), 3)
    b64 = {"image_base64": base64.b64encode(data).decode()}
    b = httpx.post(f"{url}/search/image", params={"k": 3}, json=b64).json()
    assert [x["id"] for x in b["results"]] == [x["id"] for x in a["results"]]

    t = httpx.post(f"{url}/search/image", params={"k": 4, "target": "texts"}, files={"file": ("x.png", data)}).json()
    captions = [c for n in truth.names for c in truth.captions[n]]
    exact = dict(zip(captions, (truth.bundle.encode_texts(captions) @ truth.encode([name])[0]).tolist()))
    assert [x["score"] for x in t["results"]] == pytest.approx(sorted(exact.values(), reverse=True)[:4], abs=TOL)
    assert all(x["score"] == pytest.approx(exact[x["text"]], abs=TOL) for x in t["results"])

    item = a["results"][0]["id"]
    more = httpx.get(f"{url}/items/{item}/similar", params={"k": 3})
    assert more.status_code == 200 and more.json()["results"][0]["id"] == item
    assert_exact_top_k(more.json()["results"], truth.image(name), 3)


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


def test_adding_and_removing_items_needs_the_token(served, truth):
    """An added image is found first by itself, among the exact top k; once removed it is never returned."""
    url, _, _ = served
    c = httpx.Client(base_url=url, timeout=60)
    new = truth.new_images(1)[0]
    files = {"file": ("new.png", new.read_bytes(), "image/png")}
    assert c.post("/items", files=files).status_code == 401
    assert c.post("/items", files=files, headers={"authorization": "Bearer wrong"}).status_code == 401
    before = c.get("/info").json()["index"]["images"]["count"]
    r = c.post("/items", files=files, headers={"authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 201, r.text
    new_id, new_name = r.json()["id"], r.json()["name"]
    assert c.get("/info").json()["index"]["images"]["count"] == before + 1
    query = {"file": ("q.png", new.read_bytes())}
    assert [h["id"] for h in c.post("/search/image", params={"k": 1}, files=query).json()["results"]] == [new_id]
    vector = truth.encode([new.name])[0]
    exact = {**truth.scores(vector), new_name: 1.0}
    assert_exact_top_k(c.post("/search/image", params={"k": 5}, files=query).json()["results"], exact, 5)
    assert c.delete(f"/items/{new_id}").status_code == 401
    assert c.delete(f"/items/{new_id}", headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert c.get(f"/items/{new_id}").status_code == 404
    assert c.get("/info").json()["index"]["images"]["count"] == before
    hits = c.post("/search/image", params={"k": before + 1}, files=query).json()["results"]
    assert_exact_top_k(hits, truth.scores(vector), before + 1)


def test_operations_endpoints(served):
    url, _, _ = served
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{url}/readyz").json() == {"ready": True, "encoders": {"text": True, "image": True}}
    info = httpx.get(f"{url}/info").json()
    assert info["bundle"]["dim"] == 16 and info["index"]["images"]["kind"] == "flat"
    httpx.get(f"{url}/search", params={"text": "two stars"})
    metrics = httpx.get(f"{url}/metrics").text
    assert 'dsmd_requests_total{endpoint="/search",status="200"}' in metrics
    assert 'dsmd_encoder_batch_size_count{encoder="text"}' in metrics
    assert 'dsmd_index_items{collection="index",part="images"}' in metrics
    assert "process_resident_memory_bytes" in metrics
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "dsmd search" in page.text
    spec = httpx.get(f"{url}/openapi.json").json()
    target = next(p for p in spec["paths"]["/search/image"]["post"]["parameters"] if p["name"] == "target")
    assert target["schema"]["enum"] == ["images", "texts"]  # the spec lists the allowed values


def test_concurrent_text_queries_are_batched_together(tiny_search, tmp_path):
    """32 queries sent together while the encoder works on a first one (slowed to 1 s per call) wait for it
    and are then encoded in fewer calls than queries: the counts hold however slowly the requests arrive."""
    bundle, index = copy_search(tiny_search, tmp_path)
    env = {"DSMD_ENCODE_DELAY_MS": "1000", "DSMD_REQUEST_TIMEOUT_S": "120"}
    with Server(bundle, index, env) as s:
        async def many():
            async with httpx.AsyncClient(base_url=s.url, timeout=120) as c:
                return await asyncio.gather(*[c.get("/search", params={"text": f"a red circle number {i}"})
                                              for i in range(32)])

        rs = asyncio.run(many())
        assert [r.status_code for r in rs] == [200] * 32
        calls = s.metric("dsmd_encoder_batch_size_count", encoder="text")
        singles = s.metric("dsmd_encoder_batch_size_bucket", encoder="text", le="1.0")
        assert s.metric("dsmd_encoder_batch_size_sum", encoder="text") == 32  # each query encoded once
        assert calls < 32 and singles < calls, (singles, calls)  # some calls carried more than one query


# ---------------------------------------------------------------- the web page, in a real browser


def _browser_or_skip() -> None:
    """The browser test needs Debian's chromium and chromedriver, which `make test` installs with apt where it
    can (Debian, as root). Elsewhere it is skipped with the reason; DSMD_NO_SKIPS=1 (set by .ci/run) makes
    that skip fail the run (tests/conftest.py)."""
    missing = [name for name in ("chromium", "chromedriver") if not shutil.which(name)]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not found: install them (apt-get install chromium chromium-driver) "
                    "to run the web-page test")


def chromium():
    """A headless Debian chromium under selenium (skipped, or failed under DSMD_NO_SKIPS, without it)."""
    _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        opts.add_argument(arg)
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    return webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=opts)


def test_web_page_in_headless_chromium(served, tmp_path):
    """Type a query, see results; upload an image, see neighbours and captions; 'more like this'."""
    driver = chromium()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    url, _, world = served
    try:
        wait = WebDriverWait(driver, 20)
        cards = lambda d: d.find_elements(By.CSS_SELECTOR, "#grid .result")  # noqa: E731
        driver.get(url + "/")
        box = driver.find_element(By.ID, "q")
        box.send_keys("a red circle left of a blue square")
        driver.find_element(By.ID, "go").click()
        wait.until(lambda d: len(cards(d)) == 12)
        assert "results for" in driver.find_element(By.ID, "status").text
        assert "q=a+red+circle+left+of+a+blue+square" in driver.current_url  # the search lives in the URL
        wait.until(lambda d: all(img.get_property("naturalWidth") > 0
                                 for img in d.find_elements(By.CSS_SELECTOR, "#grid .result img")))
        first_page = [c.text for c in cards(driver)]
        driver.save_screenshot(str(tmp_path / "text-search.png"))
        driver.find_element(By.ID, "more").click()  # the next page is appended
        wait.until(lambda d: len(cards(d)) == 24)
        assert [c.text for c in cards(driver)][:12] == first_page

        image = sorted((world / "images").glob("*.png"))[3]
        driver.find_element(By.ID, "file").send_keys(str(image))
        wait.until(EC.text_to_be_present_in_element((By.ID, "status"), f"images like {image.name}"))
        assert len(driver.find_elements(By.CSS_SELECTOR, "#captions .caption")) == 5
        assert len(cards(driver)) == 12
        driver.save_screenshot(str(tmp_path / "image-search.png"))

        driver.find_elements(By.CSS_SELECTOR, "#grid .result .more")[0].click()
        wait.until(EC.text_to_be_present_in_element((By.ID, "status"), "images like #"))
        assert "like=" in driver.current_url

        # a linked search opens with its results, filters included; filters change the URL; back undoes them
        driver.get(url + "/?q=a+green+triangle&dedup=1")
        wait.until(lambda d: len(cards(d)) > 0 and "results for" in d.find_element(By.ID, "status").text)
        assert driver.find_element(By.ID, "q").get_property("value") == "a green triangle"
        assert driver.find_element(By.ID, "dedup").is_selected()
        linked = [c.text for c in cards(driver)]
        folder = driver.find_element(By.ID, "folder")
        folder.send_keys("no/such/folder", Keys.ENTER)
        wait.until(lambda d: "folder=no%2Fsuch%2Ffolder" in d.current_url and len(cards(d)) == 0)
        driver.back()
        wait.until(lambda d: "folder" not in d.current_url and [c.text for c in cards(d)] == linked)
        assert driver.find_element(By.ID, "folder").get_property("value") == ""
        item = int(httpx.get(f"{url}/search", params={"text": "a yellow star", "k": 1}).json()["results"][0]["id"])
        httpx.put(f"{url}/items/{item}/tags", json={"tags": ["page-test"]},
                  headers={"Authorization": f"Bearer {TOKEN}"})
        driver.find_element(By.ID, "tags").send_keys("page-test", Keys.ENTER)
        wait.until(lambda d: "tags=page-test" in d.current_url and len(cards(d)) == 1)
        driver.execute_script("document.getElementById('from').value = '2999-01-01';"
                              "document.getElementById('from').dispatchEvent(new Event('change'));")
        wait.until(lambda d: "from=2999-01-01" in d.current_url and len(cards(d)) == 0)
        driver.get(url + "/?like=" + str(item))
        wait.until(EC.text_to_be_present_in_element((By.ID, "status"), f"images like #{item}"))
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
