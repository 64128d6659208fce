"""The search API beyond one query: filters, paging, dedup, tags, queries by vector, by weighted terms
and in batches, and the encoders' vectors (/embed). A real server on a copy of the tiny test index;
expected answers computed here with the bundle and numpy (tests/test_serve.py's Truth)."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from serving import Server, copy_search
from test_serve import TOKEN, Truth, assert_exact_top_k

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def served(tiny_search, tiny_world, tmp_path_factory):
    bundle, index = copy_search(tiny_search, tmp_path_factory.mktemp("api"))
    with Server(bundle, index, {"DSMD_TOKEN": TOKEN}) as s:
        yield s.url, Truth(bundle, tiny_world)


def names(body: dict) -> list[str]:
    return [r["name"] for r in body["results"]]


def test_pages_are_one_ranking_cut_in_pieces(served):
    url, truth = served
    text = "a small green triangle"
    whole = httpx.get(f"{url}/search", params={"text": text, "k": 12}).json()
    pages, offset = [], 0
    while offset is not None and offset < 12:
        body = httpx.get(f"{url}/search", params={"text": text, "k": 4, "offset": offset}).json()
        assert body["offset"] == offset
        pages += names(body)
        offset = body["next_offset"]
    assert pages == names(whole)
    n = len(truth.names)
    last = httpx.get(f"{url}/search", params={"text": text, "k": 4, "offset": n - 2}).json()
    assert len(last["results"]) == 2 and last["next_offset"] is None
    assert httpx.get(f"{url}/search", params={"text": text, "offset": -1}).status_code == 422


def test_tags_are_set_cleared_shown_and_filtered_on(served):
    url, truth = served
    first = httpx.get(f"{url}/search", params={"text": "a red circle", "k": 6}).json()["results"]
    ids = [r["id"] for r in first]
    assert httpx.put(f"{url}/items/{ids[0]}/tags", json={"tags": ["beach"]}).status_code == 401
    for i in ids[:3]:
        r = httpx.put(f"{url}/items/{i}/tags", json={"tags": ["beach", " sunset "]}, headers=AUTH)
        assert r.status_code == 200 and r.json() == {"id": i, "tags": ["beach", "sunset"]}
    httpx.put(f"{url}/items/{ids[5]}/tags", json={"tags": ["beach"]}, headers=AUTH)
    item = httpx.get(f"{url}/items/{ids[0]}").json()
    assert item["tags"] == ["beach", "sunset"] and item["folder"] is not None and item["bytes"] > 0
    # the filter is inside the search: far-off items still come back, k of them when there are k
    far = "a large yellow star"
    both = httpx.get(f"{url}/search", params={"text": far, "k": 10, "tag_all": ["beach", "sunset"]}).json()
    assert sorted(r["id"] for r in both["results"]) == sorted(ids[:3]) and both["strategy"] == "exact"
    anyof = httpx.get(f"{url}/search", params={"text": far, "k": 10, "tag": "beach"}).json()
    assert sorted(r["id"] for r in anyof["results"]) == sorted([*ids[:3], ids[5]])
    exact = {n: s for n, s in truth.text(far).items() if n in {r["name"] for r in anyof["results"]}}
    assert_exact_top_k(anyof["results"], exact, 4)
    assert httpx.put(f"{url}/items/{ids[5]}/tags", json={"tags": []}, headers=AUTH).json()["tags"] == []
    anyof = httpx.get(f"{url}/search", params={"text": far, "k": 10, "tag": "beach"}).json()
    assert len(anyof["results"]) == 3
    similar = httpx.get(f"{url}/items/{ids[4]}/similar", params={"k": 10, "tag": "sunset"}).json()
    assert sorted(r["id"] for r in similar["results"]) == sorted(ids[:3])
    assert httpx.put(f"{url}/items/999999/tags", json={"tags": ["x"]}, headers=AUTH).status_code == 404
    assert httpx.put(f"{url}/items/{ids[0]}/tags", json={"tags": [""]}, headers=AUTH).status_code == 422


def test_filters_by_folder_time_and_size(served):
    url, truth = served
    text = "a blue square"
    everything = httpx.get(f"{url}/search", params={"text": text, "k": 5}).json()
    item = httpx.get(f"{url}/items/{everything['results'][0]['id']}").json()
    same = httpx.get(f"{url}/search", params={"text": text, "k": 5, "folder": item["folder"] or "/",
                                              "taken_from": "2000-01-01", "min_side": 1}).json()
    assert names(same) == names(everything)
    none = httpx.get(f"{url}/search", params={"text": text, "folder": "no/such/folder"}).json()
    assert none["results"] == [] and none["next_offset"] is None
    later = httpx.get(f"{url}/search", params={"text": text, "taken_from": "2999-01-01"}).json()
    assert later["results"] == []
    big = httpx.get(f"{url}/search", params={"text": text, "min_bytes": item["bytes"], "k": 100}).json()
    assert big["results"] and all(httpx.get(f"{url}/items/{r['id']}").json()["bytes"] >= item["bytes"]
                                  for r in big["results"])
    bad = httpx.get(f"{url}/search", params={"text": text, "taken_from": "yesterday"})
    assert bad.status_code == 422 and "ISO date" in bad.json()["detail"]
    crossed = httpx.get(f"{url}/search", params={"text": text, "taken_from": "2024-02-01", "taken_to": "2024-01-01"})
    assert crossed.status_code == 422


def test_search_by_vector_equals_search_by_text_and_embed_gives_the_encoders_vectors(served):
    url, truth = served
    text = "a white cross above a black disc"
    emb = httpx.post(f"{url}/embed", json={"texts": [text, "a red circle"]}).json()
    expected = truth.bundle.encode_texts([text, "a red circle"])
    assert emb["dim"] == truth.bundle.dim and len(emb["vectors"]) == 2 and emb["truncated"] == [False, False]
    assert np.allclose(np.array(emb["vectors"]), expected, atol=1e-4)
    by_vector = httpx.post(f"{url}/search/vector", json={"vector": emb["vectors"][0], "k": 5}).json()
    by_text = httpx.get(f"{url}/search", params={"text": text, "k": 5}).json()
    assert names(by_vector) == names(by_text)
    scaled = httpx.post(f"{url}/search/vector", json={"vector": [3 * x for x in emb["vectors"][0]], "k": 5}).json()
    assert names(scaled) == names(by_text)  # normalised first
    name = truth.most_distinct()
    image = httpx.post(f"{url}/embed/image", files={"file": ("x.png", (truth.world / "images" / name).read_bytes())})
    assert np.allclose(image.json()["vectors"][0], truth.encode([name])[0], atol=1e-4)
    for body, status in (({"vector": [1.0, 2.0]}, 422), ({"vector": [0.0] * truth.bundle.dim}, 422),
                         ({"vector": emb["vectors"][0], "surprise": 1}, 422),
                         ({"vector": emb["vectors"][0], "k": 0}, 422)):
        r = httpx.post(f"{url}/search/vector", json=body)
        assert r.status_code == status, (body, r.text)
    assert httpx.post(f"{url}/search/vector", content=b"{not json", headers={"content-type": "application/json"}
                      ).status_code == 400
    assert httpx.post(f"{url}/search/vector", json={"vector": [0.1] * 100_000}).status_code == 413
    assert httpx.post(f"{url}/embed", json={"texts": ["x"] * 65}).status_code == 422


def test_a_negative_weight_moves_results_away_from_its_text(served):
    """`a red circle` + 1 and an image - 1: the exact top k of that mix, and further from the image than
    the plain text's results. (The negative term is an image: the tiny model tells images apart far better
    than texts; the texts' negative weights go the same way through the same sum.)"""
    url, truth = served
    pos = "a red circle"
    plain = httpx.get(f"{url}/search", params={"text": pos, "k": 5}).json()
    away_id, away_name = plain["results"][0]["id"], plain["results"][0]["name"]
    v_away = truth.vectors[truth.names.index(away_name)]
    mixed = truth.bundle.encode_texts([pos])[0] - v_away
    mixed /= np.linalg.norm(mixed)
    body = httpx.post(f"{url}/search/mix", json={"terms": [{"text": pos}, {"item": away_id, "weight": -1}],
                                                 "k": 5}).json()
    assert_exact_top_k(body["results"], truth.scores(mixed), 5)
    away = truth.scores(v_away)
    assert away_name not in names(body)
    assert np.mean([away[n] for n in names(body)]) < np.mean([away[n] for n in names(plain)])
    neg = httpx.post(f"{url}/search/mix", json={"terms": [{"text": pos}, {"text": "a blue square", "weight": -0.5}],
                                                "k": 5}).json()
    v = truth.bundle.encode_texts([pos, "a blue square"])
    assert_exact_top_k(neg["results"], truth.scores((v[0] - 0.5 * v[1]) / np.linalg.norm(v[0] - 0.5 * v[1])), 5)
    item = plain["results"][0]["id"]
    more = httpx.post(f"{url}/search/mix", json={"terms": [{"item": item}], "k": 3}).json()
    assert more["results"][0]["id"] == item
    cancel = httpx.post(f"{url}/search/mix", json={"terms": [{"text": pos}, {"text": pos, "weight": -1}]})
    assert cancel.status_code == 422 and "cancel" in cancel.json()["detail"]
    assert httpx.post(f"{url}/search/mix", json={"terms": [{"text": pos, "item": 1}]}).status_code == 422
    assert httpx.post(f"{url}/search/mix", json={"terms": [{"item": 10**9}]}).status_code == 404


