"""syncnorm's normalization layers, one file each."""

from ._base import BatchNormBase
from .batch_renorm import BatchRenorm
from .frozen_batchnorm import FrozenBatchNorm
from .ghost_batchnorm import GhostBatchNorm
from .sync_batchnorm import SyncBatchNorm

__all__ = ["BatchNormBase", "BatchRenorm", "FrozenBatchNorm", "GhostBatchNorm", "SyncBatchNorm"]
