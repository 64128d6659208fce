"""Opening images safely: corrupt, truncated, non-image files and decompression bombs.

Every stage opens images through `open_image`, so a bad file means the same thing
everywhere: a `BadImage` with a reason, which long jobs count in a `SkipReport` and go on.
"""

from __future__ import annotations

import io
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps

# Images larger than this are refused before they are decoded (a 20k x 20k PNG is 1.2 GB of RGB).
MAX_PIXELS = 64_000_000
# What data sets and folders may hold. Formats outside the list are never decoded (Pillow would
# otherwise hand an EPS file to Ghostscript); uploads to the server take a stricter list.
FILE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
UPLOAD_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")


class BadImage(ValueError):
    """An image that cannot be used; the message says why."""


def open_image(source: str | Path | bytes, max_pixels: int = MAX_PIXELS, formats: tuple[str, ...] = FILE_FORMATS,
               min_side: int | None = None) -> Image.Image:
    """Decode an image file or bytes into an RGB PIL image, EXIF orientation applied.

    GIFs and other animations give their first frame. With `min_side`, the image is decoded
    or reduced to no less than that on its shorter side but not much more: a JPEG is decoded
    at 1/2, 1/4 or 1/8 scale (libjpeg's own reduction, which never holds the full image), other
    formats are reduced right after decoding, before any conversion copies them. A model that
    reads 224 px then never pays for the memory of a 40-Mpixel photo. The size in the file is
    kept in `img.info["original_size"]`.

    Raises:
        BadImage: unreadable, truncated, not an image (or not one of `formats`), or more than
        `max_pixels` pixels to decode.
    """
    name = "upload" if isinstance(source, bytes) else str(source)
    try:
        fp = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
    except OSError as e:
        raise BadImage(f"{name}: cannot read ({e.strerror})") from None
    with fp:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(fp, formats=list(formats))
                original = img.size
                if min_side and img.format == "JPEG":
                    img.draft("RGB", _box_for(img.size, min_side))
                w, h = img.size
                if w * h > max_pixels:
                    raise BadImage(f"{name}: {w}x{h} pixels is over the limit of {max_pixels:,}")
                img.seek(0)
                img.load()
        except BadImage:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise BadImage(f"{name}: refused as a decompression bomb ({e})") from None
        except Image.UnidentifiedImageError:
            raise BadImage(f"{name}: not an image file"
                           + (f" (accepted: {', '.join(formats)})" if formats else "")) from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise BadImage(f"{name}: corrupt or truncated image ({e})") from None
        if min_side:
            factor = min(img.size) // min_side
            if factor >= 2:
                img = img.reduce(factor)
        img = ImageOps.exif_transpose(img)
        img = to_rgb(img)
        img.info["original_size"] = original  # as stored in the file, before any reduction
        return img


def _box_for(size: tuple[int, int], min_side: int) -> tuple[int, int]:
    """The draft box that keeps the shorter side at least `min_side` (draft keeps both sides >= the box)."""
    w, h = size
    scale = min_side / max(1, min(w, h))
    return max(1, int(w * scale)), max(1, int(h * scale))


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with transparent pixels laid on white (as Hugging Face's processors do),
    not on whatever colour they happen to store."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


@dataclass
class SkipReport:
    """Images skipped by a long job, with the reason for each; safe to share across threads."""

    skipped: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, key: str, reason: str) -> None:
        with self._lock:
            self.skipped[key] = reason

    def __len__(self) -> int:
        return len(self.skipped)

    def summary(self, n: int = 5) -> str:
        if not self.skipped:
            return "no images skipped"
        lines = [f"{len(self.skipped)} images skipped:"]
        lines += [f"  {reason}" for reason in list(self.skipped.values())[:n]]
        if len(self.skipped) > n:
            lines.append(f"  … and {len(self.skipped) - n} more")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"count": len(self.skipped), "skipped": self.skipped}
