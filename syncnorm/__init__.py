"""syncnorm: exact normalization statistics in distributed training, on every backend."""

from .convert import choose_auto_kind, convert_norms, revert_norms
from .distributed import SyncError
from .factory import create_norm_layer, get_norm_layer, norm_kinds, register_norm
from .layers import BatchRenorm, FrozenBatchNorm, GhostBatchNorm, SyncBatchNorm

__version__ = "0.1.0"

__all__ = [
    "BatchRenorm",
    "FrozenBatchNorm",
    "GhostBatchNorm",
    "SyncBatchNorm",
    "SyncError",
    "choose_auto_kind",
    "convert_norms",
    "create_norm_layer",
    "get_norm_layer",
    "norm_kinds",
    "register_norm",
    "revert_norms",
    "__version__",
]
