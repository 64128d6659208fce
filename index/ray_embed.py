"""Embedding a collection on a Ray cluster into vector shards, and building an index from them.

    dsmd index embed SHARDS --bundle B --folder F [--ray local|auto|ADDRESS]   # on the cluster
    dsmd index build INDEX --bundle B --from-shards SHARDS                    # on the index host

The sources (a folder or a data set, in the order a single-process build takes them) are cut
into shards of `shard_size`. Each shard runs as one Ray Data pipeline: reading, hashing and
decoding in parallel tasks, encoding in a pool of actors that each open the bundle once
(ONNX Runtime, with the CUDA provider on GPU nodes), and is written as one Parquet file:

    SHARDS/shard-00000.parquet   position (in the source list), uri, sha256, width, height,
                                 captions (JSON), vector (float16 bytes), caption_vectors
                                 (float16 bytes, one row per caption), error (why unreadable)
    SHARDS/manifest.json         the bundle (name, fingerprint, dim, variant) and, per shard,
                                 a digest of its sources: a rerun skips the shards whose file
                                 exists with the same sources

A shard's file is written through a temporary name, so a killed run leaves whole shards only.
Building from the shards inserts the rows in source order, skipping unreadable files and
contents seen already, as a single-process build does: the ids come out the same, and the
vectors the same to float16 precision (the index stores float16 anyway: index/vectors.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dsmd.artifacts import read_manifest, write_json
from dsmd.bundle import Bundle
from dsmd.errors import UserError
from dsmd.index.sources import Source

SHARD_SIZE = 10_000


def _ray():
    try:
        import ray
        import ray.data  # Ray Data is an extra of ray
    except ImportError:
        raise UserError("embedding on Ray needs Ray Data: pip install 'dsmd[ray]'") from None
    return ray


def _digest(sources: list[Source]) -> str:
    """What a shard was made from: each source's uri, captions, and its file's size and time (a file
    changed in place makes the shard stale)."""
    h = hashlib.sha256()
    for s in sources:
        try:
            st = s.path.stat()
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"{s.uri}\0{json.dumps(s.captions)}\0{stamp}\n".encode())
    return h.hexdigest()


def _shard_name(k: int) -> str:
    return f"shard-{k:06d}.parquet"


def _shard_number(name: str) -> int:
    return int(name.removeprefix("shard-").removesuffix(".parquet"))


class _Decode:
    """Ray task: read, hash and decode a batch of sources into the bundle's model input."""

    def __init__(self, preprocess: dict):
        from dsmd.preprocess import PreprocessConfig

        self.cfg = PreprocessConfig.from_json(preprocess)

    def __call__(self, batch: dict) -> dict:
        from dsmd.images import BadImage, open_image
        from dsmd.preprocess import image_to_array

        n = len(batch["uri"])
        out = {k: list(batch[k]) for k in ("position", "uri", "captions")}
        out.update(sha256=[""] * n, width=[0] * n, height=[0] * n, error=[""] * n,
                   pixels=[np.zeros((3, self.cfg.size, self.cfg.size), np.float32)] * n)
        for i, path in enumerate(batch["path"]):
            try:
                data = Path(path).read_bytes()
            except OSError as e:
                out["error"][i] = f"cannot read ({e.strerror})"
                continue
            out["sha256"][i] = hashlib.sha256(data).hexdigest()
            try:
                img = open_image(data, min_side=2 * self.cfg.size)
            except BadImage as e:
                out["error"][i] = str(e).replace("upload: ", "")
                continue
            out["width"][i], out["height"][i] = img.info["original_size"]
            out["pixels"][i] = image_to_array(img, self.cfg)
        out["pixels"] = np.stack(out["pixels"])
        return out


