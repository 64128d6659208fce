"""The demo world: a generated captioned-image data set that runs everything offline.

Each image is a scene of 1-3 objects (shape, colour, size) in the cells of a 3x3 grid; each
has 5 captions written from varied templates with synonyms and both word orders of a
relation. Scenes come in *pairs* that share every word a bag of words could see and differ
in how the words bind: two objects swap colours, or sizes, or places (so "left of" flips),
or a lone object moves. Retrieving the right image therefore needs attributes bound to
objects and relations between them, as with real captions ("a man in red beside a woman in
blue"); a bag-of-words matcher cannot tell a pair apart (see `bow_scores`).

Output: the Karpathy layout, `dataset_world.json` plus `images/NNNNNN.png`, deterministic
from the seed. Each image entry also keeps its `scene` (ignored by Karpathy readers).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dsmd.errors import UserError

SHAPES = {  # canonical name -> synonyms used in captions
    "circle": ["circle", "disc", "dot"],
    "square": ["square", "box", "block"],
    "triangle": ["triangle"],
    "star": ["star"],
    "cross": ["cross", "plus sign"],
    "diamond": ["diamond", "rhombus"],
}
COLOURS = {  # canonical name -> (RGB, synonyms)
    "red": ((220, 40, 40), ["red", "crimson"]),
    "green": ((40, 170, 60), ["green"]),
    "blue": ((40, 80, 220), ["blue", "navy"]),
    "yellow": ((235, 205, 40), ["yellow", "golden"]),
    "purple": ((140, 60, 180), ["purple", "violet"]),
    "orange": ((245, 130, 30), ["orange"]),
    "white": ((245, 245, 245), ["white"]),
    "black": ((25, 25, 25), ["black", "dark"]),
}
SIZES = {"small": (0.09, ["small", "little", "tiny"]), "large": (0.16, ["large", "big"])}
ROW_WORDS = ["top", "middle", "bottom"]
COL_WORDS = ["left", "centre", "right"]
STOPWORDS = {"a", "an", "the", "and", "is", "there", "of", "to", "in", "on", "at", "with", "that", "sits",
             "picture", "image", "shows", "we", "see", "one", "shape", "shapes", "two", "three", "objects",
             "it", "its", "which", "corner", "side", "next", "also", "has", "are", "some"}
SPLIT_SIZES = {"train": 8000, "val": 500, "test": 1000}
CAPTIONS_PER_IMAGE = 5


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    row: int
    col: int

    def to_json(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "row": self.row, "col": self.col}


# ---------------------------------------------------------------- scenes


def random_scene(rng: np.random.Generator) -> list[Obj]:
    n = int(rng.choice([1, 2, 3], p=[0.2, 0.45, 0.35]))
    cells = rng.choice(9, size=n, replace=False)
    return [
        Obj(
            shape=str(rng.choice(list(SHAPES))),
            colour=str(rng.choice(list(COLOURS))),
            size=str(rng.choice(list(SIZES))),
            row=int(c // 3),
            col=int(c % 3),
        )
        for c in cells
    ]


def sibling(scene: list[Obj], rng: np.random.Generator) -> list[Obj]:
    """A scene with the same bag of words whose binding differs.

    Two objects swap colours, sizes, shapes or places; a lone object moves to another
    cell. Swaps that would change nothing (two red objects swapping colours) are avoided.
    """
    if len(scene) == 1:
        (o,) = scene
        cells = [c for c in range(9) if c != o.row * 3 + o.col]
        c = int(rng.choice(cells))
        return [Obj(o.shape, o.colour, o.size, c // 3, c % 3)]
    options = []
    for i in range(len(scene)):
        for j in range(i + 1, len(scene)):
            a, b = scene[i], scene[j]
            for attr in ("colour", "size", "shape"):
                if getattr(a, attr) != getattr(b, attr):
                    options.append((i, j, attr))
            if (a.shape, a.colour, a.size) != (b.shape, b.colour, b.size):
                options.append((i, j, "place"))
    if not options:  # identical objects: move one instead
        o = scene[0]
        used = {(x.row, x.col) for x in scene}
        free = [c for c in range(9) if (c // 3, c % 3) not in used]
        c = int(rng.choice(free))
        return [Obj(o.shape, o.colour, o.size, c // 3, c % 3)] + scene[1:]
    i, j, attr = options[int(rng.integers(len(options)))]
    a, b = scene[i], scene[j]
    if attr == "place":
        a2, b2 = Obj(a.shape, a.colour, a.size, b.row, b.col), Obj(b.shape, b.colour, b.size, a.row, a.col)
    else:
        a2 = Obj(**{**a.to_json(), attr: getattr(b, attr)})
        b2 = Obj(**{**b.to_json(), attr: getattr(a, attr)})
    out = list(scene)
    out[i], out[j] = a2, b2
    return out


# ---------------------------------------------------------------- rendering


def render(scene: list[Obj], size: int, rng: np.random.Generator) -> Image.Image:
    """Draw a scene on a noisy background, with jitter in place, size and colour."""
    scale = 4  # draw large, then downsample: smooth edges at small sizes
    big = size * scale
    grey = rng.integers(95, 165)
    tint = tuple(int(grey + t) for t in rng.integers(-12, 13, size=3))  # low-saturation backgrounds
    img = Image.new("RGB", (big, big), tint)
    draw = ImageDraw.Draw(img)
    cell = big / 3
    for o in scene:
        rgb, _ = COLOURS[o.colour]
        rgb = tuple(int(np.clip(v + rng.normal(0, 12), 0, 255)) for v in rgb)
        r = SIZES[o.size][0] * big * rng.uniform(0.9, 1.1)
        cx = (o.col + 0.5) * cell + rng.uniform(-0.12, 0.12) * cell
        cy = (o.row + 0.5) * cell + rng.uniform(-0.12, 0.12) * cell
        _draw_shape(draw, o.shape, cx, cy, r, rgb, rng.uniform(-0.25, 0.25))
    small = np.asarray(img.resize((size, size), Image.Resampling.BOX), dtype=np.float32)
    noisy = np.clip(small + rng.normal(0, 6, size=small.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(noisy, "RGB")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rgb, rot: float) -> None:
    def poly(points):
        c, s = math.cos(rot), math.sin(rot)
        draw.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in points], fill=rgb)

    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    elif shape == "square":
        q = r * 0.85
        poly([(-q, -q), (q, -q), (q, q), (-q, q)])
    elif shape == "triangle":
        poly([(0, -r), (r * 0.95, r * 0.7), (-r * 0.95, r * 0.7)])
    elif shape == "diamond":
        poly([(0, -r), (r * 0.7, 0), (0, r), (-r * 0.7, 0)])
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.42
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((rad * math.cos(a), rad * math.sin(a)))
        poly(pts)
    elif shape == "cross":
        t = r * 0.33
        poly([(-t, -r), (t, -r), (t, -t), (r, -t), (r, t), (t, t), (t, r), (-t, r), (-t, t), (-r, t), (-r, -t),
              (-t, -t)])
    else:
        raise ValueError(f"unknown shape {shape!r}")


# ---------------------------------------------------------------- captions


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _noun(o: Obj, rng: np.random.Generator, with_size: bool = True) -> str:
    colour = _pick(rng, COLOURS[o.colour][1])
    shape = _pick(rng, SHAPES[o.shape])
    size = _pick(rng, SIZES[o.size][1])
    if not with_size:
        return f"{colour} {shape}"
    form = rng.integers(4)
    if form == 0:
        return f"{shape} that is {size} and {colour}"
    if form == 1:
        return f"{colour} {shape} , {size} ,"
    return f"{size} {colour} {shape}"


def _place(o: Obj, rng: np.random.Generator) -> str:
    r, c = ROW_WORDS[o.row], COL_WORDS[o.col]
    if (o.row, o.col) == (1, 1):
        return _pick(rng, ["in the centre", "in the middle"])
    if o.row == 1:
        return f"on the {c} side" if rng.random() < 0.5 else f"on the {c}"
    if o.col == 1:
        return f"at the {r}"
    return f"in the {r} {c} corner" if rng.random() < 0.5 else f"at the {r} {c}"


def _relation(a: Obj, b: Obj, rng: np.random.Generator) -> str:
    """A phrase 'R' such that 'a R b' is true, horizontal or vertical."""
    opts = []
    if a.col < b.col:
        opts += ["to the left of", "left of"]
    if a.col > b.col:
        opts += ["to the right of", "right of"]
    if a.row < b.row:
        opts += ["above", "over"]
    if a.row > b.row:
        opts += ["below", "under", "beneath"]
    return _pick(rng, opts)


def captions_for(scene: list[Obj], rng: np.random.Generator) -> list[str]:
    """Five distinct captions, each true of the scene and enough to bind its attributes."""
    out: list[str] = []
    for _ in range(50):
        if len(out) == CAPTIONS_PER_IMAGE:
            break
        cap = _one_caption(scene, rng)
        if cap not in out:
            out.append(cap)
    while len(out) < CAPTIONS_PER_IMAGE:  # tiny scenes can run out of distinct phrasings
        out.append(out[len(out) % len(out)] + " .")
    return out


def _one_caption(scene: list[Obj], rng: np.random.Generator) -> str:
    art = _pick(rng, ["a", "one"])
    if len(scene) == 1:
        o = scene[0]
        t = rng.integers(4)
        if t == 0:
            return f"a {_noun(o, rng)} {_place(o, rng)}"
        if t == 1:
            return f"{_place(o, rng)} there is a {_noun(o, rng)}"
        if t == 2:
            return f"a picture of a {_noun(o, rng)} {_place(o, rng)}"
        return f"{art} {_noun(o, rng)} sits {_place(o, rng)}"
    order = rng.permutation(len(scene))
    a, b = scene[order[0]], scene[order[1]]
    ws = rng.random() < 0.85
    rel = _relation(a, b, rng)
    t = rng.integers(4)
    if t == 0:
        core = f"a {_noun(a, rng, ws)} {rel} a {_noun(b, rng, ws)}"
    elif t == 1:
        core = f"there is a {_noun(a, rng, ws)} {rel} a {_noun(b, rng, ws)}"
    elif t == 2:
        core = f"a {_noun(a, rng, ws)} and a {_noun(b, rng, ws)} , the {_pick(rng, SHAPES[a.shape])} is {rel} it"
        if a.shape == b.shape:
            core = f"a {_noun(a, rng, ws)} {rel} a {_noun(b, rng, ws)}"
    else:
        core = f"the picture shows a {_noun(a, rng, ws)} {rel} a {_noun(b, rng, ws)}"
    if len(scene) == 3:
        c = scene[order[2]]
        tail = _pick(rng, ["and a", "with a", "; also a", "next to a"])
        core = f"{core} {tail} {_noun(c, rng, ws)} {_place(c, rng)}"
    return core


# ---------------------------------------------------------------- bag-of-words baseline

_SYNONYM = {syn: name for name, syns in SHAPES.items() for syn in syns}
_SYNONYM.update({syn: name for name, (_, syns) in COLOURS.items() for syn in syns})
_SYNONYM.update({syn: name for name, (_, syns) in SIZES.items() for syn in syns})
_SYNONYM.update({"middle": "centre", "over": "above", "under": "below", "beneath": "below"})


def bag_of_words(text: str) -> list[str]:
    """Canonical content words of a caption: synonyms merged, stop-words dropped."""
    words = re.findall(r"[a-z]+", text.lower().replace("plus sign", "cross"))
    return [_SYNONYM.get(w, w) for w in words if w not in STOPWORDS]


def scene_words(scene: list[dict]) -> list[str]:
    """What a perfect object detector that does not bind would say: each object's shape,
    colour, size and absolute place, as one unordered bag."""
    words = []
    for o in scene:
        words += [o["shape"], o["colour"], o["size"], ROW_WORDS[o["row"]], COL_WORDS[o["col"]]]
    return words


def bow_scores(captions: list[str], scenes: list[list[dict]]) -> np.ndarray:
    """Caption x scene cosine similarity of word-count vectors (the bag-of-words baseline)."""
    vocab: dict[str, int] = {}
    rows = [bag_of_words(c) for c in captions]
    cols = [scene_words(s) for s in scenes]
    for bag in rows + cols:
        for w in bag:
            vocab.setdefault(w, len(vocab))

    def mat(bags):
        m = np.zeros((len(bags), len(vocab)), np.float32)
        for i, bag in enumerate(bags):
            for w in bag:
                m[i, vocab[w]] += 1
        return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-9)

    return mat(rows) @ mat(cols).T


# ---------------------------------------------------------------- writing the data set


def generate(
    out: str | Path,
    seed: int = 0,
    image_size: int = 64,
    split_sizes: dict[str, int] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write the demo world under `out` and return the path of its Karpathy JSON.

    Image i of the data set depends only on (seed, i), so the result is the same on every
    machine and for every order of work. Split sizes must be even: scenes come in pairs.
    """
    sizes = dict(split_sizes or SPLIT_SIZES)
    if any(n % 2 for n in sizes.values()):
        raise UserError(f"split sizes must be even (scenes come in sibling pairs): {sizes}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, sent_id, img_id = [], 0, 0
    for split in ("train", "val", "test"):
        for _ in range(sizes.get(split, 0) // 2):
            pair_rng = np.random.default_rng([seed, img_id])
            first = random_scene(pair_rng)
            for scene in (first, sibling(first, pair_rng)):
                rng = np.random.default_rng([seed, img_id, 1])
                fname = f"{img_id:06d}.png"
                render(scene, image_size, rng).save(out / "images" / fname, optimize=False, compress_level=1)
                caps = captions_for(scene, rng)
                images.append(
                    {
                        "filename": fname,
                        "imgid": img_id,
                        "split": split,
                        "pair": img_id // 2,
                        "sentids": list(range(sent_id, sent_id + len(caps))),
                        "sentences": [
                            {"raw": c, "tokens": c.split(), "imgid": img_id, "sentid": sent_id + k}
                            for k, c in enumerate(caps)
                        ],
                        "scene": [o.to_json() for o in scene],
                    }
                )
                sent_id += len(caps)
                img_id += 1
                if progress:
                    progress(1)
    path = out / "dataset_world.json"
    doc = {"dataset": "dsmd-world", "seed": seed, "image_size": image_size, "images": images}
    from dsmd.artifacts import atomic_write_bytes

    atomic_write_bytes(path, json.dumps(doc).encode())
    return path
