"""The BEiT-3 retrieval model, our own implementation of the official architecture.

BEiT-3 (microsoft/unilm `beit3/`, built on torchscale) is one Multiway Transformer: every
layer has a vision expert (`A`) and a language expert (`B`) for its projections, FFN and
LayerNorms, while the token mixing is shared. A retrieval model runs each modality alone,
so here a forward pass simply picks one expert per module — no global split position.

The module tree, and so the state-dict keys, mirror the official checkpoint exactly
(`beit3.*`, `vision_head.weight`, `language_head.weight`, `logit_scale`), and the arithmetic
follows torchscale 0.3.0 step by step: pre-LN with sub-LN, exact GELU in fp32, q scaled
after its bias, softmax in fp32, positions `arange(2, T + 2)`. `tests/test_beit3.py` proves
the match against torchscale on a tiny config with every tensor random. Loading, the
tokenizer and the teacher plug-in are in `beit3.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from dsmd.errors import UserError

Modality = Literal["vision", "text"]
Precision = Literal["fp32", "fp16", "bf16"]
Attention = Literal["eager", "sdpa"]



# ---------------------------------------------------------------- config


@dataclass(frozen=True)
class BEiT3Config:
    """Architecture of a BEiT-3 retrieval model (unilm's `_get_base_config` / `_get_large_config`)."""

    embed_dim: int = 768
    depth: int = 12
    heads: int = 12
    ffn_dim: int = 3072
    img_size: int = 384  # the model only takes images of exactly this side
    patch_size: int = 16
    in_chans: int = 3
    vocab_size: int = 64010  # beit3.spm pieces + fairseq offset, padded
    max_text_positions: int = 1024  # rows of `embed_positions.B`
    layernorm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.embed_dim % self.heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by heads {self.heads}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def vision_positions(self) -> int:
        """Rows of `embed_positions.A`: patches + CLS + the 2 rows fairseq's offset skips."""
        return self.num_patches + 3

    @classmethod
    def base(cls, **overrides) -> BEiT3Config:
        return replace(cls(), **overrides)

    @classmethod
    def large(cls, **overrides) -> BEiT3Config:
        return replace(cls(embed_dim=1024, depth=24, heads=16, ffn_dim=4096), **overrides)

    @classmethod
    def tiny(cls, **overrides) -> BEiT3Config:
        """A few-thousand-parameter model for tests (random weights only)."""
        small = cls(embed_dim=64, depth=2, heads=4, ffn_dim=256, img_size=32, patch_size=16, vocab_size=128,
                    max_text_positions=96)
        return replace(small, **overrides)

    def to_json(self) -> dict:
        return asdict(self)


PRESETS: dict[str, BEiT3Config] = {"base": BEiT3Config.base(), "large": BEiT3Config.large()}


# ---------------------------------------------------------------- model


class Multiway(nn.Module):
    """A pair of experts: `A` runs on vision tokens, `B` on language tokens."""

    def __init__(self, a: nn.Module, b: nn.Module) -> None:
        super().__init__()
        self.A = a
        self.B = b

    @classmethod
    def twin(cls, make: Callable[[], nn.Module]) -> Multiway:
        return cls(make(), make())

    def pick(self, modality: Modality) -> nn.Module:
        return self.A if modality == "vision" else self.B


def _layer_norm(cfg: BEiT3Config) -> Multiway:
    return Multiway.twin(lambda: nn.LayerNorm(cfg.embed_dim, eps=cfg.layernorm_eps))


def _linear(cfg: BEiT3Config) -> Multiway:
    return Multiway.twin(lambda: nn.Linear(cfg.embed_dim, cfg.embed_dim))


class SelfAttention(nn.Module):
    """Multi-head self-attention with per-modality projections and a sub-LN before `out_proj`."""

    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.head_dim = cfg.embed_dim // cfg.heads
        self.scaling = self.head_dim**-0.5
        self.k_proj, self.v_proj, self.q_proj, self.out_proj = (_linear(cfg) for _ in range(4))
        self.inner_attn_ln = _layer_norm(cfg)

    def forward(self, x: torch.Tensor, modality: Modality, padding_mask: torch.Tensor | None = None,
                attention: Attention = "eager") -> torch.Tensor:
        """x: (B, T, D); padding_mask: (B, T), True where a key is padding."""
        b, t, d = x.shape
        q = self.q_proj.pick(modality)(x) * self.scaling  # scaled after the bias, as torchscale
        k = self.k_proj.pick(modality)(x)
        v = self.v_proj.pick(modality)(x)
        q, k, v = (z.view(b, t, self.heads, self.head_dim).transpose(1, 2) for z in (q, k, v))
        if attention == "sdpa":
            keep = None if padding_mask is None else ~padding_mask[:, None, None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=1.0)
        else:
            logits = q @ k.transpose(-1, -2)
            if padding_mask is not None:
                logits = logits.masked_fill(padding_mask[:, None, None, :], float("-inf"))
            out = F.softmax(logits, dim=-1, dtype=torch.float32).type_as(logits) @ v
        out = out.transpose(1, 2).reshape(b, t, d)
        return self.out_proj.pick(modality)(self.inner_attn_ln.pick(modality)(out))


class FeedForward(nn.Module):
    """fc1 → exact GELU (in fp32) → sub-LN → fc2; one whole copy per modality."""

    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.embed_dim)
        self.ffn_layernorm = nn.LayerNorm(cfg.ffn_dim, eps=cfg.layernorm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = F.gelu(h.float()).type_as(h)
        return self.fc2(self.ffn_layernorm(h))


class EncoderLayer(nn.Module):
    """Pre-LN block: x + attn(LN(x)), then x + ffn(LN(x)); no layer-scale, no drop-path at inference."""

    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        self.self_attn = SelfAttention(cfg)
        self.self_attn_layer_norm = _layer_norm(cfg)
        self.ffn = Multiway.twin(lambda: FeedForward(cfg))  # the expert sits *outside* the FFN: ffn.A.fc1
        self.final_layer_norm = _layer_norm(cfg)

    def forward(self, x: torch.Tensor, modality: Modality, padding_mask: torch.Tensor | None = None,
                attention: Attention = "eager") -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm.pick(modality)(x), modality, padding_mask, attention)
        return x + self.ffn.pick(modality)(self.final_layer_norm.pick(modality)(x))


