"""A student that trains on part of the pairs, with unpaired images and captions beside them
(data.pairs_fraction, data.unpaired), and a budget in steps (optim.steps), on the tiny world."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_distill import tiny_cfg

import dsmd.distill.train as train_module
from dsmd.datasets import Item, load_dataset
from dsmd.distill.config import load_config
from dsmd.distill.data import Pairs, TrainBatches, epoch_order, split_pairs, unpaired_rows
from dsmd.distill.losses import hard_negative_distill, hardest_triplet
from dsmd.distill.student import create_student
from dsmd.distill.train import lr_at, train
from dsmd.errors import UserError


def _items(n: int, captionless: tuple[int, ...] = ()) -> list[Item]:
    return [Item(i, Path(f"{i}.png"), "train", () if i in captionless else (f"cap {i} a", f"cap {i} b"),
                 () if i in captionless else (2 * i, 2 * i + 1)) for i in range(n)]


def test_the_first_share_of_captioned_images_are_pairs_and_the_rest_unpaired_rows():
    items = _items(11, captionless=(3,))
    paired, unpaired = split_pairs(items, 0.5, ["images", "captions"])
    # half of the 10 captioned, in order, rounded up to an even count (sibling scenes come in pairs)
    assert [it.image_id for it in paired] == [0, 1, 2, 4, 5, 6]
    assert [it.image_id for it in unpaired.images] == [3, 7, 8, 9, 10]  # the captionless one too
    assert [(it.image_id, c) for it, c in unpaired.captions] == [(i, c) for i in (7, 8, 9, 10) for c in (0, 1)]
    assert split_pairs(items, 0.5, [])[1].images == [] and split_pairs(items, 0.5, [])[1].captions == []
    assert split_pairs(items, 0.5, ["images"])[1].captions == []
    assert len(split_pairs(items, 0.4, [])[0]) == 4
    everything, rest = split_pairs(items, 1.0, ["images", "captions"])
    assert len(everything) == 10 and [it.image_id for it in rest.images] == [3] and rest.captions == []


def test_asking_for_unpaired_rows_that_do_not_exist_is_refused(tiny_world, tiny_store, tmp_path):
    with pytest.raises(UserError, match="data.unpaired asks for images.*lower data.pairs_fraction"):
        train(tiny_cfg(tiny_world, tiny_store, **{"data.unpaired": '["images"]'}), tmp_path / "run")


def test_the_unpaired_stream_visits_every_row_once_a_pass_and_any_slice_of_it_is_the_same():
    stream = unpaired_rows(7, seed=3, start=0, count=21)
    for p in range(3):
        assert sorted(stream[7 * p:7 * p + 7]) == list(range(7))
    assert not np.array_equal(stream[:7], stream[7:14])  # a new order each pass
    assert np.array_equal(unpaired_rows(7, 3, 5, 9), stream[5:14])  # a resumed run draws the same rows
    assert not np.array_equal(unpaired_rows(7, 4, 0, 21), stream)


def test_a_batch_holds_its_pairs_then_unpaired_images_and_captions(tiny_world):
    items = load_dataset(tiny_world).split("train")
    paired, unpaired = split_pairs(items, 0.25, ["images", "captions"])
    pairs = Pairs.of(paired)
    model, tok = create_student("tiny", 16, captions=[c for it in items for c in it.captions], log=lambda *a: None)
    pre = model.cfg.preprocess()
    aug = load_config(None, []).augment

    def batches(step_range, epoch=1):
        return TrainBatches(pairs, epoch_order(len(pairs), 0, epoch), step_range, batch=8, accum=2, rank=0, world=1,
                            pre=pre, aug=aug, tok=tok, seed=0, epoch=epoch, unpaired=unpaired, unpaired_per=3,
                            steps_per_epoch=len(pairs) // 8)

    few = TrainBatches(pairs, epoch_order(len(pairs), 0, 0), range(0, 1), batch=8, accum=1, rank=0, world=1, pre=pre,
                       aug=aug, tok=tok, seed=0, epoch=0, steps_per_epoch=len(pairs) // 8,
                       unpaired=type(unpaired)(images=unpaired.images[:2], captions=[]), unpaired_per=5)[0]
    assert len(few["pixels"]) == 8 + 2 and len(few["input_ids"]) == 8  # never more rows than a kind has
    b = batches(range(0, 2))[1]  # step 0, second micro-batch: 4 pairs, 3 unpaired rows of each kind
    assert b["pairs"] == 4 and b["pixels"].shape[0] == 7 and b["input_ids"].shape[0] == 7
    paired_ids = {it.image_id for it in paired}
    assert set(b["image_ids"][:4].tolist()) <= paired_ids and not set(b["image_ids"][4:].tolist()) & paired_ids
    assert torch.equal(b["caption_image_ids"][:4], b["image_ids"][:4])
    assert not set(b["caption_image_ids"][4:].tolist()) & paired_ids
    by_id = {c: it.image_id for it in items for c in it.caption_ids}
    assert [by_id[c] for c in b["caption_ids"].tolist()] == b["caption_image_ids"].tolist()
    # the same rows, pixels included, whichever step the loader started at (a resumed run)
    again = batches(range(1, 2))[1]
    assert torch.equal(again["image_ids"], batches(range(0, 2))[3]["image_ids"])
    assert torch.equal(again["pixels"], batches(range(0, 2))[3]["pixels"])


def test_unpaired_rows_join_only_the_within_modality_triplets():
    g = torch.Generator().manual_seed(0)
    s_img, t_img = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1), \
        torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    s_txt, t_txt = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1), \
        torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    ids, img_ids, txt_ids = torch.arange(4), torch.tensor([0, 1, 2, 3, 10, 11]), torch.tensor([0, 1, 2, 3, 12])
    got = hard_negative_distill(s_img, t_img, s_txt, t_txt, ids, 0.2, img_ids, txt_ids)
    want = (hardest_triplet(s_img, t_img, img_ids, 0.2) + hardest_triplet(s_txt, t_txt, txt_ids, 0.2)
            + hardest_triplet(s_img[:4], t_txt[:4], ids, 0.2) + hardest_triplet(s_txt[:4], t_img[:4], ids, 0.2))
    assert got == pytest.approx(float(want))
    assert got != pytest.approx(float(hard_negative_distill(s_img[:4], t_img[:4], s_txt[:4], t_txt[:4], ids, 0.2)))


def test_settings_that_cannot_work_are_refused():
    with pytest.raises(UserError, match="pairs_fraction must be in"):
        load_config(None, ["data.pairs_fraction=0"])
    with pytest.raises(UserError, match="data.unpaired lists some of images, captions"):
        load_config(None, ['data.unpaired=["pixels"]'])
    with pytest.raises(UserError, match="needs the teacher"):
        load_config(None, ["method=clip", 'data.unpaired=["images"]'])
    with pytest.raises(UserError, match="optim.steps must not be negative"):
        load_config(None, ["optim.steps=-1"])


def test_a_budget_in_steps_sets_the_cosine_and_may_end_mid_epoch(tiny_world, tiny_store, tmp_path):
    o = load_config(None, ["optim.schedule=cosine", "optim.steps=50", "optim.epochs=9"]).optim
    assert lr_at(25, 30, o) == pytest.approx(o.lr / 2)  # half of 50 steps, not of 9 epochs x 30
    manifest = train(tiny_cfg(tiny_world, tiny_store, **{"optim.steps": 40}), tmp_path / "run")
    assert manifest["steps"] == 40  # 30 steps an epoch: the second one stops after 10
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [30, 40]  # evaluated where the budget ends too


def test_a_run_with_unpaired_rows_trains_on_them_and_resumes_to_the_same_weights(tiny_world, tiny_store, tmp_path,
                                                                                  monkeypatch):
    over = {"data.pairs_fraction": 0.25, "data.unpaired": '["images","captions"]', "optim.steps": 24,
            "run.checkpoint_every": 8}
    seen = []
    real_forward = train_module._forward

    def forward_and_note(ddp, model, b, *args):
        seen.append((b["pairs"], len(b["pixels"]), len(b["input_ids"])))
        return real_forward(ddp, model, b, *args)

    monkeypatch.setattr(train_module, "_forward", forward_and_note)
    whole = train(tiny_cfg(tiny_world, tiny_store, **over), tmp_path / "whole")
    assert whole["steps"] == 24 and set(seen) == {(16, 32, 32)}  # 16 pairs, 16 unpaired of each kind
    log = (tmp_path / "whole" / "steps.jsonl").read_text().splitlines()
    assert len(log) == 24 and all(np.isfinite(v) for s in log for v in json.loads(s)["loss"].values())

    real_lr = train_module.lr_at

    def killed_at_step_19(step, *args):
        if step == 19:
            raise KeyboardInterrupt  # after the checkpoint of step 16, before the next
        return real_lr(step, *args)

    monkeypatch.setattr(train_module, "lr_at", killed_at_step_19)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(tiny_world, tiny_store, **over), tmp_path / "killed")
    assert json.loads((tmp_path / "killed" / "state.json").read_text())["step"] == 16
    monkeypatch.setattr(train_module, "lr_at", real_lr)
    train(tiny_cfg(tiny_world, tiny_store, **over), tmp_path / "killed")
    a = load_file(str(tmp_path / "whole" / "checkpoints" / "step-00000024" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "checkpoints" / "step-00000024" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_training_images_may_come_without_captions_but_evaluation_images_may_not(tmp_path):
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(tmp_path / f"{i}.png")
    rows = [{"image": "0.png", "captions": ["a red square"], "split": "train"},
            {"image": "1.png", "captions": [], "split": "train"},
            {"image": "2.png", "captions": ["a dark square"], "split": "val"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_dataset(tmp_path / "d.jsonl")
    assert [it.captions for it in ds.split("train")] == [("a red square",), ()]
    rows[2]["captions"] = []
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match="1 val/test images have no captions.*only training images may have none"):
        load_dataset(tmp_path / "d.jsonl")


def test_the_initial_weights_can_have_a_seed_of_their_own(tiny_world, tiny_store, tmp_path, monkeypatch):
    """run.init_seed separates the weights a run starts from from its data order (to tell apart what
    varies between seeds); without it they follow run.seed, as before."""
    starts = []

    def create_and_note(*args, **kwargs):
        model, tok = create_student(*args, **kwargs)
        starts.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return model, tok

    monkeypatch.setattr(train_module, "create_student", create_and_note)
    for i, (seed, init) in enumerate([(1, 5), (2, 5), (1, -1), (1, 1)]):
        train(tiny_cfg(tiny_world, tiny_store, **{"run.seed": seed, "run.init_seed": init, "optim.steps": 1}),
              tmp_path / f"run{i}")
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert same(starts[0], starts[1])  # one init seed, two data orders
    assert not same(starts[0], starts[2])
    assert same(starts[2], starts[3])  # -1: the run's seed
