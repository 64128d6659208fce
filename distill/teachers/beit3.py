"""The BEiT-3 retrieval teacher: checkpoints in the official layout loaded strictly into our model
(`beit3_model.py`), its XLM-R sentencepiece tokenizer, and the teacher plug-in.

`BEiT3Teacher.load` takes a local .pth (and beit3.spm beside it) and downloads nothing; the
plug-in functions at the end (`load_teacher`, `export_encoders`) also take a release name,
fetched once into the cache with its beit3.spm (`dsmd.hub`).
"""

from __future__ import annotations

import argparse
import contextlib
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dsmd.artifacts import sha256_file
from dsmd.distill.teachers.base import Teacher
from dsmd.distill.teachers.beit3_model import PRESETS, Attention, BEiT3Config, BEiT3Retrieval, Precision
from dsmd.errors import UserError
from dsmd.preprocess import PreprocessConfig

if TYPE_CHECKING:
    from dsmd.export.encoders import Encoders

# ---------------------------------------------------------------- strict loading


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file: `ckpt["model"]` (the official layout) or `ckpt["module"]` when
    present (unilm's own loader takes both), else the file itself."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist: give the BEiT-3 retrieval checkpoint (.pth) with --teacher-path")
    try:
        # training scripts of BEiT-3's family save their argparse settings beside the weights: that one
        # class is allowed; anything else that is not a tensor, a number or a container is still refused
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(f"{path} holds more than tensors, and torch.load(weights_only=True) refuses it. If you "
                         "trust the file, re-save only its weights: torch.save({'model': torch.load(path, "
                         f"weights_only=False)['model']}}, new_path).\n{err}") from err
    except (RuntimeError, EOFError, ValueError, OSError) as err:  # truncated, empty, not a torch file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path} ({path.stat().st_size:,} bytes) cannot be read as a checkpoint ({first}): "
                        f"is it truncated, e.g. by an interrupted download? Download it again") from None
    if isinstance(ckpt, dict):
        sd = next((ckpt[k] for k in ("model", "module") if isinstance(ckpt.get(k), dict)), ckpt)
    else:
        sd = ckpt
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path} is not a BEiT-3 checkpoint: expected {{'model': state_dict}} or a state dict")
    return sd


