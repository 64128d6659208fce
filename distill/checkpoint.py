"""A run folder on disk: checkpoints for exact resume, the best student, and the logs kept in step.

    config.json       the resolved config (a resume refuses a different one)
    checkpoints/      step-NNNNNNNN/: student + train_state.pt (optimiser, scheduler position,
                      queues, balancer, scaler, step); the latest named in state.json
    best/             the student with the best val RSUM (what export reads)
    steps.jsonl, metrics.jsonl   per-step losses and per-evaluation recall (cut back on resume)
    manifest.json     written last, when training has finished

Every write lands beside its target and is renamed into place, so a run killed at any point
resumes from its latest complete checkpoint.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer

from dsmd.artifacts import read_json, read_manifest, recover_dir, replace_dir, write_json
from dsmd.distill.config import ADDED_SETTINGS, DistillConfig, config_diff
from dsmd.distill.student import Student, save_student
from dsmd.errors import UserError


def save_checkpoint(out: Path, model: Student, tok: Tokenizer, cfg: DistillConfig, state: dict) -> Path:
    """Write checkpoint step-N (student + train state) under a temporary name, rename it, then point state.json
    at it: a kill at any moment leaves a complete checkpoint to resume from."""
    d = out / "checkpoints" / f"step-{state['step']:08d}"
    tmp = d.with_name("." + d.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_student(model, tok, tmp)
    torch.save(state, tmp / "train_state.pt")
    write_json(tmp / "config.json", cfg.to_json())
    shutil.rmtree(d, ignore_errors=True)
    tmp.rename(d)
    pointer = read_json(out / "state.json") if (out / "state.json").exists() else {}
    write_json(out / "state.json", {**pointer, "latest": str(d.relative_to(out)), "step": state["step"]})
    for old in (out / "checkpoints").glob("step-*"):  # keep only the latest
        if old != d:
            shutil.rmtree(old, ignore_errors=True)
    return d


def save_best(out: Path, model: Student, tok: Tokenizer, cfg: DistillConfig, info: dict) -> None:
    """Replace best/ (what export reads) in one swap, so it always holds a complete student."""
    tmp = out / ".best.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_student(model, tok, tmp)
    write_json(tmp / "config.json", cfg.to_json())
    write_json(tmp / "best.json", info)
    replace_dir(tmp, out / "best")


def truncate_jsonl(path: Path, step: int) -> None:
    """Drop records written after the checkpoint we resume from (they will be written again),
    and a last line half-written when the run was killed."""
    if path.exists():
        keep = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
        path.write_text("".join(line + "\n" for line in keep))



def open_run(out: Path, cfg: DistillConfig, restart: bool, is_main: bool,
             barrier: Callable[[], None]) -> tuple[Path | None, dict | None]:
    """Prepare the run folder: (the checkpoint to resume from or None, the manifest if the run has finished).

    Rank 0 clears what a kill left half-written (and the whole folder with `restart`); a folder
    holding a run with another config is refused.
    """
    if is_main:
        if restart and out.exists():
            shutil.rmtree(out)
        recover_dir(out / "best")
        for tmp in list(out.glob(".*.tmp")) + list((out / "checkpoints").glob(".*.tmp")):
            shutil.rmtree(tmp, ignore_errors=True)  # a checkpoint being written when the run was killed
    barrier()
    resume = None
    if (out / "config.json").exists():
        saved = read_json(out / "config.json")
        diff = config_diff(saved, cfg.to_json())
        if diff:
            added = [k for k in diff if k in ADDED_SETTINGS and _lookup(saved, k) is None]
            sets = " ".join(f"--set {k}={json.dumps(ADDED_SETTINGS[k])}" for k in added)
            hint = f"; it was started before {', '.join(added)} existed: resume it as it ran with {sets}, or" \
                if added else ";"
            raise UserError(f"{out} holds a run with another config (differs at {', '.join(diff[:6])}){hint} "
                            f"use another --out, or --restart to start this folder over")
        if (out / "state.json").exists():
            resume = out / read_json(out / "state.json")["latest"]
    finished = read_manifest(out)
    if finished is None and is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", cfg.to_json())
    return resume, finished


def _lookup(config: dict, dotted: str):
    """config["a"]["b"] for "a.b", or None where a part is missing."""
    for part in dotted.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def load_train_state(resume: Path) -> dict:
    """The optimiser, scheduler, queues, balancer and step of a checkpoint (tensors only: weights_only)."""
    return torch.load(resume / "train_state.pt", map_location="cpu", weights_only=True)


def resolve_student(path: str | Path) -> Path:
    """A student folder, or a run folder (its best checkpoint)."""
    p = Path(path)
    if (p / "student.json").exists():
        return p
    if (p / "best" / "student.json").exists():
        return p / "best"
    raise UserError(f"{p} is neither a student checkpoint nor a run folder with best/ (has training started?)")
