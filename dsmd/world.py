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

`world="shifted"` makes a second world from the same rules with other words, more shapes and
colours, three sizes, a 4x4 grid and other captions (dsmd/world_specs.py), to check that what
was tuned on the demo world carries over. Captions and the bag-of-words baseline live in
dsmd/world_captions.py.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dsmd.errors import UserError
from dsmd.world_captions import captions_for
from dsmd.world_specs import DEMO, WorldSpec, world_spec

SPLIT_SIZES = {"train": 8000, "val": 500, "test": 1000}


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


def random_scene(rng: np.random.Generator, world: WorldSpec = DEMO) -> list[Obj]:
    n = int(rng.choice(list(world.objects), p=list(world.objects_p)))
    g = world.grid
    cells = rng.choice(g * g, size=n, replace=False)
    return [
        Obj(
            shape=str(rng.choice(list(world.shapes))),
            colour=str(rng.choice(list(world.colours))),
            size=str(rng.choice(list(world.sizes))),
            row=int(c // g),
            col=int(c % g),
        )
        for c in cells
    ]


def sibling(scene: list[Obj], rng: np.random.Generator, grid: int = 3) -> list[Obj]:
    """A scene with the same bag of words whose binding differs.

    Two objects swap colours, sizes, shapes or places; a lone object moves to another
    cell. Swaps that would change nothing (two red objects swapping colours) are avoided.
    """
    if len(scene) == 1:
        (o,) = scene
        cells = [c for c in range(grid * grid) if c != o.row * grid + o.col]
        c = int(rng.choice(cells))
        return [Obj(o.shape, o.colour, o.size, c // grid, c % grid)]
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
        free = [c for c in range(grid * grid) if (c // grid, c % grid) not in used]
        c = int(rng.choice(free))
        return [Obj(o.shape, o.colour, o.size, c // grid, c % grid)] + scene[1:]
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


def render(scene: list[Obj], size: int, rng: np.random.Generator, world: WorldSpec = DEMO) -> Image.Image:
    """Draw a scene on a noisy background, with jitter in place, size and colour."""
    scale = 4  # draw large, then downsample: smooth edges at small sizes
    big = size * scale
    grey = rng.integers(95, 165)
    tint = tuple(int(grey + t) for t in rng.integers(-12, 13, size=3))  # low-saturation backgrounds
    img = Image.new("RGB", (big, big), tint)
    draw = ImageDraw.Draw(img)
    cell = big / world.grid
    for o in scene:
        rgb, _ = world.colours[o.colour]
        rgb = tuple(int(np.clip(v + rng.normal(0, 12), 0, 255)) for v in rgb)
        r = world.sizes[o.size][0] * big * rng.uniform(0.9, 1.1)
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
    elif shape in ("pentagon", "hexagon"):
        k = 5 if shape == "pentagon" else 6
        poly([(r * math.cos(-math.pi / 2 + 2 * math.pi * i / k), r * math.sin(-math.pi / 2 + 2 * math.pi * i / k))
              for i in range(k)])
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=rgb, width=max(1, int(r * 0.35)))
    elif shape == "arrow":
        t = r * 0.3
        poly([(-r, -t), (r * 0.2, -t), (r * 0.2, -r * 0.7), (r, 0), (r * 0.2, r * 0.7), (r * 0.2, t), (-r, t)])
    else:
        raise ValueError(f"unknown shape {shape!r}")


# ---------------------------------------------------------------- writing the data set


def scene_pair(seed: int, first_id: int, image_size: int = 64, world: WorldSpec = DEMO
               ) -> list[tuple[list[Obj], Image.Image, list[str]]]:
    """Images `first_id` and `first_id + 1` of the world of `seed` (a sibling pair), in memory:
    (scene, image, captions) each, exactly as `generate` writes them."""
    pair_rng = np.random.default_rng([seed, first_id])
    first = random_scene(pair_rng, world)
    out = []
    for img_id, scene in ((first_id, first), (first_id + 1, sibling(first, pair_rng, world.grid))):
        rng = np.random.default_rng([seed, img_id, 1])
        image = render(scene, image_size, rng, world)
        out.append((scene, image, captions_for(scene, rng, world)))
    return out


def generate(
    out: str | Path,
    seed: int = 0,
    image_size: int = 64,
    split_sizes: dict[str, int] | None = None,
    progress: Callable[[int], None] | None = None,
    world: str = "demo",
) -> Path:
    """Write the demo world under `out` and return the path of its Karpathy JSON.

    Image i of the data set depends only on (seed, i), so the result is the same on every
    machine and for every order of work. Split sizes must be even: scenes come in pairs.
    `world`: "demo" or "shifted" (dsmd/world_specs.py).
    """
    spec = world_spec(world)
    sizes = dict(split_sizes or SPLIT_SIZES)
    if any(n % 2 for n in sizes.values()):
        raise UserError(f"split sizes must be even (scenes come in sibling pairs): {sizes}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, sent_id, img_id = [], 0, 0
    for split in ("train", "val", "test"):
        for _ in range(sizes.get(split, 0) // 2):
            for scene, image, caps in scene_pair(seed, img_id, image_size, spec):
                fname = f"{img_id:06d}.png"
                image.save(out / "images" / fname, optimize=False, compress_level=1)
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
    if world != "demo":  # the demo world's file stays as it always was
        doc["world"] = world
    from dsmd.artifacts import atomic_write_bytes

    atomic_write_bytes(path, json.dumps(doc).encode())
    return path
