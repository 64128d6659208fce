"""The student presets by name: one table that `create_student`, `dsmd students`, `dsmd distill
--preset` and the config's validation read (timm's model registry, as a table).

A preset is a name, what it is for, and the `StudentModelConfig` fields it changes from the
defaults (ViT-B/16 at 224 px + BERT-base: the paper's student, so `base` changes none). Torch-free, so the CLI parser
and the config can read it without loading the model code (`student.py`).

Adding a preset: one `StudentPreset` line in `_BUILTIN` below (or `register_student_preset`
from your own code).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dsmd.distill.registry import Registry


@dataclass(frozen=True)
class StudentPreset:
    """A named student architecture: `fields` override `student.StudentModelConfig`'s defaults."""

    name: str
    description: str  # what it is for (the help of `dsmd distill --preset`)
    fields: dict[str, Any] = field(default_factory=dict)


_REGISTRY: Registry[StudentPreset] = Registry("student preset", "`dsmd students` lists their sizes",
                                               name=lambda preset: preset.name)
STUDENT_PRESETS: dict[str, StudentPreset] = _REGISTRY.entries


def register_student_preset(preset: StudentPreset) -> StudentPreset:
    """Add a preset to the table; a name is registered once."""
    return _REGISTRY.register(preset)


def student_preset(name: str) -> StudentPreset:
    """The preset called `name`, or an error that lists the presets there are."""
    return _REGISTRY[name]


def student_preset_names() -> list[str]:
    """The registered preset names, in table order."""
    return list(STUDENT_PRESETS)


_BUILTIN = (
    StudentPreset("base", "the paper's student"),
    # 16-px patches (a 4x4 grid over the 3x3 scene grid) and width 128: smaller patches cost more
    # steps per second than they give in recall on this budget (BENCHMARKS.md, "Distillation:
    # fidelity, what limits the student")
    StudentPreset("demo", "the demo world on two CPU cores",
                  dict(image_size=64, patch_size=16, image_width=128, image_depth=4, image_heads=4,
                       vocab_size=512, text_width=128, text_depth=4, text_heads=4, text_mlp=512, max_tokens=40,
                       interpolation="bilinear")),
    StudentPreset("tiny", "tests",
                  dict(image_size=32, patch_size=8, image_width=32, image_depth=2, image_heads=2,
                       vocab_size=256, text_width=32, text_depth=2, text_heads=2, text_mlp=64, max_tokens=24,
                       interpolation="bilinear")),
)
for _preset in _BUILTIN:
    register_student_preset(_preset)
