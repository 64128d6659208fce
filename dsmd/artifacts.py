"""Artifact I/O shared by every stage: atomic writes, manifests and content hashes.

Every artifact is a folder whose `manifest.json` is written last and atomically, so a
folder with a manifest is complete and a folder without one is work in progress.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


def _umask() -> int:
    """This process's umask, read without changing it (os.umask can only set it, for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the new one.

    The file gets the mode a plain open() would give it (0644 under the usual umask), not
    mkstemp's 0600: a server running as another user must be able to read an index's manifest.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    """Atomically write `obj` as indented JSON."""
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of an artifact folder, or None while the artifact is incomplete."""
    path = Path(folder) / MANIFEST
    return read_json(path) if path.exists() else None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of a JSON-serialisable object, independent of dict order."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def versions() -> dict[str, str]:
    """Versions of the libraries that shape an artifact, recorded in its manifest."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("dsmd", "numpy", "torch", "timm", "transformers", "tokenizers", "onnxruntime", "faiss-cpu"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def replace_dir(tmp: Path, final: Path) -> None:
    """Put the folder `tmp` in place of `final`; a kill at any moment leaves one of them whole
    (the old one as `final.old`, which `recover_dir` puts back)."""
    import shutil

    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(final: Path) -> None:
    """Undo a `replace_dir` killed between its two renames."""
    old = final.with_name(final.name + ".old")
    if not final.exists() and old.exists():
        old.rename(final)
