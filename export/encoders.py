"""What export needs of a model, and where it gets it: a student checkpoint, an in-memory model, a teacher.

`Encoders` is the seam between the models and the export machinery (`onnx.py`): two modules
holding the weights (one ONNX graph each), the tokenizer the bundle runtime will run, and the
preprocessing spec. A student gives its encoders here; a teacher kind gives them through its
own `export_encoders` (beside its loader, `dsmd.distill.teachers.registry`), so adding a
teacher kind never touches this package.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsmd.artifacts import sha256_file
from dsmd.preprocess import PreprocessConfig


class ImageEncoder(nn.Module):
    """The image half of a dual encoder with `encode_image(pixels)`, as its own module (one ONNX graph)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)


class TextEncoder(nn.Module):
    """The text half of a dual encoder with `encode_text(input_ids, attention_mask)`, as its own module."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids, attention_mask)


@dataclass
class Encoders:
    """What export needs of a model: its two encoders (modules holding the weights), tokenizer and spec."""

    name: str
    kind: str  # student | demo-teacher | clip-teacher | ... (the bundle manifest's "kind")
    image: nn.Module  # pixels -> unit rows
    text: nn.Module  # (input_ids, attention_mask) -> unit rows, or the inputs `text_inputs` names
    tokenizer: Any  # tokenizers.Tokenizer with truncation and padding configured
    preprocess: PreprocessConfig
    dim: int
    source: dict
    text_inputs: tuple[str, ...] = ("input_ids", "attention_mask")


def student_encoders(path: str | Path) -> Encoders:
    """Encoders of a saved student: a checkpoint folder, or a run folder (its best/)."""
    from dsmd.distill.checkpoint import resolve_student
    from dsmd.distill.student import load_student

    path = resolve_student(path)
    model, tok = load_student(path)
    return model_encoders(model, tok, source={"path": str(path), "config": model.cfg.to_json(),
                                              "weights_sha256": sha256_file(path / "model.safetensors")})


def model_encoders(model: nn.Module, tok: Any, source: dict | None = None) -> Encoders:
    """Encoders of an in-memory student (benchmarks export random-weight presets this way)."""
    return Encoders(name=f"student-{model.cfg.preset}", kind="student", image=ImageEncoder(model),
                    text=TextEncoder(model), tokenizer=tok, preprocess=model.cfg.preprocess(), dim=model.cfg.dim,
                    source=source or {"config": model.cfg.to_json()})


def teacher_encoders(kind: str, path: str | Path, **options: Any) -> Encoders:
    """Encoders of a teacher of any registered kind (path or name), from that kind's own `export_encoders`.

    Options are the kind's loader options (`teacher_spec(kind).options`), e.g. BEiT-3's `tokenizer`
    (beit3.spm; default: beside the checkpoint) and `config` (tests).
    """
    from dsmd.distill.teachers.registry import teacher_spec

    return teacher_spec(kind).encoders(path, **options)
