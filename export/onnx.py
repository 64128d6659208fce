"""Export a student (or the demo teacher) to an encoder bundle, and prove the bundle right.

`export_student(checkpoint, out)` writes the image and text encoders as two ONNX graphs
(TorchScript exporter, opset 17: torch 2.14's default dynamo exporter needs onnxscript),
with dynamic batch and sequence length and L2-normalised outputs, beside the tokenizer and
the preprocessing spec. Before the manifest is written (last), the bundle is checked:

  parity   ONNX Runtime vs PyTorch embeddings of images of several sizes and modes and of
           texts from empty to over-long: cosine >= 0.9999 in fp32
  recall   on the val split (when a data set is given): RSUM through ONNX Runtime within 0.1
           of RSUM through PyTorch
  variants INT8 (dynamic quantisation, per-channel) and fp16 (weights and activations; fp32
           inputs and outputs) are shipped only if their RSUM drop stays within `max_drop`;
           a refused variant is recorded with its numbers

A bundle that fails parity or recall is not written (no manifest), with the numbers in the error.
"""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from dsmd.artifacts import recover_dir, replace_dir, sha256_file, versions, write_json
from dsmd.bundle import BUNDLE_FORMAT, Bundle, RuntimeOptions
from dsmd.datasets import Item, load_dataset
from dsmd.errors import UserError
from dsmd.images import open_image
from dsmd.preprocess import PreprocessCfg, image_to_array
from dsmd.retrieval import Recall, evaluate


class ExportError(UserError):
    """The exported graphs do not reproduce the PyTorch model closely enough."""


@dataclass
class ExportCfg:
    opset: int = 17
    variants: tuple[str, ...] = ("int8",)  # int8 and/or fp16, each shipped only if it keeps recall
    max_drop: float = 2.0  # largest RSUM loss (points of 600) a variant may cost
    min_cosine: float = 0.9999  # fp32 parity threshold
    recall_tolerance: float = 0.1  # fp32 |RSUM(ONNX) - RSUM(PyTorch)|
    split: str = "val"
    threads: int = 0


class _ImageEncoder(nn.Module):
    """The image half of a dual encoder as its own module (one ONNX graph)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)


class _TextEncoder(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids, attention_mask)


@dataclass
class Encoders:
    """What export needs of a model: its two encoders (modules holding the weights), tokenizer and spec."""

    name: str
    kind: str  # student | demo-teacher
    image: nn.Module  # pixels -> unit rows
    text: nn.Module  # (input_ids, attention_mask) -> unit rows
    tokenizer: object  # tokenizers.Tokenizer with truncation and padding configured
    preprocess: PreprocessCfg
    dim: int
    source: dict
    text_inputs: tuple[str, ...] = ("input_ids", "attention_mask")


def student_encoders(path: str | Path) -> Encoders:
    from dsmd.distill.checkpoint import resolve_student
    from dsmd.distill.student import load_student

    path = resolve_student(path)
    model, tok = load_student(path)
    return model_encoders(model, tok, source={"path": str(path), "config": model.cfg.to_json(),
                                              "weights_sha256": sha256_file(path / "model.safetensors")})


def model_encoders(model, tok, source: dict | None = None) -> Encoders:
    """Encoders of an in-memory student (benchmarks export random-weight presets this way)."""
    return Encoders(name=f"student-{model.cfg.preset}", kind="student", image=_ImageEncoder(model),
                    text=_TextEncoder(model), tokenizer=tok, preprocess=model.cfg.preprocess(), dim=model.cfg.dim,
                    source=source or {"config": model.cfg.to_json()})


def demo_teacher_encoders(path: str | Path) -> Encoders:
    from dsmd.distill.teachers.demo import DemoTeacher

    t = DemoTeacher.load(path)
    return Encoders(name=t.name, kind="demo-teacher", image=_ImageEncoder(t.model),
                    text=_TextEncoder(t.model), tokenizer=t.tokenizer, preprocess=t.preprocess,
                    dim=t.dim, source={"path": str(path), "weights_sha256": t.checkpoint_hash})


class _HFImage(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        from dsmd.distill.teachers.hf import _pooled

        return torch.nn.functional.normalize(_pooled(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)


class _HFText(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        from dsmd.distill.teachers.hf import _pooled

        inputs = {"input_ids": input_ids} if attention_mask is None else {"input_ids": input_ids,
                                                                           "attention_mask": attention_mask}
        return torch.nn.functional.normalize(_pooled(self.model.get_text_features(**inputs)).float(), dim=-1)


def hf_teacher_encoders(kind: str, path: str | Path) -> Encoders:
    """A Hugging Face CLIP or SigLIP teacher, tokenised as it was trained (see distill/teachers/hf.py):
    CLIP pads to the longest text and takes the mask; SigLIP pads to max length, ids only."""
    from dsmd.distill.teachers.hf import HFTeacher

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
    return Encoders(name=t.name, kind=f"{kind}-teacher", image=_HFImage(t.model), text=_HFText(t.model),
                    tokenizer=tok, preprocess=t.preprocess, dim=t.dim,
                    source={"path": str(path), "weights_sha256": t.checkpoint_hash},
                    text_inputs=("input_ids",) if kind == "siglip" else ("input_ids", "attention_mask"))


class _BEiT3Image(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels, "eager")


class _BEiT3Text(nn.Module):
    """The bundle runtime feeds an attention mask (1 on tokens); BEiT-3 takes a padding mask (True on padding)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids, attention_mask == 0, "eager")


