"""The demo teacher: a small dual encoder trained CLIP-style on the demo world.

It stands in for a large pre-trained model (BEiT-3, CLIP) on a 2-core machine: trained in a
few minutes, saved like any checkpoint (config.json, model.safetensors, tokenizer.json,
manifest.json), and loaded through the same `Teacher` interface as the real ones.

Image side: a small CNN whose last feature map is flattened, not pooled, so the embedding
keeps *where* things are ("left of" must survive). Text side: a word-level tokenizer (the
`tokenizers` library, saved as tokenizer.json) and dilated 1-D convolutions (`TextTower`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from dsmd.artifacts import read_manifest, sha256_file
from dsmd.distill.teachers.base import Teacher
from dsmd.errors import UserError
from dsmd.preprocess import PreprocessConfig

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from dsmd.export.encoders import Encoders

PAD, UNK, CLS, SEP = "[PAD]", "[UNK]", "[CLS]", "[SEP]"


@dataclass
class DemoTeacherConfig:
    """Architecture of the demo teacher (saved as config.json beside the weights)."""

    vocab_size: int
    dim: int = 256  # embedding dim: the student projects to this
    image_size: int = 64
    channels: tuple[int, ...] = (32, 64, 128)  # CNN widths at strides 2, 4, 8
    blocks_per_stage: int = 2
    image_hidden: int = 512
    text_width: int = 256
    text_dilations: tuple[int, ...] = (1, 2, 4)
    max_tokens: int = 40
    preprocess: dict = field(default_factory=dict)

    def preprocess_cfg(self) -> PreprocessConfig:
        return PreprocessConfig.from_json(self.preprocess) if self.preprocess else PreprocessConfig(
            size=self.image_size, resize="squash", interpolation="bilinear", max_tokens=self.max_tokens
        )


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ImageTower(nn.Module):
    def __init__(self, cfg: DemoTeacherConfig):
        super().__init__()
        layers, cin = [], 3
        for cout in cfg.channels:
            layers.append(_conv(cin, cout, 2))
            layers += [_conv(cout, cout, 1) for _ in range(cfg.blocks_per_stage - 1)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.squeeze = nn.Conv2d(cin, 32, 1)
        side = cfg.image_size // 2 ** len(cfg.channels)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * side * side, cfg.image_hidden), nn.ReLU(inplace=True),
                                  nn.Linear(cfg.image_hidden, cfg.dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.squeeze(self.features(x)))


class TextTower(nn.Module):
    """Dilated 1-D convolutions over word embeddings, then max- and mean-pooling.

    Convolutions see words in order, so "red circle" and "blue square" become features of
    their own. On the demo world, with the same budget, a small Transformer read at [CLS] (and
    a BiGRU) kept embedding "a red circle left of a blue square" and "a blue circle left of a
    red square" alike, where this tower learnt the binding early (what binding is worth there:
    BENCHMARKS.md, "How hard is the demo world?"). Dilations 1, 2, 4 give a 15-word receptive
    field, enough for "A left of B".
    """

    def __init__(self, cfg: DemoTeacherConfig):
        super().__init__()
        w = cfg.text_width
        self.tok = nn.Embedding(cfg.vocab_size, w, padding_idx=0)
        self.convs = nn.ModuleList(nn.Conv1d(w, w, 3, padding=d, dilation=d) for d in cfg.text_dilations)
        self.norms = nn.ModuleList(nn.LayerNorm(w) for _ in cfg.text_dilations)
        self.proj = nn.Linear(2 * w, cfg.dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask: (B, T); mask is 1 for real tokens (Hugging Face convention)."""
        m = mask.unsqueeze(-1).to(self.tok.weight.dtype)
        x = self.tok(ids) * m
        for conv, norm in zip(self.convs, self.norms):
            # padded positions stay exactly zero, so an embedding does not depend on how much
            # padding its batch has (export and serving encode one text at a time)
            x = x + torch.relu(conv((norm(x) * m).transpose(1, 2))).transpose(1, 2) * m
        top = x.masked_fill(m == 0, -1e4).max(dim=1).values
        mean = (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)
        return self.proj(torch.cat([top, mean], dim=-1))


class DemoDualEncoder(nn.Module):
    def __init__(self, cfg: DemoTeacherConfig):
        super().__init__()
        self.cfg = cfg
        self.image = ImageTower(cfg)
        self.text = TextTower(cfg)
        self.logit_scale = nn.Parameter(torch.tensor(2.66))  # log(1 / 0.07), as CLIP

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image(pixels).float(), dim=-1)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(ids, mask).float(), dim=-1)


# ---------------------------------------------------------------- tokenizer


