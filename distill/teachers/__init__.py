"""Teachers by kind, each loaded from a local path (no weights are ever downloaded).

    >>> from dsmd.distill.teachers import list_teachers, load_teacher
    >>> teacher = load_teacher("beit3", "beit3_base_patch16_384_f30k_retrieval.pth", tokenizer="beit3.spm")
"""

from __future__ import annotations

from pathlib import Path

from dsmd.distill.teachers.base import Teacher
from dsmd.errors import UserError

_KINDS = {
    "demo": "the demo world's small dual encoder: a folder written by `dsmd train-teacher`",
    "beit3": "an official BEiT-3 retrieval checkpoint (.pth) plus its sentencepiece model (beit3.spm)",
    "clip": "a Hugging Face CLIP folder (config.json, weights, tokenizer)",
    "siglip": "a Hugging Face SigLIP folder (config.json, weights, tokenizer)",
}


def list_teachers() -> dict[str, str]:
    """Teacher kinds and what path each takes."""
    return dict(_KINDS)


def load_teacher(kind: str, path: str | Path, device: str = "cpu", **options) -> Teacher:
    """Load a teacher of `kind` from a local `path`.

    Options by kind: beit3 takes `tokenizer` (path of beit3.spm; default: beside the .pth)
    and `size` ("base" / "large"; default: inferred from the weights).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"teacher path {path} does not exist ({kind}: {_KINDS.get(kind, '?')})")
    if kind == "demo":
        from dsmd.distill.teachers.demo import DemoTeacher

        return DemoTeacher.load(path, device=device)
    if kind == "beit3":
        from dsmd.distill.teachers.beit3 import BEiT3Teacher

        return BEiT3Teacher.load(path, device=device, **options)
    if kind in ("clip", "siglip"):
        from dsmd.distill.teachers.hf import HFTeacher

        return HFTeacher.load(path, kind=kind, device=device)
    raise UserError(f"unknown teacher kind {kind!r}; choose one of: {', '.join(_KINDS)}")
