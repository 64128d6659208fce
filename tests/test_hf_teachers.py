"""HF CLIP / SigLIP teachers on tiny random models built offline (no Hub, no downloads).

Each fixture writes a complete HF folder the way save_pretrained does (config, weights,
tokenizer, preprocessor_config.json) and the tests load it through `load_teacher`, then
compare against the model's own get_*_features fed by the HF processor / tokenizer.

Measured parity (transformers 5.23, PIL 13, these tiny models):
  * HF PIL-backend image processor vs dsmd's `image_to_array`: identical pixels (max |diff|
    0.0) for SigLIP always and for CLIP whenever the shortest-edge resize has an integral
    long side; the embeddings are then bit-identical.
  * CLIP with a fractional long side (e.g. 70x50 → 44.8): HF floors the long side (int(),
    as torchvision does), dsmd's resize_image rounds it (45): pixels differ by up to 0.26
    (normalised units), embeddings keep cosine ≥ 0.9996.
  * v5's *default* image processor is the torchvision backend, which resizes tensors rather
    than PIL images: pixels differ by up to 0.015 (CLIP) / 0.0078 (SigLIP), embeddings keep
    cosine ≥ 0.99999 (max |diff| ≤ 2e-3).
  * Texts: identical to the model's get_text_features fed by its own tokenizer (0.0).
  * RGBA: HF composites transparency onto white, dsmd's `convert("RGB")` drops alpha, so
    parity is only asserted for opaque images.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers  # noqa: F401  (an install without it must fail here, not skip these tests)
from PIL import Image

from dsmd.artifacts import sha256_file
from dsmd.distill.teachers import load_teacher
from dsmd.distill.teachers.hf import preprocess_from_hf
from dsmd.preprocess import image_to_array

MAX_TOKENS = 16
IMAGE = 32
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
CAPTIONS = ["a photo of a cat", "two dogs on the grass", "a red car parked near a house", "people riding bikes"]


# --------------------------------------------------------------------------- tiny models


def _randomise(model: torch.nn.Module) -> None:
    """Larger random weights than HF's 0.02 init, so different inputs give clearly different
    embeddings and the parity tolerances below actually discriminate."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 1.5 / p[0].numel() ** 0.5)


def _clip_tokenizer():
    """A byte-level BPE CLIP tokenizer: every byte is a token, so nothing maps to unk (which
    is <|endoftext|> in CLIP and would end the text early)."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)


def _siglip_tokenizer(folder: Path):
    """A tiny sentencepiece model behind the real SiglipTokenizer (pad == eos == 1, like SigLIP)."""
    import sentencepiece as spm
    from transformers import SiglipTokenizer

    buf = io.BytesIO()
    corpus = [c + " " + w for c in CAPTIONS for w in ("small", "big", "blue", "on a table", "at night")]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus * 4), model_writer=buf, vocab_size=80,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, hard_vocab_limit=False, minloglevel=2, num_threads=1)
    (folder / "spiece.model").write_bytes(buf.getvalue())
    tok = SiglipTokenizer(vocab_file=str(folder / "spiece.model"), model_max_length=MAX_TOKENS)
    (folder / "spiece.model").unlink()  # save_pretrained writes its own copy
    return tok


def _build_clip(folder: Path) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder.mkdir(parents=True)
    tok = _clip_tokenizer()
    text = dict(TOWER, vocab_size=len(tok), max_position_embeddings=MAX_TOKENS, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = CLIPConfig(text_config=text, vision_config=dict(TOWER, image_size=IMAGE, patch_size=8),
                        projection_dim=16)
    model = CLIPModel(config)
    _randomise(model)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    processor = CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
    processor.save_pretrained(folder)
    return folder


def _build_siglip(folder: Path) -> Path:
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    folder.mkdir(parents=True)
    tok = _siglip_tokenizer(folder)
    text = dict(TOWER, vocab_size=len(tok), max_position_embeddings=MAX_TOKENS, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, bos_token_id=None)
    config = SiglipConfig(text_config=text, vision_config=dict(TOWER, image_size=IMAGE, patch_size=8))
    model = SiglipModel(config)
    _randomise(model)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    # resample=2 (bilinear), unlike the class default (bicubic): the teacher must read the file.
    SiglipImageProcessor(size={"height": IMAGE, "width": IMAGE}, resample=2).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    return {"clip": _build_clip(root / "tiny-clip"), "siglip": _build_siglip(root / "tiny-siglip")}


@pytest.fixture(scope="module")
def teachers(folders):
    return {kind: load_teacher(kind, folder) for kind, folder in folders.items()}


@pytest.fixture(scope="module")
def references(folders):
    """The HF model, tokenizer and both image-processor backends, loaded straight from the folder."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, SiglipModel

    out = {}
    for kind, folder in folders.items():
        cls = CLIPModel if kind == "clip" else SiglipModel
        out[kind] = dict(
            model=cls.from_pretrained(folder, local_files_only=True).eval(),
            tokenizer=AutoTokenizer.from_pretrained(folder, local_files_only=True),
            pil=AutoImageProcessor.from_pretrained(folder, local_files_only=True, backend="pil"),
            default=AutoImageProcessor.from_pretrained(folder, local_files_only=True),
        )
    return out


