"""The teacher feature store: a teacher's embeddings of a data set, computed once.

DSMD distils from the teacher's output embeddings only, so the teacher runs once over the
data set and its L2-normalised image and caption embeddings are kept on disk, looked up by
id (never by batch position) for every epoch of every run.

Layout of a store (all arrays `.npy`, memory-mappable, no pickles):

    job.json                      what is being extracted (teacher, data set, chunking)
    {split}/image_emb.npy         (N, D) float16, rows in data-set order
    {split}/image_ids.npy         (N,) int64
    {split}/image_ok.npy          (N,) bool: False for an image that could not be decoded
    {split}/caption_emb.npy       (M, D) float16
    {split}/caption_ids.npy       (M,) int64
    {split}/caption_image.npy     (M,) int64: row of each caption's image
    {split}/{image,caption}_done.npy  one byte per chunk: 1 once its rows are on disk
    manifest.json                 written last: the store is complete

Extraction works in fixed chunks and marks a chunk done only after its rows are flushed, so
a killed run continues where it stopped and ends byte-identical to an uninterrupted one.
Under `torchrun`, rank r takes chunks r, r + W, r + 2W, ... of every split.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dsmd.artifacts import read_json, read_manifest, versions, write_json
from dsmd.datasets import SPLITS, Dataset, Item
from dsmd.distill.distributed import Dist, init_dist
from dsmd.distill.teachers.base import Teacher
from dsmd.errors import UserError
from dsmd.images import BadImage, open_image
from dsmd.preprocess import PreprocessConfig, image_to_array

DTYPE = np.float16


class StoreMismatch(UserError):
    """The store folder holds features of another teacher or data set."""


class IdIndex:
    """Rows of ids, by binary search over the ids sorted once (training looks up every batch)."""

    def __init__(self, ids: np.ndarray, what: str):
        self.ids, self.what = np.asarray(ids), what
        self.order = np.argsort(self.ids, kind="stable")
        self.sorted = self.ids[self.order]

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows of the given ids (KeyError for an id that is not there)."""
        ids = np.asarray(ids)
        if len(self.sorted) == 0:
            raise KeyError(f"no {self.what} ids in the store")
        pos = np.clip(np.searchsorted(self.sorted, ids), 0, len(self.sorted) - 1)
        rows = self.order[pos]
        bad = self.ids[rows] != ids
        if bad.any():
            raise KeyError(f"{int(bad.sum())} {self.what} ids are not in the store (first: {ids[bad][:5].tolist()})")
        return rows


@dataclass
class SplitFeatures:
    """Teacher embeddings of one split; images that failed to decode are left out."""

    image_emb: np.ndarray
    image_ids: np.ndarray
    caption_emb: np.ndarray
    caption_ids: np.ndarray
    caption_image: np.ndarray  # row in image_emb of each caption's image

    def __post_init__(self):
        self._images = IdIndex(self.image_ids, "image")
        self._captions = IdIndex(self.caption_ids, "caption")

    def image_rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows of the given image ids (KeyError for an id not in the split)."""
        return self._images.rows(ids)

    def caption_rows(self, ids: np.ndarray) -> np.ndarray:
        return self._captions.rows(ids)


class FeatureStore:
    """A complete feature store, opened read-only with memory-mapped arrays."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest = read_manifest(self.path)
        if manifest is None:
            unfinished = (self.path / "job.json").exists()
            hint = " (extraction unfinished: run `dsmd features` again to resume)" if unfinished else ""
            raise FileNotFoundError(f"{self.path} is not a complete feature store{hint}")
        self.manifest = manifest
        self.dim: int = manifest["teacher"]["dim"]

    @property
    def splits(self) -> list[str]:
        return [s for s in SPLITS if s in self.manifest["splits"]]

    def split(self, name: str) -> SplitFeatures:
        if name not in self.manifest["splits"]:
            raise UserError(f"split {name!r} is not in {self.path} (has {', '.join(self.splits)})")
        d = self.path / name
        load = lambda n: np.load(d / f"{n}.npy", mmap_mode="r")  # noqa: E731
        ok = np.asarray(load("image_ok"))
        cap_img = np.asarray(load("caption_image"))
        cap_keep = ok[cap_img]
        new_row = np.cumsum(ok) - 1  # old image row -> row among kept images
        return SplitFeatures(
            image_emb=load("image_emb") if ok.all() else np.asarray(load("image_emb"))[ok],
            image_ids=np.asarray(load("image_ids"))[ok],
            caption_emb=load("caption_emb") if cap_keep.all() else np.asarray(load("caption_emb"))[cap_keep],
            caption_ids=np.asarray(load("caption_ids"))[cap_keep],
            caption_image=new_row[cap_img[cap_keep]],
        )


# ---------------------------------------------------------------- extraction


