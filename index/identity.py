"""Which encoder an index belongs to, and the check every writer makes before it writes.

An index's vectors are comparable only with those of the encoder that made them: the bundle's
fingerprint (the hashes of its graphs), its dim, and the variant (fp32, int8, fp16) that embedded.
The database records them with its first vectors (meta: bundle, dim, variant); every command that
writes (build, add-texts, remove, merge, finalize, a server's adds) is refused with another bundle,
so a manifest never names an encoder whose vectors the index does not hold.
"""

from __future__ import annotations

from pathlib import Path

from dsmd.artifacts import read_manifest, sha256_json
from dsmd.errors import UserError


class IndexMismatch(UserError):
    """The bundle does not embed into the index's space."""


def bundle_fingerprint(b) -> str:
    """What identifies an encoder: the hashes of its files (two exports of one student differ only if
    the graphs do)."""
    return sha256_json({k: v for k, v in b.manifest["files"].items() if not k.startswith(("image.", "text."))
                        or k in ("image.onnx", "text.onnx")})


def check_index_bundle(where, meta: dict[str, str], manifest: dict | None, bundle) -> None:
    """Refuse `bundle` unless it is the encoder whose vectors the index at `where` holds, as its database
    records (`meta`) or, for an index from before that was recorded, its manifest says.

    Raises:
        IndexMismatch: naming both fingerprints (or dims, or variants) and what to do.
    """
    built = (manifest or {}).get("bundle") or {}
    held_fp = meta.get("bundle") or built.get("fingerprint")
    held_dim = int(meta.get("dim") or built.get("dim") or 0)
    held_variant = meta.get("variant") or built.get("variant") or ("fp32" if held_dim else None)
    name = f" ({built['name']} at {built['path']})" if built.get("name") else ""
    if held_dim and bundle.dim != held_dim:
        raise IndexMismatch(f"the bundle {bundle.name} embeds into {bundle.dim} dims, the index at {where} holds "
                            f"{held_dim}-dim vectors{name}: pass --bundle with the index's own bundle, or build a "
                            f"new index folder with this one")
    mine = bundle_fingerprint(bundle)
    if held_fp and mine != held_fp:
        raise IndexMismatch(f"the bundle at {bundle.path} (fingerprint {mine[:12]}) is not the one the index at "
                            f"{where} was built with{name} (fingerprint {held_fp[:12]}): its vectors would not be "
                            f"comparable. Pass --bundle with the index's own bundle, or rebuild the index with this "
                            f"one into a new folder")
    if held_variant and bundle.variant != held_variant:
        raise IndexMismatch(f"the index at {where} holds vectors of the {held_variant} variant of its bundle, not "
                            f"{bundle.variant}: use --variant {held_variant}, or rebuild the index (dsmd index build "
                            f"--variant {bundle.variant}) into a new folder")


def check_bundle(path, bundle, db=None) -> None:
    """Refuse a bundle that is not the one whose vectors the index at `path` holds (IndexMismatch);
    `db`: an IndexDB of it already open."""
    from dsmd.index.db import IndexDB

    if db is None and not (Path(path) / "items.sqlite").exists():
        raise UserError(f"{path} is not an index folder (no items.sqlite)")
    own = db or IndexDB(Path(path) / "items.sqlite", readonly=True)
    try:
        check_index_bundle(path, own.meta(), read_manifest(Path(path)), bundle)
    finally:
        if db is None:
            own.close()
