"""`dsmd index build|embed|add-texts|remove|merge|info|search|recall`: the FAISS (or Milvus) + SQLite index."""

from __future__ import annotations

import argparse
from pathlib import Path


def _index(a: argparse.Namespace) -> int:
    from dsmd.bundle import Bundle
    from dsmd.errors import UserError
    from dsmd.index import build as B

    if a.action == "info":
        m = B.info(a.index)
        where = m.get("backend") or {"name": "faiss"}
        print(f"{a.index}: bundle {m['bundle']['name']} (dim {m['bundle']['dim']}), generation {m['generation']}, "
              f"vectors in {where['name']}" + (f" at {where['uri']}" if where.get("uri") else "")
              + (f", {m['pending_changes']} change(s) not yet in the FAISS files: run dsmd index build again"
                 if m["pending_changes"] else ""))
        for part in ("images", "texts"):
            p = m.get(part, {})
            if p.get("count"):
                ix = p["index"]
                print(f"  {part:6s} {p['count']:>10,} vectors  {ix['kind']:5s} {ix['params']} search {ix['search']}  "
                      f"recall@10 vs exact {ix['recall_at_10']:.3f}"
                      + (f"  {p['bytes'] / 2**20:.1f} MiB" if p.get("bytes") else f"  collection {p.get('collection')}"))
            else:
                print(f"  {part:6s} empty")
        print(f"  skipped files: {m['skipped']}")
        dead = sum(m["dead_vector_rows"].values())
        if dead:
            print(f"  vector files: {dead:,} rows of removed items (dead bytes)")
        _warn_shortfall(m)
        return 0
    if a.action == "recall":
        from dsmd.index.search import text_to_image_recall

        direct, via = text_to_image_recall(a.index)
        print(f"text→image recall of the index's captions ({a.index}):")
        print("  from the embeddings directly: " + "  ".join(f"R@{k} {v:.2f}" for k, v in direct.items()))
        print("  through the index:            " + "  ".join(f"R@{k} {v:.2f}" for k, v in via.items()))
        return 0
    if a.action == "remove":
        n = B.remove(a.index, ids=a.id or [], uris=a.uri or [])
        print(f"removed {n} item(s)")
        if n:
            m = B.finalize(a.index, Bundle(a.bundle, a.variant), kind=a.index_type, backend=_backend(a))
            print(f"{a.index}: {m['images']['count']} images")
            _warn_shortfall(m)
        return 0
    if a.action == "merge":
        n = B.merge(a.index, a.inputs)
        m = B.finalize(a.index, Bundle(a.bundle, a.variant), kind=a.index_type, backend=_backend(a))
        print(f"merged {n} items into {a.index}: {m['images']['count']} images, {m['texts']['count']} texts")
        _warn_shortfall(m)
        return 0
    bundle = Bundle(a.bundle, a.variant)
    if a.action == "search":
        from dsmd.index.search import SearchIndex

        s = SearchIndex(a.index)
        s.check_bundle(bundle)
        target = "texts" if a.image else "images"
        q = bundle.encode_images([Path(a.image).read_bytes()]) if a.image else bundle.encode_texts([a.text or ""])
        for h in s.search(q, a.k, target)[0]:
            what = h.item.get("uri") or h.item.get("text")
            print(f"  {h.score:7.4f}  #{h.id:<8d} {what}")
        return 0
    if a.action == "add-texts":
        texts = Path(a.file).read_text(encoding="utf-8").splitlines()
        n = B.add_texts(a.index, bundle, texts)
        m = B.finalize(a.index, bundle, kind=a.index_type, backend=_backend(a))
        print(f"added {n} texts: {m['texts']['count']} in the caption index")
        _warn_shortfall(m)
        return 0
    if a.action == "build" and a.from_shards:
        if a.folder or a.data:
            raise UserError("--from-shards replaces --folder/--data: the shards hold what was embedded")
        from dsmd.index.ray_embed import add_shards

        r = add_shards(a.index, bundle, a.from_shards)
        m = B.finalize(a.index, bundle, kind=a.index_type, report=r, backend=_backend(a),
                       memory_bytes=int(a.memory_gib * 2**30) if a.memory_gib else None)
        _print_build(a, m)
        return 0
    # build, embed
    if bool(a.folder) == bool(a.data):
        raise UserError("give exactly one source: --folder DIR or --data DATASET")
    sources = B.folder_sources(a.folder) if a.folder else B.dataset_sources(a.data, a.images, a.split)
    if a.action == "embed":
        from dsmd.index.ray_embed import embed

        m = embed(a.index, a.bundle, sources, a.variant, a.ray, a.actors, a.threads_per_actor, a.gpus_per_actor,
                  a.batch, a.shard_size)
        errors = sum(sh["errors"] for sh in m["shards"].values())
        print(f"{a.index}: {len(m['shards'])} shard(s) of {m['total']} images ({errors} unreadable), "
              f"{m['embedded_now']} embedded now in {m['seconds']:.1f} s"
              + (f" ({m['embedded_now'] / m['seconds']:.0f} images/s)" if m["embedded_now"] and m["seconds"] else "")
              + f"; build the index with: dsmd index build INDEX --bundle {a.bundle} --from-shards {a.index}")
        return 0
    shard = None
    if a.shard:
        i, _, n = a.shard.partition("/")
        try:
            shard = (int(i), int(n))
        except ValueError:
            raise UserError(f"--shard takes i/n, e.g. 0/4, not {a.shard!r}") from None
    sources = B.shard_of(sources, shard)
    m = B.build(a.index, bundle, sources, kind=a.index_type, batch=a.batch, workers=a.workers, backend=_backend(a),
                memory_bytes=int(a.memory_gib * 2**30) if a.memory_gib else None)
    _print_build(a, m)
    return 0


