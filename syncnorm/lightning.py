"""Lightning integration in one import: the LayerSync plugin and the callbacks."""

from .callbacks import FreezeNormStats, NormConversion, PreciseBN, StatDivergenceMonitor
from .callbacks.layer_sync import SyncNormLayerSync

__all__ = ["FreezeNormStats", "NormConversion", "PreciseBN", "StatDivergenceMonitor", "SyncNormLayerSync"]
