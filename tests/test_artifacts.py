"""Artifact writes: atomic, and readable as a file written with open() would be."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from dsmd.artifacts import read_json, write_json


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_an_atomic_write_gets_the_mode_open_would_give(tmp_path, umask):
    """mkstemp makes 0600 files: an index built by one user and served by another (a read-only
    mount, a container's uid) could not read its own manifest.json."""
    code = ("import os, sys; from pathlib import Path; from dsmd.artifacts import write_json; "
            f"os.umask({umask}); write_json(Path(sys.argv[1]) / 'manifest.json', {{'a': 1}}); "
            "open(Path(sys.argv[1]) / 'plain', 'w').close()")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
    mode = lambda name: stat.S_IMODE(os.stat(tmp_path / name).st_mode)  # noqa: E731
    assert mode("manifest.json") == mode("plain") == 0o666 & ~umask
    assert read_json(tmp_path / "manifest.json") == {"a": 1}


def test_an_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    write_json(tmp_path / "m.json", {"v": 1})
    write_json(tmp_path / "m.json", {"v": 2})
    assert read_json(tmp_path / "m.json") == {"v": 2} and os.listdir(tmp_path) == ["m.json"]
