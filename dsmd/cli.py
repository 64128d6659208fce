"""The `dsmd` command: one sub-command per step of the pipeline.

    dsmd generate        write the demo world (a captioned-image data set, Karpathy format)
    dsmd check-data      validate a data set and print its splits
    dsmd teachers        list the teacher kinds and what path each takes
    dsmd models          list|fetch: models by name (Hub ids, timm names, BEiT-3 files) in the cache
    dsmd train-teacher   train the demo teacher on the demo world
    dsmd features        run a teacher over a data set into a feature store (resumable)
    dsmd recall          the recall table of a feature store's split
    dsmd students        list the student presets and their sizes
    dsmd distill         train a student from a feature store (DSMD; resumable; torchrun for many GPUs)
    dsmd evaluate        recall of a student beside its teacher's, on one split
    dsmd export          student|teacher: write an ONNX encoder bundle; verify: check one
    dsmd index           build|add-texts|remove|merge|info|search: FAISS + SQLite index of images and captions
    dsmd serve           the search server and its web page (uvicorn)

This module is the dispatcher on top of the stages: the data-set commands live here, each
stage adds its own (`distill/cli.py`, `export/cli.py`, `index/cli.py`, `serve/cli.py`).
Heavy libraries (torch) are imported inside the commands that need them, so `dsmd --help`
and the torch-free commands start fast.
"""

from __future__ import annotations

import argparse
import os
import sys

from dsmd.distill import cli as distill_cli
from dsmd.export import cli as export_cli
from dsmd.index import cli as index_cli
from dsmd.serve import cli as serve_cli
from dsmd.world_specs import WORLDS


def _generate(a: argparse.Namespace) -> int:
    from tqdm import tqdm

    from dsmd.world import generate

    sizes = {"train": a.train, "val": a.val, "test": a.test}
    with tqdm(total=sum(sizes.values()), desc="generate", unit="img") as bar:
        path = generate(a.out, seed=a.seed, image_size=a.image_size, split_sizes=sizes, progress=bar.update,
                        world=a.world)
    print(f"wrote {path}: the {a.world} world, {sizes['train']} train / {sizes['val']} val / {sizes['test']} test "
          "images, 5 captions each")
    return 0


def _check_data(a: argparse.Namespace) -> int:
    from dsmd.datasets import load_dataset

    ds = load_dataset(a.data, images=a.images)
    print(f"{ds.name}: {ds.source} (images under {ds.meta['image_root']})")
    for split, c in ds.counts().items():
        print(f"  {split:5s}  {c['images']:7d} images  {c['captions']:8d} captions")
    print(f"  fingerprint {ds.fingerprint()[:16]}")
    return 0


def _models(a: argparse.Namespace) -> int:
    from dsmd import hub
    from dsmd.errors import UserError

    if a.action == "list":
        print(f"BEiT-3 release files (from {hub.BEIT3_URL}, cached in {hub.cache_dir() / 'beit3'}):")
        for name, digest in hub.BEIT3_FILES.items():
            cached = (hub.cache_dir() / "beit3" / name).is_file()
            print(f"  {name.removesuffix('.pth'):45s} {'cached' if cached else '      '}  "
                  f"sha256 {digest or 'not pinned (recorded at download, checked on each use)'}")
        print("Hugging Face ids (CLIP / SigLIP teachers, the BERT tower) and timm names (the ViT tower) are "
              f"fetched from {hub.hf_endpoint()} into the Hugging Face cache.")
        return 0
    if not a.names:
        raise UserError("dsmd models fetch takes one or more names, e.g. openai/clip-vit-base-patch16")
    for name in a.names:
        for path in hub.fetch(name, kind=a.kind):
            digest = hub.recorded_digest(path)
            print(f"{name}: {path}" + (f" (sha256 {digest})" if digest else ""))
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
    g.add_argument("--world", choices=list(WORLDS), default="demo",
                   help="demo, or shifted: other words, more shapes and colours, a 4x4 grid, other captions")
    g.set_defaults(run=_generate)

    c = sub.add_parser("check-data", help="validate a data set (Karpathy JSON or JSONL) and print its splits")
    c.add_argument("data", help="dataset_*.json, a .jsonl file, or a folder holding one")
    c.add_argument("--images", help="image root (default: beside the annotation file)")
    c.set_defaults(run=_check_data)

    m = sub.add_parser("models", help="models by name: list the known BEiT-3 files, fetch names into the cache")
    m.add_argument("action", choices=["list", "fetch"])
    m.add_argument("names", nargs="*", help="fetch: Hub ids (openai/clip-vit-base-patch16, bert-base-uncased), "
                   "timm names (timm/vit_base_patch16_224.augreg_in21k) or BEiT-3 names (see list)")
    m.add_argument("--kind", default="auto", choices=["auto", "hf", "timm", "beit3"],
                   help="what the names are (default auto: BEiT-3 table names, timm/..., else a Hub id)")
    m.set_defaults(run=_models)
    for stage in (distill_cli, export_cli, index_cli, serve_cli):
        stage.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from dsmd.errors import UserError

    args = build_parser().parse_args(argv)
    # --offline reaches worker processes through the environment, for this command only: a caller
    # of main() in the same process (a test, a notebook) is not left offline afterwards
    offline_before = os.environ.get("DSMD_OFFLINE")
    if getattr(args, "offline", False):
        os.environ["DSMD_OFFLINE"] = "1"
    try:
        return args.run(args)
    except (UserError, FileNotFoundError) as e:
        # Problems with the user's input: say what is wrong, without a traceback.
        print(f"dsmd {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        extra = _EXTRA_OF.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"dsmd {args.command}: error: this command needs {e.name}, which is not installed; "
              f"install it with: pip install 'dsmd[{extra}]'", file=sys.stderr)
        return 2
    finally:
        if offline_before is None:
            os.environ.pop("DSMD_OFFLINE", None)
        else:
            os.environ["DSMD_OFFLINE"] = offline_before


# Which extra brings each optional library (pyproject.toml): a command that needs one says so.
_EXTRA_OF = {name: "train" for name in ("torch", "torchvision", "timm", "transformers", "sentencepiece",
                                         "safetensors", "onnx", "matplotlib", "tensorboard")} | {
    name: "serve" for name in ("onnxruntime", "tokenizers", "faiss", "fastapi", "uvicorn", "multipart",
                               "python_multipart")}


if __name__ == "__main__":
    sys.exit(main())

