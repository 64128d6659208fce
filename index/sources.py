"""Where the images to index come from: a folder, a data set, one shard of either; and their
decoding in threads ahead of the encoder."""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from dsmd.bundle import Bundle
from dsmd.errors import UserError
from dsmd.images import BadImage, open_image
from dsmd.index.metadata import exif_facts, file_facts

# What a folder's images are called; HEIC/HEIF decode only with pillow-heif (the `heic` extra), and are
# otherwise reported as skipped with that reason, never passed over in silence.
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif"}


@dataclass(frozen=True)
class Source:
    """One image to index: where it is (uri) and its captions when a data set gives them."""

    uri: str
    path: Path
    captions: tuple[str, ...] = ()
    folder: str = ""  # its folder relative to the collection's root ('' for the root itself)



def folder_sources(root: str | Path) -> list[Source]:
    """Every image file under `root` (recursive; JPEG, PNG, WebP, GIF, BMP), in path order."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    return [Source(str(p.resolve()), p, folder=_folder(p.parent.relative_to(root).as_posix())) for p in files]


def dataset_sources(data: str | Path, images: str | None = None, split: str | None = None) -> list[Source]:
    """The images of a Karpathy/JSONL data set (one split, or all) with their captions."""
    from dsmd.datasets import load_dataset

    ds = load_dataset(data, images=images)
    items = ds.split(split) if split else ds.items
    root = os.path.commonpath([str(it.path.parent.resolve()) for it in items]) if items else ""
    return [Source(str(it.path.resolve()), it.path, tuple(it.captions),
                   _folder(Path(os.path.relpath(it.path.parent.resolve(), root)).as_posix())) for it in items]


def _folder(relative: str) -> str:
    """A folder as items record it: '' for the root itself (which paths spell '.'), else as it is."""
    return "" if relative == "." else relative


def shard_of(sources: list[Source], shard: tuple[int, int] | None) -> list[Source]:
    """The sources of shard i of n (by a hash of the uri), for builds split over processes or machines."""
    if shard is None:
        return sources
    i, n = shard
    if not 0 <= i < n:
        raise UserError(f"--shard takes i/n with 0 <= i < n, not {i}/{n}")
    return [s for s in sources if int(hashlib.sha1(s.uri.encode()).hexdigest()[:8], 16) % n == i]


def prepared(sources: Iterable[Source], bundle: Bundle, workers: int, prefetch: int) -> Iterator[tuple]:
    """(source, sha256, pixels | None, facts | None, error | None), decoded in threads ahead of use;
    facts: width, height and the metadata of index/metadata.py."""
    def work(s: Source):
        try:
            data = s.path.read_bytes()
        except OSError as e:
            return s, None, None, None, f"cannot read ({e.strerror})"
        sha = hashlib.sha256(data).hexdigest()
        try:
            img = open_image(data, min_side=2 * bundle.preprocess.size)  # a big photo decodes small
        except BadImage as e:
            return s, sha, None, None, str(e).replace("upload: ", "")
        (width, height), folder = img.info["original_size"], {"folder": s.folder}
        facts = {"width": width, "height": height, **file_facts(s.path, len(data)), **exif_facts(img), **folder}
        return s, sha, bundle.transform(img), facts, None

    with ThreadPoolExecutor(max(1, workers)) as pool:
        pending: deque = deque()
        it = iter(sources)
        for s in it:
            pending.append(pool.submit(work, s))
            if len(pending) >= prefetch:
                break
        while pending:
            yield pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(work, nxt))
