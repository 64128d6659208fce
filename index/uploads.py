"""Single-image writes: what `POST /items` and `DELETE /items/{id}` do on disk.

`SearchIndex.add_image` / `SearchIndex.remove` (index/search.py) are the live versions: they also
change the opened FAISS index, so the next search sees the change. The functions here are the
same writes to the rows alone, for callers that hold no opened index; an index opened after
them reconciles its FAISS with the rows (adds the new item, drops the removed ones).

An upload is stored under its content hash (the same bytes twice make one file and one item),
atomically (temp file + rename, under the folder lock), so a kill never leaves half an image
that a later build would index. The file of a removed upload is deleted by the next compaction
(finalize), once no row names it.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from dsmd.bundle import Bundle
from dsmd.errors import UserError
from dsmd.images import UPLOAD_FORMATS, BadImage, open_image
from dsmd.index.build import bundle_fingerprint, remove
from dsmd.index.db import IndexDB, NewItem
from dsmd.index.lock import folder_lock
from dsmd.index.metadata import UPLOAD_FOLDER, exif_facts, file_facts

EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}
_NAME = re.compile(r"[0-9a-f]{32}(" + "|".join(re.escape(e) for e in [*EXTENSIONS.values(), ".img"]) + ")")


def is_upload_name(name: str) -> bool:
    """Whether a file name is one store_file gives (content hash and extension): only those are deleted."""
    return _NAME.fullmatch(name) is not None


class UploadRefused(UserError):
    """The upload could not be indexed (its reason says why)."""


def decode(data: bytes, min_side: int | None = None) -> Image.Image:
    """The upload as an RGB image: only the upload formats (JPEG, PNG, WebP, GIF, BMP), decoded at no
    less than `min_side` on its shorter side but not much more (see dsmd.images.open_image).

    Raises:
        UploadRefused: not an image, truncated, or a decompression bomb.
    """
    try:
        return open_image(data, formats=UPLOAD_FORMATS, min_side=min_side)
    except BadImage as e:
        raise UploadRefused(f"could not index the image: {str(e).replace('upload: ', '')}") from None


def embed(bundle: Bundle, img: Image.Image) -> np.ndarray:
    """The image's (dim,) vector with the bundle's image encoder."""
    return bundle.encode_pixels(bundle.transform(img)[None])[0]


def insert(db: IndexDB, data: bytes, sha: str, img: Image.Image, vector: np.ndarray,
           folder: Path) -> tuple[int, bool, list[int], list[int]]:
    """Store the file and insert its row unless the content is indexed already; the caller holds
    the folder lock. Returns (item id, whether it was created, ids of the items it replaced, ids of
    their captions)."""
    from dsmd.index.reclaim import note_upload_dir

    note_upload_dir(db, folder, db.path.parent)
    path = store_file(data, sha, folder)
    width, height = img.info.get("original_size", img.size)
    meta = {**file_facts(None, len(data)), **exif_facts(img), "folder": UPLOAD_FOLDER}
    return db.insert_once(NewItem(str(path.resolve()), sha, width, height, [], vector, meta=meta))


def store_file(data: bytes, sha: str, folder: Path) -> Path:
    """`data` in `folder` as <sha256 prefix>.<format's extension>, written atomically once."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        fmt = Image.open(io.BytesIO(data)).format or ""
    except Exception:  # decode() has vetted the bytes; the name only needs an extension
        fmt = ""
    path = folder / f"{sha[:32]}{EXTENSIONS.get(fmt, '.img')}"
    if not _holds(path, data):  # absent, or other bytes under the name (a file changed in place)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return path


def _holds(path: Path, data: bytes) -> bool:
    try:
        return path.stat().st_size == len(data) and path.read_bytes() == data
    except FileNotFoundError:
        return False


def store_upload(index: str | Path, bundle: Bundle, data: bytes, folder: str | Path | None = None) -> str:
    """Store `data` in the upload folder (default INDEX/uploads) and add its row. Returns the sha256
    that names the item (the same bytes twice make one item). Opened indexes do not see it until
    reopened: use `SearchIndex.add_image` to change a live one.

    Raises:
        UploadRefused: the image cannot be indexed.
    """
    index = Path(index)
    sha = hashlib.sha256(data).hexdigest()
    img = decode(data, 2 * bundle.preprocess.size)
    vector = embed(bundle, img)
    db = IndexDB(index / "items.sqlite", bundle.dim, bundle_fingerprint(bundle), bundle.variant)
    try:
        with folder_lock(index):
            insert(db, data, sha, img, vector, Path(folder or index / "uploads"))
    finally:
        db.close()
    return sha


def remove_items(index: str | Path, bundle: Bundle | None, ids: list[int]) -> None:
    """Remove items by id (their rows; indexes opened afterwards leave them out). `bundle` is unused,
    kept for existing callers: nothing is re-embedded or rebuilt."""
    remove(index, ids=ids)
