"""Data-set readers: Karpathy JSON (Flickr30k, MSCOCO layouts) and JSONL, with validation."""

import json

import numpy as np
import pytest
from PIL import Image

from dsmd.datasets import DatasetError, load_dataset
from dsmd.images import BadImage, SkipReport, open_image


def _jpeg(path, size=(40, 30), colour=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, "JPEG")


def _flickr_entry(imgid, filename, split, caps):
    """An entry exactly as in the public dataset_flickr30k.json (keys, tokens, sentids)."""
    sents = [{"tokens": c.lower().split(), "raw": c, "imgid": imgid, "sentid": imgid * 5 + k}
             for k, c in enumerate(caps)]
    return {"sentids": [s["sentid"] for s in sents], "imgid": imgid, "sentences": sents, "split": split,
            "filename": filename}


def test_reads_a_flickr30k_format_file(tmp_path):
    root = tmp_path / "flickr30k-images"
    images = []
    for i, split in enumerate(["train", "train", "val", "test", "test"]):
        fname = f"{1000092795 + i}.jpg"
        _jpeg(root / fname)
        caps = [f"Two young guys with shaggy hair look at their hands {i} {k} ." for k in range(5)]
        images.append(_flickr_entry(i, fname, split, caps))
    ann = tmp_path / "dataset_flickr30k.json"
    ann.write_text(json.dumps({"images": images, "dataset": "flickr30k"}))

    ds = load_dataset(ann, images=root)
    assert ds.name == "flickr30k"
    assert ds.counts() == {"train": {"images": 2, "captions": 10}, "val": {"images": 1, "captions": 5},
                           "test": {"images": 2, "captions": 10}}
    test = ds.split("test")
    assert [it.image_id for it in test] == [3, 4]
    assert test[0].caption_ids == (15, 16, 17, 18, 19)
    assert test[0].path == root / "1000092798.jpg"
    assert test[0].captions[0].startswith("Two young guys")
    assert len(ds.fingerprint()) == 64


def test_reads_coco_layout_with_filepath_and_restval(tmp_path):
    entries = []
    for i, (sub, split) in enumerate([("val2014", "restval"), ("val2014", "test"), ("train2014", "train")]):
        fname = f"COCO_{sub}_{i:012d}.jpg"
        _jpeg(tmp_path / sub / fname)
        e = _flickr_entry(i, fname, split, ["A man riding a wave on top of a surfboard."] * 5)
        e.update({"filepath": sub, "cocoid": 100 + i})
        entries.append(e)
    ann = tmp_path / "dataset_coco.json"
    ann.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    ds = load_dataset(ann, images=tmp_path)
    assert ds.counts()["train"]["images"] == 2  # restval is read as train
    assert ds.split("test")[0].path == tmp_path / "val2014" / "COCO_val2014_000000000001.jpg"


def test_reads_jsonl(tmp_path):
    for i in range(3):
        _jpeg(tmp_path / "img" / f"{i}.jpg")
    lines = [{"image": f"img/{i}.jpg", "captions": [f"photo {i}", f"picture {i}"], "split": s}
             for i, s in enumerate(["train", "val", "test"])]
    lines.append({"image": "img/0.jpg", "captions": "single caption as a string", "split": "train"})
    (tmp_path / "mine.jsonl").write_text("\n".join(json.dumps(x) for x in lines[:3]) + "\n")
    ds = load_dataset(tmp_path / "mine.jsonl")
    assert [it.captions for it in ds.items] == [("photo 0", "picture 0"), ("photo 1", "picture 1"),
                                                ("photo 2", "picture 2")]
    assert [it.caption_ids for it in ds.items] == [(0, 1), (2, 3), (4, 5)]
    assert [it.image_id for it in ds.items] == [0, 1, 2]


def test_jsonl_paths_are_relative_to_the_file_and_types_are_checked(tmp_path):
    _jpeg(tmp_path / "images" / "a.jpg")
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "images/a.jpg", "captions": ["x"], "split": "test"}) + "\n")
    assert load_dataset(tmp_path / "d.jsonl").items[0].path == tmp_path / "images" / "a.jpg"
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "images/a.jpg", "captions": "x", "split": ["test"]}) + "\n")
    with pytest.raises(DatasetError, match="wrong type"):
        load_dataset(tmp_path / "d.jsonl")


