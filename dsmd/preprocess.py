"""The preprocessing spec and its one implementation (PIL + numpy, no torch).

A `PreprocessConfig` travels with every model: teachers declare theirs, the student saves its
own in its checkpoint, export copies it into the bundle, and serving reads it from there.
`image_to_array` is the only code that turns a PIL image into model input, so training,
evaluation, export parity checks and serving cannot drift apart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "nearest": Image.Resampling.NEAREST, "box": Image.Resampling.BOX}


@dataclass(frozen=True)
class PreprocessConfig:
    """How images and texts are prepared for a model.

    Attributes:
        size: the square side the model sees, in pixels.
        resize: "squash" resizes straight to size x size, ignoring aspect ratio (BEiT-3);
            "shortest_crop" resizes the shorter side to `size` and centre-crops (CLIP, ViT).
        interpolation: PIL filter name (bicubic, bilinear, nearest, box).
        mean, std: per-channel normalisation of [0, 1] pixel values.
        max_tokens: longest tokenised text, special tokens included; longer texts are cut.
    """

    size: int
    resize: str = "squash"
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    max_tokens: int = 64

    def __post_init__(self):
        if self.resize not in ("squash", "shortest_crop"):
            raise ValueError(f"resize must be 'squash' or 'shortest_crop', not {self.resize!r}")
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}, not {self.interpolation!r}")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> PreprocessConfig:
        return cls(**d)


# A shortest_crop resize whose whole resized image would pass this many pixels resizes only the crop:
# a 600000x20 image resized to 224 on its shorter side would be 6,720,000x224, 6 GB.
BOUNDED_RESIZE_PIXELS = 4_000_000


def resize_image(img: Image.Image, cfg: PreprocessConfig) -> Image.Image:
    """Resize (and crop) an RGB image to cfg.size x cfg.size as the spec says.

    Ordinary images are resized whole, then cropped (as Hugging Face's and torchvision's resizers do,
    so CLIP inputs match exactly). A long thin image, whose whole resize would be huge, is resized
    only where the crop lies (Pillow's `box`, at the same scale): memory stays a few times cfg.size
    squared, and the result is the same within rounding. (A squash needs no such care: Pillow's
    resize of 20x60000 to 224x224 holds no large intermediate image, measured.)
    """
    img = img.convert("RGB")
    resample = _RESAMPLE[cfg.interpolation]
    size = cfg.size
    w, h = img.size
    if cfg.resize == "squash":
        return img.resize((size, size), resample)
    scale = size / min(w, h)
    # int() (floor) as Hugging Face's and torchvision's resizers do, so CLIP inputs match exactly
    nw, nh = max(size, int(w * scale)), max(size, int(h * scale))
    left, top = (nw - size) // 2, (nh - size) // 2
    if nw * nh > BOUNDED_RESIZE_PIXELS:
        sx, sy = w / nw, h / nh  # the source region that lands in the crop, at the same scale
        return img.resize((size, size), resample, box=(left * sx, top * sy, (left + size) * sx, (top + size) * sy))
    img = img.resize((nw, nh), resample)
    return img.crop((left, top, left + size, top + size))


def image_to_array(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """An RGB PIL image as a normalised float32 (3, size, size) array."""
    x = np.asarray(resize_image(img, cfg), dtype=np.float32) / 255.0
    x = (x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))