def beit3_tokenizer(spm_path: str | Path, max_tokens: int):
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


def beit3_teacher_encoders(path: str | Path, tokenizer: str | Path | None = None, config=None) -> Encoders:
    """A BEiT-3 retrieval checkpoint (path or name) with its sentencepiece model converted for the bundle.

    The converted tokenizer must give the teacher's own ids (`BEiT3Tokenizer`) on every parity text
    and on odd spacing, else the export stops: a bundle that tokenises differently would embed
    texts the teacher never saw. (One known difference is left: the runtime reads a literal
    "<s>" or "</s>" in a query as the special token, where sentencepiece cuts it into pieces.)
    """
    from dsmd.distill.teachers import load_teacher

    options = {k: v for k, v in (("tokenizer", tokenizer), ("config", config)) if v is not None}
    t = load_teacher("beit3", path, **options)
    tok = beit3_tokenizer(t.tokenizer.path, t.tokenizer.max_tokens)
    for text in [*PARITY_TEXTS, "  two  spaces ", "tab\there\nand a new line", "ＦＵＬＬ width, ½ and ﬁ"]:
        if tok.encode(text).ids != t.tokenizer.encode(text):
            raise ExportError(f"{t.tokenizer.path}: the converted tokenizer gives other ids than sentencepiece on "
                              f"{text[:40]!r}; this beit3.spm cannot be exported")
    return Encoders(name=t.name, kind="beit3-teacher", image=_BEiT3Image(t.model), text=_BEiT3Text(t.model),
                    tokenizer=tok, preprocess=t.preprocess, dim=t.dim,
                    source={"path": str(path), "weights_sha256": t.checkpoint_hash,
                            "tokenizer_sha256": t.tokenizer_hash})


def teacher_encoders(kind: str, path: str | Path, **options) -> Encoders:
    """The teachers that fit a bundle: the demo teacher, CLIP, SigLIP and BEiT-3 (path or name).

    BEiT-3 takes `tokenizer` (beit3.spm; default: beside the checkpoint) and `config` (tests).
    """
    if kind == "demo":
        return demo_teacher_encoders(path)
    if kind in ("clip", "siglip"):
        from dsmd import hub

        return hf_teacher_encoders(kind, hub.resolve_hf(path, what=f"{kind} teacher"))
    if kind == "beit3":
        return beit3_teacher_encoders(path, **options)
    raise UserError(f"teacher kind {kind!r} cannot be exported: choose demo, clip, siglip or beit3")


# ---------------------------------------------------------------- parity inputs


def parity_images(items: list[Item] = ()) -> list[Image.Image]:
    """Images of different sizes and modes (and some of the data set's), as users will send."""
    rng = np.random.default_rng(0)
    noise = lambda h, w, c: rng.integers(0, 256, (h, w, c) if c > 1 else (h, w), dtype=np.uint8)  # noqa: E731
    imgs = [Image.fromarray(noise(61, 97, 3)), Image.fromarray(noise(40, 40, 1), "L"),
            Image.fromarray(noise(64, 64, 4), "RGBA"), Image.fromarray(noise(300, 20, 3)),
            Image.fromarray(noise(30, 90, 3)).convert("P"), Image.new("RGB", (512, 384), (250, 250, 250))]
    return imgs + [open_image(it.path) for it in list(items)[:10]]