def test_all_problems_reported_in_one_message(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(2):
        _jpeg(root / f"{i}.jpg")
    images = [
        _flickr_entry(0, "0.jpg", "train", ["ok"]),
        _flickr_entry(0, "1.jpg", "train", ["duplicate id"]),
        _flickr_entry(2, "missing_a.jpg", "test", ["a"]),
        _flickr_entry(3, "missing_b.jpg", "holdout", [""]),
    ]
    images[3]["sentences"][0]["raw"] = "   "
    ann = tmp_path / "dataset_x.json"
    ann.write_text(json.dumps({"images": images}))
    with pytest.raises(DatasetError) as e:
        load_dataset(ann, images=root)
    msg = str(e.value)
    assert "2 of 4 image files are missing" in msg and "missing_a.jpg" in msg
    assert "empty caption" in msg
    assert "duplicate image ids" in msg
    assert "unknown split values {'holdout': 1}" in msg


def test_wrong_paths_say_what_to_do(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nope.json")
    (tmp_path / "dataset_a.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_dataset(tmp_path / "dataset_a.json")
    (tmp_path / "dataset_a.json").write_text(json.dumps({"images": []}))
    with pytest.raises(DatasetError, match="--images"):
        load_dataset(tmp_path / "dataset_a.json", images=tmp_path / "no_such_dir")
    with pytest.raises(DatasetError, match="holds no images"):
        load_dataset(tmp_path / "dataset_a.json")


def test_unknown_split_name_is_an_error(tiny_world):
    ds = load_dataset(tiny_world)
    with pytest.raises(DatasetError, match="unknown split"):
        ds.split("dev")


def test_bad_images_raise_badimage_with_a_reason(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGBA", (10, 8), (1, 2, 3, 4)).save(good)
    assert open_image(good).mode == "RGB"
    (tmp_path / "text.jpg").write_text("hello, not an image")
    with pytest.raises(BadImage, match="not an image"):
        open_image(tmp_path / "text.jpg")
    noisy = tmp_path / "noisy.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(noisy)
    data = noisy.read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImage, match="corrupt or truncated"):
        open_image(tmp_path / "trunc.png")
    with pytest.raises(BadImage, match="cannot read"):
        open_image(tmp_path / "absent.png")
    big = tmp_path / "big.png"
    Image.new("L", (3000, 3000)).save(big)
    with pytest.raises(BadImage, match="over the limit"):
        open_image(big, max_pixels=1_000_000)
    report = SkipReport()
    for p in ("text.jpg", "trunc.png"):
        try:
            open_image(tmp_path / p)
        except BadImage as e:
            report.add(p, str(e))
    assert len(report) == 2 and "2 images skipped" in report.summary()


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90° on display
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert open_image(tmp_path / "rot.jpg").size == (20, 40)


def test_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("P", (8, 8), i) for i in (10, 200)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    arr = np.asarray(open_image(tmp_path / "a.gif"))
    assert arr.shape == (8, 8, 3)


@pytest.mark.parametrize("filepath", ["images", None])
def test_the_default_image_root_is_the_folder_that_holds_the_files(tmp_path, filepath):
    """`filepath: "images"` beside an images/ folder, and the demo world's images/ without a filepath."""
    entries = []
    for i in range(4):
        _jpeg(tmp_path / "images" / f"{i}.jpg")
        e = _flickr_entry(i, f"{i}.jpg", "train", [f"a photo {i}"])
        if filepath:
            e["filepath"] = filepath
        entries.append(e)
    ann = tmp_path / "dataset_mine.json"
    ann.write_text(json.dumps({"images": entries}))
    ds = load_dataset(ann)
    assert [it.path for it in ds.items] == [tmp_path / "images" / f"{i}.jpg" for i in range(4)]
    assert all(it.path.is_file() for it in ds.items)


def test_coco_filepaths_under_the_annotation_folder_need_no_images_flag(tmp_path):
    entries = []
    for i, sub in enumerate(["train2014", "val2014"]):
        _jpeg(tmp_path / sub / f"COCO_{sub}_{i:012d}.jpg")
        e = _flickr_entry(i, f"COCO_{sub}_{i:012d}.jpg", "train", ["a man on a surfboard"])
        e["filepath"] = sub
        entries.append(e)
    (tmp_path / "images").mkdir()  # an unrelated images/ folder does not mislead the choice
    ann = tmp_path / "dataset_coco.json"
    ann.write_text(json.dumps({"images": entries}))
    assert load_dataset(ann).items[1].path == tmp_path / "val2014" / "COCO_val2014_000000000001.jpg"


def test_images_found_nowhere_name_the_option_that_fixes_it(tmp_path):
    ann = tmp_path / "dataset_x.json"
    ann.write_text(json.dumps({"images": [_flickr_entry(0, "a.jpg", "train", ["a cat"])]}))
    with pytest.raises(DatasetError, match="give the folder that holds them with --images"):
        load_dataset(ann)
