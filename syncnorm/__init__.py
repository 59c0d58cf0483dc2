"""syncnorm: exact normalization statistics in distributed training, on every backend."""

from .convert import choose_auto_kind, convert_norms, revert_norms
from .distributed import SyncError
from .engine import check_sync_errors
from .factory import create_norm_layer, get_norm_layer, norm_kinds, register_norm
from .distributed import new_sync_groups
from .layers import (BatchInstanceNorm, BatchRenorm, FrozenBatchNorm, GhostBatchNorm, SwitchableNorm,
                     SyncBatchNorm)

__version__ = "0.1.0"

__all__ = [
    "BatchInstanceNorm",
    "BatchRenorm",
    "FrozenBatchNorm",
    "GhostBatchNorm",
    "SwitchableNorm",
    "SyncBatchNorm",
    "SyncError",
    "check_sync_errors",
    "choose_auto_kind",
    "convert_norms",
    "create_norm_layer",
    "get_norm_layer",
    "new_sync_groups",
    "norm_kinds",
    "register_norm",
    "revert_norms",
    "__version__",
]
