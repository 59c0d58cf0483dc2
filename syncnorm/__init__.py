"""syncnorm: exact normalization statistics in distributed training, on every backend."""

from .distributed import SyncError
from .layers import SyncBatchNorm

__version__ = "0.1.0"

__all__ = ["SyncBatchNorm", "SyncError", "__version__"]
