"""Packaging: one import namespace, installs sized to the job, a repository that stands alone."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("distill", "export", "index", "serve")
PACKAGE_DIRS = ("dsmd", *STAGES)


def _tracked(pattern: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", pattern], cwd=ROOT,
                         capture_output=True, text=True)
    if out.returncode != 0:  # not a git checkout (an sdist): every file on disk
        return sorted(p for p in ROOT.rglob(pattern) if ".venv" not in p.parts)
    return [ROOT / line for line in out.stdout.splitlines()]


def test_the_stages_import_only_through_the_dsmd_namespace(tmp_path):
    """An install puts `dsmd` into site-packages, never generic names like `index` or `serve`."""
    for stage in STAGES:
        gone = subprocess.run([sys.executable, "-c", f"import {stage}"], cwd=tmp_path, capture_output=True, text=True)
        assert gone.returncode != 0 and "No module named" in gone.stderr, f"`import {stage}` works: {gone.stdout}"
    ok = subprocess.run([sys.executable, "-c", "import dsmd.distill, dsmd.export, dsmd.index, dsmd.serve, dsmd.cli"],
                        cwd=tmp_path, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr


def test_the_code_names_no_stage_outside_the_namespace():
    bare = re.compile(rf"^\s*(from|import)\s+({'|'.join(STAGES)})\b", re.M)
    offenders = [str(p.relative_to(ROOT)) for p in _tracked("*.py") if bare.search(p.read_text(encoding="utf-8"))]
    assert offenders == []


def test_the_ground_package_imports_no_stage():
    """dsmd/ is what every stage shares: an import from it up into a stage would make a cycle (cli.py sits on top)."""
    up = re.compile(rf"^\s*(from|import)\s+dsmd\.({'|'.join(STAGES)})\b", re.M)
    offenders = [p.name for p in (ROOT / "dsmd").glob("*.py") if p.name != "cli.py" and up.search(p.read_text())]
    assert offenders == []


def test_every_package_folder_is_installed():
    """pyproject.toml lists every package folder (a new sub-package must not be left out of the wheel)."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for top in PACKAGE_DIRS:
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            found.add(".".join(("dsmd",) + (() if top == "dsmd" else (top,)) + rel))
    assert found == listed


def test_no_module_is_over_about_400_lines():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines()) for p in _tracked("*.py")
             if p.parts[len(ROOT.parts)] != "tests"}
    assert {p: n for p, n in sizes.items() if n > 420} == {}


def test_no_doc_names_a_folder_outside_the_repository():
    """The repository stands alone (its links and paths are checked in test_docs.py)."""
    for doc in _tracked("*.md"):
        text = doc.read_text(encoding="utf-8")
        assert "../shared" not in text and "/work/shared" not in text, doc


def test_the_serve_lock_pins_the_serve_extra_and_no_torch():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lock = (ROOT / "requirements-serve.lock").read_text()
    pinned = {m.group(1).lower().replace("_", "-") for m in re.finditer(r"^([A-Za-z0-9_.-]+)==", lock, re.M)}
    wanted = project["dependencies"] + project["optional-dependencies"]["serve"]
    names = {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower().replace("_", "-") for r in wanted}
    assert names <= pinned, f"not in requirements-serve.lock: {names - pinned} (run make lock)"
    assert not pinned & {"torch", "torchvision", "transformers", "timm"}
    blocks = re.split(r"^(?=[A-Za-z0-9_.-]+==)", lock, flags=re.M)[1:]
    assert blocks and all("--hash=sha256:" in b for b in blocks), "every pin carries its hashes"
    assert all("torch" not in r for r in wanted)


def test_the_docker_build_context_leaves_out_venv_data_and_artifacts():
    rules = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert rules[0] == "*", "everything is ignored unless let in"
    let_in = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    assert set(PACKAGE_DIRS) <= let_in and not let_in & {".venv", "data", "artifacts", "runs"}
    copied = re.findall(r"^COPY\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.M)
    assert {c.rstrip("/") for c in copied if not c.startswith("--")} <= let_in | {"."}


@pytest.mark.slow
def test_the_serve_extra_in_a_fresh_venv_serves_without_torch(tiny_search, tiny_world, tmp_path):
    """`pip install '.[serve]'` (with the test tools, no torch anywhere) then the serve tests, in that venv.

    Needs the package index (PyPI) the first time; pip's cache makes later runs quick.
    """
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    install = subprocess.run([str(py), "-m", "pip", "install", "-q", f"{ROOT}[serve,test]"],
                             capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    shutil.rmtree(ROOT / "build", ignore_errors=True)  # setuptools' in-tree build folder

    # Run from outside the checkout: the repository's folders must not shadow the installed package.
    away = tmp_path / "away"
    away.mkdir()
    run = lambda code: subprocess.run([str(py), "-c", code], cwd=away, capture_output=True, text=True)  # noqa: E731
    assert "No module named 'torch'" in run("import torch").stderr
    assert "No module named 'index'" in run("import index").stderr
    assert run("import dsmd.serve.app, dsmd.index.build").returncode == 0

    prebuilt = tmp_path / "prebuilt"
    prebuilt.mkdir()
    (prebuilt / "world").symlink_to(tiny_world)
    for part in ("bundle", "index"):
        shutil.copytree(tiny_search / part, prebuilt / part)
    tests = subprocess.run([str(env_dir / "bin" / "pytest"), "-q", "-p", "no:cacheprovider", "-c",
                            str(ROOT / "pyproject.toml"), "--rootdir", str(ROOT),
                            str(ROOT / "tests" / "test_serve.py")],
                           cwd=away, env={**os.environ, "DSMD_TEST_PREBUILT": str(prebuilt)},
                           capture_output=True, text=True, timeout=900)
    assert tests.returncode == 0, tests.stdout[-5000:] + tests.stderr[-2000:]
    assert re.search(r"\d+ passed", tests.stdout) and "failed" not in tests.stdout

    # A training command in this install says which extra it needs, in one line.
    train = subprocess.run([str(env_dir / "bin" / "dsmd"), "distill", "--out", str(tmp_path / "run")], cwd=away,
                           capture_output=True, text=True)
    assert train.returncode == 2 and "pip install 'dsmd[train]'" in train.stderr and "Traceback" not in train.stderr