def count_layers(sd: Mapping[str, torch.Tensor]) -> int:
    """Encoder layers in a state dict (base has 12, large 24): with the width, it tells the size apart."""
    idx = {int(m.group(1)) for k in sd if (m := re.match(r"beit3\.encoder\.layers\.(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def infer_size(sd: Mapping[str, torch.Tensor]) -> str:
    """"base" or "large", from the embedding width and the number of layers in the weights."""
    emb = sd.get("beit3.text_embed.weight")
    dim, depth = (emb.shape[1] if emb is not None and emb.ndim == 2 else None), count_layers(sd)
    for name, cfg in PRESETS.items():
        if (dim, depth) == (cfg.embed_dim, cfg.depth):
            return name
    raise UserError(f"cannot tell the BEiT-3 size from the weights (embed dim {dim}, {depth} layers; base is "
                     f"768/12, large 1024/24): use an official BEiT-3 retrieval checkpoint "
                     f"(beit3_{{base,large}}_patch16_384_{{coco,f30k}}_retrieval.pth)")


def check_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str = "checkpoint",
                     limit: int = 20) -> None:
    """Raise one error that counts every missing, unexpected and mis-shaped key and names up to `limit` of each.

    `load_state_dict(strict=True)` stops at the first kind of problem; a teacher that
    silently kept a default-initialised tensor would still produce plausible embeddings.
    """
    want = model.state_dict()
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    misshaped = [f"{k}: checkpoint {tuple(sd[k].shape)} != model {tuple(want[k].shape)}"
                 for k in want if k in sd and sd[k].shape != want[k].shape]
    if not (missing or unexpected or misshaped):
        return

    def block(title: str, items: list[str]) -> str:
        more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
        return f"  {len(items)} {title}:\n" + "\n".join(f"    {s}" for s in items[:limit]) + more

    parts = [block(t, i) for t, i in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if i]
    raise UserError(f"{source} does not match the BEiT-3 model ({len(want)} keys expected):\n" + "\n".join(parts)
                     + "\nUse an official BEiT-3 *retrieval* checkpoint (beit3_{base,large}_patch16_384_*_retrieval"
                       ".pth): its size is read from its weights.")


def load_checkpoint(path: str | Path, size: str | None = None, config: BEiT3Config | None = None
                    ) -> tuple[BEiT3Retrieval, str]:
    """Build the model a checkpoint describes and load every tensor strictly.

    Returns the model (float32, eval mode, on CPU) and its size name ("base", "large" or
    "custom" when `config` is given). The model is built on the meta device and takes the
    checkpoint's tensors directly, so no time or memory goes into a random init.
    """
    sd = read_state_dict(path)
    if config is None:
        if size is None:
            size = infer_size(sd)
        if size not in PRESETS:
            raise UserError(f"unknown BEiT-3 size {size!r}; choose one of {', '.join(PRESETS)}")
        config = PRESETS[size]
    name = size or "custom"
    with torch.device("meta"):
        model = BEiT3Retrieval(config)
    check_state_dict(model, sd, source=f"{path} (as BEiT-3 {name})")
    model.load_state_dict(sd, strict=True, assign=True)
    return model.float().eval().requires_grad_(False), name


# ---------------------------------------------------------------- tokenizer


class BEiT3Tokenizer:
    """XLM-R style sentencepiece tokenizer over beit3.spm, as unilm's BEiT-3 feeds its model.

    unilm wraps beit3.spm in the (slow, transformers 4.x) `XLMRobertaTokenizer`, whose ids follow
    fairseq: <s>=0, <pad>=1, </s>=2, <unk>=3, and every other piece is its sentencepiece id + 1.
    That is reproduced here with `sentencepiece` itself: transformers 5's XLMRobertaTokenizer
    silently ignores a `vocab_file` and maps every word to <unk>.
    """

    BOS, PAD, EOS, UNK = 0, 1, 2, 3

    def __init__(self, spm_path: str | Path, max_tokens: int = 64, vocab_size: int | None = None) -> None:
        import sentencepiece as spm

        spm_path = Path(spm_path)
        if not spm_path.exists():
            raise FileNotFoundError(f"BEiT-3 tokenizer {spm_path} does not exist: pass tokenizer= the beit3.spm "
                                    "released with BEiT-3 (microsoft/unilm, beit3/README.md)")
        if max_tokens < 3:
            raise UserError(f"max_tokens must leave room for <s>, </s> and one token, not {max_tokens}")
        self.sp = spm.SentencePieceProcessor(model_file=str(spm_path))
        self.path = spm_path
        self.max_tokens = max_tokens
        if vocab_size is not None and self.sp.get_piece_size() + 1 > vocab_size:
            raise UserError(f"{spm_path} has {self.sp.get_piece_size()} pieces but the model embeds only "
                             f"{vocab_size} ids: is this the beit3.spm that belongs to the checkpoint?")

    def encode(self, text: str) -> list[int]:
        """`<s> pieces </s>` ids, the pieces cut to max_tokens - 2 as unilm does."""
        pieces = [i + 1 if i else self.UNK for i in self.sp.encode(text)]  # spm's own <unk> is 0
        return [self.BOS, *pieces[: self.max_tokens - 2], self.EOS]

    def __call__(self, texts: list[str], pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, T) and padding mask (B, T), True on padding, right-padded with <pad>.

        Padding goes to the longest text (or `pad_to`): masked keys make the result the same
        as unilm's fixed 64, with less work.
        """
        seqs = [self.encode(t) for t in texts]
        width = max([len(s) for s in seqs] + [pad_to or 0])
        ids = torch.full((len(seqs), width), self.PAD, dtype=torch.long)
        mask = torch.ones((len(seqs), width), dtype=torch.bool)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = torch.tensor(s)
            mask[row, : len(s)] = False
        return ids, mask


# ---------------------------------------------------------------- teacher


_AMP = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


class BEiT3Teacher(Teacher):
    """An official BEiT-3 retrieval checkpoint behind the `Teacher` interface.

    Embeddings come back float32 on the CPU. `precision="fp16"` runs under autocast as the
    official evaluation did (CUDA); expect small differences from fp32 (tests/test_beit3.py bounds them).
    """

    kind = "beit3"

    def __init__(self, model: BEiT3Retrieval, tokenizer: BEiT3Tokenizer, name: str, checkpoint_hash: str,
                 device: str | torch.device = "cpu", precision: Precision = "fp32", attention: Attention = "eager"):
        if precision not in _AMP:
            raise UserError(f"precision must be one of {', '.join(_AMP)}, not {precision!r}")
        if attention not in ("eager", "sdpa"):
            raise UserError(f"attention must be 'eager' (torchscale's arithmetic) or 'sdpa', not {attention!r}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.dim = model.cfg.embed_dim
        self.preprocess = PreprocessConfig(size=model.cfg.img_size, resize="squash", interpolation="bicubic",
                                        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), max_tokens=tokenizer.max_tokens)
        self.checkpoint_hash = checkpoint_hash
        self.tokenizer_hash = sha256_file(tokenizer.path)
        self.precision = precision
        self.attention = attention

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", tokenizer: str | Path | None = None,
             size: str | None = None, config: BEiT3Config | None = None, precision: Precision = "fp32",
             attention: Attention = "eager", max_tokens: int = 64,
             checkpoint_hash: str | None = None) -> BEiT3Teacher:
        """Load a .pth and its beit3.spm (default: beside the .pth); `config` is for non-preset (test) models.

        `checkpoint_hash` is the .pth's sha256 when the caller has just checked it (a cached
        download); hashing a multi-GB file again would cost seconds per load.
        """
        path = Path(path)
        if path.is_dir():
            raise UserError(f"{path} is a folder: pass the BEiT-3 .pth file itself")
        spm_path = Path(tokenizer) if tokenizer is not None else path.with_name("beit3.spm")
        if not spm_path.exists():
            raise FileNotFoundError(f"BEiT-3 tokenizer {spm_path} not found: put beit3.spm beside {path.name} "
                                    "or pass tokenizer=PATH")
        model, size_name = load_checkpoint(path, size=size, config=config)
        tok = BEiT3Tokenizer(spm_path, max_tokens=max_tokens, vocab_size=model.cfg.vocab_size)
        return cls(model, tok, name=f"beit3-{size_name}", checkpoint_hash=checkpoint_hash or sha256_file(path),
                   device=device, precision=precision, attention=attention)

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = _AMP[self.precision]
        return contextlib.nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype)

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.device, torch.float32)
        with self._autocast():
            return self.model.encode_image(pixels, self.attention).float().cpu()

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            raise TypeError("encode_texts takes a list of strings, not one string")
        ids, mask = self.tokenizer(list(texts))
        with self._autocast():
            return self.model.encode_text(ids.to(self.device), mask.to(self.device), self.attention).float().cpu()

    def describe(self) -> dict:
        return {**super().describe(), "config": self.model.cfg.to_json(), "tokenizer_hash": self.tokenizer_hash}


# ---------------------------------------------------------------- the plug-in (distill/teachers/registry.py)


def load_teacher(kind: str, path: str | Path, device: str = "cpu", **options: Any) -> BEiT3Teacher:
    """The registry's loader: a .pth path or a release name (fetched once with its beit3.spm, `dsmd.hub`).

    Options are `BEiT3Teacher.load`'s: `tokenizer` (default: beit3.spm beside the .pth), `size`,
    `config` (tests), `precision`, `attention`, `max_tokens`.
    """
    from dsmd import hub

    checkpoint = hub.resolve_beit3(path)
    tokenizer = options.pop("tokenizer", None)
    if tokenizer is None and not Path(path).exists():
        tokenizer = "beit3.spm"  # the checkpoint came by name: its tokenizer too (fetched, or checked)
    if tokenizer is not None:
        tokenizer = hub.resolve_beit3(tokenizer)
    # a file that came by name was just checked against its recorded digest: not hashed again
    digest = None if Path(path).exists() else hub.recorded_digest(checkpoint)
    return BEiT3Teacher.load(checkpoint, device=device, tokenizer=tokenizer, checkpoint_hash=digest, **options)


class _ImageGraph(nn.Module):
    """The image encoder with torchscale's eager attention arithmetic (the one that traces)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels, "eager")


class _TextGraph(nn.Module):
    """The bundle runtime feeds an attention mask (1 on tokens); BEiT-3 takes a padding mask (True on padding)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids, attention_mask == 0, "eager")


def bundle_tokenizer(spm_path: str | Path, max_tokens: int) -> Any:
    """beit3.spm as a `tokenizers` tokenizer (what the bundle runtime reads): XLM-R's fairseq ids
    (<s>=0, <pad>=1, </s>=2, <unk>=3, pieces shifted by one), `<s> … </s>`, cut to max_tokens."""
    from types import SimpleNamespace

    from transformers.convert_slow_tokenizer import XLMRobertaConverter

    ids = {"<s>": 0, "</s>": 2}
    tok = XLMRobertaConverter(SimpleNamespace(vocab_file=str(spm_path), convert_tokens_to_ids=ids.__getitem__)
                              ).converted()
    tok.enable_truncation(max_tokens)
    tok.enable_padding(pad_id=1, pad_token="<pad>")
    return tok


def export_encoders(kind: str, path: str | Path, **options: Any) -> Encoders:
    """The registry's export wrapper: a checkpoint (path or name) with its sentencepiece model converted.

    The converted tokenizer must give the teacher's own ids (`BEiT3Tokenizer`) on every parity text
    and on odd spacing, else the export stops: a bundle that tokenises differently would embed
    texts the teacher never saw. (One known difference is left: the runtime reads a literal
    "<s>" or "</s>" in a query as the special token, where sentencepiece cuts it into pieces.)
    """
    from dsmd.export.encoders import Encoders
    from dsmd.export.onnx import PARITY_TEXTS, ExportError

    t = load_teacher(kind, path, **options)
    tok = bundle_tokenizer(t.tokenizer.path, t.tokenizer.max_tokens)
    for text in [*PARITY_TEXTS, "  two  spaces ", "tab\there\nand a new line", "ＦＵＬＬ width, ½ and ﬁ"]:
        if tok.encode(text).ids != t.tokenizer.encode(text):
            raise ExportError(f"{t.tokenizer.path}: the converted tokenizer gives other ids than sentencepiece on "
                              f"{text[:40]!r}; this beit3.spm cannot be exported")
    return Encoders(name=t.name, kind="beit3-teacher", image=_ImageGraph(t.model), text=_TextGraph(t.model),
                    tokenizer=tok, preprocess=t.preprocess, dim=t.dim,
                    source={"path": str(path), "weights_sha256": t.checkpoint_hash,
                            "tokenizer_sha256": t.tokenizer_hash})