class Encoder(nn.Module):
    """The shared stack: learned positions per modality, the layers and a final LN per modality."""

    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        self.embed_positions = Multiway(nn.Embedding(cfg.vision_positions, cfg.embed_dim),
                                        nn.Embedding(cfg.max_text_positions, cfg.embed_dim))
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.depth))
        self.layer_norm = _layer_norm(cfg)


class VisionEmbed(nn.Module):
    """16x16 patches by a strided conv, with a CLS token in front (`mask_token` is kept for the keys only)."""

    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        self.img_size = cfg.img_size
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))  # used in pre-training only
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.proj(pixels).flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)


class BEiT3(nn.Module):
    """The backbone, named as torchscale's `BEiT3` so its keys are the checkpoint's `beit3.*`."""

    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        self.text_embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.vision_embed = VisionEmbed(cfg)
        self.encoder = Encoder(cfg)

    def forward(self, x: torch.Tensor, modality: Modality, padding_mask: torch.Tensor | None = None,
                attention: Attention = "eager") -> torch.Tensor:
        """Token embeddings (B, T, D) → final-LN features of the first token (B, D)."""
        enc = self.encoder
        positions = torch.arange(2, x.shape[1] + 2, device=x.device)  # fairseq's offset, whatever the padding
        x = x + enc.embed_positions.pick(modality)(positions)[None]
        if padding_mask is not None:
            x = x * (1 - padding_mask.unsqueeze(-1).type_as(x))
        for layer in enc.layers:
            x = layer(x, modality, padding_mask, attention)
        return enc.layer_norm.pick(modality)(x[:, 0])  # LN is per token: only CLS is needed


class BEiT3Retrieval(nn.Module):
    """BEiT-3 for image-text retrieval: CLS → bias-free head → L2 normalisation, per modality."""

    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.beit3 = BEiT3(cfg)
        self.vision_head = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=False)
        self.language_head = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(0.0))  # stored log scale; retrieval ignores it

    @classmethod
    def random(cls, cfg: BEiT3Config, seed: int = 0, std: float = 0.2) -> BEiT3Retrieval:
        """A model with every tensor random (LN weights around 1), so that no key can go unnoticed in tests."""
        model = cls(cfg)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                noise = torch.randn(p.shape, generator=gen) * std
                p.copy_(noise + 1.0 if _is_norm_weight(name) else noise)
        return model.eval()

    def encode_image(self, pixels: torch.Tensor, attention: Attention = "eager") -> torch.Tensor:
        """(B, 3, S, S) normalised pixels → (B, D) unit vectors (float32)."""
        size = self.cfg.img_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (self.cfg.in_chans, size, size):
            raise UserError(f"BEiT-3 takes images of exactly ({self.cfg.in_chans}, {size}, {size}), got "
                             f"{tuple(pixels.shape)}: prepare them with the teacher's transform "
                             f"(PreprocessConfig(size={size}, resize='squash'))")
        x = self.beit3.vision_embed(pixels)
        return self._embed(self.vision_head(self.beit3(x, "vision", None, attention)))

    def encode_text(self, ids: torch.Tensor, padding_mask: torch.Tensor, attention: Attention = "eager"
                    ) -> torch.Tensor:
        """ids (B, T) starting with <s>, padding_mask (B, T) True on padding → (B, D) unit vectors."""
        if ids.shape[1] + 2 > self.cfg.max_text_positions:
            raise UserError(f"texts of {ids.shape[1]} tokens exceed BEiT-3's {self.cfg.max_text_positions - 2}")
        padding_mask = padding_mask.to(device=ids.device, dtype=torch.bool)
        x = self.beit3.text_embed(ids)
        return self._embed(self.language_head(self.beit3(x, "text", padding_mask, attention)))

    @staticmethod
    def _embed(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.float(), dim=-1)

    def save_official(self, path: str | Path) -> None:
        """Write `{"model": state_dict}` exactly as the official checkpoints are laid out."""
        torch.save({"model": {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}}, Path(path))


def _is_norm_weight(name: str) -> bool:
    return name.endswith(".weight") and any(s in name for s in ("layer_norm", "inner_attn_ln", "ffn_layernorm"))