def _job(teacher: Teacher, ds: Dataset, splits: list[str], chunk: int, precision: str) -> dict:
    return {"teacher": teacher.describe(), "dataset": {"name": ds.name, "fingerprint": ds.fingerprint(),
            "source": str(ds.source)}, "splits": splits, "chunk": chunk, "precision": precision,
            "dtype": np.dtype(DTYPE).name}


def _check_same_job(path: Path, job: dict) -> None:
    old = read_json(path / "job.json")
    problems = []
    new = json.loads(json.dumps(job["teacher"]))  # as it would read back from job.json (tuples → lists)
    # weights, preprocessing, tokenizer: everything that shapes the embeddings but the display name
    same_teacher = {k: v for k, v in old["teacher"].items() if k != "name"} == {
        k: v for k, v in new.items() if k != "name"}
    if not same_teacher:
        problems.append(f"teacher {old['teacher']['name']} ({old['teacher']['checkpoint_hash'][:12]}) "
                        f"vs {job['teacher']['name']} ({job['teacher']['checkpoint_hash'][:12]})")
    if old.get("precision") != job["precision"]:
        problems.append(f"precision {old.get('precision')} vs {job['precision']}")
    if old["dataset"]["fingerprint"] != job["dataset"]["fingerprint"]:
        problems.append(f"data set {old['dataset']['name']} ({old['dataset']['fingerprint'][:12]}) "
                        f"vs {job['dataset']['name']} ({job['dataset']['fingerprint'][:12]})")
    if old["splits"] != job["splits"] or old["chunk"] != job["chunk"]:
        problems.append(f"splits/chunk {old['splits']}/{old['chunk']} vs {job['splits']}/{job['chunk']}")
    if problems:
        raise StoreMismatch(f"{path} already holds other features: " + "; ".join(problems)
                            + ". Use another --out folder (a store never mixes teachers or data sets).")


