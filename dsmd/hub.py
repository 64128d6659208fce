"""Models by name: a local path, a Hugging Face id, a timm name or a BEiT-3 release file, downloaded once.

    resolve_hf("openai/clip-vit-base-patch16")             -> a local folder (CLIP / SigLIP / BERT)
    resolve_timm("vit_base_patch16_224.augreg_in21k")      -> a local folder holding model.safetensors
    resolve_beit3("beit3_base_patch16_384_f30k_retrieval") -> the local .pth file

A reference that exists on disk is always used as it is. Anything else is a name:

* Hugging Face ids go through `huggingface_hub` into its own cache (HF_HUB_CACHE / HF_HOME, the
  cache transformers shares), from the endpoint in HF_ENDPOINT (read at each call, so a mirror or
  a test's loopback server takes effect without restarting Python). A timm name `NAME` is the Hub
  repository `timm/NAME`, where timm publishes its weights.
* The BEiT-3 checkpoints and their sentencepiece model are plain files at the URLs of `BEIT3_FILES`
  (base URL overridable with DSMD_BEIT3_URL, for mirrors), downloaded into DSMD_CACHE (default
  ~/.cache/dsmd)/beit3. A download resumes where an interrupted one stopped (HTTP Range), holds a
  file lock so torchrun's ranks fetch it once, and is checked against the table's sha256 where the
  table pins one; either way the digest is written beside the file and checked on every later use,
  so a file damaged in the cache is caught.

Offline (`offline=True`, DSMD_OFFLINE=1 or HF_HUB_OFFLINE=1): the cache only, never the network; a
name that is not cached is an error that says how to fetch it.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dsmd.artifacts import sha256_file
from dsmd.errors import UserError

# The official release files (microsoft/unilm beit3/README.md). sha256 None: not pinned yet. The
# digests are not published beside the files, and this table was written without network access;
# `dsmd models fetch NAME` prints a file's digest, to pin here once checked against a trusted copy.
BEIT3_URL = "https://github.com/addf400/files/releases/download/beit3/"
BEIT3_FILES: dict[str, str | None] = {
    "beit3.spm": None,
    "beit3_base_patch16_384_f30k_retrieval.pth": None,
    "beit3_base_patch16_384_coco_retrieval.pth": None,
    "beit3_large_patch16_384_f30k_retrieval.pth": None,
    "beit3_large_patch16_384_coco_retrieval.pth": None,
}

# Files a model folder needs, by what it is for: configs, tokenizers, weights (safetensors first).
_HF_PATTERNS = ["*.json", "*.txt", "*.model", "*.safetensors"]
_HF_FALLBACK_WEIGHTS = ["pytorch_model*.bin"]
_CHUNK = 1 << 20


def is_offline() -> bool:
    """True when DSMD_OFFLINE or HF_HUB_OFFLINE is set to a true value."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("DSMD_OFFLINE", "HF_HUB_OFFLINE"))


def add_offline_option(parser: argparse.ArgumentParser) -> None:
    """--offline on a command: models by name come from the cache only (`dsmd.cli.main` sets DSMD_OFFLINE)."""
    parser.add_argument("--offline", action="store_true",
                        help="never touch the network: models given by name must be in the cache "
                        "(same as DSMD_OFFLINE=1)")


def cache_dir() -> Path:
    """Where files fetched by URL are kept: DSMD_CACHE, else ~/.cache/dsmd."""
    return Path(os.environ.get("DSMD_CACHE") or Path.home() / ".cache" / "dsmd")


def hf_cache_dir() -> Path:
    """huggingface_hub's cache, read at call time (the library reads its variables once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home) / "hub"


def hf_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def looks_like_name(ref: str) -> bool:
    """A Hub id (`name` or `owner/name`), not a path: no leading ./ ../ / ~, at most one slash."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", ref)) and not ref.startswith((".", "/", "~"))


# ---------------------------------------------------------------- Hugging Face ids and timm names


