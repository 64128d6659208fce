"""The BEiT-3 teacher: key layout, strict loading, tokenizer, and equality with torchscale.

Every tensor of the reference model is randomised (LayerNorms, biases, CLS and position
tables included), because the official init leaves many at 0/1 and a key we failed to load
would otherwise go unnoticed.
"""

from __future__ import annotations

import argparse
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from dsmd.artifacts import sha256_file
from dsmd.distill.teachers import load_teacher
from dsmd.distill.teachers.beit3 import (
    PRESETS,
    BEiT3Config,
    BEiT3Retrieval,
    BEiT3Teacher,
    BEiT3Tokenizer,
    check_state_dict,
    infer_size,
    load_checkpoint,
)
from dsmd.errors import UserError
from dsmd.preprocess import PreprocessConfig

TINY = BEiT3Config.tiny()

WORDS = ("dog cat man woman child car bus horse bird tree street beach grass table bed kitchen red blue green "
         "small large old young running sitting jumping eating sleeping standing holding riding").split()
CAPTIONS = [f"a {WORDS[i % 11]} is {WORDS[18 + i % 11]} near the {WORDS[11 + i % 7]} with a {WORDS[15 + i % 3]} "
            f"{WORDS[(5 * i) % 11]}" for i in range(60)]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory) -> Path:
    """A tiny sentencepiece model laid out like beit3.spm (<unk>=0, <s>=1, </s>=2)."""
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("spm")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CAPTIONS), model_prefix=str(folder / "beit3"),
                                   vocab_size=100, hard_vocab_limit=False, model_type="unigram", minloglevel=2)
    path = folder / "beit3.spm"
    (folder / "beit3.model").rename(path)
    return path


def _ts_modules():
    with warnings.catch_warnings():  # torchscale imports timm.models.layers (FutureWarning)
        warnings.simplefilter("ignore")
        from torchscale.architecture.config import EncoderConfig
        from torchscale.model.BEiT3 import BEiT3
    return EncoderConfig, BEiT3


class Reference(nn.Module):
    """unilm's BEiT3ForRetrieval, reduced to what the checkpoint holds, on torchscale."""

    def __init__(self, cfg: BEiT3Config):
        super().__init__()
        EncoderConfig, BEiT3 = _ts_modules()
        args = EncoderConfig(img_size=cfg.img_size, patch_size=cfg.patch_size, vocab_size=cfg.vocab_size,
                             multiway=True, layernorm_embedding=False, normalize_output=True, no_output_layer=True,
                             drop_path_rate=0.0, encoder_embed_dim=cfg.embed_dim, encoder_attention_heads=cfg.heads,
                             encoder_ffn_embed_dim=cfg.ffn_dim, encoder_layers=cfg.depth,
                             max_source_positions=cfg.max_text_positions, checkpoint_activations=None)
        self.beit3 = BEiT3(args)
        self.language_head = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=False)
        self.vision_head = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.ones([]) * np.log(1 / 0.07))

    def image(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.beit3(textual_tokens=None, visual_tokens=pixels, text_padding_position=None)["encoder_out"]
        return F.normalize(self.vision_head(x[:, 0, :]), dim=-1)

    def text(self, ids: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        x = self.beit3(textual_tokens=ids, visual_tokens=None, text_padding_position=padding_mask)["encoder_out"]
        return F.normalize(self.language_head(x[:, 0, :]), dim=-1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Reference, Path]:
    """A torchscale model with every tensor random, saved as an official checkpoint."""
    torch.manual_seed(0)
    ref = Reference(TINY).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            is_norm_weight = isinstance(_owner(ref, name), nn.LayerNorm) and name.endswith("weight")
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if is_norm_weight else 0.0))
    path = tmp_path_factory.mktemp("ckpt") / "beit3_tiny.pth"
    torch.save({"model": ref.state_dict()}, path)
    return ref, path


def _owner(model: nn.Module, param_name: str) -> nn.Module:
    return model.get_submodule(param_name.rpartition(".")[0])


