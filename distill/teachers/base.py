"""The teacher interface: a producer of L2-normalised image and text embeddings.

DSMD only ever needs a teacher's output embeddings, so a teacher is small: a name, an
embedding dim, the preprocessing it expects, and two encoders. Each kind is loaded from a
local path by `distill.teachers.load_teacher`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
from PIL import Image

from dsmd.preprocess import PreprocessConfig, image_to_array


class Teacher(ABC):
    """A frozen multimodal dual encoder.

    Subclasses set `kind`, `name`, `dim`, `preprocess` and `checkpoint_hash`, and implement
    `encode_pixels` and `encode_texts`. Outputs are float32 and L2-normalised.
    """

    kind: str
    name: str
    dim: int
    preprocess: PreprocessConfig
    checkpoint_hash: str
    device: torch.device = torch.device("cpu")

    def transform(self, img: Image.Image) -> np.ndarray:
        """One RGB image as the float32 (3, H, W) array the image encoder takes.

        Runs in data-loader workers, so it must stay picklable and torch-free.
        """
        return image_to_array(img, self.preprocess)

    @abstractmethod
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) preprocessed images → (B, dim) unit vectors."""

    @abstractmethod
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Raw captions → (B, dim) unit vectors (tokenised and truncated inside)."""

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images → (B, dim) unit vectors."""
        pixels = torch.from_numpy(np.stack([self.transform(im) for im in images]))
        return self.encode_pixels(pixels)

    def describe(self) -> dict:
        """What a feature store records about the teacher that made it."""
        return {"kind": self.kind, "name": self.name, "dim": self.dim, "checkpoint_hash": self.checkpoint_hash,
                "preprocess": self.preprocess.to_json()}
