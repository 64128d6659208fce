"""Shared fixtures: a tiny demo world and a tiny demo teacher, made once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TQDM_DISABLE", "1")  # keep test output readable

TINY_SPLITS = {"train": 96, "val": 24, "test": 24}
# Long enough that the tiny teacher and student tell images apart (tests/test_test_bundle.py checks
# it): search tests can then assert exact outcomes (hit 1 is the query image) instead of scores
# that any image would reach. The student trains in about 20 s. (6 epochs at 3e-3 were enough on an
# AVX-512 machine, but on a 2-core EPYC without it the same run ended below chance, two test images
# at cosine 0.99994: 12 epochs at 2e-3 left every pair below 0.9987 there.)
TEACHER_EPOCHS = 30
STUDENT_EPOCHS, STUDENT_LR = 12, 2e-3

# A folder holding world/, bundle/ and index/, made by an install with torch: the serve tests
# then run in an install without it (tests/test_packaging.py runs them so in a fresh venv).
PREBUILT = os.environ.get("DSMD_TEST_PREBUILT")


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    """A 144-image demo world (folder holding dataset_world.json and images/)."""
    if PREBUILT:
        return Path(PREBUILT) / "world"
    from dsmd.world import generate

    out = tmp_path_factory.mktemp("world")
    generate(out, seed=7, image_size=32, split_sizes=TINY_SPLITS)
    return out


@pytest.fixture(scope="session")
def tiny_teacher(tiny_world, tmp_path_factory) -> Path:
    """A demo teacher trained on the tiny world until its image embeddings spread out (30 epochs,
    about 3 s; after 2 every image sat at one point, median cosine 0.9999, and so did the student's)."""
    from dsmd.distill.train_teacher import TeacherTrainConfig, train_teacher

    out = tmp_path_factory.mktemp("teacher")
    cfg = TeacherTrainConfig(epochs=TEACHER_EPOCHS, batch_size=32, warmup_steps=2, eval_every=10, threads=1)
    train_teacher(tiny_world, out, cfg, model_cfg={"image_size": 32, "channels": (8, 16), "image_hidden": 32,
                                                    "text_width": 32, "text_dilations": (1, 2), "dim": 16})
    return out


@pytest.fixture(scope="session")
def tiny_store(tiny_world, tiny_teacher, tmp_path_factory) -> Path:
    """The tiny teacher's feature store of the tiny world."""
    from dsmd.datasets import load_dataset
    from dsmd.distill.features import extract
    from dsmd.distill.teachers import load_teacher

    out = tmp_path_factory.mktemp("store")
    extract(load_teacher("demo", tiny_teacher), load_dataset(tiny_world), out, chunk=32, workers=0)
    return out


@pytest.fixture(scope="session")
def tiny_student(tiny_world, tiny_store, tmp_path_factory) -> Path:
    """A run folder of the tiny student, distilled until it tells images apart (its best/ is the
    checkpoint)."""
    from dsmd.distill.config import load_config
    from dsmd.distill.train import train

    out = tmp_path_factory.mktemp("student")
    cfg = load_config(None, [f"data.dataset={tiny_world}", f"data.features={tiny_store}", "student.preset=tiny",
                             f"optim.epochs={STUDENT_EPOCHS}", "optim.batch_size=16", f"optim.lr={STUDENT_LR}",
                             "loss.queue_size=64",
                             "loss.margin=0.2", "run.workers=0", "run.threads=1", "run.stop_at_chance_after=0"])
    train(cfg, out)
    return out


@pytest.fixture(scope="session")
def tiny_search(request, tmp_path_factory) -> Path:
    """A folder with bundle/ (the tiny student exported to ONNX) and index/ (the tiny world's test
    split indexed with it). Tests that change the index copy it first."""
    if PREBUILT:
        return Path(PREBUILT)
    from dsmd.bundle import Bundle
    from dsmd.export.onnx import ExportConfig, export, student_encoders
    from dsmd.index.build import build, dataset_sources

    world, student = request.getfixturevalue("tiny_world"), request.getfixturevalue("tiny_student")
    root = tmp_path_factory.mktemp("search")
    export(student_encoders(student), root / "bundle", data=world, cfg=ExportConfig(variants=()), log=lambda *a: None)
    build(root / "index", Bundle(root / "bundle"), dataset_sources(world, split="test"), progress=False)
    return root


# ---------------------------------------------------------------- no silent skips
# `make test` installs everything the suite needs, so a skip means a broken install or a missing
# system package (the browser). Where that is acceptable (a laptop without chromium) it is printed as
# a skip; DSMD_NO_SKIPS=1 (set by .ci/run) turns every skip, at collection or in a test, into a failed run.
_skips: list[str] = []


def _skips_refused() -> bool:
    return os.environ.get("DSMD_NO_SKIPS") == "1"


def _note_skip(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skips.append(f"{report.nodeid}: {reason}")


def pytest_collectreport(report) -> None:
    _note_skip(report)


def pytest_runtest_logreport(report) -> None:
    _note_skip(report)


def pytest_terminal_summary(terminalreporter) -> None:
    if _skips_refused() and _skips:
        terminalreporter.section("skips refused (DSMD_NO_SKIPS=1)", red=True)
        for line in _skips:
            terminalreporter.write_line(line)


def pytest_sessionfinish(session) -> None:
    if _skips_refused() and _skips and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = 1
