"""Models by name: downloaded over a real socket from a loopback stand-in for the Hub, then used offline.

No test reaches the internet: HF_ENDPOINT and DSMD_BEIT3_URL point at `FakeHub`, and the caches
are per-test folders.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fake_hub import FakeHub
from test_beit3 import TINY, spm_path  # noqa: F401  (the fixture)
from test_hf_teachers import _build_clip

from dsmd import hub
from dsmd.artifacts import sha256_file
from dsmd.cli import main
from dsmd.distill.student import create_student, make_tokenizer
from dsmd.distill.teachers import load_teacher
from dsmd.distill.teachers.beit3_model import BEiT3Retrieval
from dsmd.errors import UserError

CAPTIONS = ["a red circle left of a blue square", "a green triangle above a red circle"]


@pytest.fixture
def caches(tmp_path, monkeypatch) -> Path:
    """Every test's own environment: empty caches, online, and endpoints where nothing answers until
    the test points them at its FakeHub (never the real Hub, never a URL another test left set)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("DSMD_CACHE", str(tmp_path / "dsmd"))
    monkeypatch.setenv("DSMD_OFFLINE", "0")  # restored after the test, whatever main() sets
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: connection refused
    monkeypatch.setenv("DSMD_BEIT3_URL", "http://127.0.0.1:9/files")
    return tmp_path


def _towers(root: Path) -> tuple[Path, Path, torch.nn.Module, torch.nn.Module]:
    """A timm repo (model.safetensors + config.json) and a BERT repo, as their Hub repos hold them."""
    import timm
    from safetensors.torch import save_file
    from transformers import BertConfig, BertForMaskedLM

    vit_dir, bert_dir = root / "vit", root / "bert"
    vit_dir.mkdir()
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10, img_size=48, patch_size=8,
                            embed_dim=32, depth=2, num_heads=2)
    save_file(vit.state_dict(), str(vit_dir / "model.safetensors"))
    (vit_dir / "config.json").write_text('{"architecture": "vit_base_patch16_224", "num_classes": 10}')
    bert = BertForMaskedLM(BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64))
    bert.save_pretrained(bert_dir)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "left", "of", "blue", "square"]
    (bert_dir / "vocab.txt").write_text("\n".join(words + [f"w{i}" for i in range(40 - len(words))]) + "\n")
    return vit_dir, bert_dir, vit, bert


def test_towers_download_by_name_then_load_offline(caches, tmp_path, monkeypatch):
    vit_dir, bert_dir, vit, bert = _towers(tmp_path)
    quiet = [].append
    with FakeHub() as fake:
        fake.add_repo("timm/vit_tiny_test.in1k", vit_dir)
        fake.add_repo("acme/bert-tiny", bert_dir)
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        model, tok = create_student("tiny", 16, image_init="vit_tiny_test.in1k", text_init="acme/bert-tiny",
                                    log=quiet)
        assert any(r.startswith("GET /timm/vit_tiny_test.in1k/resolve/") for r in fake.requests)
        assert any(r.startswith("GET /acme/bert-tiny/resolve/") for r in fake.requests)
        torch.testing.assert_close(model.vision.blocks[1].mlp.fc1.weight, vit.blocks[1].mlp.fc1.weight)
        torch.testing.assert_close(model.text.encoder.layer[1].output.dense.weight,
                                   bert.bert.encoder.layer[1].output.dense.weight)
        assert (caches / "hf" / "models--acme--bert-tiny").is_dir()

        # offline, the same names load from the cache without a single request
        seen = len(fake.requests)
        monkeypatch.setenv("DSMD_OFFLINE", "1")
        again, _ = create_student("tiny", 16, image_init="timm/vit_tiny_test.in1k", text_init="acme/bert-tiny",
                                  log=quiet)
        # the trainer builds the tokenizer from the same name (distill/train.py)
        assert make_tokenizer("acme/bert-tiny", None, 40, 16).encode("a red circle").tokens == \
            ["[CLS]", "a", "red", "circle", "[SEP]"]
        assert len(fake.requests) == seen
    assert again.cfg.init == {"text": "acme/bert-tiny", "image": "timm/vit_tiny_test.in1k"}  # the names, as given
    torch.testing.assert_close(again.vision.blocks[1].mlp.fc1.weight, vit.blocks[1].mlp.fc1.weight)
    assert tok.encode("a red circle").tokens == ["[CLS]", "a", "red", "circle", "[SEP]"]
    with pytest.raises(UserError, match="offline mode is on.*dsmd models fetch acme/other"):
        create_student("tiny", 16, text_init="acme/other", log=quiet)


def test_an_unknown_name_and_a_missing_path_are_told_apart(caches, monkeypatch):
    with FakeHub() as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        with pytest.raises(UserError, match="neither a local path nor a model on http://127.0.0.1"):
            hub.resolve_hf("acme/nothing-here", what="text encoder")
    with pytest.raises(UserError, match=r"does not exist \(a local path\)"):
        hub.resolve_hf("./models/bert", what="text encoder")


def test_clip_teacher_by_hub_id(caches, tmp_path, monkeypatch):
    folder = _build_clip(tmp_path / "clip")
    with FakeHub() as fake:
        fake.add_repo("acme/tiny-clip", folder)
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        teacher = load_teacher("clip", "acme/tiny-clip")
    local = load_teacher("clip", folder)
    assert teacher.name == "acme/tiny-clip" and teacher.checkpoint_hash == local.checkpoint_hash
    torch.testing.assert_close(teacher.encode_texts(CAPTIONS), local.encode_texts(CAPTIONS))