def resolve_hf(ref: str | Path, what: str = "model", offline: bool | None = None) -> Path:
    """A local folder for `ref`: itself when it exists, else the Hub repository of that id, cached.

    Raises:
        UserError: not a local path and not a model on the Hub (or, offline, not in the cache).
    """
    path = Path(ref)
    if path.exists():
        return path
    ref = str(ref)
    if not looks_like_name(ref):
        raise UserError(f"{what}: {ref} does not exist (a local path), and it is not a Hub id such as "
                        "owner/name either")
    folder = _snapshot(ref, _HF_PATTERNS, what, offline)
    if not any(folder.glob("*.safetensors")):
        folder = _snapshot(ref, _HF_PATTERNS + _HF_FALLBACK_WEIGHTS, what, offline)
    return folder


def resolve_timm(ref: str | Path, offline: bool | None = None) -> Path:
    """A local timm ViT checkpoint (file or folder) for `ref`: itself, or timm's Hub repository of that name.

    Takes `vit_base_patch16_224.augreg_in21k`, `timm/vit_base_patch16_224.augreg_in21k` or the
    `hf-hub:` form timm itself accepts.
    """
    path = Path(ref)
    if path.exists():
        return path
    name = str(ref).removeprefix("hf-hub:")
    if "/" not in name:
        name = f"timm/{name}"
    return resolve_hf(name, what="image encoder (student.image_init)", offline=offline)


def _snapshot(repo: str, patterns: list[str], what: str, offline: bool | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    local_only = is_offline() if offline is None else offline
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns, endpoint=hf_endpoint(),
                                      cache_dir=hf_cache_dir(), local_files_only=local_only))
    except GatedRepoError as e:
        raise UserError(f"{what}: {repo} is gated on the Hub: accept its terms on its page and log in "
                        "(`hf auth login`, or HF_TOKEN)") from e
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise UserError(f"{what}: {repo} is neither a local path nor a model on {hf_endpoint()}") from e
    except LocalEntryNotFoundError as e:
        if local_only:
            raise UserError(f"{what}: {repo} is not a local path, and as a Hub id it is not in the cache while "
                            f"offline mode is on (DSMD_OFFLINE / HF_HUB_OFFLINE / --offline). Fetch it first where "
                            f"there is a network: `dsmd models fetch {repo}`") from e
        raise UserError(f"{what}: could not reach {hf_endpoint()} to download {repo}, and it is not in the "
                        f"cache ({e})") from e
    except HfHubHTTPError as e:
        raise UserError(f"{what}: downloading {repo} from {hf_endpoint()} failed: {e}") from e


# ---------------------------------------------------------------- BEiT-3 release files


def beit3_file_name(ref: str, files: dict[str, str | None] | None = None) -> str | None:
    """The table's file name for a BEiT-3 name (with or without .pth), or None."""
    table = BEIT3_FILES if files is None else files
    return next((name for name in (ref, f"{ref}.pth") if name in table), None)


def resolve_beit3(ref: str | Path, offline: bool | None = None,
                  files: dict[str, str | None] | None = None) -> Path:
    """A local BEiT-3 file for `ref`: itself when it exists, else the release file of that name, cached.

    Raises:
        UserError: neither a local file nor a name in the table; offline and not cached; a digest
            that does not match; a failed download (which the next call resumes).
    """
    path = Path(ref)
    if path.exists():
        return path
    table = BEIT3_FILES if files is None else files
    name = beit3_file_name(str(ref), table)
    if name is None:
        raise UserError(f"{ref} does not exist, and it is not a BEiT-3 release file; names known: "
                        f"{', '.join(sorted(table))}")
    dest = cache_dir() / "beit3" / name
    if dest.is_file():  # no lock to read: torchrun's ranks check a cached file side by side
        _check_cached(dest, table[name])
        return dest
    local_only = is_offline() if offline is None else offline
    with _file_lock(dest):
        if dest.is_file():  # another process finished the download while this one waited
            _check_cached(dest, table[name])
            return dest
        if local_only:
            raise UserError(f"{name} is not in the cache ({dest.parent}) and offline mode is on. Fetch it "
                            f"first where there is a network: `dsmd models fetch {name.removesuffix('.pth')}`, "
                            "or give the local file's path")
        url = os.environ.get("DSMD_BEIT3_URL", BEIT3_URL).rstrip("/") + "/" + name
        download(url, dest, table[name])
    return dest


