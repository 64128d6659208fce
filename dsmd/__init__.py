"""dsmd: distil, export, index and serve cheap image-text search.

One namespace, four stages joined by artifacts on disk (each a folder of the repository):

    dsmd.distill   teachers, the teacher feature store, the DSMD student trainer  (needs dsmd[train])
    dsmd.export    student or teacher -> ONNX encoder bundle                        (needs dsmd[train])
    dsmd.index     images and captions -> FAISS (or Milvus) index + SQLite rows     (dsmd[serve], no torch)
    dsmd.serve     the HTTP search server and its web page                          (dsmd[serve], no torch)

The modules directly in `dsmd` are the ground floor that every stage shares and that runs
without torch; none of them imports a stage, except cli.py, the dispatcher on top:

    cli.py         the `dsmd` command: one sub-command per step; each stage adds its own
    datasets.py    captioned-image data sets (Karpathy JSON, JSONL), validated when opened
    world.py       the generated worlds: scenes, rendering, the data set files
    world_specs.py what each world is made of (demo, shifted)
    world_captions.py  their captions, and the bag-of-words baseline
    images.py      opening images safely (corrupt files, decompression bombs, EXIF orientation)
    preprocess.py  the preprocessing spec and its one implementation
    bundle.py      the encoder bundle at run time (ONNX Runtime, tokenizers)
    retrieval.py   recall metrics, the paper's protocol
    artifacts.py   atomic writes, manifests and content hashes
    hub.py         models by name: Hugging Face ids, timm names, BEiT-3 files, downloaded once
    cpus.py        how many cores this process may use
    errors.py      the base class for problems with the user's input
"""

__version__ = "0.1.0"
