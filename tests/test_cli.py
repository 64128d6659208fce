"""The command line: help a newcomer can follow, clear errors, exit codes."""

import os
import subprocess
import sys

import pytest

from dsmd.cli import build_parser, main

COMMANDS = ("generate", "check-data", "teachers", "train-teacher", "features", "recall", "students", "distill",
            "evaluate", "export", "index", "serve")


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "dsmd.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for cmd in COMMANDS:
        assert cmd in out
    assert "make demo" in out


def test_each_command_has_help():
    parser = build_parser()
    for cmd in COMMANDS:
        with pytest.raises(SystemExit) as e:
            parser.parse_args([cmd, "--help"])
        assert e.value.code == 0


def _choices(parser, command: str, option: str) -> list[str]:
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return list(next(a for a in sub._actions if option in a.option_strings).choices)


def test_teacher_and_preset_choices_are_the_registries(capsys):
    """Every command that takes a teacher kind or a student preset offers exactly what is registered."""
    from dsmd.distill.student_presets import student_preset_names
    from dsmd.distill.teachers import list_teachers, teacher_kinds

    parser = build_parser()
    assert _choices(parser, "features", "--teacher") == teacher_kinds()
    assert _choices(parser, "export", "--teacher") == teacher_kinds()
    assert _choices(parser, "distill", "--preset") == student_preset_names()
    assert main(["teachers"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {kind:7s} {what}" in out for kind, what in list_teachers().items())
    assert main(["students"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == student_preset_names()


def test_building_the_parser_imports_no_torch():
    """The registries the parser reads are torch-free, so `dsmd --help` stays fast."""
    code = ("import sys; from dsmd.cli import build_parser; build_parser(); "
            "heavy = sorted(m for m in ('torch', 'transformers', 'timm', 'dsmd.distill.student') if m in sys.modules); "
            "print(heavy); sys.exit(1 if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_generate_and_check_data(tmp_path, capsys):
    assert main(["generate", "--out", str(tmp_path / "w"), "--train", "4", "--val", "2", "--test", "2",
                 "--image-size", "16"]) == 0
    assert main(["check-data", str(tmp_path / "w")]) == 0
    out = capsys.readouterr().out
    assert "train        4 images" in out and "fingerprint" in out


def test_user_errors_are_one_line_not_a_traceback(tmp_path, capsys):
    assert main(["check-data", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsmd check-data: error:") and "does not exist" in err and "Traceback" not in err
    assert main(["recall", str(tmp_path)]) == 2
    assert "not a complete feature store" in capsys.readouterr().err
    assert main(["features", "--teacher", "demo", "--teacher-path", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_odd_split_sizes_are_refused(tmp_path, capsys):
    assert main(["generate", "--out", str(tmp_path / "w"), "--train", "3"]) == 2
    assert "even" in capsys.readouterr().err


def test_a_command_whose_extra_is_missing_names_the_extra(tmp_path):
    """In a serve-only install (no torch), a training command says what to install, in one line."""
    code = ("import sys; sys.modules['torch'] = None; from dsmd.cli import main; "
            f"sys.exit(main(['distill', '--out', {str(tmp_path / 'run')!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert "pip install 'dsmd[train]'" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("layout", ["plain", "filepath", "elsewhere"])
def test_the_pipeline_commands_read_a_karpathy_file_in_each_layout(tmp_path, capsys, layout):
    """check-data, train-teacher, features and distill on: the demo layout (images/ beside the file, no
    filepath), a Karpathy file whose filepath is "images" beside images/, and images elsewhere (--images)."""
    import json
    import shutil

    world = tmp_path / "w"
    assert main(["generate", "--out", str(world), "--train", "16", "--val", "4", "--test", "4",
                 "--image-size", "16"]) == 0
    ann = world / "dataset_world.json"
    images: list[str] = []
    if layout == "filepath":
        doc = json.loads(ann.read_text())
        for img in doc["images"]:
            img["filepath"] = "images"
        ann.write_text(json.dumps(doc))
    elif layout == "elsewhere":
        shutil.move(str(world / "images"), str(tmp_path / "photos"))
        images = ["--images", str(tmp_path / "photos")]
    assert main(["check-data", str(ann), *images]) == 0
    assert main(["train-teacher", "--data", str(ann), *images, "--out", str(tmp_path / "t"), "--epochs", "1",
                 "--batch-size", "8", "--threads", "1"]) == 0
    assert main(["features", "--teacher", "demo", "--teacher-path", str(tmp_path / "t"), "--data", str(ann), *images,
                 "--out", str(tmp_path / "f"), "--workers", "0"]) == 0
    config = str(__import__("pathlib").Path(__file__).resolve().parent.parent / "configs" / "demo.json")
    assert main(["distill", "--config", config, "--out", str(tmp_path / "r"), "--data", str(ann),
                 *images, "--features", str(tmp_path / "f"), "--preset", "tiny", "--set", "optim.epochs=1",
                 "--set", "optim.batch_size=8", "--set", "loss.queue_size=16", "--set", "run.workers=0",
                 "--set", "run.threads=1", "--set", "run.stop_at_chance_after=0"]) == 0
    out = capsys.readouterr()
    assert "feature store ready" in out.out and "Traceback" not in out.err


def test_offline_holds_for_the_command_only(tmp_path, monkeypatch):
    """`--offline` reaches the command's worker processes through DSMD_OFFLINE; a caller of main() in
    the same process is not left offline afterwards (a later test once passed only because of that)."""
    monkeypatch.delenv("DSMD_OFFLINE", raising=False)
    assert main(["features", "--offline", "--teacher", "clip", "--teacher-path", "x", "--data",
                 str(tmp_path / "none"), "--out", str(tmp_path / "f")]) == 2
    assert "DSMD_OFFLINE" not in os.environ
    monkeypatch.setenv("DSMD_OFFLINE", "0")
    main(["features", "--offline", "--teacher", "clip", "--teacher-path", "x", "--data", str(tmp_path / "none"),
          "--out", str(tmp_path / "f")])
    assert os.environ["DSMD_OFFLINE"] == "0"
