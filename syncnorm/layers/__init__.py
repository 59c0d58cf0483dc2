"""syncnorm's normalization layers, one file each."""

from ._base import BatchNormBase
from .sync_batchnorm import SyncBatchNorm

__all__ = ["BatchNormBase", "SyncBatchNorm"]
