"""dsmd.index: image collections -> FAISS (or Milvus) index + SQLite metadata, without torch.

    build.py      add images and captions, remove, finalize (choose and tune the FAISS index)
    merging.py    merge shard indexes into one folder
    sync.py       make an index match a folder: embed what is new or changed, follow moves, drop what is gone
    watch.py      `sync --watch`: sync after each burst of changes in the folder (inotify, debounced)
    sources.py    where images come from (a folder, a data set, a shard), decoded in threads
    ann.py        which FAISS index fits a size and memory, and its tuning to a recall target
    tune_queries.py  the text queries a captionless collection's image index is tuned for too
    db.py         the SQLite tables (items, content hashes, captions, the row of each vector): the source of truth
    connect.py    how SQLite is opened: durability (DSMD_INDEX_SYNCHRONOUS), read-only connections that create no file
    metadata.py   what an item is besides its vector: file size and time, EXIF time and camera, folder, tags
    identity.py   which bundle an index belongs to (fingerprint, dim, variant), checked by every writer
    reclaim.py    compaction giving back the vector rows and upload files of removed items
    vectors.py    the vectors themselves: one float16 matrix file per table, memory-mapped for reading
    search.py     an opened index answering queries from many threads, and changing live (what the server holds)
    folder_state.py  whether an index folder's manifest changed, whether this process may write it
    fulltext.py   words as well as meaning: SQLite FTS5 over file names, folders, captions, tags; fusion
    filters.py    which items a search may return (folder, capture time, tags, size, captions) as SQL
    filtered.py   a search as the API asks it: filtered inside the search, paged, near-duplicates folded
    duplicates.py exact and near-duplicate groups of a whole index (`dsmd index duplicates`)
    live.py       the in-memory side of a live index: segments for additions, tombstones for removals
    lock.py       the folder lock shared by every writer (CLI and servers), a readers-writer lock
    uploads.py    single-image writes (what POST/DELETE /items do on disk)
    recall.py     text->image recall of the index's captions, directly and through FAISS
    milvus.py     Milvus as the search back end: the same folder, the vectors searched by a Milvus collection
    ray_embed.py  embedding a collection on a Ray cluster into vector shards, and building from them
    cli.py        `dsmd index build|sync|embed|add-texts|remove|merge|info|search|duplicates|recall`
"""
