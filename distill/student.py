"""The DSMD student: a ViT image encoder (timm) and a BERT text encoder (transformers), each
followed by a linear projection to the teacher's embedding size and L2 normalisation
(METHOD.md §1, Eq. 3-4).

Presets by name (`create_student("base", dim=768)`), from the table in `student_presets.py`
(base: the paper's student, about 197M parameters; demo: the demo world on two CPU cores;
tiny: tests).

A student folder (what training writes and export reads) holds `student.json` (this config),
`model.safetensors` and `tokenizer.json`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch import nn

from dsmd.distill.student_presets import student_preset, student_preset_names
from dsmd.errors import UserError
from dsmd.preprocess import PreprocessConfig

# ImageNet statistics: timm's ViT-B/16 (augreg, in21k) checkpoints expect (0.5, 0.5, 0.5), the
# original ViT too; we keep (0.5, 0.5, 0.5) for every preset so one value travels everywhere.
_HALF = (0.5, 0.5, 0.5)


@dataclass
class StudentModelConfig:
    """Architecture of a student; saved as student.json and read back by export."""

    preset: str
    dim: int  # the teacher's embedding size: both projections map to it
    # image tower (timm VisionTransformer keyword arguments)
    image_size: int = 224
    patch_size: int = 16
    image_width: int = 768
    image_depth: int = 12
    image_heads: int = 12
    # text tower (transformers BertConfig fields)
    vocab_size: int = 30522
    text_width: int = 768
    text_depth: int = 12
    text_heads: int = 12
    text_mlp: int = 3072
    max_tokens: int = 64  # longest tokenised caption, [CLS] and [SEP] included
    resize: str = "squash"  # as BEiT-3; "shortest_crop" for CLIP-style data
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = _HALF
    std: tuple[float, float, float] = _HALF
    proj_gain: float = 1.414  # Xavier-normal gain of the two projections (the paper's)
    dropout: float = 0.1  # BERT's hidden and attention dropout
    logit_scale: bool = False  # a learnable CLIP temperature (only the direct-training baseline)
    init: dict = field(default_factory=dict)  # where pretrained weights came from, for provenance

    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig(size=self.image_size, resize=self.resize, interpolation=self.interpolation,
                             mean=self.mean, std=self.std, max_tokens=self.max_tokens)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> StudentModelConfig:
        d = dict(d)
        for k in ("mean", "std"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


def list_presets() -> list[str]:
    """The preset names (`student_presets.py`)."""
    return student_preset_names()


def preset_config(name: str, dim: int, **overrides: Any) -> StudentModelConfig:
    """The config of preset `name` for a teacher of size `dim`, with `overrides` (StudentModelConfig fields) on top."""
    return StudentModelConfig(preset=name, dim=dim, **{**student_preset(name).fields, **overrides})


class Student(nn.Module):
    """Two towers and two projections; `forward` returns unit-norm (image, text) embeddings."""

    def __init__(self, cfg: StudentModelConfig):
        super().__init__()
        import timm
        from transformers import BertConfig, BertModel

        self.cfg = cfg
        self.vision = timm.create_model(
            "vit_base_patch16_224", pretrained=False, num_classes=0, global_pool="token",
            img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.image_width,
            depth=cfg.image_depth, num_heads=cfg.image_heads,
        )
        self.text = BertModel(BertConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.text_width, num_hidden_layers=cfg.text_depth,
            num_attention_heads=cfg.text_heads, intermediate_size=cfg.text_mlp,
            max_position_embeddings=max(512, cfg.max_tokens), hidden_dropout_prob=cfg.dropout,
            attention_probs_dropout_prob=cfg.dropout,
        ), add_pooling_layer=True)
        self.image_proj = nn.Linear(cfg.image_width, cfg.dim)
        self.text_proj = nn.Linear(cfg.text_width, cfg.dim)
        for proj in (self.image_proj, self.text_proj):
            nn.init.xavier_normal_(proj.weight, gain=cfg.proj_gain)
            nn.init.zeros_(proj.bias)
        if cfg.logit_scale:
            self.logit_scale = nn.Parameter(torch.tensor(1 / 0.07).log())

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels -> (B, dim) unit vectors (the ViT's CLS token)."""
        return F.normalize(self.image_proj(self.vision(pixels)).float(), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids and mask -> (B, dim) unit vectors (BERT's pooled output)."""
        pooled = self.text(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return F.normalize(self.text_proj(pooled).float(), dim=-1)

    def forward(self, pixels, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(pixels), self.encode_text(input_ids, attention_mask)

    def parameter_counts(self) -> dict[str, int]:
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return {"image": count(self.vision) + count(self.image_proj), "text": count(self.text) + count(self.text_proj),
                "total": sum(p.numel() for n, p in self.named_parameters() if n != "logit_scale")}


# ---------------------------------------------------------------- tokenizer


def build_tokenizer(texts: list[str], vocab_size: int, max_tokens: int) -> Tokenizer:
    """A BERT-style uncased WordPiece tokenizer for the training captions, when no pretrained
    text encoder (with its own vocabulary) is given.

    The vocabulary is every character (alone and as a "##" continuation) plus the most
    frequent words, ties broken alphabetically, so the same captions always give the same
    ids (the `tokenizers` WordPiece trainer does not: its merges and ids change from run to
    run). Rarer words are spelt out in pieces.
    """
    from collections import Counter

    from tokenizers import normalizers, pre_tokenizers
    from tokenizers.models import WordPiece

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    norm, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts = Counter(w for t in texts for w, _ in pre.pre_tokenize_str(norm.normalize_str(t)))
    chars = sorted({c for w in counts for c in w})
    pieces = chars + ["##" + c for c in chars]
    room = vocab_size - len(specials) - len(pieces)
    if room < 0:
        raise UserError(f"the captions use {len(chars)} distinct characters: a vocabulary of {vocab_size} cannot "
                        f"hold them (raise vocab_size)")
    words = [w for w, _ in sorted(counts.items(), key=lambda wc: (-wc[1], wc[0])) if len(w) > 1][:room]
    tok = Tokenizer(WordPiece({t: i for i, t in enumerate(specials + pieces + words)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = norm, pre
    return _finish_tokenizer(tok, max_tokens)


def tokenizer_from_hf(path: Path, max_tokens: int) -> Tokenizer:
    """The tokenizer of a local Hugging Face BERT directory (tokenizer.json or vocab.txt)."""
    from tokenizers.implementations import BertWordPieceTokenizer

    if (path / "tokenizer.json").exists():
        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    elif (path / "vocab.txt").exists():
        lower = True
        if (path / "tokenizer_config.json").exists():
            lower = json.loads((path / "tokenizer_config.json").read_text()).get("do_lower_case", True)
        tok = BertWordPieceTokenizer(str(path / "vocab.txt"), lowercase=lower)._tokenizer
    else:
        raise UserError(f"{path} has neither tokenizer.json nor vocab.txt: cannot build the text tokenizer")
    return _finish_tokenizer(tok, max_tokens)


def _finish_tokenizer(tok: Tokenizer, max_tokens: int) -> Tokenizer:
    from tokenizers import processors

    cls, sep, pad = (tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    if None in (cls, sep, pad):
        raise UserError("the tokenizer lacks [CLS], [SEP] or [PAD]: a BERT tokenizer is needed")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls),
                                                                                              ("[SEP]", sep)])
    tok.enable_truncation(max_tokens)
    tok.enable_padding(pad_id=pad, pad_token="[PAD]")
    return tok


def tokenize(tok: Tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, padded to the longest text of the batch."""
    enc = tok.encode_batch(list(texts))
    ids = torch.tensor([e.ids for e in enc], dtype=torch.long)
    mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.long)
    return ids, mask


# ---------------------------------------------------------------- creation, pretrained weights, save/load


def create_student(preset: str, dim: int, image_init: str | Path | None = None, text_init: str | Path | None = None,
                   tokenizer: Tokenizer | None = None, captions: list[str] | None = None,
                   log: Callable[[str], Any] = print, **overrides: Any) -> tuple[Student, Tokenizer]:
    """A student from a preset, with pretrained towers from local files when given.

    Args:
        preset: a name from `list_presets()`.
        dim: the teacher's embedding size.
        image_init: a timm ViT checkpoint (.safetensors, .pth, .bin, or a folder holding one), or
            a timm name such as vit_base_patch16_224.augreg_in21k (downloaded once, `dsmd.hub`).
        text_init: a Hugging Face BERT directory (config.json + weights + vocabulary) or Hub id
            such as bert-base-uncased; its config replaces the preset's text tower sizes and its
            vocabulary is used.
        tokenizer: a ready tokenizer (when resuming); else built from `text_init` or learnt
            from `captions`.
        overrides: StudentModelConfig fields.
    """
    from dsmd import hub

    cfg = preset_config(preset, dim, **overrides)
    init = {}
    if text_init is not None:
        init["text"] = str(text_init)  # as given (a path or a Hub id), not the cache's folder
        text_init = hub.resolve_hf(text_init, what="text encoder (student.text_init)")
        hf = json.loads((text_init / "config.json").read_text()) if (text_init / "config.json").exists() else None
        if hf is None:
            raise UserError(f"{text_init} has no config.json: student.text_init takes a Hugging Face BERT directory")
        cfg = replace(cfg, vocab_size=hf["vocab_size"], text_width=hf["hidden_size"],
                      text_depth=hf["num_hidden_layers"], text_heads=hf["num_attention_heads"],
                      text_mlp=hf["intermediate_size"])
    if tokenizer is None:
        tokenizer = make_tokenizer(text_init, captions, cfg.vocab_size, cfg.max_tokens)
    if tokenizer.get_vocab_size() > cfg.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens, more than the text encoder's "
                        f"{cfg.vocab_size}")
    if image_init is not None:
        init["image"] = str(image_init)
        image_init = hub.resolve_timm(image_init)
    cfg = replace(cfg, init=init)
    model = Student(cfg)
    if image_init is not None:
        _load_timm_vit(model.vision, image_init)
        log(f"image encoder: pretrained weights from {image_init}")
    else:
        log("image encoder: random initialisation (--set student.image_init=PATH_OR_TIMM_NAME, e.g. "
            "vit_base_patch16_224.augreg_in21k, starts it pretrained)")
    if text_init is not None:
        _load_hf_bert(model.text, text_init)
        log(f"text encoder: pretrained weights from {text_init}")
    else:
        log("text encoder: random initialisation (--set student.text_init=DIR_OR_HUB_ID, e.g. bert-base-uncased, "
            "starts it pretrained)")
    return model, tokenizer


def make_tokenizer(text_init: str | Path | None, captions: list[str] | None, vocab_size: int,
                   max_tokens: int) -> Tokenizer:
    """The pretrained text encoder's tokenizer, or a WordPiece vocabulary learnt from the captions."""
    if text_init is not None:
        from dsmd import hub

        return tokenizer_from_hf(hub.resolve_hf(text_init, what="text encoder (student.text_init)"), max_tokens)
    if captions:
        return build_tokenizer(captions, vocab_size, max_tokens)
    raise UserError("no tokenizer: give a pretrained text encoder (student.text_init) or training captions")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        found = [f for pat in ("*.safetensors", "pytorch_model.bin", "*.pth", "*.bin") for f in sorted(path.glob(pat))]
        if not found:
            raise UserError(f"{path} holds no .safetensors, .pth or .bin weights")
        path = found[0]
    try:
        if path.suffix == ".safetensors":
            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a wrong or corrupt file: say which
        raise UserError(f"cannot read weights from {path}: {e}") from e
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _load_timm_vit(vit: nn.Module, path: Path) -> None:
    """Load a timm ViT checkpoint: the classifier head is dropped, position embeddings are
    resampled to our image size (timm's own filter), and any other mismatch is an error."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    sd = _read_state_dict(path)
    sd = {k: v for k, v in checkpoint_filter_fn(sd, vit).items() if not k.startswith("head.")}
    _strict_load(vit, sd, f"timm ViT checkpoint {path}")


def _load_hf_bert(bert: nn.Module, path: Path) -> None:
    sd = _read_state_dict(path)
    sd = {k.removeprefix("bert."): v for k, v in sd.items() if not k.startswith(("cls.", "classifier."))}
    sd.pop("embeddings.position_ids", None)
    if not any(k.startswith("pooler.") for k in sd):
        # MLM-only checkpoints have no pooler: it stays randomly initialised (and trains)
        sd.update({k: v for k, v in bert.state_dict().items() if k.startswith("pooler.")})
    _strict_load(bert, sd, f"BERT weights in {path}")


def _strict_load(module: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if missing or unexpected or shapes:
        parts = []
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if keys:
                parts.append(f"{len(keys)} {name} (first: {', '.join(keys[:4])})")
        raise UserError(f"{what} does not fit the student's encoder: " + "; ".join(parts))
    module.load_state_dict(sd)


def save_student(model: Student, tok: Tokenizer, out: Path) -> None:
    """Write student.json, model.safetensors and tokenizer.json into `out` (which must exist)."""
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k != "logit_scale"}
    save_file(sd, str(out / "model.safetensors"))
    tok.save(str(out / "tokenizer.json"))
    (out / "student.json").write_text(json.dumps(model.cfg.to_json(), indent=2) + "\n")


def load_student(path: str | Path, device: str | torch.device = "cpu") -> tuple[Student, Tokenizer]:
    """A saved student (a folder with student.json, model.safetensors, tokenizer.json), in eval mode."""
    path = Path(path)
    for f in ("student.json", "model.safetensors", "tokenizer.json"):
        if not (path / f).exists():
            raise UserError(f"{path} is not a student checkpoint: {f} is missing")
    cfg = StudentModelConfig.from_json(json.loads((path / "student.json").read_text()))
    cfg = replace(cfg, logit_scale=False)
    model = Student(cfg)
    _strict_load(model, load_file(str(path / "model.safetensors")), f"student weights in {path}")
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    return model.to(device).eval(), tok
