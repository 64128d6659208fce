"""The demo teacher: trains, saves, loads through the Teacher interface."""

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from test_retrieval import recall_by_definition

from dsmd.datasets import load_dataset
from dsmd.distill.teachers import TEACHERS, TeacherSpec, list_teachers, load_teacher, register_teacher, teacher_kinds
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


def test_manifest_records_the_saved_model_and_its_data_set(tiny_teacher, tiny_world):
    """Each figure of the manifest is recomputed here from the files it describes."""
    m = json.loads((tiny_teacher / "manifest.json").read_text())
    t = load_teacher("demo", tiny_teacher)
    ds = load_dataset(tiny_world)
    assert m["artifact"] == "demo-teacher" and m["history"][-1]["epoch"] == m["train"]["epochs"]
    assert m["parameters"] == sum(p.numel() for p in t.model.parameters())
    assert m["dataset"]["fingerprint"] == ds.fingerprint()
    assert m["weights_sha256"] == hashlib.sha256((tiny_teacher / "model.safetensors").read_bytes()).hexdigest()
    # the val recall is that of the saved weights (the last epoch's), by the definition of recall
    val = ds.split("val")
    want = recall_by_definition(t.encode_images([open_image(it.path) for it in val]).numpy(),
                                t.encode_texts([c for it in val for c in it.captions]).numpy(),
                                [i for i, it in enumerate(val) for _ in it.captions])
    assert {k: m["val_recall"][k] for k in want} == pytest.approx(want)


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
    assert {"demo", "beit3", "clip", "siglip"} <= set(list_teachers())


@pytest.mark.parametrize("kind", teacher_kinds())
def test_every_registered_kind_has_a_description_a_loader_and_an_export_wrapper(kind):
    """One TeacherSpec per kind declares everything: `dsmd teachers`, `load_teacher` and `dsmd export` read it."""
    import inspect

    spec = TEACHERS[kind]
    assert spec.kind == kind and spec.description.strip() and list_teachers()[kind] == spec.description
    plugin = spec.plugin()
    for name in ("load_teacher", "export_encoders"):
        params = inspect.signature(getattr(plugin, name)).parameters
        assert list(params)[:2] == ["kind", "path"] and any(p.kind is p.VAR_KEYWORD for p in params.values())
    assert "device" in inspect.signature(plugin.load_teacher).parameters


def test_a_new_kind_is_one_registry_entry(tiny_teacher):
    """A kind registered from outside is listed, loaded and exported like the built-in ones."""
    from dsmd.export.encoders import teacher_encoders

    try:
        register_teacher(TeacherSpec("demo2", "the demo teacher again", "dsmd.distill.teachers.demo"))
        assert teacher_kinds()[-1] == "demo2" and list_teachers()["demo2"] == "the demo teacher again"
        assert load_teacher("demo2", tiny_teacher).dim == 16
        assert teacher_encoders("demo2", tiny_teacher).kind == "demo-teacher"
    finally:
        TEACHERS.pop("demo2", None)
    with pytest.raises(ValueError, match="already registered"):
        register_teacher(TeacherSpec("demo", "twice", "dsmd.distill.teachers.demo"))


def test_an_option_a_kind_does_not_take_is_refused_not_ignored(tiny_teacher):
    """`dsmd features --teacher demo --tokenizer X` used to ignore the tokenizer; the registry refuses it."""
    from dsmd.export.encoders import teacher_encoders

    with pytest.raises(UserError, match="demo teacher does not take tokenizer; it takes none"):
        load_teacher("demo", tiny_teacher, tokenizer="beit3.spm")
    with pytest.raises(UserError, match="does not take size"):
        teacher_encoders("demo", tiny_teacher, size="large")


def test_a_teacher_module_without_the_plugin_functions_is_refused():
    with pytest.raises(TypeError, match="does not define load_teacher, export_encoders"):
        TeacherSpec("broken", "a module that is no teacher", "dsmd.distill.teachers.registry").plugin()


def test_text_tower_is_order_sensitive(tiny_teacher):
    """Swapping which colour goes with which shape must change the embedding (no bag of words)."""
    t = load_teacher("demo", tiny_teacher)
    e = t.encode_texts(["a red circle left of a blue square", "a blue circle left of a red square"]).numpy()
    assert float(e[0] @ e[1]) < 0.99999
    assert not np.allclose(e[0], e[1])