class _Encode:
    """Ray actor: the bundle opened once; encodes images and their captions into float16 bytes."""

    def __init__(self, bundle: str, variant: str, threads: int):
        from dsmd.bundle import RuntimeOptions

        self.bundle = Bundle(bundle, variant, RuntimeOptions(threads=threads))

    def __call__(self, batch: dict) -> dict:
        ok = np.array([not e for e in batch["error"]], bool)
        vecs = np.zeros((len(ok), self.bundle.dim), np.float32)
        if ok.any():
            vecs[ok] = self.bundle.encode_pixels(np.ascontiguousarray(batch["pixels"][ok]))
        caps = [json.loads(c) for c in batch["captions"]]
        flat = [c for cs, good in zip(caps, ok) for c in (cs if good else [])]
        cap_vecs = self.bundle.encode_texts(flat) if flat else np.zeros((0, self.bundle.dim), np.float32)
        cap_bytes, pos = [], 0
        for cs, good in zip(caps, ok):
            n = len(cs) if good else 0
            cap_bytes.append(cap_vecs[pos:pos + n].astype(np.float16).tobytes())
            pos += n
        return {"position": batch["position"], "uri": batch["uri"], "sha256": batch["sha256"],
                "width": batch["width"], "height": batch["height"], "captions": batch["captions"],
                "vector": [v.astype(np.float16).tobytes() for v in vecs], "caption_vectors": cap_bytes,
                "error": batch["error"]}


