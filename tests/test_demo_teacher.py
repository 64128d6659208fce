"""The demo teacher: trains, saves, loads through the Teacher interface."""

import json
import shutil

import numpy as np
import pytest
import torch

from dsmd.datasets import load_dataset
from dsmd.distill.teachers import list_teachers, load_teacher
from dsmd.distill.teachers.demo import DemoTeacher
from dsmd.errors import UserError
from dsmd.images import open_image


def test_trained_teacher_loads_and_gives_unit_embeddings(tiny_teacher, tiny_world):
    t = load_teacher("demo", tiny_teacher)
    assert isinstance(t, DemoTeacher) and t.dim == 16 and t.kind == "demo"
    items = load_dataset(tiny_world).split("test")[:3]
    img = t.encode_images([open_image(it.path) for it in items])
    txt = t.encode_texts([it.captions[0] for it in items] + ["", "unknownword " * 100])
    assert img.shape == (3, 16) and txt.shape == (5, 16)
    torch.testing.assert_close(img.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(txt.norm(dim=1), torch.ones(5))
    # deterministic, and batch composition does not change a row
    again = t.encode_texts([items[1].captions[0]])
    torch.testing.assert_close(again[0], txt[1], atol=1e-5, rtol=0)
    d = t.describe()
    assert d["preprocess"]["size"] == 32 and len(d["checkpoint_hash"]) == 64


def test_manifest_records_training(tiny_teacher):
    m = json.loads((tiny_teacher / "manifest.json").read_text())
    assert m["artifact"] == "demo-teacher" and m["history"] and "rsum" in m["val_recall"]
    assert m["parameters"] > 0 and m["dataset"]["fingerprint"]


def test_unfinished_or_wrong_folders_are_refused(tiny_teacher, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_teacher("demo", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_teacher("demo", tmp_path)
    half = tmp_path / "half"
    shutil.copytree(tiny_teacher, half)
    (half / "manifest.json").unlink()  # a killed training run
    with pytest.raises(UserError, match="unfinished"):
        load_teacher("demo", half)
    with pytest.raises(UserError, match="unknown teacher kind"):
        load_teacher("dall-e", tiny_teacher)
    assert set(list_teachers()) == {"demo", "beit3", "clip", "siglip"}


def test_text_tower_is_order_sensitive(tiny_teacher):
    """Swapping which colour goes with which shape must change the embedding (no bag of words)."""
    t = load_teacher("demo", tiny_teacher)
    e = t.encode_texts(["a red circle left of a blue square", "a blue circle left of a red square"]).numpy()
    assert float(e[0] @ e[1]) < 0.99999
    assert not np.allclose(e[0], e[1])
