"""Single-image writes to a live index: what `POST /items` and `DELETE /items/{id}` do on disk.

The server decides who may write and when (its token and its write lock); this module only
stores the upload beside the index, indexes it, and rebuilds the searchable files, so the
same writes are open to any caller of the library.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from pathlib import Path

from PIL import Image

from dsmd.bundle import Bundle
from dsmd.errors import UserError
from dsmd.index.build import Source, add_images, finalize, remove
from dsmd.index.db import IndexDB

EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp"}


class UploadRefused(UserError):
    """The upload could not be indexed (its reason says why)."""


def store_upload(index: str | Path, bundle: Bundle, data: bytes, folder: str | Path | None = None) -> str:
    """Write `data` into the upload folder (default INDEX/uploads) under its content hash, index it
    and rebuild the index files. Returns the sha256 that names the item (the same bytes twice
    make one item).

    The file lands atomically (temp file + rename), so a kill never leaves half an image that
    a later build would index.
    """
    sha = hashlib.sha256(data).hexdigest()
    folder = Path(folder or Path(index) / "uploads")
    folder.mkdir(parents=True, exist_ok=True)
    ext = EXTENSIONS.get(Image.open(io.BytesIO(data)).format or "", ".img")
    path = folder / f"{sha[:32]}{ext}"
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    report = add_images(index, bundle, [Source(str(path.resolve()), path)], progress=False)
    if report.skipped:
        raise UploadRefused(f"could not index the image: {report.skipped[0]['reason']}")
    finalize(index, bundle, progress=False)
    return sha


def item_id_of(db: IndexDB, sha: str) -> int | None:
    """The id of the item with this content hash, or None (removed meanwhile)."""
    row = db.con.execute("SELECT id FROM items WHERE sha256=?", (sha,)).fetchone()
    return row[0] if row else None


def remove_items(index: str | Path, bundle: Bundle, ids: list[int]) -> None:
    """Remove items by id and rebuild the index files without them."""
    remove(index, ids=ids)
    finalize(index, bundle, progress=False)
