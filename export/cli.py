"""`dsmd export student|teacher|verify`: write or check an ONNX encoder bundle."""

from __future__ import annotations

import argparse

from dsmd.distill.teachers.registry import teacher_kinds
from dsmd.hub import add_offline_option


def _export(a: argparse.Namespace) -> int:
    from dsmd.errors import UserError

    if a.what == "verify":
        from dsmd.bundle import verify

        for variant, info in verify(a.source).items():
            print(f"  {variant:5s} ok: files match the manifest, smoke encode gives unit vectors of dim {info['dim']}")
        print(f"{a.source} verified")
        return 0
    from dsmd.export.encoders import student_encoders, teacher_encoders
    from dsmd.export.onnx import ExportConfig, export

    if a.tokenizer and not (a.what == "teacher" and a.teacher in teacher_kinds("tokenizer")):
        raise UserError(f"--tokenizer is for `dsmd export teacher --teacher "
                        f"{'|'.join(teacher_kinds('tokenizer'))}` only")
    if a.what == "student":
        enc = student_encoders(a.source)
    else:
        enc = teacher_encoders(a.teacher, a.source, **({"tokenizer": a.tokenizer} if a.tokenizer else {}))
    variants = tuple(v for v in a.variants.split(",") if v)
    bad = [v for v in variants if v not in ("int8", "fp16")]
    if bad:
        raise UserError(f"--variants takes int8 and/or fp16, not {', '.join(bad)}")
    cfg = ExportConfig(variants=variants, max_drop=a.max_drop, split=a.split)
    m = export(enc, a.out, data=a.data, images=a.images, cfg=cfg)
    print(f"wrote {a.out}: {m['name']}, dim {m['dim']}, variants {', '.join(m['variants'])}"
          + (f" (refused: {', '.join(m['refused'])})" if m.get("refused") else ""))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `dsmd export` (dsmd/cli.py); the teacher kinds come from the registry, torch-free."""
    x = sub.add_parser("export", help="write an ONNX encoder bundle of a student or a teacher; verify one")
    x.add_argument("what", choices=["student", "teacher", "verify"],
                   help="student: a student checkpoint or run folder; teacher: a teacher path or name (--teacher); "
                   "verify: a bundle")
    x.add_argument("--teacher", default="demo", choices=teacher_kinds(),
                   help="teacher kind (default demo; `dsmd teachers` says what path each takes)")
    x.add_argument("--tokenizer", help=f"{', '.join(teacher_kinds('tokenizer'))} only: the sentencepiece model "
                   "(default: beit3.spm beside the .pth)")
    x.add_argument("source", help="the checkpoint, run or teacher folder, or a teacher's name (or the bundle, for "
                   "verify)")
    x.add_argument("--out", default="artifacts/bundle", help="bundle folder (default: artifacts/bundle)")
    x.add_argument("--data", help="data set whose split checks recall (PyTorch vs ONNX, and the INT8 variant)")
    x.add_argument("--images", help="image root (default: beside the annotation file)")
    x.add_argument("--split", default="val")
    x.add_argument("--variants", default="int8", help="comma-separated: int8, fp16, or '' for none (default int8)")
    x.add_argument("--max-drop", type=float, default=2.0,
                   help="largest RSUM loss a variant may cost to be shipped (default: 2.0 of 600)")
    add_offline_option(x)
    x.set_defaults(run=_export)