def test_a_batch_answers_each_text_as_search_would(served):
    url, _ = served
    texts = ["a red circle", "a blue square", "a green triangle beneath a star"]
    body = httpx.post(f"{url}/search/batch", json={"texts": texts, "k": 3}).json()
    assert [a["text"] for a in body["answers"]] == texts
    for text, ans in zip(texts, body["answers"]):
        assert names(ans) == names(httpx.get(f"{url}/search", params={"text": text, "k": 3}).json())


def test_dedup_over_http_reports_what_it_folded(served):
    url, truth = served
    text = "a red circle"
    plain = httpx.get(f"{url}/search", params={"text": text, "k": 10}).json()
    loose = httpx.get(f"{url}/search", params={"text": text, "k": 10, "dedup": 0.5}).json()
    assert loose["results"][0]["name"] == plain["results"][0]["name"]  # the best is never folded
    assert loose["collapsed"] == sum(r["duplicates"] for r in loose["results"])
    vectors = {n: v for n, v in zip(truth.names, truth.vectors)}
    kept = [vectors[n] for n in names(loose)]
    sims = np.array(kept) @ np.array(kept).T
    np.fill_diagonal(sims, 0)
    assert sims.max() < 0.5 + 1e-3  # no two results left closer than the threshold
    off = httpx.get(f"{url}/search", params={"text": text, "k": 10}).json()
    assert "collapsed" not in off


def test_json_bodies_are_described_in_the_spec_and_refused_clearly(served):
    url, truth = served
    spec = httpx.get(f"{url}/openapi.json").json()["paths"]
    for path in ("/search/vector", "/search/mix", "/search/batch", "/embed"):
        schema = spec[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert "$ref" not in json.dumps(schema) and schema["type"] == "object", path
    assert "tags" in spec["/items/{item_id}/tags"]["put"]["requestBody"]["content"]["application/json"]["schema"][
        "properties"]
    for body in ([], "x", 3, None, {"vector": "abc"}, {"vector": [float("nan")] * truth.bundle.dim}):
        r = httpx.post(f"{url}/search/vector", content=json.dumps(body), headers={"content-type": "application/json"})
        assert r.status_code == 422, (body, r.status_code, r.text)
    r = httpx.post(f"{url}/search/vector", content=b'{"vector": [NaN]}', headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert httpx.post(f"{url}/embed", content=b"texts=a").status_code == 415
