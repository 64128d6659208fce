"""Opening images safely: corrupt, truncated, non-image files and decompression bombs.

Every stage opens images through `open_image`, so a bad file means the same thing
everywhere: a `BadImage` with a reason, which long jobs count in a `SkipReport` and go on.
"""

from __future__ import annotations

import io
import re
import struct
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps

# Images larger than this are refused before they are decoded (a 20k x 20k PNG is 1.2 GB of RGB).
MAX_PIXELS = 64_000_000
# What data sets and folders may hold. Formats outside the list are never decoded (Pillow would
# otherwise hand an EPS file to Ghostscript); uploads to the server take a stricter list.
FILE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # and HEIF where pillow-heif is installed
UPLOAD_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
# What an upload may cost to decode beyond its pixels (see `check_decode_cost`). A JPEG of more than
# one scan (progressive, or sequential non-interleaved) makes libjpeg hold all its DCT coefficients
# at full size, 2 bytes each, whatever the reduced decode: 9400x9400 at 4:2:0 is 253 MiB. 160 MiB lets
# a 24 Mpixel camera photo (72 MiB at 4:2:0, 137 MiB at 4:4:4) and a 50 Mpixel one at 4:2:0 through.
MAX_COEFFICIENT_BYTES = 160 * 2**20
MAX_JPEG_SCANS = 64  # libjpeg's progressive script has 10; each scan is a pass over the coefficients
MAX_JPEG_SEGMENTS = 4096  # markers (tables, comments, APPn); Pillow reads each in Python
MAX_PNG_CHUNKS = 10_000  # Pillow reads each chunk in Python (~3 us): 870,000 empty ones fit in 10 MiB
MAX_GIF_BLOCKS = 10_000  # extension (sub-)blocks before the first frame, read one by one in Python
MAX_RLE_PIXELS = 1_000_000  # Pillow decodes RLE-compressed BMPs in Python, about 60 ns a pixel


class BadImage(ValueError):
    """An image that cannot be used; the message says why."""


class CostlyImage(BadImage):
    """An image refused from its headers because decoding it would cost far more than its size."""


def open_image(source: str | Path | bytes, max_pixels: int = MAX_PIXELS, formats: tuple[str, ...] = FILE_FORMATS,
               min_side: int | None = None, check_cost: bool | None = None) -> Image.Image:
    """Decode an image file or bytes into an RGB PIL image, EXIF orientation applied.

    GIFs and other animations give their first frame. With `min_side`, the image is decoded
    or reduced to no less than that on its shorter side but not much more: a JPEG is decoded
    at 1/2, 1/4 or 1/8 scale (libjpeg's own reduction, which never holds the full image), other
    formats are reduced right after decoding, before any conversion copies them. A model that
    reads 224 px then never pays for the memory of a 40-Mpixel photo. The size in the file is
    kept in `img.info["original_size"]`.

    With `check_cost` (by default: when `formats` is UPLOAD_FORMATS, i.e. for uploads), files
    whose decoding costs out of proportion to their pixels are refused from their headers before
    anything is decoded (`check_decode_cost`): a worker thread that decodes cannot be stopped
    when its request gives up, so the work must be bounded before it starts.

    Raises:
        BadImage: unreadable, truncated, not an image (or not one of `formats`), more than
        `max_pixels` pixels to decode, or (with `check_cost`) too costly to decode.
    """
    if check_cost is None:
        check_cost = formats == UPLOAD_FORMATS
    if formats == FILE_FORMATS:
        formats = FILE_FORMATS + heif_formats()
    name = "upload" if isinstance(source, bytes) else str(source)
    try:
        fp = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
    except OSError as e:
        raise BadImage(f"{name}: cannot read ({e.strerror})") from None
    with fp:
        try:
            if check_cost:
                data = source if isinstance(source, bytes) else fp.read()
                check_decode_cost(data, name)
                if not isinstance(source, bytes):  # read once: the file may be a pipe, or change meanwhile
                    fp = io.BytesIO(data)
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
            fp.seek(0)
            if _is_heif(fp.read(16)) and "HEIF" not in formats:
                raise BadImage(f"{name}: a HEIC/HEIF photo; "
                               + ("reading it needs pillow-heif: pip install 'dsmd[heic]'"
                                  if formats == FILE_FORMATS else "not accepted here")) from None
            raise BadImage(f"{name}: not an image file"
                           + (f" (accepted: {', '.join(formats)})" if formats else "")) from None
        except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
            raise BadImage(f"{name}: corrupt or truncated image ({e})") from None
        if min_side:
            factor = min(img.size) // min_side
            if factor >= 2:
                img = img.reduce(factor)
        img = ImageOps.exif_transpose(img)
        img = to_rgb(img)
        img.info["original_size"] = original  # as stored in the file, before any reduction
        return img


def heif_formats() -> tuple[str, ...]:
    """("HEIF",) where pillow-heif (the `heic` extra) is installed, its opener registered once; else ()."""
    global _HEIF
    if _HEIF is None:
        try:
            import pillow_heif

            pillow_heif.register_heif_opener()
            _HEIF = ("HEIF",)
        except ImportError:
            _HEIF = ()
    return _HEIF


_HEIF: tuple[str, ...] | None = None
HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1")


