"""The encoder bundle at run time: ONNX Runtime, `tokenizers` and the preprocessing spec,
without torch or transformers (what `index/` and `serve/` run on).

A bundle folder (written by `dsmd export`):

    manifest.json   written last: name, kind, dim, preprocess spec, file hashes, provenance,
                    the parity and recall figures measured at export, the variants
    image.onnx      (B, 3, S, S) float32 pixels -> (B, dim) unit vectors
    text.onnx       (B, L) int64 input_ids, attention_mask -> (B, dim) unit vectors
    tokenizer.json  the `tokenizers` tokenizer, truncation and padding included
    image.int8.onnx, text.int8.onnx   optional variants that passed their recall check
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dsmd.artifacts import read_manifest, sha256_file
from dsmd.cpus import usable_cpus
from dsmd.errors import UserError
from dsmd.images import open_image
from dsmd.preprocess import PreprocessConfig, image_to_array

BUNDLE_FORMAT = 1


class BundleError(UserError):
    """A bundle that is missing, incomplete, or does not match its manifest."""


@dataclass
class RuntimeOptions:
    """How ONNX Runtime runs the encoders.

    Attributes:
        threads: intra-op threads per session; 0 = the machine's cores.
        optimization: graph optimisation level: disable, basic, extended or all.
        providers: ONNX Runtime execution providers in order of preference; None = CUDA when
            available, then CPU.
    """

    threads: int = 0
    optimization: str = "all"
    providers: list[str] | None = None
    # ONNX Runtime's threads spin while they wait for work, by default. A text is many small
    # operators, where waking sleeping threads costs about 40% of the latency; an image is few large
    # ones, and threads still spinning after a call take a core from the next upload's decoding
    # (the server turns it off for images: BENCHMARKS.md, serving under load)
    image_spinning: bool = True
    text_spinning: bool = True


def _session(path: Path, opts: RuntimeOptions, spinning: bool):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = opts.threads or usable_cpus()
    so.inter_op_num_threads = 1
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if opts.optimization not in levels:
        raise UserError(f"optimization must be one of {', '.join(levels)}, not {opts.optimization!r}")
    so.graph_optimization_level = levels[opts.optimization]
    available = ort.get_available_providers()
    providers = opts.providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    missing = [p for p in providers if p not in available]
    if missing:
        raise UserError(f"ONNX Runtime here lacks {', '.join(missing)} (has {', '.join(available)})")
    return ort.InferenceSession(str(path), so, providers=providers)


class Bundle:
    """An opened bundle: `encode_images`, `encode_texts`, `encode_pixels`; outputs float32 unit rows."""

    def __init__(self, path: str | Path, variant: str = "fp32", options: RuntimeOptions | None = None,
                 check_hashes: bool = False):
        self.path = Path(path)
        manifest = read_manifest(self.path)
        if manifest is None:
            raise BundleError(f"{self.path} is not an encoder bundle (no manifest.json; export it with dsmd export)")
        if manifest.get("artifact") != "bundle" or manifest.get("format") != BUNDLE_FORMAT:
            raise BundleError(f"{self.path}/manifest.json is not a bundle manifest of format {BUNDLE_FORMAT}")
        self.manifest = manifest
        self.name: str = manifest["name"]
        self.dim: int = manifest["dim"]
        self.preprocess = PreprocessConfig.from_json(manifest["preprocess"])
        if variant not in manifest["variants"]:
            raise BundleError(f"{self.path} has no {variant!r} variant (has {', '.join(manifest['variants'])})")
        self.variant = variant
        if check_hashes:
            verify_files(self.path, manifest)
        from tokenizers import Tokenizer

        files = manifest["variants"][variant]["files"]
        self.options = options or RuntimeOptions()
        self.image_session = _session(self.path / files["image"], self.options, self.options.image_spinning)
        self.text_session = _session(self.path / files["text"], self.options, self.options.text_spinning)
        self.tokenizer = Tokenizer.from_file(str(self.path / "tokenizer.json"))
        self.text_inputs = [i.name for i in self.text_session.get_inputs()]

    def transform(self, img: Image.Image) -> np.ndarray:
        """The one preprocessing implementation (dsmd.preprocess), as in training and evaluation."""
        return image_to_array(img, self.preprocess)

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) preprocessed float32 pixels -> (B, dim)."""
        return self.image_session.run(None, {"pixels": np.ascontiguousarray(pixels, np.float32)})[0]

    def encode_images(self, images: list[Image.Image | bytes]) -> np.ndarray:
        """PIL images or encoded image bytes -> (B, dim). Bad bytes raise dsmd.images.BadImage."""
        arrays = [self.transform(open_image(im) if isinstance(im, bytes) else im) for im in images]
        return self.encode_pixels(np.stack(arrays))

    def tokenize(self, texts: list[str]) -> dict[str, np.ndarray]:
        return self._feeds(self.tokenizer.encode_batch(list(texts)))

    def _feeds(self, enc: list) -> dict[str, np.ndarray]:
        feeds = {"input_ids": np.array([e.ids for e in enc], np.int64),
                 "attention_mask": np.array([e.attention_mask for e in enc], np.int64)}
        return {k: v for k, v in feeds.items() if k in self.text_inputs}

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Raw strings -> (B, dim); longer texts are cut at the bundle's max tokens."""
        return self.text_session.run(None, self.tokenize(texts))[0]

    def encode_texts_and_cuts(self, texts: list[str]) -> tuple[np.ndarray, list[bool]]:
        """`encode_texts`, and for each text whether it was cut (one tokenisation for both)."""
        enc = self.tokenizer.encode_batch(list(texts))
        return self.text_session.run(None, self._feeds(enc))[0], [len(e.overflowing) > 0 for e in enc]

    def truncated(self, text: str) -> bool:
        """Whether `text` is longer than the text encoder reads."""
        return len(self.tokenizer.encode(text).overflowing) > 0


def verify_files(path: Path, manifest: dict) -> None:
    """Every file the manifest names exists and has its recorded hash."""
    bad = []
    for name, digest in manifest["files"].items():
        f = path / name
        if not f.exists():
            bad.append(f"{name} is missing")
        elif sha256_file(f) != digest:
            bad.append(f"{name} differs from the manifest (sha256 {sha256_file(f)[:12]}, expected {digest[:12]})")
    if bad:
        raise BundleError(f"{path} does not match its manifest: " + "; ".join(bad))


def verify(path: str | Path) -> dict:
    """Check a bundle's hashes, then encode an image and two texts with every variant.

    Returns {variant: {"dim": ..., "ok": True}}; raises BundleError on the first problem.
    """
    path = Path(path)
    b = Bundle(path, check_hashes=True)
    out = {}
    img = Image.new("RGB", (97, 61), (200, 30, 30))
    for variant in b.manifest["variants"]:
        v = b if variant == "fp32" else Bundle(path, variant)
        emb = np.concatenate([v.encode_images([img]), v.encode_texts(["a red square", ""])])
        norms = np.linalg.norm(emb, axis=1)
        if emb.shape != (3, b.dim) or not np.allclose(norms, 1, atol=1e-3):
            raise BundleError(f"{path} variant {variant}: smoke encode gave shape {emb.shape}, norms {norms}")
        out[variant] = {"dim": b.dim, "ok": True}
    return out
