"""The `dsmd` command: one sub-command per step of the pipeline.

    dsmd generate        write the demo world (a captioned-image data set, Karpathy format)
    dsmd check-data      validate a data set and print its splits
    dsmd teachers        list the teacher kinds and what path each takes
    dsmd train-teacher   train the demo teacher on the demo world
    dsmd features        run a teacher over a data set into a feature store (resumable)
    dsmd recall          the recall table of a feature store's split
    dsmd students        list the student presets and their sizes
    dsmd distill         train a student from a feature store (DSMD; resumable; torchrun for many GPUs)
    dsmd evaluate        recall of a student beside its teacher's, on one split
    dsmd export          student|teacher: write an ONNX encoder bundle; verify: check one
    dsmd index           build|add-texts|remove|merge|info|search: FAISS + SQLite index of images and captions
    dsmd serve           the search server and its web page (uvicorn)

Heavy libraries (torch) are imported inside the commands that need them, so `dsmd --help`
and the torch-free commands start fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _generate(a: argparse.Namespace) -> int:
    from tqdm import tqdm

    from dsmd.world import generate

    sizes = {"train": a.train, "val": a.val, "test": a.test}
    with tqdm(total=sum(sizes.values()), desc="generate", unit="img") as bar:
        path = generate(a.out, seed=a.seed, image_size=a.image_size, split_sizes=sizes, progress=bar.update)
    print(f"wrote {path} ({sizes['train']} train / {sizes['val']} val / {sizes['test']} test images, 5 captions each)")
    return 0


def _check_data(a: argparse.Namespace) -> int:
    from dsmd.datasets import load_dataset

    ds = load_dataset(a.data, images=a.images)
    print(f"{ds.name}: {ds.source} (images under {ds.meta['image_root']})")
    for split, c in ds.counts().items():
        print(f"  {split:5s}  {c['images']:7d} images  {c['captions']:8d} captions")
    print(f"  fingerprint {ds.fingerprint()[:16]}")
    return 0


def _teachers(a: argparse.Namespace) -> int:
    from distill.teachers import list_teachers

    for kind, what in list_teachers().items():
        print(f"  {kind:7s} {what}")
    return 0


def _train_teacher(a: argparse.Namespace) -> int:
    from distill.train_teacher import TeacherTrainCfg, is_trained, train_teacher

    if is_trained(a.out) and not a.force:
        print(f"{a.out} already holds a trained demo teacher (use --force to train again)")
        return 0
    cfg = TeacherTrainCfg(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, seed=a.seed, bf16=not a.no_bf16)
    r = train_teacher(a.data, a.out, cfg)
    print(f"saved the demo teacher to {a.out}: val RSUM {r.rsum:.1f}")
    return 0


def _features(a: argparse.Namespace) -> int:
    import torch

    from distill.features import extract
    from distill.teachers import load_teacher
    from dsmd.datasets import load_dataset

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
    from distill.features import FeatureStore
    from dsmd.artifacts import write_json
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
    from distill.student import PRESETS, preset_config

    for name in PRESETS:
        c = preset_config(name, dim=0)
        print(f"  {name:5s} ViT {c.image_depth}x{c.image_width} (patch {c.patch_size}, {c.image_size}px) + "
              f"BERT {c.text_depth}x{c.text_width} (vocab {c.vocab_size}, {c.max_tokens} tokens)")
    return 0


def _distill(a: argparse.Namespace) -> int:
    from distill.config import load_config
    from distill.train import train

    sets = list(a.set or [])
    for flag, key in ((a.data, "data.dataset"), (a.features, "data.features"), (a.preset, "student.preset")):
        if flag:
            sets.append(f"{key}={flag}")
    cfg = load_config(a.config, sets)
    manifest = train(cfg, a.out, restart=a.restart)
    best = manifest["best"]
    if best.get("epoch"):
        print(f"best val RSUM {best['rsum']:.1f} at epoch {best['epoch']}: {Path(a.out) / 'best'}")
    return 0


def _evaluate(a: argparse.Namespace) -> int:
    from distill.train import evaluate_student, side_by_side
    from dsmd.artifacts import write_json

    teacher, student = evaluate_student(a.student, a.data, a.features, a.split, images=a.images, device=a.device)
    print(f"{a.split}: {student.n_images} images, {student.n_captions} captions")
    print(side_by_side(teacher, student))
    if a.json:
        write_json(Path(a.json), {"split": a.split, "teacher": teacher.to_json(), "student": student.to_json()})
        print(f"wrote {a.json}")
    return 0


def _export(a: argparse.Namespace) -> int:
    from dsmd.errors import UserError

    if a.what == "verify":
        from dsmd.bundle import verify

        for variant, info in verify(a.source).items():
            print(f"  {variant:5s} ok: files match the manifest, smoke encode gives unit vectors of dim {info['dim']}")
        print(f"{a.source} verified")
        return 0
    from export.onnx import ExportCfg, export, student_encoders, teacher_encoders

    enc = student_encoders(a.source) if a.what == "student" else teacher_encoders(a.teacher, a.source)
    variants = tuple(v for v in a.variants.split(",") if v)
    bad = [v for v in variants if v not in ("int8", "fp16")]
    if bad:
        raise UserError(f"--variants takes int8 and/or fp16, not {', '.join(bad)}")
    cfg = ExportCfg(variants=variants, max_drop=a.max_drop, split=a.split)
    m = export(enc, a.out, data=a.data, images=a.images, cfg=cfg)
    print(f"wrote {a.out}: {m['name']}, dim {m['dim']}, variants {', '.join(m['variants'])}"
          + (f" (refused: {', '.join(m['refused'])})" if m.get("refused") else ""))
    return 0


def _index(a: argparse.Namespace) -> int:
    from dsmd.bundle import Bundle
    from dsmd.errors import UserError
    from index import build as B

    if a.action == "info":
        m = B.info(a.index)
        print(f"{a.index}: bundle {m['bundle']['name']} (dim {m['bundle']['dim']}), generation {m['generation']}"
              + (f", {m['pending_changes']} change(s) not yet in the FAISS files: run dsmd index build again"
                 if m["pending_changes"] else ""))
        for part in ("images", "texts"):
            p = m.get(part, {})
            if p.get("count"):
                ix = p["index"]
                print(f"  {part:6s} {p['count']:>10,} vectors  {ix['kind']:5s} {ix['params']} search {ix['search']}  "
                      f"recall@10 vs exact {ix['recall_at_10']:.3f}  {p['bytes'] / 2**20:.1f} MiB")
            else:
                print(f"  {part:6s} empty")
        print(f"  skipped files: {m['skipped']}")
        return 0
    if a.action == "recall":
        from index.search import text_to_image_recall

        direct, via = text_to_image_recall(a.index)
        print(f"text→image recall of the index's captions ({a.index}):")
        print("  from the embeddings directly: " + "  ".join(f"R@{k} {v:.2f}" for k, v in direct.items()))
        print("  through the index:            " + "  ".join(f"R@{k} {v:.2f}" for k, v in via.items()))
        return 0
    if a.action == "remove":
        n = B.remove(a.index, ids=a.id or [], uris=a.uri or [])
        print(f"removed {n} item(s)")
        if n:
            m = B.finalize(a.index, Bundle(a.bundle), kind=a.index_type)
            print(f"{a.index}: {m['images']['count']} images")
        return 0
    if a.action == "merge":
        n = B.merge(a.index, a.inputs)
        m = B.finalize(a.index, Bundle(a.bundle), kind=a.index_type)
        print(f"merged {n} items into {a.index}: {m['images']['count']} images, {m['texts']['count']} texts")
        return 0
    bundle = Bundle(a.bundle)
    if a.action == "search":
        from index.search import SearchIndex

        s = SearchIndex(a.index)
        s.check_bundle(bundle)
        target = "texts" if a.image else "images"
        q = bundle.encode_images([Path(a.image).read_bytes()]) if a.image else bundle.encode_texts([a.text or ""])
        for h in s.search(q, a.k, target)[0]:
            what = h.item.get("uri") or h.item.get("text")
            print(f"  {h.score:7.4f}  #{h.id:<8d} {what}")
        return 0
    if a.action == "add-texts":
        texts = Path(a.file).read_text(encoding="utf-8").splitlines()
        n = B.add_texts(a.index, bundle, texts)
        m = B.finalize(a.index, bundle, kind=a.index_type)
        print(f"added {n} texts: {m['texts']['count']} in the caption index")
        return 0
    # build
    if bool(a.folder) == bool(a.data):
        raise UserError("give exactly one source: --folder DIR or --data DATASET")
    sources = B.folder_sources(a.folder) if a.folder else B.dataset_sources(a.data, a.images, a.split)
    shard = None
    if a.shard:
        i, _, n = a.shard.partition("/")
        try:
            shard = (int(i), int(n))
        except ValueError:
            raise UserError(f"--shard takes i/n, e.g. 0/4, not {a.shard!r}") from None
    sources = B.shard_of(sources, shard)
    m = B.build(a.index, bundle, sources, kind=a.index_type, batch=a.batch, workers=a.workers)
    r = m["last_build"]
    print(f"{a.index}: added {r['added']}, already indexed {r['already_indexed']}, skipped {r['skipped']} unreadable "
          f"({r['seconds']:.1f} s); {m['images']['count']} images"
          + (f" ({m['images']['index']['kind']}, recall@10 {m['images']['index']['recall_at_10']:.3f})"
             if m['images']['count'] else "") + f", {m['texts']['count']} texts")
    for sk in r["skipped_files"][:10]:
        print(f"  skipped {sk['uri']}: {sk['reason']}")
    return 0


def _serve(a: argparse.Namespace) -> int:
    import uvicorn

    from serve.app import create_app
    from serve.settings import Settings

    settings = Settings.from_env(bundle=a.bundle, index=a.index, token=a.token, variant=a.variant, threads=a.threads)
    app = create_app(settings)
    print(f"serving {settings.index} with {settings.bundle} on http://{a.host}:{a.port}/  (API docs: /docs)",
          flush=True)
    uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level, access_log=False)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dsmd",
        description="Distil a big image-text model into a small one and search images with it. "
        "Start with `make demo`, which runs these steps on the generated demo world.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    g = sub.add_parser("generate", help="write the demo world (captioned images, Karpathy format)")
    g.add_argument("--out", default="data/world", help="output folder (default: data/world)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--image-size", type=int, default=64, help="image side in pixels (default: 64)")
    g.add_argument("--train", type=int, default=8000, help="train images (even: scenes come in pairs)")
    g.add_argument("--val", type=int, default=500)
    g.add_argument("--test", type=int, default=1000)
    g.set_defaults(run=_generate)

    c = sub.add_parser("check-data", help="validate a data set (Karpathy JSON or JSONL) and print its splits")
    c.add_argument("data", help="dataset_*.json, a .jsonl file, or a folder holding one")
    c.add_argument("--images", help="image root (default: beside the annotation file)")
    c.set_defaults(run=_check_data)

    t = sub.add_parser("teachers", help="list the teacher kinds and what path each takes")
    t.set_defaults(run=_teachers)

    tt = sub.add_parser("train-teacher", help="train the demo teacher on the demo world")
    tt.add_argument("--data", default="data/world", help="data set (default: data/world)")
    tt.add_argument("--out", default="artifacts/teacher", help="output folder (default: artifacts/teacher)")
    tt.add_argument("--epochs", type=int, default=20)
    tt.add_argument("--batch-size", type=int, default=128)
    tt.add_argument("--lr", type=float, default=2e-3)
    tt.add_argument("--seed", type=int, default=0)
    tt.add_argument("--no-bf16", action="store_true", help="train in fp32 even where the CPU has bf16")
    tt.add_argument("--force", action="store_true", help="train again even if --out holds a teacher")
    tt.set_defaults(run=_train_teacher)

    f = sub.add_parser("features", help="run a teacher over a data set into a feature store (resumable; torchrun shards it)")
    f.add_argument("--teacher", default="demo", help="teacher kind: demo, beit3, clip, siglip (see `dsmd teachers`)")
    f.add_argument("--teacher-path", default="artifacts/teacher", help="checkpoint file or folder of the teacher")
    f.add_argument("--tokenizer", help="beit3 only: the sentencepiece model (default: beit3.spm beside the .pth)")
    f.add_argument("--data", default="data/world", help="data set (default: data/world)")
    f.add_argument("--images", help="image root (default: beside the annotation file)")
    f.add_argument("--out", default="artifacts/features", help="store folder (default: artifacts/features)")
    f.add_argument("--splits", nargs="+", choices=["train", "val", "test"], help="default: every non-empty split")
    f.add_argument("--batch-size", type=int, default=64, help="items per chunk (the unit of resume)")
    f.add_argument("--workers", type=int, default=2, help="image-decoding processes")
    f.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    f.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast for the teacher (auto: fp16 on GPU as BEiT-3's own evaluation, fp32 on CPU)")
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
    d.add_argument("--features", help="override data.features")
    d.add_argument("--preset", help="override student.preset (base, demo, tiny)")
    d.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override any setting, e.g. --set optim.lr=5e-4 --set loss.use=[\"fd\",\"sd\"]")
    d.add_argument("--restart", action="store_true", help="delete the run folder and start over")
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

    x = sub.add_parser("export", help="write an ONNX encoder bundle of a student or the demo teacher; verify one")
    x.add_argument("what", choices=["student", "teacher", "verify"],
                   help="student: a student checkpoint or run folder; teacher: a teacher folder (--teacher); "
                   "verify: a bundle")
    x.add_argument("--teacher", default="demo", choices=["demo", "clip", "siglip"], help="teacher kind (default demo)")
    x.add_argument("source", help="the checkpoint, run or teacher folder (or the bundle, for verify)")
    x.add_argument("--out", default="artifacts/bundle", help="bundle folder (default: artifacts/bundle)")
    x.add_argument("--data", help="data set whose split checks recall (PyTorch vs ONNX, and the INT8 variant)")
    x.add_argument("--images", help="image root (default: beside the annotation file)")
    x.add_argument("--split", default="val")
    x.add_argument("--variants", default="int8", help="comma-separated: int8, fp16, or '' for none (default int8)")
    x.add_argument("--max-drop", type=float, default=2.0,
                   help="largest RSUM loss a variant may cost to be shipped (default: 2.0 of 600)")
    x.set_defaults(run=_export)

    ix = sub.add_parser("index", help="index images (and captions) for search: build, add-texts, remove, merge, "
                                      "info, search, recall")
    ix.add_argument("action", choices=["build", "add-texts", "remove", "merge", "info", "search", "recall"])
    ix.add_argument("index", nargs="?", default="artifacts/index", help="index folder (default: artifacts/index)")
    ix.add_argument("inputs", nargs="*", help="merge: the shard indexes to merge into INDEX")
    ix.add_argument("--bundle", default="artifacts/bundle", help="encoder bundle (default: artifacts/bundle)")
    ix.add_argument("--folder", help="build: a folder of images (recursive)")
    ix.add_argument("--data", help="build: a data set (Karpathy JSON / JSONL): its images and captions")
    ix.add_argument("--images", help="image root of --data (default: beside the annotation file)")
    ix.add_argument("--split", help="build: only this split of --data")
    ix.add_argument("--shard", help="build: only shard i/n of the sources (merge the shards afterwards)")
    ix.add_argument("--index-type", choices=["flat", "hnsw", "ivfpq"], help="override the choice by size")
    ix.add_argument("--batch", type=int, default=64)
    ix.add_argument("--workers", type=int, default=2, help="image-decoding threads")
    ix.add_argument("--file", help="add-texts: a text file, one text per line")
    ix.add_argument("--id", type=int, action="append", help="remove: an item id (repeatable)")
    ix.add_argument("--uri", action="append", help="remove: an item path (repeatable)")
    ix.add_argument("--text", help="search: a text query")
    ix.add_argument("--image", help="search: an image file (finds captions)")
    ix.add_argument("-k", type=int, default=10)
    ix.set_defaults(run=_index)

    sv = sub.add_parser("serve", help="the search server and its web page")
    sv.add_argument("--bundle", help="encoder bundle (default: $DSMD_BUNDLE or artifacts/bundle)")
    sv.add_argument("--index", help="index folder (default: $DSMD_INDEX or artifacts/index)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--variant", help="bundle variant: fp32 (default), int8, fp16")
    sv.add_argument("--threads", type=int, help="ONNX Runtime threads per encoder (default: all cores)")
    sv.add_argument("--token", help="enable POST /items and DELETE /items/{id} for callers with this token")
    sv.add_argument("--log-level", default="warning")
    sv.set_defaults(run=_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    from dsmd.errors import UserError

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (UserError, FileNotFoundError) as e:
        # Problems with the user's input: say what is wrong, without a traceback.
        print(f"dsmd {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