def _print_build(a: argparse.Namespace, m: dict) -> None:
    r = m["last_build"]
    print(f"{a.index}: added {r['added']}, already indexed {r['already_indexed']}, skipped {r['skipped']} unreadable "
          f"({r['seconds']:.1f} s); {m['images']['count']} images"
          + (f" ({m['images']['index']['kind']}, recall@10 {m['images']['index']['recall_at_10']:.3f})"
             if m['images']['count'] else "") + f", {m['texts']['count']} texts")
    for sk in r["skipped_files"][:10]:
        print(f"  skipped {sk['uri']}: {sk['reason']}")
    _warn_shortfall(m)


def _backend(a: argparse.Namespace) -> dict | None:
    """--backend/--milvus-uri/--collection as finalize takes them; None keeps what the index was built with."""
    from dsmd.errors import UserError
    from dsmd.index import milvus

    if a.backend is None:
        if a.milvus_uri or a.collection:
            raise UserError("--milvus-uri and --collection go with --backend milvus")
        return None
    if a.backend == "faiss":
        return {"name": "faiss"}
    return {"name": "milvus", "uri": a.milvus_uri or milvus.default_uri(a.index), "collection": a.collection or "dsmd"}


def _warn_shortfall(manifest: dict) -> None:
    """The recall target a FAISS file did not reach, said at the end where it is seen."""
    for part in ("images", "texts"):
        if manifest.get(part, {}).get("shortfall"):
            print(f"warning: {manifest[part]['shortfall']}")


def add_commands(sub: argparse._SubParsersAction) -> None:
    ix = sub.add_parser("index", help="index images (and captions) for search: build, embed (on Ray), add-texts, "
                                      "remove, merge, info, search, recall")
    ix.add_argument("action", choices=["build", "embed", "add-texts", "remove", "merge", "info", "search", "recall"])
    ix.add_argument("index", nargs="?", default="artifacts/index", help="index folder (default: artifacts/index); embed: the "
                                                                    "folder of vector shards")
    ix.add_argument("inputs", nargs="*", help="merge: the shard indexes to merge into INDEX")
    ix.add_argument("--bundle", default="artifacts/bundle", help="encoder bundle (default: artifacts/bundle)")
    ix.add_argument("--folder", help="build: a folder of images (recursive)")
    ix.add_argument("--data", help="build: a data set (Karpathy JSON / JSONL): its images and captions")
    ix.add_argument("--images", help="image root of --data (default: beside the annotation file)")
    ix.add_argument("--split", help="build: only this split of --data")
    ix.add_argument("--shard", help="build: only shard i/n of the sources (merge the shards afterwards)")
    ix.add_argument("--variant", default="fp32", help="bundle variant that embeds: fp32 (default), int8, fp16; "
                                                      "an index holds the vectors of one variant")
    ix.add_argument("--from-shards", help="build: the vector shards of dsmd index embed instead of --folder/--data")
    ix.add_argument("--ray", default="local", help="embed: 'local' (Ray on this machine), 'auto' (the cluster this "
                                                  "machine belongs to) or a cluster address (default: local)")
    ix.add_argument("--actors", type=int, help="embed: encoder actors, each opening the bundle once "
                                               "(default: half the cluster's CPUs)")
    ix.add_argument("--threads-per-actor", type=int, default=1, help="embed: ONNX Runtime threads (and CPUs) per "
                                                                      "actor (default: 1)")
    ix.add_argument("--gpus-per-actor", type=float, default=0, help="embed: GPUs per actor; ONNX Runtime then runs "
                                                                     "on CUDA (default: 0)")
    ix.add_argument("--shard-size", type=int, default=10_000, help="embed: images per shard file (default: 10000)")
    ix.add_argument("--index-type", choices=["flat", "hnsw", "ivfpq", "ivfdisk"], help="override the choice by size")
    ix.add_argument("--memory-gib", type=float, help="build: memory the FAISS index may take; past it the choice "
                                                     "goes to IVF-PQ on disk (ivfdisk). Remembered (default: no limit)")
    ix.add_argument("--backend", choices=["faiss", "milvus"],
                    help="build: where the vectors are searched: FAISS files in the folder, or a Milvus collection "
                         "(default: what the index was built with, else faiss)")
    ix.add_argument("--milvus-uri", help="--backend milvus: a Milvus server (http://host:19530, token in DSMD_MILVUS_TOKEN) "
                                  "or a local file for Milvus Lite (default: INDEX/milvus.db)")
    ix.add_argument("--collection", help="--backend milvus: collection name prefix (default: dsmd; "
                                         "PREFIX_images and PREFIX_texts)")
    ix.add_argument("--batch", type=int, default=64)
    ix.add_argument("--workers", type=int, default=2, help="image-decoding threads")
    ix.add_argument("--file", help="add-texts: a text file, one text per line")
    ix.add_argument("--id", type=int, action="append", help="remove: an item id (repeatable)")
    ix.add_argument("--uri", action="append", help="remove: an item path (repeatable)")
    ix.add_argument("--text", help="search: a text query")
    ix.add_argument("--image", help="search: an image file (finds captions)")
    ix.add_argument("-k", type=int, default=10)
    ix.set_defaults(run=_index)