def _is_heif(head: bytes) -> bool:
    """An ISO media file whose brand is HEIF's (what iPhones and many cameras write as .heic)."""
    return head[4:8] == b"ftyp" and head[8:12] in HEIF_BRANDS


def check_decode_cost(data: bytes, name: str = "upload") -> None:
    """Refuse, from the headers alone, an image whose decoding would cost far more than its pixels:
    a multi-scan JPEG whose coefficients pass MAX_COEFFICIENT_BYTES, or with more than MAX_JPEG_SCANS
    scans or MAX_JPEG_SEGMENTS markers; a PNG of more than MAX_PNG_CHUNKS chunks; a GIF with more than
    MAX_GIF_BLOCKS blocks before its first frame; an RLE-compressed BMP of more than MAX_RLE_PIXELS.
    Each walk stops at its limit, so the check itself costs little whatever the file.

    Raises:
        CostlyImage: (a BadImage) with what was found and what to send instead.
    """
    head = bytes(data[:64])
    if head.startswith(b"\xff\xd8"):
        _check_jpeg(data, name)
    elif head.startswith(b"\x89PNG\r\n\x1a\n"):
        _check_png(data, name)
    elif head.startswith((b"GIF87a", b"GIF89a")):
        _check_gif(data, name)
    elif head.startswith(b"BM") and len(head) >= 34 and struct.unpack_from("<I", head, 14)[0] >= 40:
        width, height, _, _, compression = struct.unpack_from("<iiHHI", head, 18)
        pixels = abs(width) * abs(height)
        if compression in (1, 2) and pixels > MAX_RLE_PIXELS:
            raise CostlyImage(f"{name}: an RLE-compressed BMP of {abs(width)}x{abs(height)} pixels is over the "
                           f"limit of {MAX_RLE_PIXELS:,} for that compression; send it as PNG or JPEG")


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
# the first marker after a scan's data: neither a stuffed 0xff00 nor a restart marker
_ENTROPY_END = re.compile(rb"\xff[^\x00\xd0-\xd7]")


def _check_jpeg(data: bytes, name: str) -> None:
    pos, n, segments, scans, frame = 2, len(data), 0, 0, None
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return  # corrupt: Pillow says so
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:  # end of image
            break
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
            continue
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            raise CostlyImage(f"{name}: a JPEG of more than {MAX_JPEG_SEGMENTS:,} segments; save it again with an "
                           f"ordinary encoder")
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker in _SOF and frame is None and pos + 10 <= n:
            frame = (marker, data[pos + 4:pos + 2 + length])
        pos += 2 + length
        if marker == 0xDA:
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise CostlyImage(f"{name}: a JPEG of more than {MAX_JPEG_SCANS} scans (each one a pass over the whole "
                               f"image); save it again as a baseline JPEG")
            end = _ENTROPY_END.search(data, pos)
            pos = end.start() if end else n
    if frame is None:
        return
    marker, sof = frame
    if (scans > 1 or marker in (0xC2, 0xC6, 0xCA, 0xCE)) and len(sof) >= 6:
        height, width, count = int.from_bytes(sof[1:3], "big"), int.from_bytes(sof[3:5], "big"), sof[5]
        sampling = [(sof[7 + 3 * i] >> 4, sof[7 + 3 * i] & 15) for i in range(count) if 8 + 3 * i < len(sof)]
        hmax = max((h for h, _ in sampling), default=1) or 1
        vmax = max((v for _, v in sampling), default=1) or 1
        blocks = sum(-(-width * h // (8 * hmax)) * -(-height * v // (8 * vmax)) for h, v in sampling)
        need = blocks * 64 * 2
        if need > MAX_COEFFICIENT_BYTES:
            kind = "progressive" if marker in (0xC2, 0xC6, 0xCA, 0xCE) else "multi-scan"
            raise CostlyImage(f"{name}: a {kind} JPEG of {width}x{height} pixels needs {need / 2**20:.0f} MiB to "
                           f"decode (libjpeg holds all its coefficients), over the limit of "
                           f"{MAX_COEFFICIENT_BYTES / 2**20:.0f} MiB; send a baseline JPEG or a smaller image")


def _check_png(data: bytes, name: str) -> None:
    pos, n, chunks = 8, len(data), 0
    while pos + 8 <= n:
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            raise CostlyImage(f"{name}: a PNG of more than {MAX_PNG_CHUNKS:,} chunks; save it again with an "
                           f"ordinary encoder")
        if data[pos + 4:pos + 8] == b"IEND":
            return
        pos += 12 + int.from_bytes(data[pos:pos + 4], "big")


def _check_gif(data: bytes, name: str) -> None:
    n, flags = len(data), data[10] if len(data) > 10 else 0
    pos, blocks = 13 + (3 * 2 ** ((flags & 7) + 1) if flags & 0x80 else 0), 0
    while pos < n and data[pos] == 0x21:  # an extension: introducer, label, then sub-blocks up to an empty one
        pos += 2
        while pos < n:
            blocks += 1
            if blocks > MAX_GIF_BLOCKS:
                raise CostlyImage(f"{name}: a GIF of more than {MAX_GIF_BLOCKS:,} blocks before its first image; save "
                               f"it again with an ordinary encoder")
            size = data[pos]
            pos += 1 + size
            if size == 0:
                break


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
