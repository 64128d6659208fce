"""Teachers by kind, each loaded from a local path or by name (downloaded once into a cache, `dsmd.hub`).

    >>> from dsmd.distill.teachers import list_teachers, load_teacher
    >>> teacher = load_teacher("beit3", "beit3_base_patch16_384_f30k_retrieval.pth", tokenizer="beit3.spm")
    >>> teacher = load_teacher("beit3", "beit3_base_patch16_384_f30k_retrieval")  # by name, with beit3.spm
    >>> teacher = load_teacher("clip", "openai/clip-vit-base-patch16")
"""

from __future__ import annotations

from pathlib import Path

from dsmd.distill.teachers.base import Teacher
from dsmd.errors import UserError

_KINDS = {
    "demo": "the demo world's small dual encoder: a folder written by `dsmd train-teacher`",
    "beit3": "an official BEiT-3 retrieval checkpoint (.pth) plus its sentencepiece model (beit3.spm), or its "
             "name, e.g. beit3_base_patch16_384_f30k_retrieval (see `dsmd models list`)",
    "clip": "a Hugging Face CLIP folder (config.json, weights, tokenizer) or Hub id, e.g. "
            "openai/clip-vit-base-patch16",
    "siglip": "a Hugging Face SigLIP folder (config.json, weights, tokenizer) or Hub id, e.g. "
              "google/siglip-base-patch16-224",
}


def list_teachers() -> dict[str, str]:
    """Teacher kinds and what path each takes."""
    return dict(_KINDS)


def load_teacher(kind: str, path: str | Path, device: str = "cpu", **options) -> Teacher:
    """Load a teacher of `kind` from a local `path`, or from a name (downloaded once; see `dsmd.hub`).

    Options by kind: beit3 takes `tokenizer` (path or name of beit3.spm; default: beside the .pth,
    which is where a checkpoint fetched by name has it) and `size` ("base" / "large"; default:
    inferred from the weights).
    """
    from dsmd import hub

    if kind not in _KINDS:
        raise UserError(f"unknown teacher kind {kind!r}; choose one of: {', '.join(_KINDS)}")
    if kind == "demo":
        from dsmd.distill.teachers.demo import DemoTeacher

        if not Path(path).exists():
            raise FileNotFoundError(f"teacher path {path} does not exist ({kind}: {_KINDS[kind]})")
        return DemoTeacher.load(path, device=device)
    if kind == "beit3":
        from dsmd.distill.teachers.beit3 import BEiT3Teacher

        checkpoint = hub.resolve_beit3(path)
        tokenizer = options.pop("tokenizer", None)
        if tokenizer is None and not Path(path).exists():
            tokenizer = "beit3.spm"  # the checkpoint came by name: its tokenizer too (fetched, or checked)
        if tokenizer is not None:
            tokenizer = hub.resolve_beit3(tokenizer)
        # a file that came by name was just checked against its recorded digest: not hashed again
        digest = None if Path(path).exists() else hub.recorded_digest(checkpoint)
        return BEiT3Teacher.load(checkpoint, device=device, tokenizer=tokenizer, checkpoint_hash=digest, **options)
    from dsmd.distill.teachers.hf import HFTeacher

    return HFTeacher.load(hub.resolve_hf(path, what=f"{kind} teacher"), kind=kind, device=device)
