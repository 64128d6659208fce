"""dsmd: distil, export, index and serve cheap image-text search.

This package holds what every stage shares and what must run without torch:
data-set readers, the demo world, retrieval metrics, artifact I/O and the command line.
"""

__version__ = "0.1.0"
