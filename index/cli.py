"""`dsmd index ACTION`: the command line of the FAISS (or Milvus) + SQLite index of images and captions.

One sub-parser and one handler per action, each sub-parser with only the options its action uses
(`dsmd index info INDEX --folder X` is an error, not an ignored option):

    build      add images (a folder, a data set, or the shards of embed) and rebuild the search files
    embed      embed images on a Ray cluster into vector shards (build --from-shards takes them)
    add-texts  add free texts, one a line, to the caption index
    remove     remove items by id or path
    merge      merge shard indexes (build --shard i/n) into one
    info       what an index holds: bundle, kinds, counts, measured recall, skipped files
    search     search by text (finds images) or by image (finds captions)
    recall     text->image recall of the index's captions, directly and through the index

An option used by several actions is added by one helper (`_bundle_options`, `_source_options`,
`_finalize_options`, ...), so it is defined once. FAISS, ONNX Runtime and the index modules are
imported inside the handlers, so `dsmd --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dsmd.errors import UserError

DEFAULT_INDEX = "artifacts/index"


# --- handlers: one per action ---------------------------------------------------------------------------------

def _build(a: argparse.Namespace) -> int:
    from dsmd.index.build import build

    if a.from_shards:
        if a.shard:
            raise UserError("--from-shards replaces --shard: the shards hold what was embedded")
        from dsmd.index.ray_embed import add_shards

        bundle = _bundle(a)
        r = add_shards(a.index, bundle, a.from_shards)
        _print_build(a, _finalize(a, bundle, report=r, memory_bytes=_memory_bytes(a)))
        return 0
    shard = None
    if a.shard:
        i, _, n = a.shard.partition("/")
        try:
            shard = (int(i), int(n))
        except ValueError:
            raise UserError(f"--shard takes i/n, e.g. 0/4, not {a.shard!r}") from None
    from dsmd.index.sources import shard_of

    sources = shard_of(_sources(a), shard)
    m = build(a.index, _bundle(a), sources, kind=a.index_type, batch=a.batch, workers=a.workers,
              backend=_backend(a), memory_bytes=_memory_bytes(a), tune_queries=_tune_queries(a))
    _print_build(a, m)
    return 0


def _sync(a: argparse.Namespace) -> int:
    from dsmd.index.sync import sync
    from dsmd.index.watch import watch

    options = {"kind": a.index_type, "batch": a.batch, "workers": a.workers, "backend": _backend(a),
               "tune_queries": _tune_queries(a)}
    settle = a.settle_s if a.settle_s is not None else 2.0 if a.watch else 0.0
    if not a.watch:
        r = sync(a.index, _bundle(a), a.folder, settle_s=settle, **options)
        print(json.dumps(r.to_json(), indent=2) if a.json else r.line())
        return 0
    try:
        watch(a.index, _bundle(a), a.folder, quiet_s=settle, on_report=lambda r: print(
            json.dumps(r.to_json()) if a.json else r.line(), flush=True), **options)
    except KeyboardInterrupt:
        pass
    return 0


def _embed(a: argparse.Namespace) -> int:
    from dsmd.index.ray_embed import embed

    m = embed(a.index, a.bundle, _sources(a), a.variant, a.ray, a.actors, a.threads_per_actor, a.gpus_per_actor,
              a.batch, a.shard_size)
    errors = sum(sh["errors"] for sh in m["shards"].values())
    print(f"{a.index}: {len(m['shards'])} shard(s) of {m['total']} images ({errors} unreadable), "
          f"{m['embedded_now']} embedded now in {m['seconds']:.1f} s"
          + (f" ({m['embedded_now'] / m['seconds']:.0f} images/s)" if m["embedded_now"] and m["seconds"] else "")
          + f"; build the index with: dsmd index build INDEX --bundle {a.bundle} --from-shards {a.index}")
    return 0


def _add_texts(a: argparse.Namespace) -> int:
    from dsmd.index.build import add_texts

    bundle = _bundle(a)
    texts = Path(a.file).read_text(encoding="utf-8").splitlines()
    n = add_texts(a.index, bundle, texts)
    m = _finalize(a, bundle)
    print(f"added {n} texts: {m['texts']['count']} in the caption index")
    _warn_shortfall(m)
    return 0


def _remove(a: argparse.Namespace) -> int:
    from dsmd.index.build import remove

    bundle = _bundle(a)
    n = remove(a.index, ids=a.id or [], uris=a.uri or [], bundle=bundle)  # another bundle: refused first
    print(f"removed {n} item(s)")
    if n:
        m = _finalize(a, bundle)
        print(f"{a.index}: {m['images']['count']} images")
        _warn_shortfall(m)
    return 0


def _merge(a: argparse.Namespace) -> int:
    from dsmd.index.build import merge

    bundle = _bundle(a)
    n = merge(a.index, a.inputs, bundle)  # shards of another bundle: refused before anything is merged
    m = _finalize(a, bundle)
    print(f"merged {n} items into {a.index}: {m['images']['count']} images, {m['texts']['count']} texts")
    _warn_shortfall(m)
    return 0


def _info(a: argparse.Namespace) -> int:
    from dsmd.index.build import info

    m = info(a.index)
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
                  + (f"  {p['bytes'] / 2**20:.1f} MiB" if p.get("bytes") else f"  collection {p.get('collection')}")
                  + (f"\n         (no captions: image queries {q['image_queries_recall_at_10']:.3f}, {q['count']} "
                     f"{q['from']} text queries {q['recall_at_10']:.3f})" if (q := p.get("text_queries")) else ""))
        else:
            print(f"  {part:6s} empty")
    print(f"  skipped files: {m['skipped']}")
    r = m["reclaimable"]
    if r["bytes"]:
        print(f"  reclaimable by a compaction: {r['bytes'] / 2**20:.2f} MiB ({sum(r['vector_rows'].values()):,} "
              f"vector rows of removed items, {r['upload_files']} upload files): freed by a server's "
              f"compaction, or by a finalize (build, remove) once dead rows pass 10%")
    _warn_shortfall(m)
    return 0


def _search(a: argparse.Namespace) -> int:
    from dsmd.index.search import SearchIndex

    bundle = _bundle(a)
    s = SearchIndex(a.index)
    s.check_bundle(bundle)
    target = "texts" if a.image else "images"
    q = bundle.encode_images([Path(a.image).read_bytes()]) if a.image else bundle.encode_texts([a.text or ""])
    for h in s.search(q, a.k, target)[0]:
        what = h.item.get("uri") or h.item.get("text")
        print(f"  {h.score:7.4f}  #{h.id:<8d} {what}")
    return 0


def _duplicates(a: argparse.Namespace) -> int:
    from dsmd.index.duplicates import exact_groups, near_groups
    from dsmd.index.search import SearchIndex

    if not 0 < a.threshold <= 1:
        raise UserError(f"--threshold is a cosine in (0, 1], not {a.threshold}")
    with SearchIndex(a.index, readonly=True) as s:
        exact, near = exact_groups(s), near_groups(s, a.threshold, progress=not a.json)
    if a.json:
        print(json.dumps({"threshold": a.threshold, "exact": exact, "near": near}, indent=1))
        return 0
    print(f"{len(exact)} item(s) whose exact bytes are also at other paths; {len(near)} group(s) of near-duplicates "
          f"(cosine >= {a.threshold}) holding {sum(len(g['ids']) for g in near)} items")
    for g in exact[:10]:
        print(f"  exact #{g['id']} {g['uri']}  also at: {', '.join(g['copies'][:3])}")
    for g in near[:10]:
        print(f"  near  {len(g['ids'])} items (max cosine {g['max_cosine']:.4f}): {', '.join(g['uris'][:3])}"
              + (" ..." if len(g["uris"]) > 3 else ""))
    return 0


def _recall(a: argparse.Namespace) -> int:
    from dsmd.index.recall import text_to_image_recall

    direct, via = text_to_image_recall(a.index)
    print(f"text→image recall of the index's captions ({a.index}):")
    print("  from the embeddings directly: " + "  ".join(f"R@{k} {v:.2f}" for k, v in direct.items()))
    print("  through the index:            " + "  ".join(f"R@{k} {v:.2f}" for k, v in via.items()))
    return 0


# --- what the handlers share ----------------------------------------------------------------------------------

def _bundle(a: argparse.Namespace):
    from dsmd.bundle import Bundle

    return Bundle(a.bundle, a.variant)


def _sources(a: argparse.Namespace) -> list:
    """--folder or --data (argparse has made sure there is exactly one) as a list of sources."""
    from dsmd.index.sources import dataset_sources, folder_sources

    return folder_sources(a.folder) if a.folder else dataset_sources(a.data, a.images, a.split)


def _memory_bytes(a: argparse.Namespace) -> int | None:
    return int(a.memory_gib * 2**30) if a.memory_gib else None


def _finalize(a: argparse.Namespace, bundle, **kwargs) -> dict:
    """Rebuild the search files after a change, with the kind and back end of --index-type / --backend."""
    from dsmd.index.build import finalize

    return finalize(a.index, bundle, kind=a.index_type, backend=_backend(a), tune_queries=_tune_queries(a), **kwargs)


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
    from dsmd.index import milvus

    if a.backend is None:
        if a.milvus_uri or a.collection:
            raise UserError("--milvus-uri and --collection go with --backend milvus")
        return None
    if a.backend == "faiss":
        return {"name": "faiss"}
    # no --collection: each index its own collections (dsmd_<index id>), or the ones it already has
    return {"name": "milvus", "uri": a.milvus_uri or milvus.default_uri(a.index), "collection": a.collection}


def _warn_shortfall(manifest: dict) -> None:
    """The recall target a FAISS file did not reach, said at the end where it is seen."""
    for part in ("images", "texts"):
        if manifest.get(part, {}).get("shortfall"):
            print(f"warning: {manifest[part]['shortfall']}")


# --- options shared by several actions, each defined once -----------------------------------------------------

def _index_argument(p: argparse.ArgumentParser, metavar: str = "INDEX", what: str = "index folder") -> None:
    p.add_argument("index", nargs="?", default=DEFAULT_INDEX, metavar=metavar,
                   help=f"{what} (default: {DEFAULT_INDEX})")


def _bundle_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", default="artifacts/bundle", help="encoder bundle (default: artifacts/bundle)")
    p.add_argument("--variant", default="fp32", help="bundle variant that embeds: fp32 (default), int8, fp16; "
                                                     "an index holds the vectors of one variant")


def _source_options(p: argparse.ArgumentParser, from_shards: bool = False) -> None:
    """Exactly one of --folder, --data (and --from-shards for build); --images/--split of --data."""
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--folder", help="a folder of images (recursive)")
    g.add_argument("--data", help="a data set (Karpathy JSON / JSONL): its images and captions")
    if from_shards:
        g.add_argument("--from-shards", help="the vector shards of dsmd index embed instead of --folder/--data")
    p.add_argument("--images", help="image root of --data (default: beside the annotation file)")
    p.add_argument("--split", help="only this split of --data")


def _batch_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, default=64, help="images per encoder batch (default: 64)")


def _tune_queries(a: argparse.Namespace) -> list[str] | None:
    from dsmd.index.tune_queries import read
    return read(a.tune_queries) if getattr(a, "tune_queries", None) else None


def _finalize_options(p: argparse.ArgumentParser, memory: bool = False) -> None:
    """What rebuilding the search files takes: --index-type, [--memory-gib], --tune-queries, --backend/..."""
    p.add_argument("--index-type", choices=["flat", "hnsw", "ivfpq", "ivfdisk"], help="override the choice by size")
    p.add_argument("--tune-queries", metavar="FILE", help="a captionless collection: tune its image index for these "
                   "text queries (one a line; remembered) instead of the built-in ones")
    if memory:
        p.add_argument("--memory-gib", type=float, help="memory the FAISS index may take; past it the choice goes "
                                                        "to IVF-PQ on disk (ivfdisk). Remembered (default: no limit)")
    p.add_argument("--backend", choices=["faiss", "milvus"],
                   help="where the vectors are searched: FAISS files in the folder, or a Milvus collection "
                        "(default: what the index was built with, else faiss)")
    p.add_argument("--milvus-uri", help="--backend milvus: a Milvus server (http://host:19530, token in "
                                        "DSMD_MILVUS_TOKEN) or a local file for Milvus Lite (default: INDEX/milvus.db)")
    p.add_argument("--collection", help="--backend milvus: collection name prefix, PREFIX_images and PREFIX_texts "
                                        "(default: the index's own, dsmd_<index id>; a collection of another index "
                                        "is refused)")


# --- the parsers ----------------------------------------------------------------------------------------------

class _ActionParser(argparse.ArgumentParser):
    """An action's parser refuses an option it does not take itself, with its own usage (argparse would pass it
    up to `dsmd`, whose error shows the top-level usage instead)."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def add_commands(sub: argparse._SubParsersAction) -> None:
    ix = sub.add_parser("index", help="index images (and captions) for search: build, sync, embed (on Ray), "
                                      "add-texts, remove, merge, info, search, recall",
                        description="The FAISS (or Milvus) + SQLite index of images and captions. "
                                    "`dsmd index ACTION --help` lists an action's options.")
    actions = ix.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=_ActionParser)

    b = actions.add_parser("build", help="add images (a folder, a data set, or the shards of embed) and rebuild "
                                         "the search files")
    _index_argument(b)
    _bundle_options(b)
    _source_options(b, from_shards=True)
    b.add_argument("--shard", help="only shard i/n of the sources (merge the shards afterwards)")
    _batch_option(b)
    b.add_argument("--workers", type=int, default=2, help="image-decoding threads (default: 2)")
    _finalize_options(b, memory=True)
    b.set_defaults(run=_build)

    y = actions.add_parser("sync", help="make the index match a folder: embed new and changed files, follow moves, "
                                        "drop deleted ones (--watch: keep doing it)")
    _index_argument(y)
    _bundle_options(y)
    y.add_argument("--folder", required=True, help="the folder of images (recursive) the index is to match")
    y.add_argument("--watch", action="store_true", help="keep watching the folder (inotify) and sync after changes")
    y.add_argument("--settle-s", type=float, help="leave files written in the last N seconds for the next round "
                   "(default: 0, with --watch 2: the quiet time before a sync too)")
    y.add_argument("--json", action="store_true", help="the report as JSON")
    _batch_option(y)
    y.add_argument("--workers", type=int, default=2, help="image-decoding threads (default: 2)")
    _finalize_options(y)
    y.set_defaults(run=_sync)

    e = actions.add_parser("embed", help="embed images on a Ray cluster into vector shards (then: build "
                                         "--from-shards)")
    _index_argument(e, "SHARDS", "folder of the vector shards")
    _bundle_options(e)
    _source_options(e)
    e.add_argument("--ray", default="local", help="'local' (Ray on this machine), 'auto' (the cluster this "
                                                  "machine belongs to) or a cluster address (default: local)")
    e.add_argument("--actors", type=int, help="encoder actors, each opening the bundle once "
                                              "(default: half the cluster's CPUs)")
    e.add_argument("--threads-per-actor", type=int, default=1, help="ONNX Runtime threads (and CPUs) per actor "
                                                                     "(default: 1)")
    e.add_argument("--gpus-per-actor", type=float, default=0, help="GPUs per actor; ONNX Runtime then runs on CUDA "
                                                                    "(default: 0)")
    e.add_argument("--shard-size", type=int, default=10_000, help="images per shard file (default: 10000)")
    _batch_option(e)
    e.set_defaults(run=_embed)

    t = actions.add_parser("add-texts", help="add free texts, one a line, to the caption index")
    _index_argument(t)
    t.add_argument("--file", required=True, help="a text file, one text per line")
    _bundle_options(t)
    _finalize_options(t)
    t.set_defaults(run=_add_texts)

    r = actions.add_parser("remove", help="remove items by id or path")
    _index_argument(r)
    r.add_argument("--id", type=int, action="append", help="an item id (repeatable)")
    r.add_argument("--uri", action="append", help="an item path (repeatable)")
    _bundle_options(r)
    _finalize_options(r)
    r.set_defaults(run=_remove)

    m = actions.add_parser("merge", help="merge shard indexes (build --shard i/n) into one")
    m.add_argument("index", metavar="OUT", help="the index folder to merge into")
    m.add_argument("inputs", nargs="+", metavar="SHARD", help="the shard indexes to merge into OUT")
    _bundle_options(m)
    _finalize_options(m)
    m.set_defaults(run=_merge)

    i = actions.add_parser("info", help="what an index holds: bundle, kinds, counts, measured recall, skipped files")
    _index_argument(i)
    i.set_defaults(run=_info)

    s = actions.add_parser("search", help="search by text (finds images) or by image (finds captions)")
    _index_argument(s)
    s.add_argument("--text", help="a text query")
    s.add_argument("--image", help="an image file (finds captions)")
    s.add_argument("-k", type=int, default=10, help="results to print (default: 10)")
    _bundle_options(s)
    s.set_defaults(run=_search)

    d = actions.add_parser("duplicates", help="exact duplicates (the same bytes at other paths) and groups of "
                                              "near-duplicates (burst shots, re-encodings)")
    _index_argument(d)
    d.add_argument("--threshold", type=float, default=0.95,
                   help="cosine at or above which two images are near-duplicates (default: 0.95)")
    d.add_argument("--json", action="store_true", help="print the groups as JSON")
    d.set_defaults(run=_duplicates)

    c = actions.add_parser("recall", help="text->image recall of the index's captions, directly and through "
                                          "the index")
    _index_argument(c)
    c.set_defaults(run=_recall)