def build_tokenizer(captions: list[str], max_tokens: int) -> Tokenizer:
    """A word-level tokenizer over the captions' words, as a `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel({PAD: 0, UNK: 1, CLS: 2, SEP: 3}, unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    split = tok.pre_tokenizer.pre_tokenize_str
    words = sorted({w for c in captions for w, _ in split(tok.normalizer.normalize_str(c))})
    vocab = {PAD: 0, UNK: 1, CLS: 2, SEP: 3, **{w: i + 4 for i, w in enumerate(words)}}
    tok.model = models.WordLevel(vocab, unk_token=UNK)
    tok.post_processor = processors.TemplateProcessing(single=f"{CLS} $A {SEP}", special_tokens=[(CLS, 2), (SEP, 3)])
    configure_tokenizer(tok, max_tokens)
    return tok


def configure_tokenizer(tok: Tokenizer, max_tokens: int) -> Tokenizer:
    """Truncation to max_tokens and [PAD] (id 0) padding, as the model was trained; applied on build and on load."""
    tok.enable_truncation(max_length=max_tokens)
    tok.enable_padding(pad_id=0, pad_token=PAD)
    return tok


def tokenize(tok: Tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask (1 on tokens), padded to the longest text of the batch."""
    enc = tok.encode_batch(list(texts))
    ids = torch.tensor([e.ids for e in enc], dtype=torch.long)
    mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.long)
    return ids, mask


# ---------------------------------------------------------------- save / load


def save(model: DemoDualEncoder, tokenizer: Tokenizer, folder: Path) -> None:
    """Write config.json, model.safetensors and tokenizer.json (the manifest is the caller's)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(asdict(model.cfg), indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    tokenizer.save(str(folder / "tokenizer.json"))


def load(folder: Path, device: str | torch.device = "cpu") -> tuple[DemoDualEncoder, Tokenizer]:
    """The model (eval mode) and tokenizer of a folder `save` wrote; a mismatch of weights and config is an error."""
    from tokenizers import Tokenizer

    folder = Path(folder)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (folder / name).exists():
            raise FileNotFoundError(
                f"{folder} is not a demo teacher: {name} is missing (train one with `dsmd train-teacher`)"
            )
    raw = json.loads((folder / "config.json").read_text())
    cfg = DemoTeacherConfig(**{**raw, "channels": tuple(raw["channels"]),
                               "text_dilations": tuple(raw["text_dilations"])})
    model = DemoDualEncoder(cfg)
    state = load_file(str(folder / "model.safetensors"))
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise UserError(f"{folder}: weights do not match config.json (missing {result.missing_keys[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]})")
    tok = configure_tokenizer(Tokenizer.from_file(str(folder / "tokenizer.json")), cfg.max_tokens)
    return model.to(device).eval(), tok


class DemoTeacher(Teacher):
    """The demo dual encoder behind the `Teacher` interface."""

    kind = "demo"

    def __init__(self, model: DemoDualEncoder, tokenizer, name: str, checkpoint_hash: str):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.dim = model.cfg.dim
        self.preprocess = model.cfg.preprocess_cfg()
        self.checkpoint_hash = checkpoint_hash
        self.device = next(model.parameters()).device

    @classmethod
    def load(cls, folder: str | Path, device: str = "cpu") -> DemoTeacher:
        folder = Path(folder)
        if read_manifest(folder) is None and (folder / "config.json").exists():
            raise UserError(f"{folder} holds an unfinished demo teacher (no manifest.json): train it again")
        model, tok = load(folder, device)
        return cls(model, tok, name=f"demo-{folder.name}", checkpoint_hash=sha256_file(folder / "model.safetensors"))

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels.to(self.device)).cpu()

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        ids, mask = tokenize(self.tokenizer, texts)
        return self.model.encode_text(ids.to(self.device), mask.to(self.device)).cpu()


# ---------------------------------------------------------------- the plug-in (distill/teachers/registry.py)


def load_teacher(kind: str, path: str | Path, device: str = "cpu", **options: Any) -> DemoTeacher:
    """The registry's loader: a folder written by `dsmd train-teacher` (no options)."""
    if not Path(path).exists():
        from dsmd.distill.teachers.registry import teacher_spec

        raise FileNotFoundError(f"teacher path {path} does not exist ({kind}: {teacher_spec(kind).description})")
    return DemoTeacher.load(path, device=device)


def export_encoders(kind: str, path: str | Path, **options: Any) -> Encoders:
    """The registry's export wrapper: the model's own encode_image / encode_text, its word-level tokenizer."""
    from dsmd.export.encoders import Encoders, ImageEncoder, TextEncoder

    t = load_teacher(kind, path)
    return Encoders(name=t.name, kind="demo-teacher", image=ImageEncoder(t.model), text=TextEncoder(t.model),
                    tokenizer=t.tokenizer, preprocess=t.preprocess, dim=t.dim,
                    source={"path": str(path), "weights_sha256": t.checkpoint_hash})
