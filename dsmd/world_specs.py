"""What a generated world is made of: its shapes, colours, sizes, grid and words.

Two worlds share one generator (dsmd/world.py, dsmd/world_captions.py): `demo`, the world every
config was tuned on, and `shifted`, another vocabulary over more shapes and colours, three sizes,
a 4x4 grid, up to four objects and captions of other lengths and phrasings, so that a claim made
on one world can be checked on a second it was not tuned on.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsmd.errors import UserError

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class WorldSpec:
    name: str
    shapes: dict[str, list[str]]  # canonical name -> words used in captions
    colours: dict[str, tuple[RGB, list[str]]]  # canonical name -> (RGB, words)
    sizes: dict[str, tuple[float, list[str]]]  # canonical name -> (radius as a share of the image side, words)
    grid: int  # cells per side
    row_words: list[str]  # one per row, top first (single words: the bag of words counts them)
    col_words: list[str]  # one per column, left first
    objects: tuple[int, ...]  # how many objects a scene may hold
    objects_p: tuple[float, ...]  # and how likely each count is
    captions: str  # the caption family of dsmd/world_captions.py: "demo" or "shifted"
    stopwords: frozenset[str]  # template words a bag of words drops
    synonyms: dict[str, str]  # more words -> canonical (relations, places), for the bag of words


DEMO = WorldSpec(
    name="demo",
    shapes={"circle": ["circle", "disc", "dot"], "square": ["square", "box", "block"], "triangle": ["triangle"],
            "star": ["star"], "cross": ["cross", "plus sign"], "diamond": ["diamond", "rhombus"]},
    colours={"red": ((220, 40, 40), ["red", "crimson"]), "green": ((40, 170, 60), ["green"]),
             "blue": ((40, 80, 220), ["blue", "navy"]), "yellow": ((235, 205, 40), ["yellow", "golden"]),
             "purple": ((140, 60, 180), ["purple", "violet"]), "orange": ((245, 130, 30), ["orange"]),
             "white": ((245, 245, 245), ["white"]), "black": ((25, 25, 25), ["black", "dark"])},
    sizes={"small": (0.09, ["small", "little", "tiny"]), "large": (0.16, ["large", "big"])},
    grid=3, row_words=["top", "middle", "bottom"], col_words=["left", "centre", "right"],
    objects=(1, 2, 3), objects_p=(0.2, 0.45, 0.35), captions="demo",
    stopwords=frozenset({"a", "an", "the", "and", "is", "there", "of", "to", "in", "on", "at", "with", "that", "sits",
                         "picture", "image", "shows", "we", "see", "one", "shape", "shapes", "two", "three",
                         "objects", "it", "its", "which", "corner", "side", "next", "also", "has", "are", "some"}),
    synonyms={"middle": "centre", "over": "above", "under": "below", "beneath": "below"},
)

SHIFTED = WorldSpec(
    name="shifted",
    shapes={"circle": ["ball", "round"], "square": ["tile", "quad"], "triangle": ["wedge", "trigon"],
            "star": ["starburst", "asterisk"], "cross": ["plus", "x"], "diamond": ["lozenge", "kite"],
            "pentagon": ["pentagon"], "hexagon": ["hexagon", "honeycomb"], "ring": ["ring", "hoop"],
            "arrow": ["arrow", "pointer"]},
    colours={"red": ((210, 30, 50), ["scarlet", "ruby"]), "green": ((30, 150, 70), ["emerald", "leafy"]),
             "blue": ((30, 70, 200), ["cobalt", "azure"]), "yellow": ((240, 215, 50), ["lemon", "amber"]),
             "purple": ((130, 50, 170), ["plum", "lilac"]), "orange": ((240, 120, 20), ["tangerine", "apricot"]),
             "white": ((240, 240, 240), ["ivory", "snowy"]), "black": ((20, 20, 20), ["ebony", "inky"]),
             "pink": ((245, 130, 190), ["pink", "rosy"]), "cyan": ((40, 200, 210), ["cyan", "teal"]),
             "brown": ((130, 80, 40), ["brown", "chocolate"]), "lime": ((150, 230, 50), ["lime", "chartreuse"])},
    sizes={"small": (0.055, ["mini", "wee"]), "medium": (0.085, ["medium", "midsize"]),
           "large": (0.115, ["huge", "jumbo"])},
    grid=4, row_words=["top", "upper", "lower", "bottom"], col_words=["leftmost", "left", "right", "rightmost"],
    objects=(1, 2, 3, 4), objects_p=(0.15, 0.35, 0.3, 0.2), captions="shifted",
    stopwords=frozenset({"a", "the", "and", "row", "column", "this", "scene", "holds", "one", "is", "sitting",
                         "found", "in", "of", "with", "too", "at", "nothing", "else"}),
    synonyms={},  # compass relations stay their own words: "west" is not the column word "left"
)

WORLDS = {w.name: w for w in (DEMO, SHIFTED)}


def world_spec(name: str) -> WorldSpec:
    if name not in WORLDS:
        raise UserError(f"unknown world {name!r}: one of {', '.join(WORLDS)}")
    return WORLDS[name]
