"""The student, the trainer's parts, and whole training runs on the tiny world (real processes,
a real SIGKILL, real torchrun with two gloo processes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_retrieval import recall_by_definition

from dsmd.distill.config import DistillConfig, load_config
from dsmd.distill.data import epoch_order, micro_batch, random_crop_box
from dsmd.distill.evaluate import CollapsedError
from dsmd.distill.student import create_student, load_student, save_student, tokenize
from dsmd.distill.student_presets import student_preset, student_preset_names
from dsmd.distill.train import Queue, lr_at, train
from dsmd.errors import UserError
from dsmd.retrieval import chance_rsum, evaluate

CAPTIONS = ["a red circle left of a blue square", "a small green triangle above a big yellow star",
            "two circles", "a big blue square"] * 5


def quiet(*a, **k):
    pass


# ---------------------------------------------------------------- the student


def test_base_preset_is_the_papers_197m_student():
    model, _ = create_student("base", 768, captions=CAPTIONS, log=quiet)
    counts = model.parameter_counts()
    assert 196e6 < counts["total"] < 198e6  # ViT-B/16 + BERT-base + two 768x768 projections
    assert model.cfg.image_size == 224 and model.cfg.patch_size == 16


@pytest.mark.parametrize("name", student_preset_names())
def test_every_preset_is_a_registry_entry_with_a_purpose_and_valid_fields(name):
    """`dsmd students`, `--preset` and the config read the one table; each entry builds a config."""
    from dataclasses import fields

    from dsmd.distill.student import StudentModelConfig, list_presets, preset_config

    preset = student_preset(name)
    assert preset.name == name and preset.description.strip() and name in list_presets()
    assert set(preset.fields) <= {f.name for f in fields(StudentModelConfig)} - {"preset", "dim"}
    cfg = preset_config(name, dim=8)
    assert cfg.preset == name and all(getattr(cfg, k) == v for k, v in preset.fields.items())
    assert load_config(None, [f"student.preset={name}"]).student.preset == name


def test_an_unknown_preset_is_refused_by_the_config_and_by_create_student():
    with pytest.raises(UserError, match="student.preset must be one of base, demo, tiny"):
        load_config(None, ["student.preset=huge"])
    with pytest.raises(UserError, match="unknown student preset 'huge'"):
        create_student("huge", 8, captions=CAPTIONS, log=quiet)


def test_student_outputs_unit_vectors_of_the_teacher_dim(tmp_path):
    model, tok = create_student("tiny", 24, captions=CAPTIONS, log=quiet)
    model.eval()
    ids, mask = tokenize(tok, CAPTIONS[:3] + [""])
    img, txt = model(torch.randn(4, 3, 32, 32), ids, mask)
    assert img.shape == (4, 24) and txt.shape == (4, 24)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(4))
    save_student(model, tok, tmp_path)
    again, tok2 = load_student(tmp_path)
    torch.testing.assert_close(again.encode_text(ids, mask), txt)
    assert tok2.encode("a red circle").ids == tok.encode("a red circle").ids


def test_projections_are_xavier_normal_with_gain_1_414():
    model, _ = create_student("base", 768, captions=CAPTIONS, log=quiet)
    w = model.image_proj.weight
    expected_std = 1.414 * (2 / (w.shape[0] + w.shape[1])) ** 0.5
    assert w.std().item() == pytest.approx(expected_std, rel=0.01)
    assert model.image_proj.bias.abs().max() == 0


def test_learnt_vocabulary_is_the_same_every_time():
    from dsmd.distill.student import build_tokenizer

    vocabs = {tuple(sorted(build_tokenizer(CAPTIONS, 64, 16).get_vocab().items())) for _ in range(5)}
    assert len(vocabs) == 1


def test_random_initialisation_is_announced():
    lines = []
    create_student("tiny", 16, captions=CAPTIONS, log=lines.append)
    assert any("image encoder: random initialisation" in line for line in lines)
    assert any("text encoder: random initialisation" in line for line in lines)


def test_pretrained_towers_load_from_local_files(tmp_path):
    import timm
    from safetensors.torch import save_file
    from transformers import BertConfig, BertForMaskedLM

    # a timm checkpoint *with* its classifier head, at another image size (position embeddings resampled)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10, img_size=48, patch_size=8,
                            embed_dim=32, depth=2, num_heads=2)
    save_file(vit.state_dict(), str(tmp_path / "vit.safetensors"))
    # an HF BERT directory as `save_pretrained` writes it, with a vocab.txt
    bert_dir = tmp_path / "bert"
    bert = BertForMaskedLM(BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64))
    bert.save_pretrained(bert_dir)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "left", "of", "blue", "square"]
    (bert_dir / "vocab.txt").write_text("\n".join(words + [f"w{i}" for i in range(40 - len(words))]) + "\n")

    lines = []
    model, tok = create_student("tiny", 16, image_init=tmp_path / "vit.safetensors", text_init=bert_dir,
                                log=lines.append)
    torch.testing.assert_close(model.vision.blocks[1].mlp.fc1.weight, vit.blocks[1].mlp.fc1.weight)
    torch.testing.assert_close(model.text.encoder.layer[1].output.dense.weight,
                               bert.bert.encoder.layer[1].output.dense.weight)
    assert model.cfg.vocab_size == 40 and model.cfg.init["text"] == str(bert_dir)
    assert tok.encode("A red circle").tokens == ["[CLS]", "a", "red", "circle", "[SEP]"]
    assert any("pretrained weights from" in line for line in lines)

    wrong = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                              embed_dim=64, depth=2, num_heads=2)
    save_file(wrong.state_dict(), str(tmp_path / "wrong.safetensors"))
    with pytest.raises(UserError, match="does not fit the student's encoder.*wrong shape"):
        create_student("tiny", 16, image_init=tmp_path / "wrong.safetensors", captions=CAPTIONS, log=quiet)
    with pytest.raises(UserError, match="does not exist"):
        create_student("tiny", 16, image_init=tmp_path / "nope.pth", captions=CAPTIONS, log=quiet)


# ---------------------------------------------------------------- config, data order, schedule, queue


def test_config_file_and_overrides(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"_comment": "x", "student": {"preset": "demo"}, "optim": {"lr": 5e-4}}))
    cfg = load_config(f, ["loss.margin=0.2", 'loss.use=["fd","sd"]', "balancer.mode=none", "data.dataset=/d"])
    assert cfg.student.preset == "demo" and cfg.optim.lr == 5e-4 and cfg.optim.epochs == 20
    assert cfg.loss.margin == 0.2 and cfg.loss.use == ["fd", "sd"] and cfg.balancer.mode == "none"
    assert cfg.data.dataset == "/d"
    assert DistillConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
    with pytest.raises(UserError, match="unknown setting 'lrr'"):
        load_config(None, ["optim.lrr=1"])
    with pytest.raises(UserError, match="unknown key"):
        f.write_text(json.dumps({"optim": {"learning_rate": 1}}))
        load_config(f)
    with pytest.raises(UserError, match="balancer.*mode"):
        load_config(None, ["balancer.mode=magic"])
    with pytest.raises(UserError, match="loss.use"):
        load_config(None, ['loss.use=["cd","xx"]'])
    with pytest.raises(UserError, match="optim.epochs: expected int, got 'two'"):
        load_config(None, ["optim.epochs=two"])
    with pytest.raises(UserError, match="run.device must be auto, cpu or cuda"):
        load_config(None, ["run.device=gpu"])
    with pytest.raises(UserError, match="optim.accum_steps must be positive"):
        load_config(None, ["optim.accum_steps=0"])
    with pytest.raises(UserError, match="balancer.fixed must give a weight"):
        load_config(None, ["balancer.mode=fixed", 'balancer.fixed={"cd": 1}'])
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0  # an int is a fine float


def test_micro_batches_partition_the_global_batch_for_any_world_and_accumulation():
    order = epoch_order(200, seed=3, epoch=1)
    for world, accum in [(1, 1), (2, 1), (1, 4), (2, 2), (4, 2)]:
        for step in (0, 2):
            parts = [micro_batch(order, step, 16, accum, r, world, m) for m in range(accum) for r in range(world)]
            assert np.array_equal(np.sort(np.concatenate(parts)), np.sort(order[step * 16:(step + 1) * 16]))
    assert not np.array_equal(epoch_order(200, 3, 1), epoch_order(200, 3, 2))
    assert np.array_equal(epoch_order(200, 3, 1), epoch_order(200, 3, 1))


def test_random_crop_boxes_stay_inside_and_are_reproducible():
    for seed in range(50):
        box = random_crop_box(64, 48, np.random.default_rng(seed), (0.5, 1.0), (0.75, 1.333))
        assert 0 <= box[0] < box[2] <= 64 and 0 <= box[1] < box[3] <= 48
        assert (box[2] - box[0]) * (box[3] - box[1]) >= 0.45 * 64 * 48
        assert box == random_crop_box(64, 48, np.random.default_rng(seed), (0.5, 1.0), (0.75, 1.333))


def test_step_decay_schedule_of_the_paper():
    o = DistillConfig().optim  # lr 1e-4, x0.1 at epoch 10 of 20
    assert lr_at(0, 100, o) == pytest.approx(1e-4)
    assert lr_at(999, 100, o) == pytest.approx(1e-4)
    assert lr_at(1000, 100, o) == pytest.approx(1e-5)
    o.warmup_steps = 10
    assert lr_at(4, 100, o) == pytest.approx(5e-5)


def test_cosine_schedule_falls_from_lr_to_zero_after_warmup():
    o = DistillConfig().optim
    o.schedule, o.epochs, o.warmup_steps = "cosine", 2, 10  # 200 steps of 100 per epoch
    assert lr_at(9, 100, o) == pytest.approx(1e-4)
    assert lr_at(10, 100, o) == pytest.approx(1e-4)
    assert lr_at(105, 100, o) == pytest.approx(5e-5)  # half way through the steps after warm-up
    assert lr_at(199, 100, o) < 1e-7 and lr_at(250, 100, o) == pytest.approx(0.0, abs=1e-12)
    assert all(lr_at(t, 100, o) >= lr_at(t + 1, 100, o) for t in range(10, 220))
    with pytest.raises(UserError, match="optim.schedule must be step or cosine"):
        load_config(None, ["optim.schedule=linear"])


def test_queue_is_a_fifo_that_wraps():
    q = Queue(5, 2, torch.device("cpu"))
    assert (q.ids == -1).all()
    q.push(torch.ones(3, 2), torch.tensor([1, 2, 3]))
    q.push(2 * torch.ones(3, 2), torch.tensor([4, 5, 6]))
    assert q.ids.tolist() == [6, 2, 3, 4, 5] and q.ptr == 1
    assert q.emb[0].tolist() == [2.0, 2.0] and q.emb[1].tolist() == [1.0, 1.0]
    q.push(torch.arange(14.0).reshape(7, 2), torch.arange(10, 17))  # more than fits: the newest 5 stay
    assert sorted(q.ids.tolist()) == [12, 13, 14, 15, 16]


def test_chance_rsum_matches_random_embeddings():
    rng = np.random.default_rng(0)
    runs = [evaluate(rng.normal(size=(40, 8)), rng.normal(size=(200, 8)), np.repeat(np.arange(40), 5)).rsum
            for _ in range(30)]
    assert np.mean(runs) == pytest.approx(chance_rsum(40, [5] * 40), rel=0.1)


# ---------------------------------------------------------------- whole runs on the tiny world


def tiny_cfg(world: Path, features: Path, **over) -> DistillConfig:
    sets = [f"data.dataset={world}", f"data.features={features}", "student.preset=tiny", "optim.epochs=3",
            "optim.batch_size=16", "optim.lr=1e-3", "loss.queue_size=64", "loss.margin=0.2", "run.workers=0",
            "run.threads=1", "run.checkpoint_every=7", "run.stop_at_chance_after=0", "balancer.window=10"]
    return load_config(None, sets + [f"{k}={v}" for k, v in over.items()])


@pytest.fixture(scope="module")
def finished_run(tiny_world, tiny_store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    train(tiny_cfg(tiny_world, tiny_store), out)
    return out


def test_a_run_writes_best_checkpoint_logs_and_plot(finished_run):
    out = finished_run
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["artifact"] == "student" and manifest["steps"] == 90  # 480 pairs / 16 x 3 epochs
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert manifest["best"]["rsum"] == max(m["rsum"] for m in metrics)
    assert json.loads((out / "best" / "best.json").read_text())["epoch"] == manifest["best"]["epoch"]
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, 91))
    assert set(steps[0]["factor"]) == {"cd", "fd", "sd", "hnd"}  # every weight, every step
    # DWA over windows of 10 steps: equal weights until two window means exist, then they move,
    # only at window boundaries, and always sum to K = 4
    weights = [s["weight"] for s in steps]
    assert all(sum(w.values()) == pytest.approx(4) for w in weights)
    assert all(w == {n: 1.0 for n in w} for w in weights[:20])
    moved = max(abs(v - 1) for w in weights[20:] for v in w.values())
    assert moved > 0.01, f"the balancer's weights stayed within {moved:.4f} of equal"
    assert weights[20] == weights[29] != weights[30]
    assert json.loads((out / "config.json").read_text()) == json.loads((out / "best" / "config.json").read_text())
    assert (out / "plot.png").stat().st_size > 10_000
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb")).Reload()
    assert {"loss/cd", "weight/hnd", "factor/hnd", "val/rsum"} <= set(acc.Tags()["scalars"])
    assert len(acc.Scalars("weight/fd")) == 90


def _student_recall(checkpoint: Path, items: list) -> dict[str, float]:
    """Recall of a saved student on `items`: encoded here (the plain preprocessing), scored by the definition."""
    from dsmd.images import open_image
    from dsmd.preprocess import image_to_array

    model, tok = load_student(checkpoint)
    pre = model.cfg.preprocess()
    with torch.no_grad():
        img = model.encode_image(torch.from_numpy(np.stack([image_to_array(open_image(it.path), pre) for it in items])))
        txt = model.encode_text(*tokenize(tok, [c for it in items for c in it.captions]))
    return recall_by_definition(img.numpy(), txt.numpy(), [i for i, it in enumerate(items) for _ in it.captions])


def _row(name: str, r: dict[str, float]) -> str:
    cells = [f"{r[f'{w}_R@{k}']:.1f}" for w in ("i2t", "t2i") for k in (1, 5, 10)] + [f"{r['rsum']:.1f}"]
    return f"| {name} | {' | '.join(cells)} |"


def test_evaluate_prints_teacher_and_student_from_the_same_split(finished_run, tiny_world, tiny_store, capsys):
    """Both rows are the recall of the test split: the teacher's from its stored test embeddings, the
    student's from its best checkpoint, each recomputed here (the val split gives other numbers)."""
    from dsmd.cli import main
    from dsmd.datasets import load_dataset
    from dsmd.distill.features import FeatureStore

    items = load_dataset(tiny_world).split("test")
    f = FeatureStore(tiny_store).split("test")
    teacher = recall_by_definition(f.image_emb, f.caption_emb, f.caption_image)
    student = _student_recall(finished_run / "best", items)
    assert main(["evaluate", str(finished_run), "--data", str(tiny_world), "--features", str(tiny_store),
                 "--split", "test", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "test: 24 images, 120 captions" in out
    assert _row("teacher", teacher) in out and _row("student", student) in out
    assert f"the student keeps {100 * student['rsum'] / teacher['rsum']:.1f}% of the teacher's RSUM" in out


def test_a_finished_run_is_not_trained_again_and_another_config_is_refused(finished_run, tiny_world, tiny_store):
    again = train(tiny_cfg(tiny_world, tiny_store), finished_run)
    assert again["steps"] == 90
    with pytest.raises(UserError, match="another config.*optim.lr"):
        train(tiny_cfg(tiny_world, tiny_store, **{"optim.lr": 5e-4}), finished_run)


def test_a_run_started_before_a_setting_existed_resumes_as_it_ran(tmp_path):
    from dsmd.distill.checkpoint import open_run

    cfg = DistillConfig()
    saved = cfg.to_json()
    del saved["balancer"]["window"], saved["optim"]["schedule"]  # settings added since that run began
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(saved))
    with pytest.raises(UserError, match=r"differs at balancer\.window\); it was started before balancer\.window "
                                        r"existed: resume it as it ran with --set balancer\.window=0, or"):
        open_run(run, cfg, restart=False, is_main=True, barrier=lambda: None)
    cfg.balancer.window = 0  # the earlier behaviour; optim.schedule's default ("step") already is
    assert open_run(run, cfg, restart=False, is_main=True, barrier=lambda: None) == (None, None)
    assert json.loads((run / "config.json").read_text())["balancer"]["window"] == 0  # now written out


def test_resume_refuses_features_of_another_teacher_but_takes_harmless_changes(finished_run, tiny_world, tiny_store,
                                                                              tmp_path):
    import shutil

    from dsmd.distill.features import StoreMismatch

    run, store = tmp_path / "run", tmp_path / "store"
    shutil.copytree(finished_run, run)
    shutil.copytree(tiny_store, store)
    (run / "manifest.json").unlink()  # as if killed after its last checkpoint
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["teacher"]["checkpoint_hash"] = "0" * 64
    (store / "manifest.json").write_text(json.dumps(manifest))
    cfg = tiny_cfg(tiny_world, tiny_store)
    cfg.data.features = str(store)
    config = json.loads((run / "config.json").read_text())
    config["data"]["features"] = str(store)
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(StoreMismatch, match="another teacher"):
        train(cfg, run)
    cfg.data.features = str(tiny_store)
    config["data"]["features"] = str(tiny_store)
    (run / "config.json").write_text(json.dumps(config))
    cfg.run.workers, cfg.run.checkpoint_every = 1, 5  # do not change what is learnt: accepted
    assert train(cfg, run)["steps"] == 90


def test_a_store_of_another_data_set_is_refused(tiny_store, tmp_path):
    from dsmd.world import generate

    other = tmp_path / "other"
    generate(other, seed=8, image_size=32, split_sizes={"train": 96, "val": 24, "test": 24})
    with pytest.raises(UserError, match="another data set"):
        train(tiny_cfg(other, tiny_store), tmp_path / "run")


def test_training_stops_with_advice_when_recall_sits_at_chance(tiny_world, tiny_store, tmp_path):
    cfg = tiny_cfg(tiny_world, tiny_store, **{"optim.lr": 0.0, "run.stop_at_chance_after": 1, "optim.epochs": 2})
    with pytest.raises(CollapsedError, match="at chance.*loss.margin=0.2"):
        train(cfg, tmp_path / "run")


def test_direct_clip_baseline_trains_the_student_on_the_contrastive_loss_alone(tiny_world, tiny_store, tmp_path,
                                                                              monkeypatch):
    """The baseline (method=clip) learns from image-caption pairs only: the one loss it logs is CLIP's, its
    weights and temperature move from where they started, and its recorded val recall is its own."""
    import dsmd.distill.train as train_module
    from dsmd.datasets import load_dataset

    initial = {}

    def create_and_keep_a_copy(*args, **kwargs):  # the real student, its starting weights noted
        model, tok = create_student(*args, **kwargs)
        initial.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return model, tok

    monkeypatch.setattr(train_module, "create_student", create_and_keep_a_copy)
    run = tmp_path / "run"
    # fp32 evaluation (run.amp=off): the recorded val recall can then be recomputed exactly
    manifest = train(tiny_cfg(tiny_world, tiny_store, method="clip",
                              **{"optim.epochs": 1, "optim.accum_steps": 2, "run.amp": "off"}), run)
    assert manifest["steps"] == 30 and json.loads((run / "config.json").read_text())["method"] == "clip"
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 30 and all(set(s["loss"]) == {"clip"} for s in steps)

    state = torch.load(run / "checkpoints" / "step-00000030" / "train_state.pt", weights_only=True)
    assert state["logit_scale"] != pytest.approx(float(initial["logit_scale"]), abs=1e-4)  # the temperature learns
    trained = load_file(str(run / "best" / "model.safetensors"))
    assert [k for k in trained if torch.equal(trained[k], initial[k])] == []  # every tensor was trained

    best = json.loads((run / "best" / "best.json").read_text())
    want = _student_recall(run / "best", load_dataset(tiny_world).split("val"))
    assert {k: best["val"][k] for k in want} == pytest.approx(want)
    load_student(run / "best")  # the baseline's student is an ordinary student


def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "dsmd.cli", "distill", *args]


