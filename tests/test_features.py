"""The teacher feature store: correct, resumable after a kill, sharded by torchrun, never mixed."""

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_retrieval import recall_by_definition

from dsmd.cli import main as dsmd
from dsmd.datasets import load_dataset
from dsmd.distill.features import FeatureStore, StoreMismatch, extract
from dsmd.distill.teachers import load_teacher

ARRAYS = ("image_emb", "image_ids", "image_ok", "caption_emb", "caption_ids", "caption_image")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "dsmd.cli", *args]


def _same_store(a: Path, b: Path, atol: float = 0.0) -> None:
    """Byte-identical arrays (atol=0), or ids identical and embeddings within atol."""
    for split in ("train", "val", "test"):
        for name in ARRAYS:
            x, y = np.load(a / split / f"{name}.npy"), np.load(b / split / f"{name}.npy")
            assert x.dtype == y.dtype and x.shape == y.shape
            if atol and name.endswith("_emb"):
                np.testing.assert_allclose(x.astype(np.float32), y.astype(np.float32), atol=atol, rtol=0)
            else:
                assert x.tobytes() == y.tobytes(), f"{split}/{name} differs"


@pytest.fixture(scope="module")
def reference_store(tiny_world, tiny_teacher, tmp_path_factory):
    """An uninterrupted extraction, run as a user would (a fresh process, default threads)."""
    out = tmp_path_factory.mktemp("store") / "ref"
    subprocess.run(_cli("features", "--teacher-path", str(tiny_teacher), "--data", str(tiny_world), "--out", str(out),
                        "--batch-size", "4", "--workers", "0"), check=True, capture_output=True)
    return out


def test_store_holds_the_teachers_unit_embeddings_by_id(reference_store, tiny_world, tiny_teacher):
    store = FeatureStore(reference_store)
    ds = load_dataset(tiny_world)
    teacher = load_teacher("demo", tiny_teacher)
    assert store.manifest["teacher"]["checkpoint_hash"] == teacher.checkpoint_hash
    assert store.manifest["dataset"]["fingerprint"] == ds.fingerprint()
    assert store.splits == ["train", "val", "test"]
    test = store.split("test")
    items = ds.split("test")
    assert test.image_emb.shape == (24, teacher.dim) and test.image_emb.dtype == np.float16
    assert test.caption_emb.shape == (120, teacher.dim)
    np.testing.assert_allclose(np.linalg.norm(test.image_emb.astype(np.float32), axis=1), 1, atol=2e-3)
    # rows are the teacher's own embeddings of the items with those ids
    rows = test.image_rows(np.array([items[5].image_id, items[0].image_id]))
    direct = teacher.encode_images([__import__("dsmd.images").images.open_image(items[5].path)]).numpy()
    np.testing.assert_allclose(test.image_emb[rows[0]].astype(np.float32), direct[0], atol=2e-3)
    caps = test.caption_rows(np.array(items[3].caption_ids))
    assert (test.caption_image[caps] == rows_of(test, items[3].image_id)).all()
    direct = teacher.encode_texts(list(items[3].captions)).numpy()
    np.testing.assert_allclose(test.caption_emb[caps].astype(np.float32), direct, atol=2e-3)
    with pytest.raises(KeyError, match="not in the store"):
        test.image_rows(np.array([10**9]))


def rows_of(split, image_id):
    return split.image_rows(np.array([image_id]))[0]


