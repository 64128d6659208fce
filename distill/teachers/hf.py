"""Hugging Face CLIP and SigLIP teachers, loaded from a local folder; a Hub id is fetched into the cache first.

A folder is what `save_pretrained` (or `huggingface-cli download --local-dir`) writes:
config.json, the weights, the tokenizer files and preprocessor_config.json. `HFTeacher.load`
reads everything with `local_files_only=True`, so loading a folder never touches the network;
the plug-in functions at the end (`load_teacher`, `export_encoders`) resolve a Hub id to its
cached folder first (`dsmd.hub`).

The image preprocessing of the HF image processor is translated into a `PreprocessConfig`, so
images go through dsmd's one PIL implementation (`dsmd.preprocess.image_to_array`) like
every other model in the project. With the PIL backend of the HF processor the pixels are
identical; see `preprocess_from_hf` for the cases a `PreprocessConfig` cannot express.

Text handling follows how each family was trained:
  * CLIP: causal text tower pooled at the first EOS, so padding is irrelevant; we pad to
    the longest text in the batch and pass the attention mask.
  * SigLIP: the text tower pools the *last* position and was trained on texts padded to
    max_length with pad == eos and no attention mask (big_vision, open_clip). We therefore
    pad to max_length and pass `input_ids` only: HF's tokenizer also returns an attention
    mask, and feeding it masks the padding out and changes the embeddings.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from dsmd.artifacts import sha256_file
from dsmd.distill.teachers.base import Teacher
from dsmd.errors import UserError
from dsmd.preprocess import PreprocessConfig

if TYPE_CHECKING:
    from dsmd.export.encoders import Encoders

KINDS = ("clip", "siglip")

# PIL's integer resampling codes (what HF writes as "resample") that PreprocessConfig supports.
_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic", 4: "box"}
_PIL_RESAMPLE_NAMES = {1: "lanczos", 5: "hamming"}

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# What the HF image processor of each family does when preprocessor_config.json does not
# say otherwise (the class defaults of CLIPImageProcessor / SiglipImageProcessor).
_PROCESSOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "clip": {"resize": "shortest_crop", "resample": 3, "do_center_crop": True,
             "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD},
    "siglip": {"resize": "squash", "resample": 3, "do_center_crop": False,
               "image_mean": (0.5, 0.5, 0.5), "image_std": (0.5, 0.5, 0.5)},
}

_MAX_TOKENS = {"clip": 77, "siglip": 64}  # text max_position_embeddings defaults of the HF configs

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model", "tokenizer.model",
                    "sentencepiece.bpe.model")

# (single file, shard index) per weight format, in the order transformers prefers them.
_WEIGHT_FORMATS = (("model.safetensors", "model.safetensors.index.json"),
                   ("pytorch_model.bin", "pytorch_model.bin.index.json"))


def read_hf_config(folder: Path, kind: str) -> dict[str, Any]:
    """config.json of `folder`, checked to describe a full `kind` model (both towers)."""
    if kind not in KINDS:
        raise UserError(f"HF teacher kind must be one of {KINDS}, not {kind!r}")
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} is not a Hugging Face model folder: config.json is missing. Point the {kind} teacher at "
            f"a folder written by save_pretrained or `huggingface-cli download <repo> --local-dir <folder>`.")
    config = json.loads(path.read_text(encoding="utf-8"))
    found = config.get("model_type")
    if found != kind:
        hint = ""
        if found in KINDS:
            hint = f" It is a {found} model: load it with kind {found!r}."
        elif found in (f"{kind}_vision_model", f"{kind}_text_model"):
            hint = f" It holds only one tower; the teacher needs the full {kind} model (both towers)."
        raise UserError(f"{folder}/config.json has model_type {found!r}, but a {kind} teacher needs model_type "
                         f"{kind!r} (a full {'CLIPModel' if kind == 'clip' else 'SiglipModel'} checkpoint).{hint}")
    return config


def weight_files(folder: Path) -> list[Path]:
    """The weight files transformers will load from `folder` (safetensors first, shards included)."""
    for single, index in _WEIGHT_FORMATS:
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            shards = json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"].values()
            files = sorted({folder / name for name in shards})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(f"{folder}: {index} lists shards that are missing: {missing[:5]}")
            return files
    raise FileNotFoundError(f"{folder} has no weights: expected model.safetensors or pytorch_model.bin "
                            "(or their sharded .index.json form). Download the weights into the folder.")


def checkpoint_hash(folder: Path) -> str:
    """sha256 of the weights: of the file itself for one file (so `sha256sum` agrees), else of
    the sorted "name hash" lines of the shards."""
    files = weight_files(folder)
    if len(files) == 1:
        return sha256_file(files[0])
    lines = "".join(f"{f.name} {sha256_file(f)}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def teacher_name(folder: Path, config: dict[str, Any]) -> str:
    """A readable name: the folder name, "org/model" for a Hub cache snapshot, else config's _name_or_path."""
    folder = folder.resolve()
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent.name[len("models--"):].replace("--", "/")
    name_or_path = str(config.get("_name_or_path") or "")
    if re.fullmatch(r"[0-9a-f]{40}", folder.name) and name_or_path:  # a bare commit-hash folder says nothing
        return name_or_path
    return folder.name