def _pooled(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def _hf_image(ref: dict, img: Image.Image, backend: str) -> tuple[np.ndarray, torch.Tensor]:
    pixels = ref[backend](images=img, return_tensors="pt")["pixel_values"]
    return pixels[0].numpy(), F.normalize(_pooled(ref["model"].get_image_features(pixel_values=pixels)), dim=-1)


def _smooth(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A smooth photo-like image (gradients plus blobs); pure noise exaggerates resampling effects."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    channels = [np.sin(x * rng.uniform(2, 8) + y * rng.uniform(2, 8) + rng.uniform(0, 6)) for _ in range(3)]
    arr = ((np.stack(channels, -1) + 1) * 127.5).clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr).convert(mode)


KINDS = ["clip", "siglip"]


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("kind", KINDS)
def test_loads_metadata_from_folder(kind, teachers, folders):
    t = teachers[kind]
    assert (t.kind, t.name) == (kind, folders[kind].name)
    assert t.dim == (16 if kind == "clip" else 32)  # CLIP: projection_dim; SigLIP: vision hidden size
    assert t.checkpoint_hash == sha256_file(folders[kind] / "model.safetensors")
    assert not t.model.training and not any(p.requires_grad for p in t.model.parameters())
    p = t.preprocess
    assert (p.size, p.max_tokens) == (IMAGE, MAX_TOKENS)
    if kind == "clip":
        assert (p.resize, p.interpolation) == ("shortest_crop", "bicubic")
        assert p.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    else:
        assert (p.resize, p.interpolation, p.mean, p.std) == ("squash", "bilinear", (0.5,) * 3, (0.5,) * 3)
    json.dumps(t.describe())


# --------------------------------------------------------------------------- images


@pytest.mark.parametrize("kind", KINDS)
def test_image_embeddings_unit_norm_dim_deterministic(kind, teachers):
    t = teachers[kind]
    images = [_smooth(40, 40, seed=i) for i in range(3)]
    a, b = t.encode_images(images), t.encode_images(images)
    assert a.shape == (3, t.dim) and a.dtype == torch.float32
    assert torch.allclose(a.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.equal(a, b)
    assert (a @ a.T)[0, 1] < 0.99  # different images really differ: the parity checks below mean something
    assert torch.allclose(t.encode_images(images[:1]), a[:1], atol=1e-5)  # batch-independent


# (w, h, mode): square, integral-ratio landscape and portrait, grayscale, opaque RGBA, and
# fractional resizes (70x50 → long side 44.8, floored to 44 by HF and by dsmd alike).
EXACT = [(48, 48, "RGB"), (80, 40, "RGB"), (32, 96, "RGB"), (64, 64, "L"), (60, 30, "RGBA"),
         (70, 50, "RGB"), (50, 70, "RGB"), (100, 33, "RGB")]


@pytest.mark.parametrize("kind", KINDS)
def test_image_parity_with_hf_pil_processor(kind, teachers, references):
    """Same pixels as HF's PIL-backend processor, hence the same embeddings."""
    t, ref = teachers[kind], references[kind]
    for w, h, mode in EXACT:
        img = _smooth(w, h, mode)
        hf_pixels, hf_emb = _hf_image(ref, img, "pil")
        assert np.abs(image_to_array(img, t.preprocess) - hf_pixels).max() < 1e-6, (w, h, mode)
        assert (t.encode_images([img]) - hf_emb).abs().max() < 1e-5, (w, h, mode)


@pytest.mark.parametrize("kind", KINDS)
def test_image_parity_with_hf_default_processor(kind, teachers, references):
    """v5's default (torchvision) processor resizes tensors, not PIL images: close, not equal."""
    t, ref = teachers[kind], references[kind]
    for w, h, mode in EXACT:
        img = _smooth(w, h, mode)
        hf_pixels, hf_emb = _hf_image(ref, img, "default")
        assert np.abs(image_to_array(img, t.preprocess) - hf_pixels).max() < 0.1, (w, h, mode)
        assert F.cosine_similarity(t.encode_images([img]), hf_emb).item() >= 0.999, (w, h, mode)


@pytest.mark.parametrize("kind", KINDS)
def test_odd_images_work(kind, teachers):
    t = teachers[kind]
    rgba = _smooth(50, 20, "RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((50, 20)))  # real transparency
    images = [_smooth(200, 13), _smooth(7, 90, "L"), rgba, _smooth(1, 1), _smooth(33, 33, "P")]
    emb = t.encode_images(images)
    assert emb.shape == (len(images), t.dim) and torch.isfinite(emb).all()
    assert torch.allclose(emb.norm(dim=-1), torch.ones(len(images)), atol=1e-5)


def test_encode_pixels_rejects_bad_shape(teachers):
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        teachers["clip"].encode_pixels(torch.zeros(3, IMAGE, IMAGE))


# --------------------------------------------------------------------------- texts


@torch.no_grad()
def _hf_text(kind: str, ref: dict, texts: list[str]) -> torch.Tensor:
    """The HF reference. SigLIP: padded to max_length, input_ids only (as SigLIP was trained)."""
    tok, model = ref["tokenizer"], ref["model"]
    if kind == "siglip":
        enc = tok(texts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
        out = model.get_text_features(input_ids=enc["input_ids"])
    else:
        enc = tok(texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        out = model.get_text_features(**enc)
    return F.normalize(_pooled(out), dim=-1)


@pytest.mark.parametrize("kind", KINDS)
def test_text_parity_unit_norm_deterministic(kind, teachers, references):
    t = teachers[kind]
    emb = t.encode_texts(CAPTIONS)
    assert emb.shape == (len(CAPTIONS), t.dim) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=-1), torch.ones(len(CAPTIONS)), atol=1e-5)
    assert torch.equal(emb, t.encode_texts(CAPTIONS))
    assert (emb - _hf_text(kind, references[kind], CAPTIONS)).abs().max() < 1e-5
    assert (emb @ emb.T)[0, 1] < 0.99
    # padding to the batch's longest text (CLIP) must not change a short text's embedding
    assert (t.encode_texts(CAPTIONS[:1]) - emb[:1]).abs().max() < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_long_text_is_truncated(kind, teachers):
    t = teachers[kind]
    long = " ".join(["a red car parked near a house"] * 20)
    emb = t.encode_texts([long, long + " and a cat and a dog"])
    assert emb.shape == (2, t.dim) and torch.isfinite(emb).all()
    assert (emb[0] - emb[1]).abs().max() < 1e-6  # everything past max_tokens is cut
    ids = t.tokenizer([long], truncation=True, max_length=t.preprocess.max_tokens)["input_ids"][0]
    assert len(ids) == MAX_TOKENS and ids[-1] == t.tokenizer.eos_token_id  # cut before EOS, not through it


@pytest.mark.parametrize("kind", KINDS)
def test_empty_texts(kind, teachers):
    t = teachers[kind]
    emb = t.encode_texts(["", "a cat"])
    assert emb.shape == (2, t.dim) and torch.isfinite(emb).all()
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert t.encode_texts([]).shape == (0, t.dim)
    with pytest.raises(TypeError, match="list"):
        t.encode_texts("a cat")


def test_siglip_attention_mask_would_change_embeddings(teachers, references):
    """Why the SigLIP teacher drops the tokenizer's attention mask: it changes the embedding
    of every text shorter than max_length (SigLIP attends to its eos padding)."""
    ref = references["siglip"]
    enc = ref["tokenizer"](CAPTIONS[:1], padding="max_length", max_length=MAX_TOKENS, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any()
    with torch.no_grad():
        masked = F.normalize(_pooled(ref["model"].get_text_features(**enc)), dim=-1)
    assert (teachers["siglip"].encode_texts(CAPTIONS[:1]) - masked).abs().max() > 1e-3


# --------------------------------------------------------------------------- errors


def _copy(src: Path, dst: Path, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(src, dst, ignore=lambda _d, names: [n for n in names if n in drop])
    return dst


def test_wrong_model_type_is_explained(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match=r"model_type 'bert'.*needs model_type 'clip'"):
        load_teacher("clip", tmp_path)


@pytest.mark.parametrize("kind", KINDS)
def test_swapped_kind_suggests_the_right_one(kind, folders):
    other = "siglip" if kind == "clip" else "clip"
    with pytest.raises(ValueError, match=f"load it with kind '{kind}'"):
        load_teacher(other, folders[kind])


def test_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_teacher("siglip", tmp_path)


def test_missing_tokenizer_files(folders, tmp_path):
    folder = _copy(folders["siglip"], tmp_path / "no-tok", drop=("spiece.model", "tokenizer_config.json",
                                                                 "special_tokens_map.json", "tokenizer.json"))
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_teacher("siglip", folder)


def test_missing_weights(folders, tmp_path):
    folder = _copy(folders["clip"], tmp_path / "no-weights", drop=("model.safetensors",))
    with pytest.raises(FileNotFoundError, match="has no weights"):
        load_teacher("clip", folder)


# --------------------------------------------------------------------------- processor configs


def test_preprocess_from_legacy_and_missing_configs():
    legacy_clip = {"size": 224, "crop_size": 224, "do_center_crop": True, "resample": 3,
                   "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
    p = preprocess_from_hf("clip", legacy_clip, 224, 77)
    assert (p.size, p.resize, p.interpolation, p.max_tokens) == (224, "shortest_crop", "bicubic", 77)
    p = preprocess_from_hf("siglip", None, 384, 64)  # no preprocessor_config.json: HF class defaults
    assert (p.size, p.resize, p.mean, p.std, p.max_tokens) == (384, "squash", (0.5,) * 3, (0.5,) * 3, 64)
    p = preprocess_from_hf("siglip", {"size": {"height": 224, "width": 224}, "resample": 2, "mean": [0.5] * 3,
                                      "std": [0.5] * 3}, 224, 64)  # early SigLIP key names
    assert (p.resize, p.interpolation) == ("squash", "bilinear")


@pytest.mark.parametrize("config, match", [
    ({"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}}, "centre-crops 224"),
    ({"size": {"shortest_edge": 224}, "do_center_crop": False}, "non-square"),
    ({"size": {"height": 224, "width": 224}, "resample": 1}, "lanczos"),
    ({"size": {"height": 256, "width": 256}}, "built for 224"),
    ({"size": {"height": 224, "width": 224}, "rescale_factor": 1.0}, "rescale"),
])
def test_preprocess_configs_it_cannot_express(config, match):
    with pytest.raises(ValueError, match=match):
        preprocess_from_hf("clip", config, 224, 77)
