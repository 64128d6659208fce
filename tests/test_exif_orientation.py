"""EXIF orientation, applied wherever an image is opened: each of the seven non-trivial orientations
comes out upright, pixel for pixel, through `dsmd index sync` (the stored vector), an upload to the
server (/embed/image), the server's thumbnail and the training reader. A photo stored sideways with
its orientation tag must be searched, shown and learnt as it is seen."""

from __future__ import annotations

import io
import shutil

import httpx
import numpy as np
import pytest
from PIL import Image
from serving import Server

from dsmd.bundle import Bundle
from dsmd.images import open_image

# stored = INVERSE[o](upright): a viewer applying orientation o shows the upright picture again
INVERSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_270}


def upright() -> Image.Image:
    """96x64, no symmetry: four coloured quadrants and a white mark near the top-left corner."""
    a = np.zeros((64, 96, 3), np.uint8)
    a[:32, :48], a[:32, 48:], a[32:, :48], a[32:, 48:] = (200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)
    a[4:12, 4:20] = 255
    return Image.fromarray(a)


def png(img: Image.Image, orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    if orientation is None:
        img.save(buf, "PNG")
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        img.transpose(INVERSE[orientation]).save(buf, "PNG", exif=exif.tobytes())
    return buf.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("oriented") / "photos"
    (root / "sideways").mkdir(parents=True)
    (root / "upright.png").write_bytes(png(upright()))
    for o in INVERSE:
        (root / "sideways" / f"o{o}.png").write_bytes(png(upright(), o))
    return root


def test_every_orientation_opens_upright(folder):
    want = np.asarray(upright())
    for o in INVERSE:
        stored = Image.open(folder / "sideways" / f"o{o}.png")
        assert stored.getexif()[0x0112] == o and (o < 5) == (stored.size == (96, 64))  # really stored turned
        assert np.array_equal(np.asarray(open_image(folder / "sideways" / f"o{o}.png")), want), o


def test_the_training_reader_sees_them_upright(folder, tiny_search):
    from dsmd.datasets import Item
    from dsmd.distill.data import EvalImages

    pre = Bundle(tiny_search / "bundle").preprocess
    items = [Item(i, folder / "upright.png" if i == 0 else folder / "sideways" / f"o{i + 1}.png", "train", (), ())
             for i in range(8)]
    images = EvalImages(items, pre)
    for i in range(1, 8):
        assert np.array_equal(images[i].numpy(), images[0].numpy()), f"orientation {i + 1}"


def test_sync_upload_and_thumbnail_see_them_upright(folder, tiny_search, tmp_path):
    from dsmd.index.search import SearchIndex
    from dsmd.index.sync import sync

    bundle_dir = tmp_path / "bundle"
    shutil.copytree(tiny_search / "bundle", bundle_dir)
    bundle, index = Bundle(bundle_dir), tmp_path / "index"
    r = sync(index, bundle, folder, progress=False)
    assert r.added == 8 and not r.unreadable
    s = SearchIndex(index)
    try:
        uris = {s.item(i)["uri"]: i for i in range(1, 9)}
        ids = {o: uris[str((folder / "sideways" / f"o{o}.png").resolve())] for o in INVERSE}
        want = s.vector_of(uris[str((folder / "upright.png").resolve())])
        for o, i in ids.items():
            assert np.array_equal(s.vector_of(i), want), f"the stored vector of orientation {o}"
    finally:
        s.close()
    with Server(bundle_dir, index) as srv:
        def thumbnail(i: int) -> bytes:
            got = httpx.get(f"{srv.url}/items/{i}/thumbnail")
            assert got.status_code == 200, got.text
            return got.content

        def embedded(data: bytes) -> list[float]:
            got = httpx.post(f"{srv.url}/embed/image", files={"file": ("x.png", data, "image/png")})
            assert got.status_code == 200, got.text
            return got.json()["vectors"][0]

        upright_id = uris[str((folder / "upright.png").resolve())]
        assert Image.open(io.BytesIO(thumbnail(upright_id))).size[0] > Image.open(io.BytesIO(
            thumbnail(upright_id))).size[1]  # landscape, as seen
        want_vector = embedded(png(upright()))
        for o, i in ids.items():
            assert thumbnail(i) == thumbnail(upright_id), f"the thumbnail of orientation {o}"
            assert embedded((folder / "sideways" / f"o{o}.png").read_bytes()) == want_vector, f"upload {o}"
