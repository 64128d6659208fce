"""dsmd.index: image collections -> FAISS index + SQLite metadata, without torch.

    build.py    add images and captions, remove, merge shards, finalize (choose and tune the FAISS index)
    ann.py      which FAISS index fits a size and memory, and its tuning to a recall target
    db.py       the SQLite items table (vectors, content hashes, captions)
    search.py   an opened index answering queries (what the server holds)
    uploads.py  single-image writes to a live index (what POST/DELETE /items do on disk)
"""
