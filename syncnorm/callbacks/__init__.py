"""Lightning callbacks: NormConversion, FreezeNormStats, StatDivergenceMonitor, PreciseBN."""

from .freeze_norm_stats import FreezeNormStats, freeze_stats, unfreeze_stats
from .norm_conversion import NormConversion
from .precise_bn import PreciseBN, recompute_population_stats
from .stat_divergence import StatDivergenceMonitor, divergence_metrics

__all__ = [
    "FreezeNormStats",
    "NormConversion",
    "PreciseBN",
    "StatDivergenceMonitor",
    "divergence_metrics",
    "freeze_stats",
    "recompute_population_stats",
    "unfreeze_stats",
]
