"""Teachers by kind, each loaded from a local path or by name (downloaded once into a cache, `dsmd.hub`).

    >>> from dsmd.distill.teachers import list_teachers, load_teacher
    >>> teacher = load_teacher("beit3", "beit3_base_patch16_384_f30k_retrieval.pth", tokenizer="beit3.spm")
    >>> teacher = load_teacher("beit3", "beit3_base_patch16_384_f30k_retrieval")  # by name, with beit3.spm
    >>> teacher = load_teacher("clip", "openai/clip-vit-base-patch16")

The modules:

    registry.py      the kinds: one `TeacherSpec` each (description, options, implementing module); torch-free
    base.py          the `Teacher` interface every kind implements
    demo.py          the demo world's small dual encoder (trained by `dsmd train-teacher`)
    beit3.py         BEiT-3 retrieval checkpoints: strict loading, the XLM-R tokenizer, the plug-in
    beit3_model.py   our implementation of the BEiT-3 retrieval model
    hf.py            Hugging Face CLIP and SigLIP folders or Hub ids

This package imports no torch until a teacher is loaded, so the CLI can read the kinds cheaply.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsmd.distill.teachers.registry import TEACHERS, TeacherSpec, register_teacher, teacher_kinds, teacher_spec

if TYPE_CHECKING:
    from dsmd.distill.teachers.base import Teacher

__all__ = ["TEACHERS", "TeacherSpec", "list_teachers", "load_teacher", "register_teacher", "teacher_kinds",
           "teacher_spec"]


def list_teachers() -> dict[str, str]:
    """Teacher kinds and what path each takes (what `dsmd teachers` prints)."""
    return {kind: spec.description for kind, spec in TEACHERS.items()}


def load_teacher(kind: str, path: str | Path, device: str = "cpu", **options: Any) -> Teacher:
    """Load a teacher of `kind` from a local `path`, or from a name (downloaded once; see `dsmd.hub`).

    Options by kind: beit3 takes `tokenizer` (path or name of beit3.spm; default: beside the .pth,
    which is where a checkpoint fetched by name has it) and `size` ("base" / "large"; default:
    inferred from the weights). `teacher_spec(kind).options` lists what each kind takes.
    """
    return teacher_spec(kind).load(path, device=device, **options)