def _square(value: Any, what: str, where: str) -> int:
    """A square side from an HF size field (an int, or a dict with height == width)."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict) and "height" in value and "width" in value:
        if value["height"] != value["width"]:
            raise UserError(f"{where}: {what} is {value['height']}x{value['width']}; dsmd preprocessing only "
                             "makes square images")
        return int(value["height"])
    raise UserError(f"{where}: cannot read {what} {value!r} (expected an int or {{'height', 'width'}})")


def _interpolation(resample: Any, where: str) -> str:
    """PreprocessConfig's filter name for HF's "resample" (a PIL int code, or a name)."""
    if isinstance(resample, str):
        name = resample.rsplit(".", 1)[-1].lower()
    else:
        name = _PIL_RESAMPLE.get(int(resample)) or _PIL_RESAMPLE_NAMES.get(int(resample), str(resample))
    if name not in _PIL_RESAMPLE.values():
        raise UserError(f"{where}: resample {resample!r} ({name}) is not supported by dsmd preprocessing; "
                         f"use one of {sorted(_PIL_RESAMPLE.values())} (PIL codes {sorted(_PIL_RESAMPLE)})")
    return name


def preprocess_from_hf(kind: str, processor: dict[str, Any] | None, image_size: int, max_tokens: int,
                       where: str = "preprocessor_config.json") -> PreprocessConfig:
    """Translate an HF image processor config into the project's `PreprocessConfig`.

    `processor` is the parsed preprocessor_config.json (None: the family's HF defaults at the
    model's `image_size`). Raises ValueError for pipelines a PreprocessConfig cannot express
    (resize to one size then crop to a smaller one, non-square output, no resize, odd
    rescaling) rather than silently preprocess differently from the processor.
    """
    defaults = _PROCESSOR_DEFAULTS[kind]
    p = dict(processor or {})
    if not p.get("do_resize", True):
        raise UserError(f"{where}: do_resize is false; dsmd always resizes images to the model's input size")

    size = p.get("size", image_size)
    if isinstance(size, dict) and "shortest_edge" in size:
        resize, side = "shortest_crop", int(size["shortest_edge"])
    elif isinstance(size, dict):
        resize, side = "squash", _square(size, "size", where)
    else:  # a bare int: legacy configs; CLIP means the shortest edge, SigLIP the square side
        resize, side = defaults["resize"], _square(size, "size", where)

    if p.get("do_center_crop", defaults["do_center_crop"]):
        crop = _square(p.get("crop_size", side), "crop_size", where)
        if crop != side:
            raise UserError(f"{where}: resizes to {side} px and then centre-crops {crop} px; dsmd preprocessing "
                             f"can only crop to the resize size. Use a processor config with size == crop_size.")
    elif resize == "shortest_crop":
        raise UserError(f"{where}: resizes the shortest edge to {side} px without a centre crop, which gives "
                         "non-square images; dsmd preprocessing needs square model input")
    if side != image_size:
        raise UserError(f"{where} makes {side} px images but the model was built for {image_size} px "
                         "(vision_config.image_size); fix the processor config")

    if p.get("do_rescale", True) is False or abs(float(p.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-8:
        raise UserError(f"{where}: dsmd preprocessing scales pixels to [0, 1] (rescale_factor 1/255); this "
                         f"config has do_rescale={p.get('do_rescale')} rescale_factor={p.get('rescale_factor')}")
    if p.get("do_normalize", True):
        # Early SigLIP processor configs spelled these "mean" / "std".
        mean = p.get("image_mean", p.get("mean", defaults["image_mean"]))
        std = p.get("image_std", p.get("std", defaults["image_std"]))
        if isinstance(mean, (int, float)):
            mean = (mean,) * 3
        if isinstance(std, (int, float)):
            std = (std,) * 3
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if len(mean) != 3 or len(std) != 3:
        raise UserError(f"{where}: image_mean / image_std must have 3 values (RGB), got {mean} / {std}")

    interpolation = _interpolation(p.get("resample", defaults["resample"]), where)
    return PreprocessConfig(size=side, resize=resize, interpolation=interpolation, mean=tuple(mean), std=tuple(std),
                            max_tokens=int(max_tokens))


def _pooled(output: Any) -> torch.Tensor:
    """The embedding from get_*_features, across transformers versions.

    transformers v4 returns the projected embedding as a tensor; v5 returns a
    BaseModelOutputWithPooling whose `pooler_output` is the projected embedding (or its
    `to_tuple()`, (last_hidden_state, pooler_output, ...), when return_dict is off).
    """
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None and isinstance(output, (tuple, list)) and len(output) > 1:
        pooled = output[1]
    if not isinstance(pooled, torch.Tensor):
        raise TypeError(f"cannot find the embedding in a {type(output).__name__} returned by the model")
    return pooled


class HFTeacher(Teacher):
    """A Hugging Face CLIPModel / SiglipModel behind the `Teacher` interface (float32, eval)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, kind: str, name: str, dim: int,
                 preprocess: PreprocessConfig, checkpoint_hash: str):
        self.model = model
        self.tokenizer = tokenizer
        self.kind = kind
        self.name = name
        self.dim = dim
        self.preprocess = preprocess
        self.checkpoint_hash = checkpoint_hash
        self.device = next(model.parameters()).device

    @classmethod
    def load(cls, folder: str | Path, kind: str, device: str | torch.device = "cpu") -> HFTeacher:
        """Load a CLIP or SigLIP folder offline; errors say which file is wrong and what to do."""
        from transformers import AutoTokenizer, CLIPModel, SiglipModel

        folder = Path(folder)
        if not folder.is_dir():
            raise UserError(f"a {kind} teacher is a Hugging Face model folder; {folder} is not a folder")
        config = read_hf_config(folder, kind)
        files = weight_files(folder)  # fail on missing weights before the slow model build
        if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
            raise FileNotFoundError(
                f"{folder} has no tokenizer files (looked for {', '.join(_TOKENIZER_FILES)}). Copy the tokenizer of "
                f"the model's Hub repo into it, e.g. `huggingface-cli download <repo> --local-dir {folder}`.")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:  # transformers raises many types here; re-raise with the folder and a hint
            raise UserError(f"{folder}: could not load the {kind} tokenizer ({type(e).__name__}: {e}). Check "
                               "the tokenizer files are complete; SigLIP's spiece.model needs sentencepiece and "
                               "protobuf installed.") from e

        # Preprocessing is checked before the (slow) model build. The HF config defaults are
        # those of CLIPConfig / SiglipConfig for keys a config.json leaves out.
        max_tokens = int((config.get("text_config") or {}).get("max_position_embeddings", _MAX_TOKENS[kind]))
        if 0 < getattr(tokenizer, "model_max_length", max_tokens) < max_tokens:
            max_tokens = int(tokenizer.model_max_length)
        image_size = (config.get("vision_config") or {}).get("image_size", 224)
        if isinstance(image_size, (list, tuple)):  # v5 configs may store (height, width)
            image_size = _square({"height": image_size[0], "width": image_size[-1]}, "image_size", str(folder))
        proc_path = folder / "preprocessor_config.json"
        processor = json.loads(proc_path.read_text(encoding="utf-8")) if proc_path.is_file() else None
        preprocess = preprocess_from_hf(kind, processor, int(image_size), max_tokens, where=str(proc_path))

        model_cls = CLIPModel if kind == "clip" else SiglipModel
        model, info = model_cls.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32,
                                                output_loading_info=True)
        missing = sorted(info.get("missing_keys") or [])
        if missing:
            raise UserError(f"{folder}: the weights in {[f.name for f in files]} lack {len(missing)} tensors of "
                             f"the {model_cls.__name__} (e.g. {missing[:3]}); they would be random. Is this a "
                             "complete checkpoint?")
        model = model.to(device).eval().requires_grad_(False)

        text_cfg, vision_cfg = model.config.text_config, model.config.vision_config
        if kind == "clip":
            dim = int(model.config.projection_dim)
        else:
            if not getattr(vision_cfg, "vision_use_head", True):
                raise UserError(f"{folder}: this SigLIP vision tower has no pooling head (vision_use_head=false), "
                                 "so it has no image embedding")
            dim = int(vision_cfg.hidden_size)
            text_dim = int(getattr(text_cfg, "projection_size", None) or text_cfg.hidden_size)
            if text_dim != dim:
                raise UserError(f"{folder}: SigLIP image embeddings have {dim} dims but text embeddings "
                                 f"{text_dim}; they must match")

        return cls(model, tokenizer, kind=kind, name=teacher_name(folder, config), dim=dim, preprocess=preprocess,
                   checkpoint_hash=checkpoint_hash(folder))

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be (B, 3, H, W), got {tuple(pixels.shape)}")
        output = self.model.get_image_features(pixel_values=pixels.to(self.device, torch.float32))
        return self._normalised(_pooled(output), len(pixels))

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            raise TypeError("encode_texts takes a list of strings, not one string")
        texts = list(texts)
        if not texts:
            return torch.zeros(0, self.dim)
        if self.kind == "siglip":  # trained padded to max_length, pad == eos, no mask (module docstring)
            enc = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.preprocess.max_tokens,
                                 return_tensors="pt")
            inputs = {"input_ids": enc["input_ids"].to(self.device)}
        else:
            enc = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.preprocess.max_tokens,
                                 return_tensors="pt")
            inputs = {"input_ids": enc["input_ids"].to(self.device),
                      "attention_mask": enc["attention_mask"].to(self.device)}
        return self._normalised(_pooled(self.model.get_text_features(**inputs)), len(texts))

    def _normalised(self, emb: torch.Tensor, batch: int) -> torch.Tensor:
        if emb.shape != (batch, self.dim):
            raise RuntimeError(f"{self.name}: expected ({batch}, {self.dim}) embeddings, got {tuple(emb.shape)}")
        return F.normalize(emb.float(), dim=-1).cpu()