def test_recall_command_prints_table_and_writes_clip_benchmark_json(reference_store, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert dsmd(["recall", str(reference_store), "--split", "test", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| model | i→t R@1" in text and "24 images, 120 captions" in text
    doc = __import__("json").loads(out.read_text())
    # the ground truth: recall of the store's test embeddings, computed here from the definition
    f = FeatureStore(reference_store).split("test")
    want = recall_by_definition(f.image_emb, f.caption_emb, f.caption_image)
    assert 0 < want["i2t_R@1"] < 100  # a teacher that tells images apart, but not perfectly
    assert {k: doc["dsmd"][k] for k in want} == pytest.approx(want)
    # CLIP_benchmark's names: "image retrieval" is text→image, "text retrieval" image→text, in fractions
    names = {"image": "t2i", "text": "i2t"}
    assert doc["metrics"] == pytest.approx({f"{d}_retrieval_recall@{k}": want[f"{w}_R@{k}"] / 100
                                            for d, w in names.items() for k in (1, 5, 10)})
    name = FeatureStore(reference_store).manifest["teacher"]["name"]
    row = " | ".join(f"{want[f'{w}_R@{k}']:.1f}" for w in ("i2t", "t2i") for k in (1, 5, 10))
    assert f"| {name} | {row} | {want['rsum']:.1f} |" in text


@pytest.mark.slow
def test_killed_extraction_resumes_to_an_identical_store(reference_store, tiny_world, tiny_teacher, tmp_path):
    out = tmp_path / "killed"
    args = _cli("features", "--teacher-path", str(tiny_teacher), "--data", str(tiny_world), "--out", str(out),
                "--batch-size", "4", "--workers", "0")
    kills = 0
    for target in ("train/image_done.npy", "train/caption_done.npy"):
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                done = np.load(out / target)
            except (FileNotFoundError, ValueError, OSError):
                done = np.zeros(1)
            if 0 < done.sum() < len(done):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                break
            time.sleep(0.002)
        else:
            proc.wait()
        assert not (out / "manifest.json").exists() or proc.returncode == 0
    assert kills >= 1, "the extraction finished before it could be killed"
    with pytest.raises(FileNotFoundError, match="resume"):
        FeatureStore(out)
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _same_store(reference_store, out)
    assert FeatureStore(out).manifest["splits"] == FeatureStore(reference_store).manifest["splits"]


@pytest.mark.slow
def test_torchrun_two_processes_give_the_same_store(reference_store, tiny_world, tiny_teacher, tmp_path):
    out = tmp_path / "dist"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dsmd.cli",
           "features", "--teacher-path", str(tiny_teacher), "--data", str(tiny_world), "--out", str(out),
           "--batch-size", "4", "--workers", "0", "--device", "cpu"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert FeatureStore(out).manifest["world_size"] == 2
    # same rows and ids; embeddings within an fp16 step (torchrun runs each rank on one thread,
    # and another thread count may sum in another order)
    _same_store(reference_store, out, atol=2e-3)


def test_a_store_never_mixes_teachers_or_data_sets(reference_store, tiny_world, tiny_teacher, tmp_path):
    other_teacher = tmp_path / "teacher2"
    shutil.copytree(tiny_teacher, other_teacher)
    teacher = load_teacher("demo", other_teacher)
    for p in teacher.model.parameters():  # same architecture, other weights
        p.data.add_(0.01)
    from dsmd.distill.teachers import demo

    demo.save(teacher.model, teacher.tokenizer, other_teacher)
    store = tmp_path / "store"
    shutil.copytree(reference_store, store)
    (store / "manifest.json").unlink()  # an unfinished store of the first teacher
    with pytest.raises(StoreMismatch, match="teacher"):
        extract(load_teacher("demo", other_teacher), load_dataset(tiny_world), store)

    world2 = tmp_path / "world2"
    shutil.copytree(tiny_world, world2)
    doc = (world2 / "dataset_world.json").read_text().replace('"raw": "a ', '"raw": "one ', 1)
    (world2 / "dataset_world.json").write_text(doc)
    with pytest.raises(StoreMismatch, match="data set"):
        extract(load_teacher("demo", tiny_teacher), load_dataset(world2), store)

    with pytest.raises(StoreMismatch, match="precision"):
        extract(load_teacher("demo", tiny_teacher), load_dataset(tiny_world), store, precision="bf16")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(StoreMismatch, match="not a feature store"):
        extract(load_teacher("demo", tiny_teacher), load_dataset(tiny_world), tmp_path / "other")

    # the command line says the same without a traceback
    assert dsmd(["features", "--teacher-path", str(other_teacher), "--data", str(tiny_world),
                 "--out", str(store)]) == 2


def test_a_corrupt_image_is_skipped_and_counted(tiny_world, tiny_teacher, tmp_path):
    world = tmp_path / "world"
    shutil.copytree(tiny_world, world)
    ds = load_dataset(world)
    victim = ds.split("test")[2]
    victim.path.write_bytes(victim.path.read_bytes()[:50])  # truncated PNG
    manifest = extract(load_teacher("demo", tiny_teacher), ds, tmp_path / "store", chunk=8, workers=0)
    assert manifest["splits"]["test"] == {"images": 23, "captions": 115, "skipped_images": 1}
    assert str(victim.path) in manifest["skipped"]["test"][0]
    # the reason is kept on disk, so a run that resumes (here: finds the store done) still has it
    assert list((tmp_path / "store" / "test").glob("skipped.rank*.jsonl"))
    test = FeatureStore(tmp_path / "store").split("test")
    assert victim.image_id not in test.image_ids
    assert len(test.caption_emb) == 115 and test.caption_image.max() == 22
    assert not set(victim.caption_ids) & set(test.caption_ids.tolist())
