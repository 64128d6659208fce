"""Captioned-image data sets: the Karpathy split JSON (Flickr30k, MSCOCO) and plain JSONL.

A data set is validated in full when it is opened, and every problem found is reported in
one message, so that a wrong path or a broken annotation file fails in the first second of a
run and not hours into it. Images themselves are decoded later (see `dsmd.images`); one that
turns out to be corrupt then is skipped and counted, never a crash.

Formats:
- Karpathy: `{"images": [{"filename", "filepath"?, "split", "imgid"?, "sentences": [{"raw",
  "sentid"?}]}]}`; images live at `root / filepath / filename`. `restval` (MSCOCO) is read as
  `train`, as in the Karpathy split's usual use.
- JSONL: one `{"image": path, "captions": [...], "split": ..., "id"?: int}` per line; a
  relative `image` is relative to `--images` (default: the JSONL file's folder).

A training image may come without captions: distillation learns from the teacher's embedding
of it alone (`data.unpaired`, docs/distillation.md). Val and test images need captions.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from dsmd.artifacts import sha256_json
from dsmd.errors import UserError

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"restval": "train", "dev": "val", "validation": "val"}
_SHOW = 5  # how many examples of each problem a message lists


class DatasetError(UserError):
    """A data set that cannot be used; the message lists every problem found."""


@dataclass(frozen=True)
class Item:
    """One image and its captions."""

    image_id: int
    path: Path
    split: str
    captions: tuple[str, ...]
    caption_ids: tuple[int, ...]


@dataclass
class Dataset:
    """A validated captioned-image data set."""

    name: str
    source: Path
    items: list[Item]
    meta: dict = field(default_factory=dict)

    def split(self, name: str) -> list[Item]:
        """Items of one split, in file order."""
        if name not in SPLITS:
            raise DatasetError(f"unknown split {name!r}: choose one of {', '.join(SPLITS)}")
        return [it for it in self.items if it.split == name]

    def counts(self) -> dict[str, dict[str, int]]:
        out = {}
        for s in SPLITS:
            items = self.split(s)
            out[s] = {"images": len(items), "captions": sum(len(it.captions) for it in items)}
        return out

    def fingerprint(self) -> str:
        """Hash of the annotations (ids, splits, file names, captions), not of the pixels.

        Two stores built from data sets with the same fingerprint can be mixed safely;
        hashing every image file would cost minutes on MSCOCO for little extra safety.
        """
        rows = [[it.image_id, it.split, it.path.name, list(it.captions), list(it.caption_ids)] for it in self.items]
        return sha256_json(rows)


def load_dataset(path: str | Path, images: str | Path | None = None, check_files: bool = True) -> Dataset:
    """Open a Karpathy JSON or a JSONL data set and validate it.

    Args:
        path: the annotation file (`dataset_flickr30k.json`, `*.jsonl`), or a folder holding
            exactly one `dataset_*.json` (as the demo world writes).
        images: the image root (files are at root / filepath / filename); default: the
            annotation file's folder or its `images/` sub-folder, whichever holds the first
            entries' files (so `filepath: "images"` beside an `images/` folder works, and so
            does the demo world's `images/` without a filepath). COCO's `filepath` values
            (`train2014`, `val2014`) work with `--images` at the folder holding them.
        check_files: check that every image file exists (cheap: one stat per image).

    Raises:
        DatasetError: listing every problem found, with counts and the first few examples.
    """
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("dataset_*.json")) + sorted(path.glob("*.jsonl"))
        if len(found) != 1:
            raise DatasetError(
                f"{path} is a folder with {len(found)} data-set files (dataset_*.json or *.jsonl); "
                "pass the annotation file itself"
            )
        path = found[0]
    if not path.exists():
        raise DatasetError(f"data set file {path} does not exist")
    if path.suffix == ".jsonl":
        raw, name = _read_jsonl(path), path.stem
    else:
        raw, name = _read_karpathy(path)
    given = images is not None
    root = Path(images) if given else _default_root(path, raw)
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist; pass the folder holding the images with --images")
    return _build(raw, name, path, root, check_files, given)


def _default_root(path: Path, rows: list[dict], probe: int = 20) -> Path:
    """The annotation file's folder or its images/ sub-folder: whichever holds more of the first
    entries' files (JSONL paths are relative to the file itself)."""
    candidates = [path.parent] if path.suffix == ".jsonl" else [path.parent / "images", path.parent]
    candidates = [c for c in candidates if c.is_dir()] or [path.parent]
    files = [r["file"] for r in rows[:probe] if isinstance(r.get("file"), str) and r["file"]]
    return max(candidates, key=lambda c: sum((c / f).is_file() for f in files))  # ties: the first, images/


def _read_karpathy(path: Path) -> tuple[list[dict], str]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise DatasetError(f"{path} is not a Karpathy split file: expected an object with an 'images' list")
    rows = []
    for i, img in enumerate(doc["images"]):
        sents = img.get("sentences") or []
        rows.append(
            {
                "line": i,
                "id": img.get("imgid", img.get("cocoid", i)),
                "file": str(Path(img.get("filepath", "")) / img.get("filename", "")) if img.get("filename") else None,
                "split": img.get("split"),
                "captions": [s.get("raw", " ".join(s.get("tokens", []))) for s in sents if isinstance(s, dict)],
                "caption_ids": [s.get("sentid") for s in sents if isinstance(s, dict)],
            }
        )
    return rows, str(doc.get("dataset", path.stem))


