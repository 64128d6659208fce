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


def resize_image(img: Image.Image, cfg: PreprocessConfig) -> Image.Image:
    """Resize (and crop) an RGB image to cfg.size x cfg.size as the spec says."""
    img = img.convert("RGB")
    resample = _RESAMPLE[cfg.interpolation]
    if cfg.resize == "squash":
        return img.resize((cfg.size, cfg.size), resample)
    w, h = img.size
    scale = cfg.size / min(w, h)
    # int() (floor) as Hugging Face's and torchvision's resizers do, so CLIP inputs match exactly
    nw, nh = max(cfg.size, int(w * scale)), max(cfg.size, int(h * scale))
    img = img.resize((nw, nh), resample)
    left, top = (nw - cfg.size) // 2, (nh - cfg.size) // 2
    return img.crop((left, top, left + cfg.size, top + cfg.size))


def image_to_array(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """An RGB PIL image as a normalised float32 (3, size, size) array."""
    x = np.asarray(resize_image(img, cfg), dtype=np.float32) / 255.0
    x = (x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))
