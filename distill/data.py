"""Training pairs, their order, and the images of a batch.

One epoch visits every (image, caption) pair of the training split once, as the paper does,
in an order drawn from (seed, epoch). A global batch is cut into micro-batches by rank and
accumulation step, so the order does not depend on how many processes train. Augmentation
draws from a generator seeded by (seed, epoch, pair), so a resumed run sees exactly the
pixels the uninterrupted one would have seen, whatever the number of decoding workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer

from dsmd.datasets import Item
from dsmd.distill.config import AugmentConfig
from dsmd.distill.student import tokenize
from dsmd.images import BadImage, open_image
from dsmd.preprocess import PreprocessConfig, image_to_array


@dataclass
class Pairs:
    """Every (image, caption) pair of a split: item index and caption index, one row each."""

    items: list[Item]
    item: np.ndarray
    caption: np.ndarray

    @classmethod
    def of(cls, items: list[Item]) -> Pairs:
        item = np.array([i for i, it in enumerate(items) for _ in it.captions], dtype=np.int64)
        caption = np.array([c for it in items for c in range(len(it.captions))], dtype=np.int64)
        return cls(items, item, caption)

    def __len__(self) -> int:
        return len(self.item)


@dataclass
class Unpaired:
    """Training rows with one side only, learnt from the teacher's embedding of that side alone."""

    images: list[Item]  # images seen without their captions
    captions: list[tuple[Item, int]]  # (item, caption index): captions seen without their image


def split_pairs(items: list[Item], fraction: float, unpaired: list[str]) -> tuple[list[Item], Unpaired]:
    """The items whose captions are trained on as pairs, the first `fraction` of the captioned ones in
    data-set order, rounded up to an even count (the generated worlds' sibling scenes stay together),
    and the unpaired rows the rest gives (`unpaired`: "images" and/or "captions"; images without
    captions count as unpaired images)."""
    captioned = [it for it in items if it.captions]
    n = len(captioned) if fraction >= 1 else max(1, round(fraction * len(captioned)))
    n = min(len(captioned), n + n % 2)
    paired = {it.image_id for it in captioned[:n]}
    rest = [it for it in items if it.image_id not in paired]
    return captioned[:n], Unpaired(
        images=rest if "images" in unpaired else [],
        captions=[(it, c) for it in rest for c in range(len(it.captions))] if "captions" in unpaired else [])


# a tag in the random keys of the unpaired streams: no key of theirs equals a pair's (seed, epoch, pair)
UNPAIRED_TAG = 0x5EED


