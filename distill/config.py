"""The distillation config: every setting of a training run in one file.

A config is a JSON file of sections (data, student, loss, balancer, optim, augment, run);
`--set section.key=value` overrides single fields from the command line. The resolved config
is written beside the run (`config.json`) and inside every checkpoint, so a run can be
resumed, repeated and read later without the command that started it.

Defaults are the paper's recipe (METHOD.md §4) except where noted; `configs/demo.json` is the
demo world's setting and says why it differs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from dsmd.distill.balancer import BalancerConfig
from dsmd.distill.student_presets import STUDENT_PRESETS
from dsmd.errors import UserError

LOSSES = ("cd", "fd", "sd", "hnd", "kl")  # the paper's four, and the peers' similarity KL (off by default)
METHODS = ("dsmd", "clip")  # distil from the teacher, or train directly on the pairs (the baseline)
UNPAIRED = ("images", "captions")


@dataclass
class DataConfig:
    dataset: str = "data/world"  # a Karpathy JSON / JSONL file, or a folder holding one
    images: str | None = None  # image root, when not beside the data set file
    features: str = "artifacts/features"  # the teacher's feature store of that data set
    train_split: str = "train"
    val_split: str = "val"
    # the share of the captioned training images whose captions are trained on as pairs (the first
    # ones, in data-set order); the teacher's features cover them all, so the rest can be unpaired rows
    pairs_fraction: float = 1.0
    # rows with one side only, beside the pairs (dsmd method): "images" (training images without
    # captions, and those past pairs_fraction), "captions" (the captions of images past pairs_fraction)
    unpaired: list[str] = field(default_factory=list)
    unpaired_ratio: float = 1.0  # unpaired rows of each kind per pair in a batch

    def __post_init__(self):
        if not 0 < self.pairs_fraction <= 1:
            raise UserError(f"data.pairs_fraction must be in (0, 1], not {self.pairs_fraction}")
        bad = [u for u in self.unpaired if u not in UNPAIRED]
        if bad:
            raise UserError(f"data.unpaired lists some of {', '.join(UNPAIRED)}, not {bad}")
        _positive("data", unpaired_ratio=self.unpaired_ratio)


@dataclass
class StudentConfig:
    preset: str = "base"
    image_init: str | None = None  # a timm ViT checkpoint (ImageNet-21k in the paper)
    text_init: str | None = None  # a Hugging Face BERT directory (bert-base-uncased in the paper)
    overrides: dict = field(default_factory=dict)  # StudentModelConfig fields, e.g. {"image_size": 384}

    def __post_init__(self):
        if self.preset not in STUDENT_PRESETS:  # caught here, not after the data and features are loaded
            raise UserError(f"student.preset must be one of {', '.join(STUDENT_PRESETS)}, not {self.preset!r} "
                            f"(`dsmd students` lists them)")


@dataclass
class LossConfig:
    use: list[str] = field(default_factory=lambda: ["cd", "fd", "sd", "hnd"])
    tau: float = 0.05  # contrastive temperature
    queue_size: int = 8192  # K, per modality
    margin: float = 0.0  # triplet margin: the paper's 0 can collapse (METHOD.md §7)
    kl_temperature: float = 0.05  # of both similarity matrices in the "kl" loss
    clip_temperature: float = 0.07  # method clip: where its learnt temperature starts (CLIP's 0.07)

    def __post_init__(self):
        bad = [n for n in self.use if n not in LOSSES]
        if bad or not self.use:
            raise UserError(f"loss.use must list some of {', '.join(LOSSES)} (got {self.use})")
        _positive("loss", tau=self.tau, queue_size=self.queue_size, kl_temperature=self.kl_temperature,
                  clip_temperature=self.clip_temperature)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 1e-4
    epochs: int = 20
    steps: int = 0  # optimiser steps in all, when set (not 0): a budget that holds whatever the data set's size
    decay_epochs: list[int] = field(default_factory=lambda: [10])  # lr x `decay` at each of these epochs
    decay: float = 0.1
    schedule: str = "step"  # step: the paper's step decay; cosine: from lr to 0 over the run (decay_epochs unused)
    warmup_steps: int = 0  # linear warm-up (not in the paper; helps from-scratch students)
    batch_size: int = 64  # pairs per optimiser step, over all ranks and accumulation steps
    accum_steps: int = 1  # gradient accumulation: micro-batch = batch_size / (ranks x accum_steps)
    clip_grad: float = 0.0  # max gradient norm; 0 = off

    def __post_init__(self):
        _positive("optim", epochs=self.epochs, batch_size=self.batch_size, accum_steps=self.accum_steps)
        if self.schedule not in ("step", "cosine"):
            raise UserError(f"optim.schedule must be step or cosine, not {self.schedule!r}")
        if self.lr < 0 or self.weight_decay < 0 or self.warmup_steps < 0 or self.steps < 0:
            raise UserError("optim.lr, optim.weight_decay, optim.warmup_steps and optim.steps must not be negative")


@dataclass
class AugmentConfig:
    """Training-time image augmentation; evaluation uses the plain preprocessing spec.

    No colour jitter and no horizontal flip by default: captions name colours and sides
    ("a red circle left of ..."), and both would make them false.
    """

    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])  # random resized crop, area fraction
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333])
    hflip: bool = False


@dataclass
class RunConfig:
    seed: int = 0
    init_seed: int = -1  # the student's initial weights' seed when >= 0 (else `seed`): what varies between seeds
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "auto"  # auto | bf16 | fp16 | off (auto: bf16 on GPUs that have it and on CPUs with native bf16)
    threads: int = 0  # CPU threads per process; 0 = cores / processes
    workers: int = 2  # image-decoding processes per rank
    eval_every: int = 1  # epochs
    checkpoint_every: int = 500  # steps; every epoch end too
    stop_at_chance_after: int = 2  # stop if val recall is at chance after this many epochs; 0 = never
    eval_batch: int = 256

    def __post_init__(self):
        if self.device not in ("auto", "cpu", "cuda"):
            raise UserError(f"run.device must be auto, cpu or cuda, not {self.device!r} "
                            f"(under torchrun each process takes the GPU of its LOCAL_RANK)")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise UserError(f"run.amp must be auto, bf16, fp16 or off, not {self.amp!r}")
        _positive("run", eval_every=self.eval_every, checkpoint_every=self.checkpoint_every,
                  eval_batch=self.eval_batch)


# Settings that may change between a run and its resume: they do not change what is learnt.
RESUMABLE_CHANGES = ("run.workers", "run.threads", "run.eval_batch", "run.checkpoint_every")

# Settings added after runs had been started, with the value that gives the earlier behaviour: a
# run whose saved config lacks one ran with that value. Add a key here whenever one is added.
ADDED_SETTINGS = {"optim.schedule": "step", "balancer.window": 0, "optim.steps": 0, "data.pairs_fraction": 1.0,
                  "data.unpaired": [], "data.unpaired_ratio": 1.0, "loss.clip_temperature": 0.07, "run.init_seed": -1}


def _positive(section: str, **values) -> None:
    bad = [k for k, v in values.items() if not v > 0]
    if bad:
        raise UserError(f"{', '.join(f'{section}.{k}' for k in bad)} must be positive")


@dataclass
class DistillConfig:
    data: DataConfig = field(default_factory=DataConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    method: str = "dsmd"
    loss: LossConfig = field(default_factory=LossConfig)
    balancer: BalancerConfig = field(default_factory=BalancerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        if self.method not in METHODS:
            raise UserError(f"method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if self.method == "clip" and self.data.unpaired:
            raise UserError("data.unpaired needs the teacher (method dsmd): direct training learns from pairs only")
        _positive("balancer", temperature=self.balancer.temperature, max_scale=self.balancer.max_scale)
        if self.balancer.mode == "fixed" and set(self.balancer.fixed) != set(self.loss.use):
            raise UserError(f"balancer.fixed must give a weight to each of loss.use {self.loss.use}, "
                            f"got {sorted(self.balancer.fixed)}")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> DistillConfig:
        return _build(cls, d, "")


def _build(cls, d: Any, where: str):
    if not isinstance(d, dict):
        raise UserError(f"config {where or 'file'}: expected an object, got {d!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise UserError(f"config {where or 'file'}: unknown key(s) {', '.join(unknown)} "
                        f"(known: {', '.join(known)})")
    kwargs = {}
    for name, value in d.items():
        f = known[name]
        default = f.default_factory() if callable(f.default_factory) else f.default
        if is_dataclass(default):
            kwargs[name] = _build(type(default), value, f"{where}{name}.")
            continue
        _check_type(f"{where}{name}", value, default)
        kwargs[name] = float(value) if isinstance(default, float) and isinstance(value, int) else value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"config {where.rstrip('.') or 'file'}: {e}") from e


def _check_type(key: str, value: Any, default: Any) -> None:
    """A value must have its default's type (ints pass for floats; None-defaults take str or None)."""
    if default is None:  # optional paths and numbers
        ok = value is None or (isinstance(value, (str, int, float)) and not isinstance(value, bool))
    elif isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        want = "a string, a number or null" if default is None else type(default).__name__
        raise UserError(f"config {key}: expected {want}, got {value!r}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DistillConfig:
    """A config from a JSON file (or the defaults), with `section.key=value` overrides applied.

    Values are read as JSON when they parse (numbers, true/false, null, lists), else as strings.
    """
    d = DistillConfig().to_json()
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise UserError(f"config file {p} does not exist")
        try:
            _merge(d, json.loads(p.read_text()), "")
        except json.JSONDecodeError as e:
            raise UserError(f"config file {p} is not valid JSON: {e}") from e
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise UserError(f"--set takes section.key=value, not {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node, parts = d, key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise UserError(f"--set {key}: no section {part!r} in the config")
            node = node[part]
        if parts[-1] not in node and not (len(parts) > 1 and parts[-2] in ("overrides", "fixed")):
            raise UserError(f"--set {key}: unknown setting {parts[-1]!r} (known: {', '.join(node)})")
        node[parts[-1]] = value
    return DistillConfig.from_json(d)


def _merge(base: dict, new: dict, where: str) -> None:
    for k, v in new.items():
        if k.startswith("_"):  # "_comment" keys document a config file
            continue
        if isinstance(v, dict) and isinstance(base.get(k), dict) and k not in ("overrides", "fixed"):
            _merge(base[k], v, f"{where}{k}.")
        else:
            base[k] = v


def config_diff(a: dict, b: dict, where: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts (RESUMABLE_CHANGES left out).

    A key of ADDED_SETTINGS missing from either side counts as its earlier-behaviour value.
    """
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = (d.get(k, ADDED_SETTINGS.get(f"{where}{k}")) for d in (a, b))
        if isinstance(va, dict) and isinstance(vb, dict) and k not in ("overrides", "fixed"):
            out += config_diff(va, vb, f"{where}{k}.")
        elif va != vb and f"{where}{k}" not in RESUMABLE_CHANGES:
            out.append(f"{where}{k}")
    return out
