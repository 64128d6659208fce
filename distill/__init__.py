"""dsmd.distill: the training side (needs torch: pip install 'dsmd[train]').

    teachers/        teacher plug-ins (demo, BEiT-3, CLIP, SigLIP) behind one interface
    features.py      a teacher's embeddings of a data set, stored once (resumable, torchrun)
    train_teacher.py the demo teacher, trained in place on the demo world
    student.py       the dual-encoder student (ViT + BERT) and its presets
    losses.py, balancer.py   the four DSMD losses and the dynamic self-adaptive balancer
    train.py         the distillation loop; distributed.py, checkpoint.py, evaluate.py and
                     run_log.py are the rooms around it

`dsmd.index` and `dsmd.serve` never import it.
"""
