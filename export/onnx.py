"""Export an encoder bundle and prove it right: the generic machinery behind `dsmd export`.

`export(encoders, out, data=None)` takes the `Encoders` of any model (`encoders.py`:
`student_encoders(checkpoint)`, `model_encoders(model, tokenizer)`, `teacher_encoders(kind,
path)`) and writes the image and text encoders as two ONNX graphs (`export_graphs`: the
TorchScript exporter at opset 17, as torch's default dynamo exporter needs onnxscript), with
dynamic batch and sequence length and L2-normalised outputs, beside the tokenizer and the
preprocessing spec. Before the manifest is written (last), the bundle is checked against
`ExportConfig`'s thresholds:

  parity   ONNX Runtime vs PyTorch embeddings of images of several sizes and modes and of
           texts from empty to over-long (`parity_images`, `PARITY_TEXTS`): min cosine
  recall   on the val split (when a data set is given): RSUM through ONNX Runtime against
           RSUM through PyTorch
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
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dsmd.artifacts import recover_dir, replace_dir, sha256_file, versions, write_json
from dsmd.bundle import BUNDLE_FORMAT, Bundle, RuntimeOptions
from dsmd.datasets import Item, load_dataset
from dsmd.errors import UserError
from dsmd.export.encoders import Encoders, model_encoders, student_encoders, teacher_encoders
from dsmd.images import open_image
from dsmd.preprocess import image_to_array
from dsmd.retrieval import Recall, evaluate

# Callers import the encoder sources from here too (the CLI, tests, bench/).
__all__ = ["PARITY_TEXTS", "Encoders", "ExportConfig", "ExportError", "export", "export_graphs", "model_encoders",
           "parity_images", "student_encoders", "teacher_encoders"]


class ExportError(UserError):
    """The exported graphs do not reproduce the PyTorch model closely enough."""


@dataclass
class ExportConfig:
    """The checks a bundle must pass (defaults: what `dsmd export` applies) and the variants to try."""

    opset: int = 17
    variants: tuple[str, ...] = ("int8",)  # int8 and/or fp16, each shipped only if it keeps recall
    max_drop: float = 2.0  # largest RSUM loss (points of 600) a variant may cost
    min_cosine: float = 0.9999  # fp32 parity threshold
    recall_tolerance: float = 0.1  # fp32 |RSUM(ONNX) - RSUM(PyTorch)|
    split: str = "val"
    threads: int = 0


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
    """image.onnx and text.onnx in `folder`, traced on small inputs with dynamic batch (and token) axes."""
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
           cfg: ExportConfig | None = None, log: Callable[[str], Any] = print) -> dict:
    """Write, check and describe a bundle of `enc` at `out`; returns its manifest."""
    cfg = cfg or ExportConfig()
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


def _variant(folder: Path, name: str, manifest: dict, items, r_fp32: Recall, cfg: ExportConfig, opts, log) -> None:
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