def _read_jsonl(path: Path) -> list[dict]:
    rows, bad = [], []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                bad.append(i + 1)
                continue
            if not isinstance(rec, dict):
                bad.append(i + 1)
                continue
            caps = rec.get("captions", [])
            if isinstance(caps, str):
                caps = [caps]
            rows.append(
                {
                    "line": i + 1,
                    "id": rec.get("id", len(rows)),
                    "file": rec.get("image"),
                    "split": rec.get("split"),
                    "captions": caps,
                    "caption_ids": [None] * len(caps),
                }
            )
    if bad:
        raise DatasetError(f"{path}: {len(bad)} lines are not JSON objects (lines {_few(bad)})")
    return rows


def _build(rows: list[dict], name: str, source: Path, root: Path, check_files: bool, root_given: bool = True
           ) -> Dataset:
    problems: list[str] = []
    mistyped = [r["line"] for r in rows if not _well_typed(r)]
    if mistyped:
        raise DatasetError(f"data set {source}: {len(mistyped)} entries have fields of the wrong type (entries "
                           f"{_few(mistyped)}): image must be a string, captions a list of strings, split a "
                           "string, id an integer")
    no_file = [r["line"] for r in rows if not r["file"]]
    bad_split = Counter(str(r["split"]) for r in rows if _SPLIT_ALIASES.get(r["split"], r["split"]) not in SPLITS)
    # a training image may have none: distillation learns from its teacher embedding alone (data.unpaired)
    no_caps = [r["line"] for r in rows if not r["captions"] and _SPLIT_ALIASES.get(r["split"], r["split"]) != "train"]
    empty_caps = [r["line"] for r in rows if any(not isinstance(c, str) or not c.strip() for c in r["captions"])]
    bad_ids = [r["line"] for r in rows if not isinstance(r["id"], int) or isinstance(r["id"], bool)]
    dup_ids = [k for k, n in Counter(r["id"] for r in rows).items() if n > 1]
    dup_files = [k for k, n in Counter(r["file"] for r in rows if r["file"]).items() if n > 1]

    if no_file:
        problems.append(f"{len(no_file)} images have no file name (entries {_few(no_file)})")
    if bad_split:
        problems.append(
            f"unknown split values {dict(bad_split)}; expected one of {', '.join(SPLITS)} (or restval)"
        )
    if no_caps:
        problems.append(f"{len(no_caps)} val/test images have no captions (entries {_few(no_caps)}); only training "
                        "images may have none")
    if empty_caps:
        problems.append(f"{len(empty_caps)} images have an empty caption (entries {_few(empty_caps)})")
    if bad_ids:
        problems.append(f"{len(bad_ids)} image ids are not integers (entries {_few(bad_ids)})")
    if dup_ids:
        problems.append(f"{len(dup_ids)} duplicate image ids ({_few(dup_ids)})")
    if dup_files:
        problems.append(f"{len(dup_files)} image files are listed twice ({_few(dup_files)})")

    # Caption ids: from the file when every caption has one, else numbered in file order.
    given = [c for r in rows for c in r["caption_ids"]]
    if given and all(isinstance(c, int) for c in given):
        dup_caps = [k for k, n in Counter(given).items() if n > 1]
        if dup_caps:
            problems.append(f"{len(dup_caps)} duplicate caption ids ({_few(dup_caps)})")
    else:
        n = 0
        for r in rows:
            r["caption_ids"] = list(range(n, n + len(r["captions"])))
            n += len(r["captions"])

    if check_files and not no_file:
        missing = [r["file"] for r in rows if not (root / r["file"]).is_file()]
        if missing:
            hint = ("" if len(missing) < len(rows) else
                    "; give the folder that holds them with --images" + ("" if root_given else
                    f" (looked in {root}, chosen as the folder holding more of the first files)"))
            problems.append(f"{len(missing)} of {len(rows)} image files are missing under {root} "
                            f"(first: {_few(missing)}){hint}")

    if problems:
        raise DatasetError(f"data set {source} has {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))
    if not rows:
        raise DatasetError(f"data set {source} holds no images")

    items = [
        Item(
            image_id=int(r["id"]),
            path=root / r["file"],
            split=_SPLIT_ALIASES.get(r["split"], r["split"]),
            captions=tuple(c.strip() for c in r["captions"]),
            caption_ids=tuple(int(c) for c in r["caption_ids"]),
        )
        for r in rows
    ]
    return Dataset(name=name, source=source, items=items, meta={"image_root": str(root)})


def _well_typed(r: dict) -> bool:
    return (
        (r["file"] is None or isinstance(r["file"], str))
        and (r["split"] is None or isinstance(r["split"], str))
        and isinstance(r["captions"], list)
        and isinstance(r["id"], (int, str, float)) and not isinstance(r["id"], bool)
        and all(c is None or isinstance(c, (int, str, float)) for c in r["caption_ids"])
    )


def _few(values: list, n: int = _SHOW) -> str:
    shown = ", ".join(str(v) for v in values[:n])
    return shown + (f", … ({len(values) - n} more)" if len(values) > n else "")
