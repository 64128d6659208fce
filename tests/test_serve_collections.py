"""Several collections behind one server (`--index NAME=PATH`, `collection=` on every endpoint): each
request sees its own collection's items and nothing of the others, through the search routes, the
text cache they share, the item routes and the writes. A real server; collection "photos" is the tiny
test index, "other" a folder of the world's training images indexed with the same bundle."""

from __future__ import annotations

import shutil

import httpx
import pytest
from serving import Server, copy_search
from test_serve import TOKEN, Truth

from dsmd.serve.collections import specs

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def indexes(tiny_search, tiny_world, tmp_path_factory):
    """(bundle, photos index, other index, names in photos, names in other)."""
    from dsmd.bundle import Bundle
    from dsmd.index.build import build
    from dsmd.index.sources import folder_sources

    root = tmp_path_factory.mktemp("collections")
    bundle, photos = copy_search(tiny_search, root)
    truth = Truth(bundle, tiny_world)
    folder = root / "other-images"
    folder.mkdir()
    for name in truth.unindexed[:10]:
        shutil.copy(tiny_world / "images" / name, folder / name)
    build(root / "other", Bundle(bundle), folder_sources(folder), progress=False)
    return bundle, photos, root / "other", set(truth.names), set(truth.unindexed[:10])


@pytest.fixture(scope="module")
def two(indexes):
    bundle, photos, other, photo_names, other_names = indexes
    with Server(bundle, f"photos={photos}", {"DSMD_TOKEN": TOKEN}, args=("--index", f"other={other}")) as s:
        yield s.url, photo_names, other_names


def names(body: dict) -> set[str]:
    return {r["name"] for r in body["results"]}


def test_info_lists_the_collections_and_the_first_is_the_default(two):
    url, photos, other = two
    info = httpx.get(f"{url}/info").json()
    assert info["collection"] == "photos" and info["index"]["images"]["count"] == len(photos)
    listed = {c["name"]: c for c in info["collections"]}
    assert list(listed) == ["photos", "other"] and listed["photos"]["default"] and not listed["other"]["default"]
    assert listed["other"]["images"] == len(other) and listed["photos"]["images"] == len(photos)
    assert httpx.get(f"{url}/info", params={"collection": "other"}).json()["index"]["images"]["count"] == len(other)
    missing = httpx.get(f"{url}/search", params={"text": "a red circle", "collection": "nope"})
    assert missing.status_code == 404 and "photos, other" in missing.json()["detail"]


def test_a_second_collection_never_leaks_into_the_first(two, tiny_world):
    url, photos, other = two
    k = len(photos) + len(other)  # as many as both hold: anything of the other would show
    for text in ("a red circle", "two blue squares"):  # the second asks "other" first: the cache is shared
        first = "photos" if text == "a red circle" else "other"
        for c in (first, "other" if first == "photos" else "photos"):
            body = httpx.get(f"{url}/search", params={"text": text, "k": k, "collection": c}).json()
            assert names(body) == (photos if c == "photos" else other)
    default = httpx.get(f"{url}/search", params={"text": "a red circle", "k": k}).json()
    assert names(default) == photos and default["results"][0]["image_url"].endswith("?collection=photos")
    hit = httpx.get(f"{url}/search", params={"text": "a red circle", "k": 1, "collection": "other"}).json()
    hit = hit["results"][0]
    assert hit["image_url"].endswith("?collection=other") and hit["thumbnail_url"].endswith("?collection=other")
    item = httpx.get(f"{url}/items/{hit['id']}", params={"collection": "other"}).json()
    assert item["name"] == hit["name"] and item["name"] in other
    assert httpx.get(f"{url}{hit['thumbnail_url']}").status_code == 200
    image = httpx.get(f"{url}{hit['image_url']}")
    assert image.status_code == 200 and image.content == (tiny_world / "images" / item["name"]).read_bytes()
    similar = httpx.get(f"{url}/items/{hit['id']}/similar", params={"k": k, "collection": "other"}).json()
    assert names(similar) == other


def test_json_endpoints_search_the_collection_named(two):
    url, photos, other = two
    k = len(other)
    batch = httpx.post(f"{url}/search/batch", params={"collection": "other"},
                       json={"texts": ["a red circle", "a green star"], "k": k}).json()
    assert all(names(a) == other for a in batch["answers"])
    vector = httpx.post(f"{url}/embed", params={"collection": "other"}, json={"texts": ["a red circle"]}).json()
    by_vector = httpx.post(f"{url}/search/vector", params={"collection": "other"},
                           json={"vector": vector["vectors"][0], "k": k}).json()
    assert names(by_vector) == other
    mix = httpx.post(f"{url}/search/mix", params={"collection": "other"},
                     json={"terms": [{"text": "a red circle"}, {"text": "night", "weight": -0.5}], "k": k}).json()
    assert names(mix) == other


