"""Recall of a student: during training (val, every epoch) and of a finished one beside its teacher.

Students are evaluated the way serving will use them: the plain preprocessing spec (no
augmentation), normalised embeddings, and the metrics of `dsmd.retrieval`.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from dsmd.datasets import Dataset, Item, load_dataset
from dsmd.distill.checkpoint import resolve_student, save_best
from dsmd.distill.config import DistillConfig
from dsmd.distill.data import EvalImages
from dsmd.distill.distributed import Dist, resolve_device
from dsmd.distill.features import FeatureStore, SplitFeatures, StoreMismatch
from dsmd.distill.run_log import plot_run
from dsmd.distill.student import Student, load_student, tokenize
from dsmd.errors import UserError
from dsmd.retrieval import Recall, chance_rsum, evaluate, format_table


class CollapsedError(UserError):
    """Val recall sits at chance: the student is not learning."""


def usable_items(ds: Dataset, split: str, feats: SplitFeatures) -> list[Item]:
    """Items of a split that the feature store holds (images that failed to decode are left out)."""
    have = set(feats.image_ids.tolist())
    return [it for it in ds.split(split) if it.image_id in have]


def open_store(cfg: DistillConfig, ds: Dataset) -> FeatureStore:
    """The teacher's feature store of the config, checked to belong to data set `ds` (else: what to run)."""
    try:
        store = FeatureStore(cfg.data.features)
    except FileNotFoundError as e:
        raise UserError(f"{e}. Build it first: dsmd features --data {ds.source} --out {cfg.data.features} "
                        f"--teacher ...") from e
    theirs = store.manifest["dataset"]["fingerprint"]
    if theirs != ds.fingerprint():
        raise StoreMismatch(f"the feature store {store.path} was built from another data set "
                            f"(fingerprint {theirs[:12]}, this one {ds.fingerprint()[:12]}); "
                            f"rebuild it with dsmd features")
    return store


@torch.no_grad()
def encode_split(model: Student, tok: Tokenizer, items: list[Item], device: torch.device, batch: int = 256,
                 workers: int = 0, amp: torch.dtype | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Student embeddings of a split's images and captions (the plain preprocessing spec).

    Returns (image_emb, caption_emb, caption_image) ready for `dsmd.retrieval.evaluate`.
    """
    was_training = model.training
    model.eval()
    ctx = torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()
    loader = torch.utils.data.DataLoader(EvalImages(items, model.cfg.preprocess()), batch_size=batch,
                                         num_workers=workers)
    with ctx:
        img = torch.cat([model.encode_image(px.to(device)).cpu() for px in loader])
        caps = [c for it in items for c in it.captions]
        txt = []
        for i in range(0, len(caps), batch):
            ids, mask = tokenize(tok, caps[i:i + batch])
            txt.append(model.encode_text(ids.to(device), mask.to(device)).cpu())
    model.train(was_training)
    owner = np.array([i for i, it in enumerate(items) for _ in it.captions])
    return img.float().numpy(), torch.cat(txt).float().numpy(), owner



def evaluate_epoch(out: Path, model: Student, tok: Tokenizer, cfg: DistillConfig, items: list[Item],
                   device: torch.device, amp: torch.dtype | None, dist: Dist, epoch: int, step: int, best: dict,
                   writer: Any, bar: Any) -> str | None:
    """Val recall on rank 0 (best checkpoint, metrics, plot); a message on every rank if training must stop."""
    stop = dist.on_main(lambda: _evaluate_on_main(out, model, tok, cfg, items, device, amp, epoch, step, best,
                                                  writer, bar), device)
    if dist.broadcast_flag(stop is not None, device) and stop is None:
        stop = "stopped by rank 0: val recall at chance"
    return stop


def _evaluate_on_main(out: Path, model: Student, tok, cfg: DistillConfig, items: list[Item], device, amp,
                      epoch: int, step: int, best: dict, writer, bar) -> str | None:
    stop = None
    r = evaluate(*encode_split(model, tok, items, device, cfg.run.eval_batch, amp=amp))
    rec = {"step": step, "epoch": epoch + 1, "val": r.to_json(), "rsum": r.rsum, "time": time.time()}
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
    improved = r.rsum > best["rsum"]
    if improved:
        best.update({"rsum": r.rsum, "epoch": epoch + 1, "step": step, "val": r.to_json()})
        save_best(out, model, tok, cfg, dict(best))
    if writer is not None:
        writer.add_scalar("val/rsum", r.rsum, step)
        for k, v in r.to_json().items():
            if isinstance(v, (int, float)) and k.startswith(("i2t", "t2i")):
                writer.add_scalar(f"val/{k}", v, step)
        writer.flush()
    chance = chance_rsum(len(items), [len(it.captions) for it in items])
    bar.write(f"epoch {epoch + 1}: val RSUM {r.rsum:.1f} (i2t R@1 {r.i2t[1]:.1f}, t2i R@1 {r.t2i[1]:.1f})"
              f"{'  best' if improved else ''}  [chance {chance:.1f}]")
    plot_run(out)
    after = cfg.run.stop_at_chance_after
    if after and epoch + 1 >= after and r.rsum <= 1.5 * chance:
        stop = (f"val RSUM {r.rsum:.1f} after {epoch + 1} epochs is at chance ({chance:.1f}): the student is not "
                f"learning. With margin 0 the magnitude scaling of a vanishing triplet loss can collapse "
                f"training (METHOD.md §7): try --set loss.margin=0.2 or --set balancer.mode=none; a higher "
                f"optim.lr helps students trained from scratch; start over with --restart or a new --out. "
                f"(run.stop_at_chance_after=0 disables this stop.)")
    return stop



def evaluate_student(student: str | Path, dataset: str | Path, features: str | Path, split: str = "test",
                     images: str | None = None, device: str = "auto") -> tuple[Recall, Recall]:
    """(teacher recall from the feature store, student recall) on the same images and captions."""
    path = resolve_student(student)
    dev = torch.device(resolve_device(device))
    model, tok = load_student(path, dev)
    ds = load_dataset(dataset, images=images)
    cfg = DistillConfig()
    cfg.data.features = str(features)
    store = open_store(cfg, ds)
    if store.dim != model.cfg.dim:
        raise UserError(f"the student embeds into {model.cfg.dim} dims, the feature store's teacher into {store.dim}")
    feats = store.split(split)
    items = usable_items(ds, split, feats)
    student = evaluate(*encode_split(model, tok, items, dev))
    rows = feats.image_rows(np.array([it.image_id for it in items]))
    cap_ids = np.array([c for it in items for c in it.caption_ids])
    owner = np.array([i for i, it in enumerate(items) for _ in it.captions])
    teacher = evaluate(np.asarray(feats.image_emb[rows], np.float32),
                       np.asarray(feats.caption_emb[feats.caption_rows(cap_ids)], np.float32), owner)
    return teacher, student


def side_by_side(teacher: Recall, student: Recall, teacher_name: str = "teacher",
                 student_name: str = "student") -> str:
    """Both recall tables and the share of the teacher's RSUM the student keeps (the distillation's figure)."""
    table = format_table({teacher_name: teacher, student_name: student})
    frac = student.rsum / teacher.rsum if teacher.rsum else math.nan
    return f"{table}\nthe student keeps {100 * frac:.1f}% of the teacher's RSUM"
