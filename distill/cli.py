"""The training side's commands: teachers, train-teacher, features, recall, students, distill, evaluate.

Each imports torch inside the handler, so `dsmd --help` stays fast and works without it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dsmd.distill.student_presets import STUDENT_PRESETS
from dsmd.distill.teachers.registry import teacher_kinds
from dsmd.hub import add_offline_option


def _teachers(a: argparse.Namespace) -> int:
    from dsmd.distill.teachers import list_teachers

    for kind, what in list_teachers().items():
        print(f"  {kind:7s} {what}")
    return 0


def _train_teacher(a: argparse.Namespace) -> int:
    from dsmd.distill.train_teacher import TeacherTrainConfig, is_trained, train_teacher

    if is_trained(a.out) and not a.force:
        print(f"{a.out} already holds a trained demo teacher (use --force to train again)")
        return 0
    cfg = TeacherTrainConfig(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, seed=a.seed, bf16=not a.no_bf16,
                          threads=a.threads)
    r = train_teacher(a.data, a.out, cfg, images=a.images)
    print(f"saved the demo teacher to {a.out}: val RSUM {r.rsum:.1f}")
    return 0


def _features(a: argparse.Namespace) -> int:
    import torch

    from dsmd.datasets import load_dataset
    from dsmd.distill.features import extract
    from dsmd.distill.teachers import load_teacher

    device = a.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        import os

        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    options = {"tokenizer": a.tokenizer} if a.tokenizer else {}
    teacher = load_teacher(a.teacher, a.teacher_path, device=device, **options)
    ds = load_dataset(a.data, images=a.images)
    precision = a.precision if a.precision != "auto" else ("fp16" if device.startswith("cuda") else "fp32")
    manifest = extract(teacher, ds, a.out, splits=a.splits, chunk=a.batch_size, workers=a.workers,
                       precision=precision)
    for split, c in manifest["splits"].items():
        extra = f", {c['skipped_images']} unreadable images skipped" if c["skipped_images"] else ""
        print(f"  {split:5s} {c['images']:7d} images {c['captions']:8d} captions{extra}")
    print(f"feature store ready: {a.out} ({teacher.name}, dim {teacher.dim})")
    return 0


def _recall(a: argparse.Namespace) -> int:
    from dsmd.artifacts import write_json
    from dsmd.distill.features import FeatureStore
    from dsmd.retrieval import evaluate, format_table

    store = FeatureStore(a.store)
    f = store.split(a.split)
    r = evaluate(f.image_emb, f.caption_emb, f.caption_image)
    name = store.manifest["teacher"]["name"]
    print(f"{store.manifest['dataset']['name']} {a.split}: {r.n_images} images, {r.n_captions} captions")
    print(format_table({name: r}))
    print(f"median rank: image→text {r.i2t_medr:g}, text→image {r.t2i_medr:g}")
    out = Path(a.json) if a.json else store.path / f"recall_{a.split}.json"
    write_json(out, {"task": "zeroshot_retrieval", "model": name, "dataset": store.manifest["dataset"]["name"],
                     "split": a.split, "metrics": r.to_json()["clip_benchmark"], "dsmd": r.to_json()})
    print(f"wrote {out}")
    return 0


def _students(a: argparse.Namespace) -> int:
    from dsmd.distill.student import list_presets, preset_config

    for name in list_presets():
        c = preset_config(name, dim=0)
        print(f"  {name:5s} ViT {c.image_depth}x{c.image_width} (patch {c.patch_size}, {c.image_size}px) + "
              f"BERT {c.text_depth}x{c.text_width} (vocab {c.vocab_size}, {c.max_tokens} tokens)")
    return 0


def _distill(a: argparse.Namespace) -> int:
    from dsmd.distill.config import load_config
    from dsmd.distill.train import train

    sets = list(a.set or [])
    for flag, key in ((a.data, "data.dataset"), (a.images, "data.images"), (a.features, "data.features"),
                      (a.preset, "student.preset")):
        if flag:
            sets.append(f"{key}={flag}")
    cfg = load_config(a.config, sets)
    manifest = train(cfg, a.out, restart=a.restart)
    best = manifest["best"]
    if best.get("epoch"):
        print(f"best val RSUM {best['rsum']:.1f} at epoch {best['epoch']}: {Path(a.out) / 'best'}")
    return 0


def _evaluate(a: argparse.Namespace) -> int:
    from dsmd.artifacts import write_json
    from dsmd.distill.evaluate import evaluate_student, side_by_side

    teacher, student = evaluate_student(a.student, a.data, a.features, a.split, images=a.images, device=a.device)
    print(f"{a.split}: {student.n_images} images, {student.n_captions} captions")
    print(side_by_side(teacher, student))
    if a.json:
        write_json(Path(a.json), {"split": a.split, "teacher": teacher.to_json(), "student": student.to_json()})
        print(f"wrote {a.json}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add this stage's commands to `dsmd` (dsmd/cli.py); choices come from the registries, torch-free."""
    t = sub.add_parser("teachers", help="list the teacher kinds and what path each takes")
    t.set_defaults(run=_teachers)

    tt = sub.add_parser("train-teacher", help="train the demo teacher on the demo world",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    tt.add_argument("--data", default="data/world", help="data set")
    tt.add_argument("--images", help="image root (default: beside the annotation file, or its images/ folder)")
    tt.add_argument("--out", default="artifacts/teacher", help="output folder")
    tt.add_argument("--epochs", type=int, default=20, help="training epochs")
    tt.add_argument("--batch-size", type=int, default=128, help="images per step")
    tt.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    tt.add_argument("--seed", type=int, default=0, help="random seed")
    tt.add_argument("--threads", type=int, default=0, help="torch threads (0: the cores this process may use; "
                                                             "fewer leave cores to other jobs)")
    tt.add_argument("--no-bf16", action="store_true", help="train in fp32 even where the CPU has bf16")
    tt.add_argument("--force", action="store_true", help="train again even if --out holds a teacher")
    tt.set_defaults(run=_train_teacher)

    f = sub.add_parser("features",
                       help="run a teacher over a data set into a feature store (resumable; torchrun shards it)")
    f.add_argument("--teacher", default="demo", choices=teacher_kinds(),
                   help="teacher kind (default demo; `dsmd teachers` says what path each takes)")
    f.add_argument("--teacher-path", default="artifacts/teacher",
                   help="checkpoint file or folder of the teacher, or its name: a Hub id (clip, siglip) or a BEiT-3 "
                   "release name such as beit3_base_patch16_384_f30k_retrieval (see `dsmd models list`)")
    f.add_argument("--tokenizer", help=f"{', '.join(teacher_kinds('tokenizer'))} only: the sentencepiece model "
                   "(default: beit3.spm beside the .pth)")
    f.add_argument("--data", default="data/world", help="data set (default: data/world)")
    f.add_argument("--images", help="image root (default: beside the annotation file)")
    f.add_argument("--out", default="artifacts/features", help="store folder (default: artifacts/features)")
    f.add_argument("--splits", nargs="+", choices=["train", "val", "test"], help="default: every non-empty split")
    f.add_argument("--batch-size", type=int, default=64, help="items per chunk (the unit of resume)")
    f.add_argument("--workers", type=int, default=2, help="image-decoding processes")
    f.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    f.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast for the teacher (auto: fp16 on GPU as BEiT-3's own evaluation, fp32 on CPU)")
    add_offline_option(f)
    f.set_defaults(run=_features)

    r = sub.add_parser("recall", help="print the recall table of a feature store's split")
    r.add_argument("store", nargs="?", default="artifacts/features", help="feature store (default: artifacts/features)")
    r.add_argument("--split", default="test")
    r.add_argument("--json", help="where to write the metrics JSON (default: STORE/recall_SPLIT.json)")
    r.set_defaults(run=_recall)

    s = sub.add_parser("students", help="list the student presets")
    s.set_defaults(run=_students)

    d = sub.add_parser("distill", help="train a student on a teacher's feature store (resumes a killed run)")
    d.add_argument("--config", help="a JSON config (see configs/); default: the paper's recipe")
    d.add_argument("--out", default="runs/student", help="run folder (default: runs/student)")
    d.add_argument("--data", help="override data.dataset")
    d.add_argument("--images", help="override data.images: the image root of the data set")
    d.add_argument("--features", help="override data.features")
    d.add_argument("--preset", choices=list(STUDENT_PRESETS),
                   help="override student.preset: " + ", ".join(f"{p.name} ({p.description})"
                                                                  for p in STUDENT_PRESETS.values()))
    d.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override any setting, e.g. --set optim.lr=5e-4 --set loss.use=[\"fd\",\"sd\"]")
    d.add_argument("--restart", action="store_true", help="delete the run folder and start over")
    add_offline_option(d)
    d.set_defaults(run=_distill)

    e = sub.add_parser("evaluate", help="recall of a student beside its teacher's (from the feature store)")
    e.add_argument("student", help="a student checkpoint folder, or a run folder (uses its best/)")
    e.add_argument("--data", default="data/world")
    e.add_argument("--images", help="image root (default: beside the annotation file)")
    e.add_argument("--features", default="artifacts/features")
    e.add_argument("--split", default="test")
    e.add_argument("--device", default="auto")
    e.add_argument("--json", help="also write both recall tables to this file")
    e.set_defaults(run=_evaluate)