# ---------------------------------------------------------------- the plug-in (distill/teachers/registry.py)


def load_teacher(kind: str, path: str | Path, device: str = "cpu", **options: Any) -> HFTeacher:
    """The registry's loader for clip and siglip: a local folder or a Hub id (fetched once, `dsmd.hub`)."""
    from dsmd import hub

    return HFTeacher.load(hub.resolve_hf(path, what=f"{kind} teacher"), kind=kind, device=device)


class _ImageFeatures(torch.nn.Module):
    """get_image_features, pooled and L2-normalised, as one traceable module (the bundle's image graph)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(_pooled(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)


class _TextFeatures(torch.nn.Module):
    """get_text_features with the mask (CLIP) or ids only (SigLIP, as trained), pooled and L2-normalised."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        inputs = {"input_ids": input_ids} if attention_mask is None else {"input_ids": input_ids,
                                                                           "attention_mask": attention_mask}
        return F.normalize(_pooled(self.model.get_text_features(**inputs)).float(), dim=-1)


def export_encoders(kind: str, path: str | Path, **options: Any) -> Encoders:
    """The registry's export wrapper, tokenised as the family was trained (module docstring): CLIP pads
    to the longest text and takes the mask; SigLIP pads to max length, ids only."""
    from dsmd import hub
    from dsmd.export.encoders import Encoders

    path = hub.resolve_hf(path, what=f"{kind} teacher")
    t = HFTeacher.load(path, kind)
    hf_tok = t.tokenizer
    if not getattr(hf_tok, "is_fast", False):
        raise UserError(f"{path}: the bundle runtime tokenises with the `tokenizers` library and this folder has no "
                        f"tokenizer.json (SigLIP ships only spiece.model, which transformers cannot convert); "
                        f"add a tokenizer.json to export it")
    tok = hf_tok.backend_tokenizer
    tok.enable_truncation(t.preprocess.max_tokens)
    pad_id = hf_tok.pad_token_id if hf_tok.pad_token_id is not None else 0
    pad_token = hf_tok.pad_token or hf_tok.convert_ids_to_tokens(pad_id)
    if kind == "siglip":
        tok.enable_padding(pad_id=pad_id, pad_token=pad_token, length=t.preprocess.max_tokens)
    else:
        tok.enable_padding(pad_id=pad_id, pad_token=pad_token)
    return Encoders(name=t.name, kind=f"{kind}-teacher", image=_ImageFeatures(t.model), text=_TextFeatures(t.model),
                    tokenizer=tok, preprocess=t.preprocess, dim=t.dim,
                    source={"path": str(path), "weights_sha256": t.checkpoint_hash},
                    text_inputs=("input_ids",) if kind == "siglip" else ("input_ids", "attention_mask"))
