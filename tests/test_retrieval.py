"""Recall metrics on hand-worked cases (METHOD.md §5), and `recall_by_definition`: the ground truth
that other test files compare the code's recall numbers with."""

import numpy as np
import pytest

from dsmd.retrieval import evaluate, format_table, ranks_of_positives


def recall_by_definition(image_emb, caption_emb, caption_image) -> dict[str, float]:
    """R@1/5/10 both ways and RSUM in percent, one query at a time, straight from METHOD.md §5 (the
    keys of `Recall.to_json`). A query's rank is 1 + the number of wrong answers scoring at least as
    high as its best right one; image→text: an image's right answers are all its captions."""
    img, cap = np.asarray(image_emb, np.float32), np.asarray(caption_emb, np.float32)
    owner = np.asarray(caption_image)
    ranks = {"i2t": [], "t2i": []}
    for i, scores in enumerate(img @ cap.T):
        mine = owner == i
        ranks["i2t"].append(1 + np.sum(scores[~mine] >= scores[mine].max()))
    for c, scores in enumerate(cap @ img.T):
        ranks["t2i"].append(1 + np.sum(np.delete(scores, owner[c]) >= scores[owner[c]]))
    out = {f"{way}_R@{k}": 100.0 * np.mean(np.array(r) <= k) for way, r in ranks.items() for k in (1, 5, 10)}
    return {**out, "rsum": sum(out.values())}


def test_perfect_and_reversed_retrieval():
    img = np.eye(3, dtype=np.float32)
    cap = np.eye(3, dtype=np.float32)
    r = evaluate(img, cap, np.array([0, 1, 2]))
    assert r.i2t == {1: 100.0, 5: 100.0, 10: 100.0} and r.t2i == {1: 100.0, 5: 100.0, 10: 100.0}
    assert r.rsum == 600.0 and r.i2t_medr == 1.0

    # every caption prefers the wrong image: image 0's caption points at image 1 etc.
    cap = img[[1, 2, 0]]
    r = evaluate(img, cap, np.array([0, 1, 2]))
    # caption 0 scores 1 with image 1 and ties at 0 with images 0 and 2: the tie ranks it last
    assert r.t2i[1] == 0.0 and r.t2i[5] == 100.0
    assert r.t2i_medr == 3.0


def test_image_to_text_counts_the_best_of_several_captions():
    # image 0 has captions 0 and 1; caption 1 is the best match, caption 0 ranks last
    img = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    cap = np.array([[-1.0, 0.0], [0.9, 0.1], [0.0, 1.0]], np.float32)
    owner = np.array([0, 0, 1])
    r = evaluate(img, cap, owner)
    assert r.i2t[1] == 100.0
    # text→image: caption 0 (score -1 with its image, 0 with the other) ranks 2nd
    assert r.t2i[1] == pytest.approx(200 / 3)


def test_images_with_other_than_five_captions():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(4, 8)).astype(np.float32)
    owner = np.array([0, 1, 1, 1, 2, 3, 3, 3, 3, 3, 3, 3])  # 1, 3, 1 and 7 captions
    cap = img[owner] + 0.01 * rng.normal(size=(len(owner), 8)).astype(np.float32)
    r = evaluate(img, cap, owner)
    assert r.n_captions == 12 and r.n_images == 4
    assert r.t2i[1] == 100.0 and r.i2t[1] == 100.0


def test_ties_count_against_the_query():
    # all scores equal: a collapsed model must not score 100% R@1
    img = np.ones((10, 4), np.float32)
    cap = np.ones((10, 4), np.float32)
    r = evaluate(img, cap, np.arange(10))
    assert r.t2i[1] == 0.0 and r.i2t[1] == 0.0
    assert r.t2i[10] == 100.0  # rank 10 of 10: all 9 negatives tie above it
    ranks = ranks_of_positives(cap, img, [np.array([i]) for i in range(10)])
    assert (ranks == 10).all()


def test_tie_between_positives_is_not_a_negative():
    # two captions of the same image with identical scores: the image still ranks them first
    img = np.array([[1.0, 0.0]], np.float32)
    cap = np.array([[1.0, 0.0], [1.0, 0.0]], np.float32)
    ranks = ranks_of_positives(img, cap, [np.array([0, 1])])
    assert ranks.tolist() == [1]


def test_chunked_equals_unchunked():
    rng = np.random.default_rng(1)
    img = rng.normal(size=(50, 16)).astype(np.float32)
    owner = np.repeat(np.arange(50), 5)
    cap = img[owner] + rng.normal(size=(250, 16)).astype(np.float32)
    pos = [np.array([o]) for o in owner]
    whole = ranks_of_positives(cap, img, pos)
    tiny = ranks_of_positives(cap, img, pos, chunk_bytes=4 * 50 * 3)  # 3 queries per chunk
    assert (whole == tiny).all()


def test_recall_at_k_from_known_ranks():
    # gallery of 12 images; query q's positive is placed at rank q+1 by construction
    n = 12
    img = np.eye(n, dtype=np.float32)
    cap = np.zeros((n, n), np.float32)
    for q in range(n):
        cap[q, q] = n - q  # positive score
        cap[q, [j for j in range(n) if j != q][:q]] = n + 1  # q negatives above it
    r = evaluate(img, cap, np.arange(n))
    assert r.t2i == {1: pytest.approx(100 / 12), 5: pytest.approx(500 / 12), 10: pytest.approx(1000 / 12)}
    assert r.t2i_medr == 6.5


def test_json_has_clip_benchmark_keys_and_table_renders():
    img = np.eye(2, dtype=np.float32)
    r = evaluate(img, img, np.array([0, 1]))
    j = r.to_json()
    assert j["clip_benchmark"]["image_retrieval_recall@1"] == 1.0  # text→image, a fraction
    assert j["clip_benchmark"]["text_retrieval_recall@5"] == 1.0  # image→text
    assert j["rsum"] == 600.0
    assert "| t | 100.0 |" in format_table({"t": r})


def test_bad_inputs_are_refused():
    img = np.eye(2, dtype=np.float32)
    with pytest.raises(ValueError, match="no caption"):
        evaluate(img, img[:1], np.array([0]))
    with pytest.raises(ValueError, match="outside"):
        evaluate(img, img, np.array([0, 5]))


def test_evaluate_agrees_with_the_definition_on_random_embeddings():
    """Random embeddings near their images, 1 to 7 captions each: every R@K and the RSUM."""
    rng = np.random.default_rng(2)
    img = rng.normal(size=(30, 8)).astype(np.float32)
    owner = np.repeat(np.arange(30), rng.integers(1, 8, size=30))
    cap = img[owner] + 1.5 * rng.normal(size=(len(owner), 8)).astype(np.float32)
    want = recall_by_definition(img, cap, owner)
    assert 0 < want["i2t_R@1"] < 100 and 0 < want["t2i_R@1"] < 100  # neither all hits nor all misses
    got = evaluate(img, cap, owner).to_json()
    assert {k: got[k] for k in want} == pytest.approx(want)