def _count_checkpoint_hashes(monkeypatch) -> list[str]:
    """Record each sha256 of a .pth (or its download part) taken by the hub and the BEiT-3 loader."""
    from dsmd.distill.teachers import beit3

    hashed: list[str] = []

    def counting(path, *args, **kwargs):
        if ".pth" in str(path):
            hashed.append(str(path))
        return sha256_file(path, *args, **kwargs)

    monkeypatch.setattr(hub, "sha256_file", counting)
    monkeypatch.setattr(beit3, "sha256_file", counting)
    return hashed


def test_beit3_by_name_resumes_checks_sha256_and_fetches_its_tokenizer(caches, tmp_path, monkeypatch,
                                                                     spm_path):  # noqa: F811
    model = BEiT3Retrieval.random(TINY, seed=3)
    ckpt = tmp_path / "served.pth"
    model.save_official(ckpt)
    name = "beit3_base_patch16_384_f30k_retrieval"
    monkeypatch.setitem(hub.BEIT3_FILES, f"{name}.pth", sha256_file(ckpt))  # pinned, as a real entry would be
    monkeypatch.setitem(hub.BEIT3_FILES, "beit3.spm", None)  # not pinned: recorded at download
    with FakeHub() as fake:
        fake.add_file(f"{name}.pth", ckpt)
        fake.add_file("beit3.spm", spm_path)
        monkeypatch.setenv("DSMD_BEIT3_URL", f"{fake.url}/files")

        fake.cut_after = 5000  # the connection drops: the part is kept and the error says to run again
        with pytest.raises(UserError, match="run the command again to resume"):
            hub.resolve_beit3(name)
        part = caches / "dsmd" / "beit3" / f"{name}.pth.part"
        assert part.stat().st_size == 5000

        fake.cut_after = None
        hashed = _count_checkpoint_hashes(monkeypatch)
        teacher = load_teacher("beit3", name, config=TINY)
        assert len(hashed) == 1  # by the download's check only, not again by the loader
        assert fake.requests.count(f"GET /files/{name}.pth") == 2  # the second asked for the rest (Range)
        assert not part.exists()
        assert [p.name for p in hub.fetch(name)] == [f"{name}.pth", "beit3.spm"]  # cached: no new download
        assert fake.requests.count(f"GET /files/{name}.pth") == 2

        # a pinned digest that does not match: the download is deleted and refused
        monkeypatch.setitem(hub.BEIT3_FILES, "beit3_large_patch16_384_coco_retrieval.pth", "0" * 64)
        fake.add_file("beit3_large_patch16_384_coco_retrieval.pth", ckpt)
        with pytest.raises(UserError, match="sha256 is .* not the expected 0000"):
            hub.resolve_beit3("beit3_large_patch16_384_coco_retrieval")
        assert not (caches / "dsmd" / "beit3" / "beit3_large_patch16_384_coco_retrieval.pth").exists()

        # offline, from the cache, without a request
        seen = len(fake.requests)
        monkeypatch.setenv("DSMD_OFFLINE", "1")
        hashed.clear()
        offline = load_teacher("beit3", name, config=TINY)
        assert len(fake.requests) == seen
        assert len(hashed) == 1  # by the cache's check only

    cached = caches / "dsmd" / "beit3"
    assert (cached / "beit3.spm.sha256").read_text().strip() == sha256_file(spm_path)
    assert teacher.checkpoint_hash == sha256_file(ckpt)
    ids = teacher.tokenizer(["a dog is running"])[0]
    assert ids[0, 0].item() == 0  # <s>: the sentencepiece model came along

    # a damaged cached file is caught by its recorded digest
    torch.testing.assert_close(offline.encode_texts(CAPTIONS), teacher.encode_texts(CAPTIONS))
    (cached / "beit3.spm").write_bytes(b"damaged")
    with pytest.raises(UserError, match="damaged or replaced"):
        hub.resolve_beit3("beit3.spm")
    with pytest.raises(UserError, match="offline mode is on"):
        hub.resolve_beit3("beit3_large_patch16_384_f30k_retrieval")


def test_models_fetch_command(caches, tmp_path, monkeypatch, capsys):
    _, bert_dir, _, _ = _towers(tmp_path)
    with FakeHub() as fake:
        fake.add_repo("acme/bert-tiny", bert_dir)
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        assert main(["models", "fetch", "acme/bert-tiny"]) == 0
    out = capsys.readouterr().out
    assert "acme/bert-tiny: " in out and "models--acme--bert-tiny" in out
    assert main(["models", "list"]) == 0
    assert "beit3_base_patch16_384_f30k_retrieval" in capsys.readouterr().out
    # --offline on a command that reads models: an uncached name fails with exit 2, not a traceback
    assert main(["features", "--offline", "--teacher", "clip", "--teacher-path", "acme/not-cached",
                 "--data", str(tmp_path / "none")]) == 2
    assert "offline mode is on" in capsys.readouterr().err
    # offline (set here, not left over from the command above): fetching is refused, not attempted
    monkeypatch.setenv("DSMD_OFFLINE", "1")
    with FakeHub() as fake:
        fake.add_repo("acme/bert-tiny", bert_dir)
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        assert main(["models", "fetch", "acme/bert-tiny"]) == 2
        assert fake.requests == []
    assert "fetching needs the network" in capsys.readouterr().err