PARITY_TEXTS = ["", "a", "a red circle left of a blue square", "A SMALL Green Triangle, above: a big star!",
                "naïve café ☃ 東京", " ".join(["a big blue square left of a small red circle"] * 40)]


def _text_args(enc: Encoders, texts: list[str]) -> tuple[torch.Tensor, ...]:
    out = enc.tokenizer.encode_batch(list(texts))
    cols = {"input_ids": torch.tensor([e.ids for e in out]),
            "attention_mask": torch.tensor([e.attention_mask for e in out])}
    return tuple(cols[n] for n in enc.text_inputs)


def _torch_text(enc: Encoders, texts: list[str]) -> np.ndarray:
    with torch.no_grad():
        return enc.text(*_text_args(enc, texts)).float().numpy()


def _torch_pixels(enc: Encoders, pixels: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return enc.image(torch.from_numpy(pixels)).float().numpy()


def _min_cos(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(1).min())


# ---------------------------------------------------------------- the export


def export_graphs(enc: Encoders, folder: Path, opset: int) -> None:
    size = enc.preprocess.size
    pixels = torch.randn(2, 3, size, size)
    text_args = _text_args(enc, ["a red circle left of a blue square", "two"])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
        torch.onnx.export(enc.image.eval(), (pixels,), str(folder / "image.onnx"), dynamo=False, opset_version=opset,
                          input_names=["pixels"], output_names=["embedding"],
                          dynamic_axes={"pixels": {0: "batch"}, "embedding": {0: "batch"}})
        torch.onnx.export(enc.text.eval(), text_args, str(folder / "text.onnx"), dynamo=False, opset_version=opset,
                          input_names=list(enc.text_inputs), output_names=["embedding"],
                          dynamic_axes={**{n: {0: "batch", 1: "tokens"} for n in enc.text_inputs},
                                        "embedding": {0: "batch"}})


def _recall(items: list[Item], transform, encode_pixels, encode_texts, batch: int = 128) -> Recall:
    """Recall of a split through any pair of encoders (PyTorch's or a bundle's)."""
    img = np.concatenate([encode_pixels(np.stack([transform(open_image(it.path)) for it in items[i:i + batch]]))
                          for i in range(0, len(items), batch)])
    caps = [c for it in items for c in it.captions]
    txt = np.concatenate([encode_texts(caps[i:i + batch]) for i in range(0, len(caps), batch)])
    owner = np.array([i for i, it in enumerate(items) for _ in it.captions])
    return evaluate(img, txt, owner)


def _bundle_recall(b: Bundle, items: list[Item]) -> Recall:
    return _recall(items, b.transform, b.encode_pixels, b.encode_texts)


def _torch_recall(enc: Encoders, items: list[Item]) -> Recall:
    return _recall(items, lambda im: image_to_array(im, enc.preprocess), lambda x: _torch_pixels(enc, x),
                   lambda t: _torch_text(enc, t))


def export(enc: Encoders, out: str | Path, data: str | Path | None = None, images: str | None = None,
           cfg: ExportCfg | None = None, log=print) -> dict:
    """Write, check and describe a bundle of `enc` at `out`; returns its manifest."""
    cfg = cfg or ExportCfg()
    out = Path(out)
    t0 = time.time()
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    enc.image.eval()
    enc.text.eval()
    export_graphs(enc, tmp, cfg.opset)
    enc.tokenizer.save(str(tmp / "tokenizer.json"))
    figures: dict = {}
    items: list[Item] = []
    if data is not None:
        items = load_dataset(data, images=images).split(cfg.split)
        if not items:
            raise UserError(f"{data} has no {cfg.split} split to check the bundle's recall on")

    # provisional manifest so the runtime can open the folder for the checks
    manifest = {"artifact": "bundle", "format": BUNDLE_FORMAT, "name": enc.name, "kind": enc.kind, "dim": enc.dim,
                "preprocess": enc.preprocess.to_json(), "files": {},
                "variants": {"fp32": {"files": {"image": "image.onnx", "text": "text.onnx"}}}}
    write_json(tmp / "manifest.json", manifest)
    opts = RuntimeOptions(threads=cfg.threads)
    b = Bundle(tmp, options=opts)

    # parity on awkward inputs
    pix = np.stack([image_to_array(im, enc.preprocess) for im in parity_images(items)])
    cos_img = _min_cos(_torch_pixels(enc, pix), b.encode_pixels(pix))
    cos_txt = _min_cos(_torch_text(enc, PARITY_TEXTS), b.encode_texts(PARITY_TEXTS))
    figures["parity"] = {"min_cosine_image": cos_img, "min_cosine_text": cos_txt, "images": len(pix),
                         "texts": len(PARITY_TEXTS)}
    log(f"parity ONNX vs PyTorch: min cosine image {cos_img:.6f}, text {cos_txt:.6f}")
    if not (cos_img >= cfg.min_cosine and cos_txt >= cfg.min_cosine):  # NaN fails too
        raise ExportError(f"ONNX and PyTorch embeddings differ: min cosine image {cos_img:.6f}, text {cos_txt:.6f} "
                          f"(need >= {cfg.min_cosine}); the bundle was not written")

    if items:
        r_torch, r_onnx = _torch_recall(enc, items), _bundle_recall(b, items)
        figures["recall"] = {"split": cfg.split, "torch": r_torch.to_json(), "fp32": r_onnx.to_json()}
        log(f"{cfg.split} RSUM: PyTorch {r_torch.rsum:.2f}, ONNX fp32 {r_onnx.rsum:.2f}")
        if not abs(r_torch.rsum - r_onnx.rsum) <= cfg.recall_tolerance:  # NaN fails too
            raise ExportError(f"ONNX recall differs from PyTorch: RSUM {r_onnx.rsum:.2f} vs {r_torch.rsum:.2f} "
                              f"(tolerance {cfg.recall_tolerance}); the bundle was not written")
        for name in cfg.variants:
            _variant(tmp, name, manifest, items, r_onnx, cfg, opts, log)
    elif cfg.variants:
        log(f"no data set given: variants {', '.join(cfg.variants)} not built (their recall could not be checked)")
        figures["variants"] = "not built: no data set to check their recall"

    manifest["files"] = {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.name != "manifest.json"}
    manifest.update({"figures": figures, "provenance": {"source": enc.source, "opset": cfg.opset,
                                                         "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                                         "seconds": round(time.time() - t0, 1),
                                                         "versions": versions(), "export_cfg": asdict(cfg)}})
    write_json(tmp / "manifest.json", manifest)
    recover_dir(out)  # an earlier export killed mid-swap
    replace_dir(tmp, out)  # never no bundle at all
    return manifest


def _build_variant(folder: Path, name: str) -> dict[str, str]:
    """Write the variant's two graphs next to the fp32 ones; returns their file names."""
    files = {"image": f"image.{name}.onnx", "text": f"text.{name}.onnx"}
    for part in ("image", "text"):
        src, dst = folder / f"{part}.onnx", folder / files[part]
        if name == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            logging.getLogger().setLevel(logging.ERROR)  # the quantiser logs advice through the root logger
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True)
        else:  # fp16 weights and activations, fp32 inputs and outputs
            import onnx
            from onnxruntime.transformers.float16 import convert_float_to_float16

            onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(dst))
    return files


def _variant(folder: Path, name: str, manifest: dict, items, r_fp32: Recall, cfg: ExportCfg, opts, log) -> None:
    """Build a variant, measure its recall, and keep it (in manifest["variants"]) or refuse it."""
    files = _build_variant(folder, name)
    manifest["variants"][name] = {"files": files}
    write_json(folder / "manifest.json", manifest)
    r = _bundle_recall(Bundle(folder, name, opts), items)
    drop = r_fp32.rsum - r.rsum
    info = {"files": files, "recall": r.to_json(), "rsum_change": round(-drop, 2), "max_drop": cfg.max_drop}
    if not drop <= cfg.max_drop:  # NaN is refused too
        log(f"{name} refused: {cfg.split} RSUM {r.rsum:.2f}, {drop:.2f} below fp32 (max drop {cfg.max_drop})")
        for f in files.values():
            (folder / f).unlink()
        del manifest["variants"][name]
        manifest.setdefault("refused", {})[name] = {k: v for k, v in info.items() if k != "files"}
    else:
        log(f"{name} kept: {cfg.split} RSUM {r.rsum:.2f} ({-drop:+.2f} vs fp32)")
        manifest["variants"][name] = info
