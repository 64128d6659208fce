"""Words as well as meaning (index/fulltext.py): a file named for what it shows is found by that word
even where the embedding ranks it last; folders, tags and captions are words too; the full-text
index follows renames, deletions, tag changes and old indexes; GET /search?mode=text|hybrid."""

from __future__ import annotations

import shutil
import sqlite3

import httpx
import numpy as np
import pytest
from serving import Server

from dsmd.bundle import Bundle
from dsmd.index.filtered import Ask, answer
from dsmd.index.filters import Filter
from dsmd.index.metadata import set_tags
from dsmd.index.search import SearchIndex
from dsmd.index.sync import sync


def names(ans) -> list[str]:
    return [h.item["uri"].rsplit("/", 1)[1] for h in ans.hits]


@pytest.fixture
def indexed(tiny_search, tiny_world, tmp_path):
    """A folder of 10 world images, one of them named for a word (kayak) and chosen as the one the
    embedding ranks last for that word, synced into an index."""
    bundle = Bundle(tiny_search / "bundle")
    images = sorted((tiny_world / "images").glob("*.png"))[:10]
    query = bundle.encode_texts(["kayak"])[0]
    last = int(np.argmin(bundle.encode_images([p.read_bytes() for p in images]) @ query))
    root = tmp_path / "photos"
    for i, src in enumerate(images):
        dest = root / ("2024/june" if i % 2 else "2023") / ("kayak-trip.png" if i == last else f"img{i}.png")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dest)
    sync(tmp_path / "index", bundle, root, progress=False)
    return bundle, root, tmp_path / "index", query, root / ("2024/june" if last % 2 else "2023") / "kayak-trip.png"


def test_the_file_name_carries_what_the_embedding_does_not(indexed):
    bundle, root, index, query, kayak = indexed
    s = SearchIndex(index)
    try:
        by_meaning = answer(s, query, Ask(10))
        assert names(by_meaning)[-1] == "kayak-trip.png"  # the embedding puts it last
        by_words = answer(s, None, Ask(3, mode="text", text="Kayak!"))
        assert names(by_words) == ["kayak-trip.png"] and by_words.strategy == "text" and not by_words.more
        both = answer(s, query, Ask(3, mode="hybrid", text="kayak"))
        assert names(both)[0] == "kayak-trip.png" and len(both.hits) == 3 and both.strategy == "hybrid"
        june = answer(s, None, Ask(10, mode="text", text="june"))  # folders are words too
        assert {h.item["folder"] for h in june.hits} == {"2024/june"} and len(june.hits) == 5
        only_2023 = answer(s, query, Ask(10, where=Filter(folder="2023"), mode="hybrid", text="june"))
        assert {h.item["folder"] for h in only_2023.hits} == {"2023"}  # the filter holds for both rankings
        assert answer(s, None, Ask(3, mode="text", text="!!! ...")).hits == []
    finally:
        s.close()
    with pytest.raises(Exception, match="mode is one of"):
        Ask(3, mode="words", text="x")
    with pytest.raises(Exception, match="without dedup"):
        Ask(3, mode="text", text="x", dedup=0.9)


def test_the_words_follow_tags_renames_deletions_and_old_indexes(indexed):
    bundle, root, index, query, kayak = indexed

    def found(text: str) -> list[str]:
        s = SearchIndex(index)
        try:
            return names(answer(s, None, Ask(10, mode="text", text=text)))
        finally:
            s.close()

    with sqlite3.connect(index / "items.sqlite") as con:
        con.execute("PRAGMA foreign_keys=ON")
        item = con.execute("SELECT id FROM items WHERE uri LIKE '%img0.png'").fetchone()[0]
        set_tags(con, item, ["sunsets", "beach"])
    assert found("sunset") == ["img0.png"]  # a prefix of the tag
    with sqlite3.connect(index / "items.sqlite") as con:
        con.execute("PRAGMA foreign_keys=ON")
        set_tags(con, item, [])
    assert found("sunset") == []
    kayak.rename(kayak.with_name("canoe.png"))
    (root / "2023" / "img0.png").unlink()
    r = sync(index, bundle, root, progress=False)
    assert (r.moved, r.removed, r.added) == (1, 1, 0)
    assert found("kayak") == [] and found("canoe") == ["canoe.png"] and found("img0") == []
    # an index made before the full-text table gains it, filled, when opened with write access
    with sqlite3.connect(index / "items.sqlite") as con:
        con.executescript("DROP TABLE items_fts; DROP TRIGGER items_fts_insert; DROP TRIGGER items_fts_delete; "
                          "DROP TRIGGER items_fts_update; DROP TRIGGER tags_fts_insert; DROP TRIGGER tags_fts_delete;")
    assert found("canoe") == ["canoe.png"]


def test_search_by_words_through_the_server(indexed):
    bundle, root, index, query, kayak = indexed
    with Server(bundle.path, index) as s:
        def ask(**params):
            return httpx.get(f"{s.url}/search", params={"k": 3, **params})

        r = ask(text="kayak", mode="text")
        assert r.status_code == 200 and [x["name"] for x in r.json()["results"]] == ["kayak-trip.png"]
        assert r.json()["strategy"] == "text"
        hybrid = ask(text="kayak", mode="hybrid").json()
        assert hybrid["results"][0]["name"] == "kayak-trip.png" and hybrid["strategy"] == "hybrid"
        assert ask(text="kayak").json()["results"][0]["name"] != "kayak-trip.png"  # by meaning alone
        assert ask(text="kayak", mode="words").status_code == 422
        assert ask(text="kayak", mode="text", dedup=0.9).status_code == 422
        # the page's switch, kept in its URL
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import Select, WebDriverWait
        from test_serve import chromium

        driver = chromium()
        try:
            wait = WebDriverWait(driver, 20)
            cards = "#grid .result img"
            first = lambda d: [i.get_attribute("alt") for i in d.find_elements(By.CSS_SELECTOR, cards)][:1]  # noqa: E731
            driver.get(s.url + "/?q=kayak&mode=text")
            wait.until(lambda d: first(d) == ["kayak-trip.png"])
            assert Select(driver.find_element(By.ID, "mode")).first_selected_option.get_attribute("value") == "text"
            Select(driver.find_element(By.ID, "mode")).select_by_value("")
            wait.until(lambda d: "mode=" not in d.current_url and first(d) and first(d) != ["kayak-trip.png"])
        finally:
            driver.quit()