def download(url: str, dest: Path, sha256: str | None = None, progress: bool = True) -> str:
    """Download `url` to `dest` through DEST.part (resumed with a Range request); returns the sha256.

    The digest is checked against `sha256` when given, and written to DEST.sha256 either way.
    """
    from tqdm import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            if have and response.status != 206:  # the server ignored the range: start over
                have = 0
            length = response.headers.get("Content-Length")
            total = have + int(length) if length is not None else None
            with open(part, "ab" if have else "wb") as out, \
                    tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=dest.name,
                         disable=not progress) as bar:
                try:
                    while chunk := response.read(_CHUNK):
                        out.write(chunk)
                        bar.update(len(chunk))
                except http.client.IncompleteRead as e:  # keep what did arrive, for the resume
                    out.write(e.partial)
                    raise
        if total is not None and part.stat().st_size != total:
            raise http.client.IncompleteRead(b"", total - part.stat().st_size)
    except urllib.error.HTTPError as e:
        if not (e.code == 416 and have):  # 416 with a partial file: it is complete already
            raise UserError(f"downloading {url} failed: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        raise UserError(f"downloading {url} stopped ({type(e).__name__}: {e}); run the command again to resume "
                        f"({part.stat().st_size if part.exists() else 0:,} bytes kept in {part})") from e
    digest = sha256_file(part)
    if sha256 is not None and digest != sha256:
        part.unlink()
        raise UserError(f"{url}: the downloaded file's sha256 is {digest}, not the expected {sha256}; it was "
                        "deleted. Is the URL (or DSMD_BEIT3_URL) right?")
    dest.with_name(dest.name + ".sha256").write_text(digest + "\n")  # before the file: never one unrecorded
    part.replace(dest)
    return digest


def recorded_digest(path: Path) -> str | None:
    """The sha256 written beside a downloaded file (DEST.sha256), or None."""
    record = path.with_name(path.name + ".sha256")
    return record.read_text().strip() if record.is_file() else None


def _check_cached(path: Path, pinned: str | None) -> None:
    """A cached file must still have the digest it was downloaded with (and the pinned one)."""
    expected = pinned or recorded_digest(path)
    if expected is None:
        return
    digest = sha256_file(path)
    if digest != expected:
        raise UserError(f"{path} in the cache has sha256 {digest}, not {expected}: it was damaged or replaced. "
                        "Delete it and run the command again to download it anew")


@contextmanager
def _file_lock(dest: Path) -> Iterator[None]:
    """One downloader of `dest` at a time, across processes (flock on DEST.lock)."""
    import fcntl  # POSIX only: imported here so that `dsmd` itself still imports elsewhere

    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        f = open(dest.with_name(dest.name + ".lock"), "w")
    except OSError as e:
        raise UserError(f"cannot write to the model cache {dest.parent} ({e}): set DSMD_CACHE to a folder this "
                        "user can write, or give the file's local path") from e
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def fetch(ref: str, kind: str = "auto") -> list[Path]:
    """Download `ref` into the cache (for `dsmd models fetch`): kind auto, hf, timm or beit3.

    A BEiT-3 checkpoint comes with beit3.spm, so that it loads offline afterwards.
    """
    if is_offline():
        raise UserError("offline mode is on (DSMD_OFFLINE / HF_HUB_OFFLINE): fetching needs the network")
    if kind == "auto":
        kind = "beit3" if beit3_file_name(ref) else "timm" if ref.startswith(("timm/", "hf-hub:timm/")) else "hf"
    if kind == "beit3":
        files = [resolve_beit3(ref, offline=False)]
        if files[0].suffix == ".pth":
            files.append(resolve_beit3("beit3.spm", offline=False))
        return files
    if kind == "timm":
        return [resolve_timm(ref, offline=False)]
    if kind == "hf":
        return [resolve_hf(ref, offline=False)]
    raise UserError(f"unknown model kind {kind!r}: auto, hf, timm or beit3")