def _cli_args(world, store, out, extra=()) -> list[str]:
    cfg = tiny_cfg(world, store)
    sets = [f"{s}.{k}={json.dumps(v)}" for s, sec in cfg.to_json().items() if isinstance(sec, dict)
            for k, v in sec.items() if not isinstance(v, dict)]
    return ["--out", str(out), *[a for s in sets + list(extra) for a in ("--set", s)]]


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_weights(tiny_world, tiny_store, finished_run, tmp_path):
    """SIGKILL mid-epoch, start again: same final weights as the uninterrupted run."""
    out = tmp_path / "killed"
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.Popen(_cli(_cli_args(tiny_world, tiny_store, out)), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        state = out / "state.json"
        if state.exists() and 35 <= json.loads(state.read_text())["step"] < 60:  # mid-epoch 2
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "the run finished before it could be killed"
    killed_at = json.loads((out / "state.json").read_text())["step"]
    assert killed_at % 30, "killed exactly at an epoch end: not the mid-epoch case"

    done = subprocess.run(_cli(_cli_args(tiny_world, tiny_store, out)), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming {out} at step {killed_at}" in done.stdout
    a = load_file(str(finished_run / "checkpoints" / "step-00000090" / "model.safetensors"))
    b = load_file(str(out / "checkpoints" / "step-00000090" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    rec = lambda p: [json.loads(line)["rsum"] for line in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert rec(out) == pytest.approx(rec(finished_run))
    assert len((out / "steps.jsonl").read_text().splitlines()) == 90  # no step logged twice


@pytest.mark.slow
def test_two_process_torchrun_training_gathers_queues(tiny_world, tiny_store, tmp_path):
    """Half the pairs, and unpaired images beside them: each rank's image rows outnumber its text rows."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "dsmd.cli",
           "distill", *_cli_args(tiny_world, tiny_store, out), "--set", "optim.epochs=1",
           "--set", "data.pairs_fraction=0.5", "--set", 'data.unpaired=["images"]']
    done = subprocess.run(cmd, env={**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["steps"] == 15  # 240 pairs / 16
    state = torch.load(out / "checkpoints" / "step-00000015" / "train_state.pt", weights_only=True)
    # 15 steps through queues of 64, from both ranks: 16 pairs and 16 unpaired images a step into the
    # image queue (pointer at 480 mod 64), the 16 captions into the text queue (240 mod 64)
    assert state["queues"]["image"]["ptr"] == 480 % 64 and state["queues"]["text"]["ptr"] == 240 % 64
    assert (state["queues"]["text"]["ids"] >= 0).all()
    assert "1 process" not in done.stdout and "2 process(es) x 1 accumulation x 8" in done.stdout