def _create_split(d: Path, items: list[Item], dim: int, chunk: int) -> None:
    """Allocate a split's arrays (rank 0, first run only)."""
    from numpy.lib.format import open_memmap

    d.mkdir(parents=True, exist_ok=True)
    n, m = len(items), sum(len(it.captions) for it in items)
    np.save(d / "image_ids.npy", np.array([it.image_id for it in items], np.int64))
    np.save(d / "caption_ids.npy", np.array([c for it in items for c in it.caption_ids], np.int64))
    np.save(d / "caption_image.npy", np.array([i for i, it in enumerate(items) for _ in it.captions], np.int64))
    for name, shape, dtype in (("image_emb", (n, dim), DTYPE), ("caption_emb", (m, dim), DTYPE),
                               ("image_ok", (n,), np.bool_), ("image_done", (-(-n // chunk),), np.uint8),
                               ("caption_done", (-(-m // chunk),), np.uint8)):
        arr = open_memmap(d / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
        arr.flush()
        del arr


class _ImageChunks(torch.utils.data.Dataset):
    """Decodes and preprocesses one chunk of images per item, in loader workers.

    Holds the preprocessing spec, not the teacher, so that spawned workers do not receive
    a copy of the model."""

    def __init__(self, preprocess: PreprocessConfig, items: list[Item], chunks: list[int], chunk: int):
        self.preprocess, self.items, self.chunks, self.chunk = preprocess, items, chunks, chunk
        self.shape = (3, preprocess.size, preprocess.size)

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, k: int):
        c = self.chunks[k]
        items = self.items[c * self.chunk:(c + 1) * self.chunk]
        pixels = np.zeros((len(items), *self.shape), np.float32)
        ok = np.ones(len(items), bool)
        errors = []
        for i, it in enumerate(items):
            try:
                pixels[i] = image_to_array(open_image(it.path), self.preprocess)
            except BadImage as e:
                ok[i] = False
                errors.append(str(e))
        return c, torch.from_numpy(pixels), ok, errors


def extract(
    teacher: Teacher,
    ds: Dataset,
    out: str | Path,
    splits: list[str] | None = None,
    chunk: int = 64,
    workers: int = 2,
    precision: str = "fp32",
) -> dict:
    """Run `teacher` over the splits of `ds` into the store at `out`; resume if partial.

    Returns the manifest. Under torchrun every rank calls this with the same arguments.
    """
    out = Path(out)
    splits = splits or [s for s in SPLITS if ds.split(s)]
    job = _job(teacher, ds, splits, chunk, precision)
    dist = init_dist("cuda" if torch.cuda.is_available() else "cpu")
    if (out / "job.json").exists():
        _check_same_job(out, job)  # on every rank, so that no rank waits for one that failed
    elif out.exists() and any(out.iterdir()):
        raise StoreMismatch(f"{out} exists and is not a feature store; choose an empty --out folder")
    elif dist.rank == 0:
        # Allocate beside, then rename into place: a kill here leaves no half-made store.
        tmp = out.parent / f".{out.name}.allocating"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for s in splits:
            _create_split(tmp / s, ds.split(s), teacher.dim, chunk)
        write_json(tmp / "job.json", job)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    dist.barrier()
    if read_manifest(out) is not None:
        return read_manifest(out)

    t0 = time.time()
    amp = _autocast(precision, teacher.device)
    for s in splits:
        _extract_split(teacher, ds.split(s), out / s, chunk, workers, dist, amp, s)
    dist.barrier()
    manifest = None
    if dist.rank == 0:
        manifest = _finish(out, job, ds, splits, time.time() - t0, dist.world)
    dist.barrier()
    return manifest or read_manifest(out)


def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device.type, dtype=dtype)


def _extract_split(teacher, items, d: Path, chunk, workers, dist: Dist, amp, split: str) -> None:
    img_emb = np.load(d / "image_emb.npy", mmap_mode="r+")
    img_ok = np.load(d / "image_ok.npy", mmap_mode="r+")
    img_done = np.load(d / "image_done.npy", mmap_mode="r+")
    cap_emb = np.load(d / "caption_emb.npy", mmap_mode="r+")
    cap_done = np.load(d / "caption_done.npy", mmap_mode="r+")
    mine = lambda done: [c for c in range(len(done)) if c % dist.world == dist.rank and not done[c]]  # noqa: E731

    todo = mine(img_done)
    loader = torch.utils.data.DataLoader(_ImageChunks(teacher.preprocess, items, todo, chunk), batch_size=None,
                                         num_workers=workers if len(todo) > 1 else 0)
    show = dist.rank == 0
    with tqdm(total=len(items), initial=max(0, len(items) - len(todo) * chunk * dist.world), desc=f"{split} images",
              unit="img", disable=not show) as bar:
        for c, pixels, ok, errs in loader:
            ok = torch.as_tensor(ok, dtype=torch.bool)  # the loader may hand back numpy or torch
            emb = torch.zeros(len(ok), teacher.dim)
            if ok.any():
                with torch.no_grad(), amp:
                    emb[ok] = teacher.encode_pixels(pixels[ok]).float().cpu()
            img_emb[c * chunk:c * chunk + len(ok)] = emb.numpy().astype(DTYPE)
            img_ok[c * chunk:c * chunk + len(ok)] = ok.numpy()
            img_emb.flush()
            img_ok.flush()
            if errs:  # reasons kept on disk, so a resumed run still reports them
                with open(d / f"skipped.rank{dist.rank}.jsonl", "a", encoding="utf-8") as f:
                    f.write("".join(json.dumps({"chunk": int(c), "reason": e}) + "\n" for e in errs))
            img_done[c] = 1  # only after the rows are on disk
            img_done.flush()
            bar.update(len(ok) * dist.world)

    captions = [t for it in items for t in it.captions]
    todo = mine(cap_done)
    with tqdm(total=len(captions), initial=max(0, len(captions) - len(todo) * chunk * dist.world),
              desc=f"{split} captions", unit="cap", disable=not show) as bar:
        for c in todo:
            texts = captions[c * chunk:(c + 1) * chunk]
            with torch.no_grad(), amp:
                emb = teacher.encode_texts(texts).float().cpu()
            cap_emb[c * chunk:c * chunk + len(texts)] = emb.numpy().astype(DTYPE)
            cap_emb.flush()
            cap_done[c] = 1
            cap_done.flush()
            bar.update(len(texts) * dist.world)


def _skip_reasons(d: Path) -> list[str]:
    """Reasons recorded for skipped images, one per chunk and image (a chunk redone after a
    kill may have written its reasons twice)."""
    seen: dict[tuple, None] = {}
    for path in sorted(d.glob("skipped.rank*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            seen[(rec["chunk"], rec["reason"])] = None
    return [reason for _, reason in sorted(seen)]


def _finish(out: Path, job: dict, ds: Dataset, splits: list[str], seconds: float, world: int) -> dict:
    counts, skipped = {}, {}
    for s in splits:
        d = out / s
        for what in ("image", "caption"):
            done = np.load(d / f"{what}_done.npy")
            if not done.all():
                raise RuntimeError(f"{d}: {int((done == 0).sum())} {what} chunks were not extracted; "
                                   "run again to resume")
        ok = np.load(d / "image_ok.npy")
        cap_img = np.load(d / "caption_image.npy")
        counts[s] = {"images": int(ok.sum()), "captions": int(ok[cap_img].sum()), "skipped_images": int((~ok).sum())}
        if reasons := _skip_reasons(d):
            skipped[s] = reasons
    manifest = {
        "artifact": "feature-store",
        "teacher": job["teacher"],
        "dataset": {**job["dataset"], "counts": ds.counts()},
        "dtype": job["dtype"],
        "chunk": job["chunk"],
        "splits": counts,
        "skipped": skipped,
        "seconds": round(seconds, 1),
        "world_size": world,
        "versions": versions(),
    }
    write_json(out / "manifest.json", manifest)
    return manifest
