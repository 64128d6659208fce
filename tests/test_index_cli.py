"""`dsmd index ACTION`: one sub-parser per action, with only the options it uses (no index is built here)."""

from __future__ import annotations

import subprocess
import sys

import pytest

INDEX_ACTIONS = ("build", "sync", "embed", "add-texts", "remove", "merge", "info", "search", "duplicates", "recall")
FINALIZE = {"--index-type", "--tune-queries", "--backend", "--milvus-uri", "--collection"}
INDEX_OPTIONS = {  # what each action's --help documents
    "build": {"--bundle", "--variant", "--folder", "--data", "--images", "--split", "--from-shards", "--shard",
              "--batch", "--workers", "--memory-gib"} | FINALIZE,
    "sync": {"--bundle", "--variant", "--folder", "--watch", "--settle-s", "--json", "--batch", "--workers"}
    | FINALIZE,
    "embed": {"--bundle", "--variant", "--folder", "--data", "--images", "--split", "--ray", "--actors",
              "--threads-per-actor", "--gpus-per-actor", "--shard-size", "--batch"},
    "add-texts": {"--file", "--bundle", "--variant"} | FINALIZE,
    "remove": {"--id", "--uri", "--bundle", "--variant"} | FINALIZE,
    "merge": {"--bundle", "--variant"} | FINALIZE,
    "info": set(),
    "search": {"--text", "--image", "-k", "--bundle", "--variant"},
    "duplicates": {"--threshold", "--json"},
    "recall": set(),
}
INDEX_COMMAND_LINES = [  # together, every option of every action
    "build idx --bundle b --variant int8 --folder f --shard 0/2 --batch 8 --workers 1 --index-type hnsw "
    "--memory-gib 1.5 --tune-queries q.txt --backend milvus --milvus-uri m.db --collection c",
    "build idx --data d.json --images im --split test",
    "build idx --from-shards sh",
    "sync idx --folder f --bundle b --variant int8 --watch --settle-s 1.5 --json --batch 8 --workers 1 "
    "--index-type hnsw --tune-queries q.txt --backend faiss --milvus-uri m --collection c",
    "embed sh --bundle b --variant fp16 --data d.json --images im --split test --ray auto --actors 2 "
    "--threads-per-actor 2 --gpus-per-actor 0.5 --shard-size 80 --batch 16",
    "embed --folder f",
    "add-texts idx --file t.txt --bundle b --variant fp32 --index-type flat --tune-queries q --backend faiss "
    "--milvus-uri m --collection c",
    "remove idx --id 3 --id 4 --uri a.png --bundle b --variant int8 --index-type ivfpq --tune-queries q "
    "--backend milvus --milvus-uri m --collection c",
    "merge out s1 s2 --bundle b --variant fp32 --index-type ivfdisk --tune-queries q --backend faiss --milvus-uri m "
    "--collection c",
    "info idx",
    "search idx --text dogs -k 5 --bundle b --variant fp16",
    "search --image x.png",
    "duplicates idx --threshold 0.9 --json",
    "recall idx",
]
REQUIRED = {"build": ["--folder", "f"], "sync": ["--folder", "f"], "embed": ["--folder", "f"],
            "add-texts": ["--file", "t"], "merge": ["out", "s1"]}


def _index_action_parsers() -> dict:
    import argparse

    from dsmd.cli import build_parser

    def subparsers(p):
        return next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))

    return subparsers(subparsers(build_parser()).choices["index"]).choices


def _options(parser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings} - {"-h", "--help"}


def test_each_index_action_has_its_own_options():
    parsers = _index_action_parsers()
    assert tuple(parsers) == INDEX_ACTIONS
    assert {action: _options(p) for action, p in parsers.items()} == INDEX_OPTIONS


def test_each_index_action_accepts_its_documented_options():
    from dsmd.cli import build_parser

    used = {action: set() for action in INDEX_ACTIONS}
    for line in INDEX_COMMAND_LINES:
        argv = line.split()
        a = build_parser().parse_args(["index", *argv])
        assert a.action == argv[0] and callable(a.run)
        used[argv[0]] |= {w for w in argv if w.startswith("-")}
    assert used == INDEX_OPTIONS
    parse = build_parser().parse_args
    a = parse(["index", "remove", "idx", "--id", "3", "--id", "4", "--uri", "a.png"])
    assert (a.index, a.id, a.uri, a.bundle, a.variant, a.index_type) == ("idx", [3, 4], ["a.png"],
                                                                        "artifacts/bundle", "fp32", None)
    a = parse(["index", "merge", "out", "s1", "s2"])
    assert (a.index, a.inputs) == ("out", ["s1", "s2"])
    a = parse(["index", "embed", "--folder", "f"])  # the defaults of before
    assert (a.index, a.ray, a.actors, a.threads_per_actor, a.gpus_per_actor, a.shard_size, a.batch) == (
        "artifacts/index", "local", None, 1, 0, 10_000, 64)
    a = parse(["index", "build", "--folder", "f"])
    assert (a.index, a.batch, a.workers, a.memory_gib, a.backend, a.shard) == ("artifacts/index", 64, 2, None, None,
                                                                               None)
    assert parse(["index", "search", "--text", "x"]).k == 10
    assert parse(["index", "info"]).index == parse(["index", "recall"]).index == "artifacts/index"


def test_an_option_of_another_index_action_is_refused(capsys):
    from dsmd.cli import build_parser, main

    done = subprocess.run([sys.executable, "-m", "dsmd.cli", "index", "info", "idx", "--folder", "x"],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "dsmd index info: error: unrecognized arguments: --folder x" in done.stderr
    everything = set().union(*INDEX_OPTIONS.values())
    for action, own in INDEX_OPTIONS.items():
        # argparse takes an unambiguous prefix of an option for the option (--image for --images): not foreign
        for option in sorted(o for o in everything - own if not any(mine.startswith(o) for mine in own)):
            with pytest.raises(SystemExit) as e:
                build_parser().parse_args(["index", action, *REQUIRED.get(action, ["idx"]), option, "1"])
            assert e.value.code == 2, (action, option)
    capsys.readouterr()
    for argv in (["build", "idx", "--folder", "f", "--data", "d"], ["build", "idx"], ["embed", "--from-shards", "s"],
                 ["merge", "out"], ["add-texts", "idx"], []):
        with pytest.raises(SystemExit) as e:
            main(["index", *argv])
        assert e.value.code == 2, argv
        assert "error:" in capsys.readouterr().err


def test_index_help_lists_the_actions():
    import re

    out = subprocess.run([sys.executable, "-m", "dsmd.cli", "index", "--help"], capture_output=True, text=True,
                         check=True).stdout
    shown = re.findall(r"^ {4}(\S+)", out, flags=re.M)
    assert tuple(shown) == INDEX_ACTIONS
    for action, parser in _index_action_parsers().items():
        with pytest.raises(SystemExit) as e:
            parser.parse_args(["--help"])
        assert e.value.code == 0, action
