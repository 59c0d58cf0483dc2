"""syncnorm's normalization layers, one file each."""

from ._base import BatchNormBase
from .batch_instance_norm import BatchInstanceNorm
from .batch_renorm import BatchRenorm
from .frozen_batchnorm import FrozenBatchNorm
from .ghost_batchnorm import GhostBatchNorm
from .switchable_norm import SwitchableNorm
from .sync_batchnorm import SyncBatchNorm

__all__ = ["BatchInstanceNorm", "BatchNormBase", "BatchRenorm", "FrozenBatchNorm", "GhostBatchNorm",
           "SwitchableNorm", "SyncBatchNorm"]
