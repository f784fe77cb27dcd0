"""catchtag: the library behind the executable companion book to arXiv 2502.00919.

Attention sinks, the catch, tag, release mechanism, and the experiments of the paper, on real
pretrained models through nnsight, locally or on NDIF.
"""

__version__ = "0.1.0"

from .errors import CatchtagError  # noqa: F401
