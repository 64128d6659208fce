"""The teacher kinds: one table that the loader, the export, `dsmd teachers` and the CLI choices read.

A kind is declared once, as a `TeacherSpec`: its name, what path it takes (the line `dsmd
teachers` prints), the options its loader takes beyond path and device, and the module that
implements it. That module defines two functions (imported only when a teacher is loaded or
exported, so this table stays torch-free and building the CLI parser stays cheap):

    load_teacher(kind, path, device="cpu", **options) -> Teacher         (dsmd features, evaluate)
    export_encoders(kind, path, **options) -> dsmd.export.encoders.Encoders   (dsmd export teacher)

Adding a kind: write the module (a `Teacher` subclass and those two functions), add one
`TeacherSpec` line to `_BUILTIN` below (or call `register_teacher` from your own code), done.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from dsmd.distill.registry import Registry
from dsmd.errors import UserError

if TYPE_CHECKING:
    from dsmd.distill.teachers.base import Teacher
    from dsmd.export.encoders import Encoders

PLUGIN_FUNCTIONS = ("load_teacher", "export_encoders")  # what every teacher module must define


@dataclass(frozen=True)
class TeacherSpec:
    """One teacher kind: its metadata here, its code in `module` (imported on first use)."""

    kind: str
    description: str  # what path it takes, for `dsmd teachers` and error messages
    module: str  # dotted module defining load_teacher and export_encoders
    options: tuple[str, ...] = ()  # loader options beyond path and device (the CLI's --tokenizer needs one)

    def plugin(self) -> ModuleType:
        """The implementing module (this imports torch), checked to define what a teacher module must."""
        module = importlib.import_module(self.module)
        missing = [name for name in PLUGIN_FUNCTIONS if not callable(getattr(module, name, None))]
        if missing:
            raise TypeError(f"teacher kind {self.kind!r}: {self.module} does not define {', '.join(missing)}")
        return module

    def check_options(self, options: dict[str, Any]) -> None:
        """Refuse an option this kind does not take (a silently ignored --tokenizer misleads)."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            takes = f"it takes {', '.join(self.options)}" if self.options else "it takes none"
            raise UserError(f"the {self.kind} teacher does not take {', '.join(unknown)}; {takes}")

    def load(self, path: str | Path, device: str = "cpu", **options: Any) -> Teacher:
        """A ready teacher of this kind from a local path or a name (see `dsmd.hub`)."""
        self.check_options(options)
        return self.plugin().load_teacher(self.kind, path, device=device, **options)

    def encoders(self, path: str | Path, **options: Any) -> Encoders:
        """What `dsmd.export.onnx.export` needs to write this teacher as an encoder bundle."""
        self.check_options(options)
        return self.plugin().export_encoders(self.kind, path, **options)


_REGISTRY: Registry[TeacherSpec] = Registry("teacher kind", "`dsmd teachers` says what path each takes",
                                              name=lambda spec: spec.kind, origin=lambda spec: spec.module)
TEACHERS: dict[str, TeacherSpec] = _REGISTRY.entries


def register_teacher(spec: TeacherSpec) -> TeacherSpec:
    """Add a kind to the table (timm's `register_model`, as a table entry); a kind is registered once."""
    return _REGISTRY.register(spec)


def teacher_spec(kind: str) -> TeacherSpec:
    """The spec of `kind`, or an error that lists the kinds there are."""
    return _REGISTRY[kind]


def teacher_kinds(option: str | None = None) -> list[str]:
    """The registered kinds, in table order; with `option`, only the kinds whose loader takes it."""
    return [k for k, s in TEACHERS.items() if option is None or option in s.options]


_BUILTIN = (
    TeacherSpec("demo", "the demo world's small dual encoder: a folder written by `dsmd train-teacher`",
                "dsmd.distill.teachers.demo"),
    TeacherSpec("beit3", "an official BEiT-3 retrieval checkpoint (.pth) plus its sentencepiece model (beit3.spm), "
                "or its name, e.g. beit3_base_patch16_384_f30k_retrieval (see `dsmd models list`)",
                "dsmd.distill.teachers.beit3",
                options=("tokenizer", "size", "config", "precision", "attention", "max_tokens")),
    TeacherSpec("clip", "a Hugging Face CLIP folder (config.json, weights, tokenizer) or Hub id, e.g. "
                "openai/clip-vit-base-patch16", "dsmd.distill.teachers.hf"),
    TeacherSpec("siglip", "a Hugging Face SigLIP folder (config.json, weights, tokenizer) or Hub id, e.g. "
                "google/siglip-base-patch16-224", "dsmd.distill.teachers.hf"),
)
for _spec in _BUILTIN:
    register_teacher(_spec)
