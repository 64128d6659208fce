"""distill: teachers, the teacher feature store, and (next) the DSMD student trainer.

This is the training side of the project; it needs torch. `index/` and `serve/` never
import it.
"""