def unpaired_rows(n: int, seed: int, start: int, count: int, kind: int = 0) -> np.ndarray:
    """Rows [start, start + count) of an endless stream over n unpaired rows, each pass over them in
    a new order drawn from (seed, kind, pass): row k of the stream depends on k alone, so a resumed run
    draws what the uninterrupted one would have. `kind`: 0 for images, 1 for captions."""
    pos = np.arange(start, start + count)
    out = np.empty(count, np.int64)
    for p in np.unique(pos // n):
        at = pos // n == p
        out[at] = np.random.default_rng([seed, UNPAIRED_TAG, kind, int(p)]).permutation(n)[pos[at] % n]
    return out


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The pairs' order in an epoch: a function of (seed, epoch) only, so a resumed run sees the same order."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def micro_batch(order: np.ndarray, step: int, batch: int, accum: int, rank: int, world: int, micro: int) -> np.ndarray:
    """Pair indices of micro-batch `micro` (0..accum-1) of rank `rank` in global step `step`."""
    per = batch // (accum * world)
    start = step * batch + (micro * world + rank) * per
    return order[start:start + per]


def random_crop_box(w: int, h: int, rng: np.random.Generator, scale: tuple[float, float],
                    ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """A random resized crop's box (torchvision's rule: 10 tries, then the whole image)."""
    area = w * h
    log_ratio = np.log(ratio)
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = float(np.exp(rng.uniform(*log_ratio)))
        cw, ch = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return left, top, left + cw, top + ch
    return 0, 0, w, h


def train_pixels(img: Image.Image, pre: PreprocessConfig, aug: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Augmented model input: a random resized crop (and flip, if on), then the preprocessing spec."""
    img = img.convert("RGB")
    img = img.crop(random_crop_box(*img.size, rng, tuple(aug.crop_scale), tuple(aug.crop_ratio)))
    if aug.hflip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    # the crop is resized straight to the model's size: a crop already chose the framing
    return image_to_array(img, PreprocessConfig(**{**pre.to_json(), "resize": "squash"}))


class TrainBatches(torch.utils.data.Dataset):
    """Micro-batches of one rank for the steps [start, stop) of an epoch (DataLoader, batch_size=None)."""

    def __init__(self, pairs: Pairs, order: np.ndarray, steps: range, *, batch: int, accum: int, rank: int,
                 world: int, pre: PreprocessConfig, aug: AugmentConfig, tok: Tokenizer, seed: int, epoch: int,
                 steps_per_epoch: int, unpaired: Unpaired | None = None, unpaired_per: int = 0):
        self.pairs, self.order, self.steps = pairs, order, steps
        self.batch, self.accum, self.rank, self.world = batch, accum, rank, world
        self.pre, self.aug, self.tok, self.seed, self.epoch = pre, aug, tok, seed, epoch
        # unpaired rows per micro-batch, of each kind there is; the stream position counts global steps
        self.unpaired, self.unpaired_per, self.steps_per_epoch = unpaired, unpaired_per, steps_per_epoch

    def __len__(self) -> int:
        return len(self.steps) * self.accum

    def __getitem__(self, k: int) -> dict:
        step, micro = self.steps[k // self.accum], k % self.accum
        idx = micro_batch(self.order, step, self.batch, self.accum, self.rank, self.world, micro)
        items = [self.pairs.items[i] for i in self.pairs.item[idx]]
        pixels = [self._pixels(it, int(p)) for it, p in zip(items, idx)]
        image_ids = [it.image_id for it in items]
        texts = [it.captions[c] for it, c in zip(items, self.pairs.caption[idx])]
        caption_ids = [it.caption_ids[c] for it, c in zip(items, self.pairs.caption[idx])]
        caption_image_ids = list(image_ids)
        if self.unpaired is not None and self.unpaired_per:
            # after the pairs: rows [pairs:] of the images and of the texts have no other side
            start = (((self.epoch * self.steps_per_epoch + step) * self.accum + micro) * self.world
                     + self.rank) * self.unpaired_per
            images, captions = self.unpaired.images, self.unpaired.captions
            if images:  # never more rows of a kind than it has: a few would repeat within a batch
                rows = unpaired_rows(len(images), self.seed, start, min(self.unpaired_per, len(images)))
                for k, r in enumerate(rows):
                    it = images[r]
                    rng = np.random.default_rng([self.seed, UNPAIRED_TAG, 2, start + k])
                    pixels.append(self._pixels(it, None, rng))
                    image_ids.append(it.image_id)
            if captions:
                for r in unpaired_rows(len(captions), self.seed, start, min(self.unpaired_per, len(captions)), kind=1):
                    it, c = captions[r]
                    texts.append(it.captions[c])
                    caption_ids.append(it.caption_ids[c])
                    caption_image_ids.append(it.image_id)
        ids, mask = tokenize(self.tok, texts)
        return {
            "pixels": torch.from_numpy(np.stack(pixels)), "input_ids": ids, "attention_mask": mask,
            "image_ids": torch.tensor(image_ids), "caption_ids": torch.tensor(caption_ids),
            "caption_image_ids": torch.tensor(caption_image_ids), "pairs": len(idx),
        }

    def _pixels(self, item: Item, pair: int | None, rng: np.random.Generator | None = None) -> np.ndarray:
        rng = rng or np.random.default_rng([self.seed, self.epoch, pair])
        try:
            return train_pixels(open_image(item.path), self.pre, self.aug, rng)
        except BadImage as e:  # the feature store read it; it changed on disk since
            raise BadImage(f"{item.path} became unreadable since the feature store was built: {e}") from e


class EvalImages(torch.utils.data.Dataset):
    """Images of a split with the plain preprocessing spec (no augmentation)."""

    def __init__(self, items: list[Item], pre: PreprocessConfig):
        self.items, self.pre = items, pre

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(image_to_array(open_image(self.items[i].path), self.pre))