def test_writes_go_to_the_collection_named_and_only_there(two, tiny_world):
    url, photos, other = two
    image = sorted(photos)[0]
    data = (tiny_world / "images" / image).read_bytes()
    added = httpx.post(f"{url}/items", params={"collection": "other"}, headers=AUTH,
                       files={"file": (image, data, "image/png")})
    assert added.status_code == 201, added.text
    new = added.json()
    counts = {c["name"]: c["images"] for c in httpx.get(f"{url}/info").json()["collections"]}
    assert counts == {"photos": len(photos), "other": len(other) + 1}
    assert httpx.put(f"{url}/items/{new['id']}/tags", params={"collection": "other"}, headers=AUTH,
                     json={"tags": ["mine"]}).status_code == 200
    tagged = httpx.get(f"{url}/search", params={"text": "a red circle", "tag": "mine", "collection": "other"})
    assert [r["id"] for r in tagged.json()["results"]] == [new["id"]]
    assert httpx.get(f"{url}/search", params={"text": "a red circle", "tag": "mine"}).json()["results"] == []
    assert httpx.delete(f"{url}/items/{new['id']}", params={"collection": "other"}, headers=AUTH).status_code == 200
    counts = {c["name"]: c["images"] for c in httpx.get(f"{url}/info").json()["collections"]}
    assert counts == {"photos": len(photos), "other": len(other)}


def test_the_web_page_searches_the_collection_chosen(two):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
    from test_serve import chromium

    url, photos, other = two
    driver = chromium()
    try:
        wait = WebDriverWait(driver, 20)
        shown = lambda d: {i.get_attribute("alt") for i in d.find_elements(By.CSS_SELECTOR, "#grid .result img")}  # noqa: E731
        driver.get(url + "/?q=a+red+circle")
        wait.until(lambda d: d.find_element(By.ID, "collection-box").is_displayed() and len(shown(d)) > 0)
        choice = Select(driver.find_element(By.ID, "collection"))
        assert [o.text for o in choice.options] == ["photos", "other"]
        assert choice.first_selected_option.text == "photos"
        choice.select_by_visible_text("other")  # a change searches again, in the URL
        wait.until(lambda d: "collection=other" in d.current_url and shown(d) and shown(d) <= other)
        wait.until(lambda d: all(img.get_property("naturalWidth") > 0
                                 for img in d.find_elements(By.CSS_SELECTOR, "#grid .result img")))
        driver.back()
        wait.until(lambda d: "collection=other" not in d.current_url and shown(d) and shown(d) <= photos)
    finally:
        driver.quit()


def test_a_collection_with_a_bundle_of_its_own(indexes, tmp_path):
    bundle, photos, other, photo_names, other_names = indexes
    own = shutil.copytree(bundle, tmp_path / "own-bundle")  # another folder: loaded a second time
    with Server(bundle, f"photos={photos}", args=("--index", f"other={other}", "--bundle", f"other={own}")) as s:
        assert httpx.get(f"{s.url}/readyz").json()["ready"]
        for c, expected in (("other", other_names), ("photos", photo_names)):
            body = httpx.get(f"{s.url}/search", params={"text": "a red circle", "k": 50, "collection": c}).json()
            assert names(body) == expected


def test_collection_names_and_bundles_are_checked_before_anything_loads():
    assert [(c.name, c.index, c.bundle) for c in specs("a=/x, /data/photos", "/b")] == \
        [("a", "/x", "/b"), ("photos", "/data/photos", "/b")]
    assert [c.bundle for c in specs("a=/x,b=/y", "/b,b=/other")] == ["/b", "/other"]
    # a lone index keeps working whatever its folder is called, commas included
    assert [(c.name, c.index) for c in specs("/data/My Photos", "/b")] == [("index", "/data/My Photos")]
    assert [(c.name, c.index) for c in specs("/x/photos,2024", "/b")] == [("index", "/x/photos,2024")]
    assert [(c.name, c.index) for c in specs("/data/a=b", "/b")] == [("index", "/data/a=b")]  # '/data/a' no name
    for index, bundle, says in [("photos=/x/index,/y/photos", "/b", "two collections are named 'photos'"),
                                ("a=/x", "c=/b", "no collection is named 'c'"),
                                ("a=/x,b=/y", "a=/b", "collection 'b' has no bundle"),
                                ("", "/b", "no index given"),
                                ("a=", "/b", "'a' has no index folder"),
                                ("/x/My Photos,b=/y", "/b", "needs a name usable in a URL")]:
        with pytest.raises(ValueError, match=says):
            specs(index, bundle)


def test_serve_refuses_two_unnamed_indexes_of_one_folder_name(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "dsmd.cli", "serve", "--bundle", str(tmp_path / "b"), "--index",
                           str(tmp_path / "a" / "index"), "--index", str(tmp_path / "c" / "index")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "two collections are named 'index'" in done.stderr + done.stdout
