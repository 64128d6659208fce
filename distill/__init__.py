"""dsmd.distill: the training side (needs torch: pip install 'dsmd[train]').

    teachers/           teacher plug-ins (demo, BEiT-3, CLIP, SigLIP) behind one interface, one registry
    features.py         a teacher's embeddings of a data set, stored once (resumable, torchrun)
    train_teacher.py    the demo teacher, trained in place on the demo world
    student.py          the dual-encoder student (ViT + BERT), its tokenizer, save and load
    student_presets.py  the student presets by name (base, demo, tiny); torch-free
    registry.py         the named table both the teacher kinds and the student presets are kept in
    config.py           every setting of a distillation run, from JSON and --set overrides
    losses.py           the four DSMD losses (and the peers' ones for the ablation)
    balancer.py         the dynamic self-adaptive loss balancer and its variants
    train.py            the distillation loop
    data.py             training pairs: order, shards per rank, augmentation, batches
    distributed.py      torchrun ranks, devices and mixed precision
    checkpoint.py       the run folder, checkpoints and exact resume
    evaluate.py         val and test recall of a student, beside its teacher's
    run_log.py          the run's TensorBoard log and plot
    cli.py              the commands: teachers, train-teacher, features, recall, students, distill, evaluate

The CLI and the registries (`teachers/registry.py`, `student_presets.py`) import no torch until
a command runs. `dsmd.index` and `dsmd.serve` never import this package.
"""
