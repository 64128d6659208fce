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

from distill.balancer import BalancerCfg
from dsmd.errors import UserError

LOSSES = ("cd", "fd", "sd", "hnd", "kl")  # the paper's four, and the peers' similarity KL (off by default)
METHODS = ("dsmd", "clip")  # distil from the teacher, or train directly on the pairs (the baseline)


@dataclass
class DataCfg:
    dataset: str = "data/world"  # a Karpathy JSON / JSONL file, or a folder holding one
    images: str | None = None  # image root, when not beside the data set file
    features: str = "artifacts/features"  # the teacher's feature store of that data set
    train_split: str = "train"
    val_split: str = "val"


@dataclass
class StudentCfg:
    preset: str = "base"
    image_init: str | None = None  # a timm ViT checkpoint (ImageNet-21k in the paper)
    text_init: str | None = None  # a Hugging Face BERT directory (bert-base-uncased in the paper)
    overrides: dict = field(default_factory=dict)  # StudentConfig fields, e.g. {"image_size": 384}


@dataclass
class LossCfg:
    use: list[str] = field(default_factory=lambda: ["cd", "fd", "sd", "hnd"])
    tau: float = 0.05  # contrastive temperature
    queue_size: int = 8192  # K, per modality
    margin: float = 0.0  # triplet margin: the paper's 0 can collapse (METHOD.md §7)
    kl_temperature: float = 0.05  # of both similarity matrices in the "kl" loss

    def __post_init__(self):
        bad = [n for n in self.use if n not in LOSSES]
        if bad or not self.use:
            raise UserError(f"loss.use must list some of {', '.join(LOSSES)} (got {self.use})")


@dataclass
class OptimCfg:
    lr: float = 1e-4
    weight_decay: float = 1e-4
    epochs: int = 20
    decay_epochs: list[int] = field(default_factory=lambda: [10])  # lr x `decay` at each of these epochs
    decay: float = 0.1
    warmup_steps: int = 0  # linear warm-up (not in the paper; helps from-scratch students)
    batch_size: int = 64  # pairs per optimiser step, over all ranks and accumulation steps
    accum_steps: int = 1  # gradient accumulation: micro-batch = batch_size / (ranks x accum_steps)
    clip_grad: float = 0.0  # max gradient norm; 0 = off


@dataclass
class AugmentCfg:
    """Training-time image augmentation; evaluation uses the plain preprocessing spec.

    No colour jitter and no horizontal flip by default: captions name colours and sides
    ("a red circle left of ..."), and both would make them false.
    """

    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])  # random resized crop, area fraction
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333])
    hflip: bool = False


@dataclass
class RunCfg:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "auto"  # auto | bf16 | fp16 | off (auto: bf16 on GPUs that have it and on CPUs with native bf16)
    threads: int = 0  # CPU threads per process; 0 = cores / processes
    workers: int = 2  # image-decoding processes per rank
    eval_every: int = 1  # epochs
    checkpoint_every: int = 500  # steps; every epoch end too
    stop_at_chance_after: int = 2  # stop if val recall is at chance after this many epochs; 0 = never
    eval_batch: int = 256


@dataclass
class DistillConfig:
    data: DataCfg = field(default_factory=DataCfg)
    student: StudentCfg = field(default_factory=StudentCfg)
    method: str = "dsmd"
    loss: LossCfg = field(default_factory=LossCfg)
    balancer: BalancerCfg = field(default_factory=BalancerCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    augment: AugmentCfg = field(default_factory=AugmentCfg)
    run: RunCfg = field(default_factory=RunCfg)

    def __post_init__(self):
        if self.method not in METHODS:
            raise UserError(f"method must be one of {', '.join(METHODS)}, not {self.method!r}")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "DistillConfig":
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
        default = known[name].default_factory() if callable(known[name].default_factory) else None
        if is_dataclass(default):
            kwargs[name] = _build(type(default), value, f"{where}{name}.")
        else:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"config {where.rstrip('.') or 'file'}: {e}") from e


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
    """Dotted keys whose values differ between two config dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, f"{where}{k}.")
        elif va != vb:
            out.append(f"{where}{k}")
    return out
