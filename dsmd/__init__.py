"""dsmd: distil, export, index and serve cheap image-text search.

One namespace, four stages joined by artifacts on disk (each a folder of the repository):

    dsmd.distill   teachers, the teacher feature store, the DSMD student trainer  (needs dsmd[train])
    dsmd.export    student or teacher -> ONNX encoder bundle                        (needs dsmd[train])
    dsmd.index     images and captions -> FAISS index + SQLite metadata             (dsmd[serve], no torch)
    dsmd.serve     the HTTP search server and its web page                          (dsmd[serve], no torch)
    dsmd.cli       the `dsmd` command: one sub-command per step

The modules directly in `dsmd` are the ground floor every stage shares and that runs without
torch: data-set readers, the demo world, preprocessing, the bundle runtime, retrieval
metrics and artifact I/O.
"""

__version__ = "0.1.0"