def _texts(vocab: int, lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """<s> random ids </s> <pad>..., with a True-on-padding mask."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), BEiT3Tokenizer.PAD)
    mask = torch.ones(len(lengths), width, dtype=torch.bool)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.cat([torch.tensor([0]), torch.randint(4, vocab, (n - 2,), generator=gen),
                                  torch.tensor([2])])
        mask[row, :n] = False
    return ids, mask


# ---------------------------------------------------------------- layout and sizes


@pytest.mark.parametrize("size, n_params, n_keys", [("base", 222_458_881, 494), ("large", 675_188_737, 974)])
def test_preset_sizes_on_meta_device(size, n_params, n_keys):
    with torch.device("meta"):
        model = BEiT3Retrieval(PRESETS[size])
    sd = model.state_dict()
    assert len(sd) == n_keys
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert sd["beit3.encoder.embed_positions.A.weight"].shape[0] == 579
    assert sd["beit3.encoder.embed_positions.B.weight"].shape[0] == 1024
    assert sd["logit_scale"].shape == ()
    assert infer_size(sd) == size


@pytest.mark.reference
@pytest.mark.parametrize("size", ["base", "large"])
def test_preset_layout_equals_torchscale(size):
    cfg = PRESETS[size]
    with torch.device("meta"):
        ours = BEiT3Retrieval(cfg).state_dict()
        ref = Reference(cfg).state_dict()
    assert set(ours) == set(ref)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}


def test_infer_size_rejects_unknown_widths():
    with torch.device("meta"):
        sd = BEiT3Retrieval(TINY).state_dict()
    with pytest.raises(ValueError, match="use an official BEiT-3 retrieval checkpoint"):
        infer_size(sd)


# ---------------------------------------------------------------- equality with torchscale


@pytest.mark.reference
def test_checkpoint_loads_every_key(reference):
    ref, path = reference
    model, name = load_checkpoint(path, config=TINY)
    assert name == "custom"
    ours, theirs = model.state_dict(), ref.state_dict()
    assert set(ours) == set(theirs)
    for k in theirs:
        assert torch.equal(ours[k], theirs[k]), k


@pytest.mark.reference
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_embeddings_equal_torchscale(reference, attention):
    ref, path = reference
    model, _ = load_checkpoint(path, config=TINY)
    pixels = torch.randn(3, 3, TINY.img_size, TINY.img_size, generator=torch.Generator().manual_seed(2))
    ids, mask = _texts(TINY.vocab_size, [5, 12, 3, 9])
    full_ids, full_mask = _texts(TINY.vocab_size, [7, 7])  # no padding at all
    with torch.no_grad():
        for got, want in [
            (model.encode_image(pixels, attention), ref.image(pixels)),
            (model.encode_text(ids, mask, attention), ref.text(ids, mask)),
            (model.encode_text(full_ids, full_mask, attention), ref.text(full_ids, full_mask)),
        ]:
            assert got.dtype == torch.float32
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
            torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(got)))


@pytest.mark.reference
def test_padding_is_masked_not_ignored(reference):
    """Extra padding changes nothing; dropping the mask changes the embedding visibly."""
    _, path = reference
    model, _ = load_checkpoint(path, config=TINY)
    ids, mask = _texts(TINY.vocab_size, [6, 10])
    wide_ids = F.pad(ids, (0, 20), value=BEiT3Tokenizer.PAD)
    wide_mask = F.pad(mask, (0, 20), value=True)
    with torch.no_grad():
        short = model.encode_text(ids, mask)
        torch.testing.assert_close(model.encode_text(wide_ids, wide_mask), short, atol=1e-6, rtol=0)
        unmasked = model.encode_text(ids, torch.zeros_like(mask))
    assert (unmasked[0] - short[0]).abs().max() > 1e-3


# ---------------------------------------------------------------- strict loading


def test_loader_names_missing_unexpected_and_misshaped_keys(tmp_path):
    sd = BEiT3Retrieval.random(TINY).state_dict()
    del sd["beit3.encoder.layers.1.ffn.B.ffn_layernorm.bias"]
    sd["beit3.encoder.layers.0.self_attn.extra.weight"] = torch.zeros(3)
    sd["vision_head.weight"] = torch.zeros(TINY.embed_dim, TINY.embed_dim + 1)
    path = tmp_path / "broken.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(UserError) as err:  # printed by the CLI without a traceback
        load_checkpoint(path, config=TINY)
    msg = str(err.value)
    assert "1 missing" in msg and "beit3.encoder.layers.1.ffn.B.ffn_layernorm.bias" in msg
    assert "1 unexpected" in msg and "beit3.encoder.layers.0.self_attn.extra.weight" in msg
    assert "1 mis-shaped" in msg and "vision_head.weight: checkpoint (64, 65) != model (64, 64)" in msg


def test_loader_reports_wrong_size_and_accepts_bare_state_dict(tmp_path):
    model = BEiT3Retrieval.random(TINY)
    path = tmp_path / "bare.pth"
    torch.save(model.state_dict(), path)  # no {"model": ...} wrapper
    loaded, _ = load_checkpoint(path, config=TINY)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    with pytest.raises(ValueError, match=r"mis-shaped"):
        check_state_dict(BEiT3Retrieval(BEiT3Config.tiny(embed_dim=32, heads=2)), model.state_dict())


def test_loader_accepts_module_wrapped_and_refuses_truncated_files_in_one_line(tmp_path):
    model = BEiT3Retrieval.random(TINY)
    wrapped = tmp_path / "module.pth"
    torch.save({"module": model.state_dict(), "epoch": 3}, wrapped)  # as unilm's loader also accepts
    loaded, _ = load_checkpoint(wrapped, config=TINY)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    full = wrapped.read_bytes()
    for name, data in (("cut.pth", full[: len(full) // 2]), ("empty.pth", b"")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError, match="cannot be read as a checkpoint") as err:
            load_checkpoint(tmp_path / name, config=TINY)
        assert "\n" not in str(err.value) and "Download it again" in str(err.value)
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pth", config=TINY)


def test_loader_takes_the_training_args_saved_beside_the_weights_and_nothing_else(tmp_path):
    """Checkpoints of BEiT-3's training scripts carry {"model": ..., "args": argparse.Namespace}: loaded.
    Any other object is still refused with the advice to re-save the weights."""
    model = BEiT3Retrieval.random(TINY)
    with_args = tmp_path / "with_args.pth"
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=5e-4, batch_size=32)}, with_args)
    loaded, _ = load_checkpoint(with_args, config=TINY)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    other = tmp_path / "other.pth"
    torch.save({"model": model.state_dict(), "args": Fraction(1, 3)}, other)
    with pytest.raises(UserError, match="holds more than tensors"):
        load_checkpoint(other, config=TINY)


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_ids_follow_fairseq(spm_path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spm_path))
    tok = BEiT3Tokenizer(spm_path)
    texts = ["a dog is running near the beach", "a cat", " ".join(["dog cat"] * 60), "ünïcødé ✓ 🐕"]
    ids, mask = tok(texts)
    assert ids.dtype == torch.long and mask.dtype == torch.bool and ids.shape == mask.shape
    assert ids.shape[1] == 64  # the long text is cut to 62 pieces + <s> + </s>
    for row, text in enumerate(texts):
        n = int((~mask[row]).sum())
        assert not mask[row, :n].any() and mask[row, n:].all()  # True = padding, on the right
        assert ids[row, 0] == 0 and ids[row, n - 1] == 2 and (ids[row, n:] == 1).all()
        want = [i + 1 if i else 3 for i in sp.encode(text)][:62]
        assert ids[row, 1 : n - 1].tolist() == want
    assert 3 in ids[3].tolist()  # characters outside the vocabulary are <unk>
    assert tok(["a cat"], pad_to=64)[0].shape == (1, 64)


def test_tokenizer_rejects_a_vocab_larger_than_the_model(spm_path):
    with pytest.raises(ValueError, match="beit3.spm"):
        BEiT3Tokenizer(spm_path, vocab_size=10)


# ---------------------------------------------------------------- the teacher


def test_teacher_end_to_end(tmp_path, spm_path):
    model = BEiT3Retrieval.random(TINY, seed=3)
    ckpt = tmp_path / "beit3_tiny.pth"
    model.save_official(ckpt)
    (tmp_path / "beit3.spm").write_bytes(spm_path.read_bytes())  # the default: beside the .pth

    teacher = load_teacher("beit3", ckpt, config=TINY)
    assert isinstance(teacher, BEiT3Teacher)
    assert (teacher.kind, teacher.name, teacher.dim) == ("beit3", "beit3-custom", TINY.embed_dim)
    assert teacher.checkpoint_hash == sha256_file(ckpt)
    assert teacher.preprocess == PreprocessConfig(size=TINY.img_size, resize="squash", interpolation="bicubic",
                                               mean=(0.5,) * 3, std=(0.5,) * 3, max_tokens=64)
    assert teacher.describe()["config"]["embed_dim"] == TINY.embed_dim

    texts = ["a dog is running near the beach", "a cat"]
    emb = teacher.encode_texts(texts)
    ids, mask = BEiT3Tokenizer(spm_path)(texts)
    with torch.no_grad():
        torch.testing.assert_close(emb, model.encode_text(ids, mask), atol=1e-6, rtol=0)
    assert emb.shape == (2, TINY.embed_dim) and emb.dtype == torch.float32

    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 50, 3), dtype=np.uint8)) for i in range(2)]
    img = teacher.encode_images(images)
    assert img.shape == (2, TINY.embed_dim)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(2))
    with pytest.raises(ValueError, match=r"exactly \(3, 32, 32\)"):
        teacher.encode_pixels(torch.zeros(1, 3, 33, 33))


def test_teacher_load_errors(tmp_path, spm_path):
    ckpt = tmp_path / "beit3_tiny.pth"
    BEiT3Retrieval.random(TINY).save_official(ckpt)
    with pytest.raises(FileNotFoundError, match="tokenizer=PATH"):
        BEiT3Teacher.load(ckpt, config=TINY)
    with pytest.raises(ValueError, match="use an official BEiT-3 retrieval checkpoint"):
        BEiT3Teacher.load(ckpt, tokenizer=spm_path)
    with pytest.raises(ValueError, match="does not match"):
        BEiT3Teacher.load(ckpt, tokenizer=spm_path, size="base")


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_precision_stays_close(tmp_path, spm_path, precision, dtype):
    """Autocast (as the official fp16 evaluation) runs the layers in half precision and moves a tiny
    model's embeddings only slightly."""
    ckpt = tmp_path / "beit3_tiny.pth"
    BEiT3Retrieval.random(TINY).save_official(ckpt)
    full = BEiT3Teacher.load(ckpt, tokenizer=spm_path, config=TINY)
    half = BEiT3Teacher.load(ckpt, tokenizer=spm_path, config=TINY, precision=precision, attention="sdpa")
    seen: set[torch.dtype] = set()  # what the linear layers compute in: fp32 only if autocast did nothing
    for m in half.model.modules():
        if isinstance(m, nn.Linear):
            m.register_forward_hook(lambda _m, _in, out: seen.add(out.dtype))
    pixels = torch.randn(2, 3, TINY.img_size, TINY.img_size)
    for encode, inputs in [("encode_pixels", pixels), ("encode_texts", CAPTIONS[:3])]:
        seen.clear()
        a, b = getattr(full, encode)(inputs), getattr(half, encode)(inputs)
        assert seen == {dtype}, encode
        assert b.dtype == torch.float32
        assert (a * b).sum(-1).min() > 0.999
