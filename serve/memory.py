"""Resident memory: read it, state what requests may add to it, and keep glibc from holding on to
what requests freed.

Large transient buffers (upload bodies, decoded images) are allocated and freed all the time.
glibc raises its mmap threshold after such frees, so later buffers come from the heap and the
freed pages stay resident; one arena per thread multiplies that. Fixing the threshold and
capping the arenas keeps the resident size near what is live.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dsmd.serve.settings import Settings

M_ARENA_MAX = -8
M_MMAP_THRESHOLD = -3


def limit_malloc(mmap_threshold: int = 256 * 1024, arenas: int = 2) -> bool:
    """Best effort on glibc (Linux); elsewhere a no-op. True if applied."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False


def _status(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def resident_bytes() -> int | None:
    """The process's resident set now (VmRSS), or None where /proc is not there."""
    return _status("VmRSS")


def peak_resident_bytes() -> int | None:
    """The highest resident set so far (VmHWM)."""
    return _status("VmHWM")


def budget_bytes(s: Settings, input_size: int = 512) -> int:
    """What requests may add to the resident memory at most, above the loaded model and index:
    the figure `/info` adds to the resident size after start-up to state its ceiling.

    Every buffer a request can hold is counted at its largest, for as many requests as the gates let in:
    - upload bodies being read: the body budget where the settings have one (`body_budget_bytes`), else
      one body per image search and write; and for each of those being parsed, a copy of its base64
      text with JSON's escapes dropped, and the image's bytes (a multipart file is joined once from
      views of the body);
    - a decode (each decode slot, also held by thumbnails, and the index writer's own decode of an added
      image): a multi-scan JPEG's coefficients with its reduced image, or a decoded image and its
      conversion copy at 4 bytes a pixel (Pillow keeps RGB in 32 bits), whichever is larger, plus the
      bounded resize and the model input;
    - encoder inputs in flight (`input_size`: the bundle's, or a generous 512), the text and thumbnail
      caches full (batchers and a text cache per distinct bundle), each index's cache of filtered
      vectors (index/filtered.py), and 32 MiB for sockets, threads and the rest.
    """
    from dsmd.images import MAX_COEFFICIENT_BYTES
    from dsmd.index.filtered import SUBSET_CACHE
    from dsmd.preprocess import BOUNDED_RESIZE_PIXELS
    from dsmd.serve.collections import specs
    from dsmd.serve.uploads import body_limit

    body = body_limit(s.max_upload_bytes)
    parsing = s.max_image_requests + s.max_write_requests
    bodies = s.body_budget_bytes or parsing * body
    uploads = bodies + parsing * (body + s.max_upload_bytes)
    image = 4 * s.max_pixels
    model_input = 3 * input_size**2 * 4  # float32
    decode = max(MAX_COEFFICIENT_BYTES + image, 2 * image) + 2 * 4 * BOUNDED_RESIZE_PIXELS + 4 * model_input
    decodes = (s.decode_slots + (1 if s.writes else 0)) * decode
    served = specs(s.index, s.bundle)
    models = len({os.path.realpath(c.bundle) for c in served})  # each with its batchers and text cache
    batches = models * 2 * s.max_batch * model_input  # a batch being encoded and the next one being stacked
    caches = models * s.text_cache * (10_000 + 4 * 4096) + s.thumb_cache * s.thumb_size**2 // 2  # texts <= 10k
    filters = len(served) * SUBSET_CACHE  # each index keeps the vectors of recent filters
    return uploads + decodes + batches + caches + filters + 32 * 2**20