def embed(out: str | Path, bundle_path: str | Path, sources: list[Source], variant: str = "fp32",
          ray_address: str = "local", actors: int | None = None, threads: int = 1, gpus_per_actor: float = 0,
          batch: int = 64, shard_size: int = SHARD_SIZE, progress: bool = True) -> dict:
    """Embed `sources` on Ray into Parquet shards under `out` (skipping shards done); returns the manifest.

    `ray_address`: "local" starts Ray on this machine with the cores this process may use, "auto"
    joins the cluster this machine is part of, anything else is a cluster address.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    ray = _ray()
    from dsmd.cpus import usable_cpus
    from dsmd.index.build import bundle_fingerprint

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bundle = Bundle(bundle_path, variant)
    identity = {"name": bundle.name, "fingerprint": bundle_fingerprint(bundle), "dim": bundle.dim, "variant": variant}
    manifest = read_manifest(out) or {"artifact": "vector-shards", "bundle": identity, "shards": {}}
    if manifest.get("bundle") != identity:
        raise UserError(f"{out} holds shards of another bundle or variant ({manifest.get('bundle', {}).get('name')}): "
                        f"embed into a new folder")
    shards = [sources[i:i + shard_size] for i in range(0, len(sources), shard_size)]
    for name in [n for n in manifest["shards"] if _shard_number(n) >= len(shards)]:  # the sources shrank
        del manifest["shards"][name]
        (out / name).unlink(missing_ok=True)
    todo = []
    for k, part in enumerate(shards):
        name = _shard_name(k)
        done = manifest["shards"].get(name)
        if not (done and done["sources"] == _digest(part) and (out / name).exists()):
            todo.append((k, name, part))
    manifest["total"] = len(sources)
    t0 = time.time()
    if todo:
        started = not ray.is_initialized()
        if started:
            kwargs = {"num_cpus": usable_cpus()} if ray_address == "local" else {"address": ray_address}
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **kwargs)
        try:
            ctx = ray.data.DataContext.get_current()
            ctx.execution_options.preserve_order = True
            ctx.enable_progress_bars = progress
            cpus = int(ray.cluster_resources().get("CPU", 1))
            n_actors = actors or max(1, cpus // 2)
            bar = tqdm(total=sum(len(p) for _, _, p in todo), desc="embed (ray)", unit="img", disable=not progress)
            for k, name, part in todo:
                rows = [{"position": k * shard_size + i, "uri": s.uri, "path": str(s.path),
                         "captions": json.dumps(list(s.captions))} for i, s in enumerate(part)]
                ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows) // batch))
                ds = ds.map_batches(_Decode, fn_constructor_kwargs={"preprocess": bundle.preprocess.to_json()},
                                    batch_size=batch, concurrency=max(1, cpus - n_actors), batch_format="numpy")
                ds = ds.map_batches(_Encode, fn_constructor_kwargs={"bundle": str(Path(bundle_path).resolve()),
                                                                    "variant": variant, "threads": threads},
                                    batch_size=batch, concurrency=n_actors, num_cpus=threads,
                                    num_gpus=gpus_per_actor or None, batch_format="numpy")
                table = pa.Table.from_pylist(sorted(ds.take_all(), key=lambda r: int(r["position"])))
                tmp = out / f".{name}.{os.getpid()}.tmp"
                pq.write_table(table, tmp)
                os.replace(tmp, out / name)
                manifest["shards"][name] = {"sources": _digest(part), "count": len(part),
                                            "errors": int(sum(1 for e in table.column("error").to_pylist() if e))}
                write_json(out / "manifest.json", manifest)
                bar.update(len(part))
            bar.close()
        finally:
            if started:
                ray.shutdown()
    manifest["seconds"] = round(time.time() - t0, 1)
    manifest["embedded_now"] = sum(len(p) for _, _, p in todo)
    write_json(out / "manifest.json", manifest)
    return manifest


def read_shards(shards: str | Path, bundle: Bundle):
    """(rows in source order) of every shard under `shards`, after checking they were made by `bundle`."""
    import pyarrow.parquet as pq

    from dsmd.index.build import bundle_fingerprint

    shards = Path(shards)
    m = read_manifest(shards)
    if m is None or m.get("artifact") != "vector-shards":
        raise UserError(f"{shards} holds no vector shards (no manifest.json from dsmd index embed)")
    want = {"fingerprint": bundle_fingerprint(bundle), "variant": bundle.variant}
    if {k: m["bundle"].get(k) for k in want} != want:
        raise UserError(f"the shards in {shards} were embedded with {m['bundle']['name']} ({m['bundle']['variant']}), "
                        f"not the bundle at {bundle.path} ({bundle.variant}): give that bundle and --variant")
    done = sum(sh["count"] for sh in m["shards"].values())
    if done != m.get("total"):
        raise UserError(f"{shards} holds {done} of {m.get('total')} images: the embedding did not finish; "
                        f"run dsmd index embed again (it continues where it stopped)")
    for name in sorted(m["shards"], key=_shard_number):
        yield from pq.read_table(shards / name).to_pylist()


def add_shards(path: str | Path, bundle: Bundle, shards: str | Path, batch: int = 1000,
               progress: bool = True):
    """Insert the rows of vector shards (`dsmd index embed`, index/ray_embed.py) in source order, as
    build.add_images would have: unreadable files listed, contents seen already skipped. Then `finalize`."""
    from dsmd.index.build import Report, _quiet, bundle_fingerprint
    from dsmd.index.db import IndexDB, NewItem
    from dsmd.index.lock import folder_lock

    t0 = time.time()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    db = IndexDB(path / "items.sqlite", bundle.dim, bundle_fingerprint(bundle), bundle.variant)
    report, known, pending = Report(), db.known_hashes(), []

    def flush() -> None:
        if pending:
            with folder_lock(path):
                ids = db.replace(pending)
            report.added += sum(i is not None for i in ids)
            report.already += sum(i is None for i in ids)
            pending.clear()

    bar = tqdm(desc="index (shards)", unit="img", dynamic_ncols=True, **_quiet(progress))
    for r in read_shards(shards, bundle):
        bar.update(1)
        if r["error"]:
            db.skip(r["uri"], r["error"])
            report.skipped.append({"uri": r["uri"], "reason": r["error"]})
        elif r["sha256"] in known:
            report.already += 1
        else:
            known.add(r["sha256"])
            caps = json.loads(r["captions"])
            cap_vecs = (np.frombuffer(r["caption_vectors"], np.float16).reshape(len(caps), -1).astype(np.float32)
                        if caps else None)
            pending.append(NewItem(r["uri"], r["sha256"], r["width"], r["height"], caps,
                                   np.frombuffer(r["vector"], np.float16).astype(np.float32), cap_vecs))
            if len(pending) >= batch:
                flush()
    flush()
    bar.close()
    db.close()
    report.seconds = time.time() - t0
    return report
