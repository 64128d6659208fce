"""Captions of a generated scene, and the bag-of-words baseline that cannot bind them.

Every caption is true of its scene and names each object's shape and colour, so it is enough to
bind the attributes (dsmd/world.py says why that matters). The demo world's captions are one
family of templates; the shifted world's another: other words, terse ones of a few words and
long ones that list every object with its place, and compass words for the relations.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np

from dsmd.world_specs import DEMO, WorldSpec

if TYPE_CHECKING:
    from dsmd.world import Obj

CAPTIONS_PER_IMAGE = 5


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def captions_for(scene: list[Obj], rng: np.random.Generator, world: WorldSpec = DEMO) -> list[str]:
    """Five distinct captions, each true of the scene and enough to bind its attributes."""
    one = _one_caption if world.captions == "demo" else _shifted_caption
    out: list[str] = []
    for _ in range(50):
        if len(out) == CAPTIONS_PER_IMAGE:
            break
        cap = one(scene, rng, world)
        if cap not in out:
            out.append(cap)
    while len(out) < CAPTIONS_PER_IMAGE:  # tiny scenes can run out of distinct phrasings
        out.append(out[len(out) % len(out)] + " .")
    return out


# ---------------------------------------------------------------- the demo world's family


def _noun(o: Obj, rng: np.random.Generator, world: WorldSpec, with_size: bool = True) -> str:
    colour = _pick(rng, world.colours[o.colour][1])
    shape = _pick(rng, world.shapes[o.shape])
    size = _pick(rng, world.sizes[o.size][1])
    if not with_size:
        return f"{colour} {shape}"
    form = rng.integers(4)
    if form == 0:
        return f"{shape} that is {size} and {colour}"
    if form == 1:
        return f"{colour} {shape} , {size} ,"
    return f"{size} {colour} {shape}"


def _place(o: Obj, rng: np.random.Generator, world: WorldSpec) -> str:
    r, c = world.row_words[o.row], world.col_words[o.col]
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


def _one_caption(scene: list[Obj], rng: np.random.Generator, world: WorldSpec) -> str:
    art = _pick(rng, ["a", "one"])
    if len(scene) == 1:
        o = scene[0]
        t = rng.integers(4)
        if t == 0:
            return f"a {_noun(o, rng, world)} {_place(o, rng, world)}"
        if t == 1:
            return f"{_place(o, rng, world)} there is a {_noun(o, rng, world)}"
        if t == 2:
            return f"a picture of a {_noun(o, rng, world)} {_place(o, rng, world)}"
        return f"{art} {_noun(o, rng, world)} sits {_place(o, rng, world)}"
    order = rng.permutation(len(scene))
    a, b = scene[order[0]], scene[order[1]]
    ws = rng.random() < 0.85
    rel = _relation(a, b, rng)
    t = rng.integers(4)
    if t == 0:
        core = f"a {_noun(a, rng, world, ws)} {rel} a {_noun(b, rng, world, ws)}"
    elif t == 1:
        core = f"there is a {_noun(a, rng, world, ws)} {rel} a {_noun(b, rng, world, ws)}"
    elif t == 2:
        core = (f"a {_noun(a, rng, world, ws)} and a {_noun(b, rng, world, ws)} , the "
                f"{_pick(rng, world.shapes[a.shape])} is {rel} it")
        if a.shape == b.shape:
            core = f"a {_noun(a, rng, world, ws)} {rel} a {_noun(b, rng, world, ws)}"
    else:
        core = f"the picture shows a {_noun(a, rng, world, ws)} {rel} a {_noun(b, rng, world, ws)}"
    if len(scene) == 3:
        c = scene[order[2]]
        tail = _pick(rng, ["and a", "with a", "; also a", "next to a"])
        core = f"{core} {tail} {_noun(c, rng, world, ws)} {_place(c, rng, world)}"
    return core


# ---------------------------------------------------------------- the shifted world's family


def _s_noun(o: Obj, rng: np.random.Generator, world: WorldSpec) -> str:
    colour = _pick(rng, world.colours[o.colour][1])
    shape = _pick(rng, world.shapes[o.shape])
    size = _pick(rng, world.sizes[o.size][1])
    form = rng.integers(3)
    if form == 0:
        return f"{size} {shape} in {colour}"
    return f"{colour} {size} {shape}" if form == 1 else f"{size} {colour} {shape}"


def _s_place(o: Obj, rng: np.random.Generator, world: WorldSpec) -> str:
    r, c = world.row_words[o.row], world.col_words[o.col]
    return f"{r} {c}" if rng.random() < 0.5 else f"in the {r} row , {c} column"


def _s_relation(a: Obj, b: Obj, rng: np.random.Generator) -> str:
    """Compass words: 'a R b' is true (north is up)."""
    opts = (["west of"] if a.col < b.col else ["east of"] if a.col > b.col else [])
    opts += ["north of"] if a.row < b.row else ["south of"] if a.row > b.row else []
    return _pick(rng, opts)


def _s_name(o: Obj, scene: list[Obj], rng: np.random.Generator, world: WorldSpec) -> str:
    """The fewest words that single `o` out of its scene: its shape, then its colour, then its size,
    then its place."""
    def same(attrs):
        return sum(all(getattr(x, k) == getattr(o, k) for k in attrs) for x in scene) > 1

    words = [_pick(rng, world.shapes[o.shape])]
    if same(["shape"]):
        words.insert(0, _pick(rng, world.colours[o.colour][1]))
        if same(["shape", "colour"]):
            words.insert(0, _pick(rng, world.sizes[o.size][1]))
            if same(["shape", "colour", "size"]):
                words.append(f"at {world.row_words[o.row]} {world.col_words[o.col]}")
    return " ".join(words)


def _shifted_caption(scene: list[Obj], rng: np.random.Generator, world: WorldSpec) -> str:
    if len(scene) == 1:
        o = scene[0]
        t = rng.integers(3)
        if t == 0:
            return f"{_s_noun(o, rng, world)} , {_s_place(o, rng, world)}"
        if t == 1:
            return f"this scene holds one {_s_noun(o, rng, world)} found {_s_place(o, rng, world)}"
        return f"a {_s_noun(o, rng, world)} sitting {_s_place(o, rng, world)} with nothing else"
    order = rng.permutation(len(scene))
    a, b, rest = scene[order[0]], scene[order[1]], [scene[i] for i in order[2:]]
    rel = _s_relation(a, b, rng)
    t = rng.integers(3)
    if t == 0:  # terse
        core = f"{_s_noun(a, rng, world)} {rel} {_s_noun(b, rng, world)}"
        return " ; ".join([core] + [_s_noun(c, rng, world) for c in rest])
    if t == 1:  # long: every object with its place, then the relation
        listed = " , ".join(f"{_s_noun(o, rng, world)} {world.row_words[o.row]} {world.col_words[o.col]}"
                            for o in (a, b, *rest))
        return f"{listed} ; the {_s_name(a, scene, rng, world)} is {rel} the {_s_name(b, scene, rng, world)}"
    core = f"a {_s_noun(a, rng, world)} sitting {rel} a {_s_noun(b, rng, world)}"
    return core + "".join(f" with a {_s_noun(c, rng, world)} {_s_place(c, rng, world)} too" for c in rest)


# ---------------------------------------------------------------- bag-of-words baseline


def _synonyms(world: WorldSpec) -> dict[str, str]:
    out = {syn: name for name, syns in world.shapes.items() for syn in syns}
    out.update({syn: name for name, (_, syns) in world.colours.items() for syn in syns})
    out.update({syn: name for name, (_, syns) in world.sizes.items() for syn in syns})
    out.update(world.synonyms)
    return out


def bag_of_words(text: str, world: WorldSpec = DEMO) -> list[str]:
    """Canonical content words of a caption: synonyms merged, stop-words dropped."""
    text = text.lower()
    for name, syns in world.shapes.items():  # words of several words ("plus sign")
        for syn in syns:
            if " " in syn:
                text = text.replace(syn, name)
    syn = _synonyms(world)
    return [syn.get(w, w) for w in re.findall(r"[a-z]+", text) if w not in world.stopwords]


def scene_words(scene: list[dict], world: WorldSpec = DEMO) -> list[str]:
    """What a perfect object detector that does not bind would say: each object's shape,
    colour, size and absolute place, as one unordered bag."""
    words = []
    for o in scene:
        words += [o["shape"], o["colour"], o["size"], world.row_words[o["row"]], world.col_words[o["col"]]]
    return words


def bow_scores(captions: list[str], scenes: list[list[dict]], world: WorldSpec = DEMO) -> np.ndarray:
    """Caption x scene cosine similarity of word-count vectors (the bag-of-words baseline)."""
    vocab: dict[str, int] = {}
    rows = [bag_of_words(c, world) for c in captions]
    cols = [scene_words(s, world) for s in scenes]
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
