"""Lightning integration in one import: the ``SyncNormLayerSync`` plugin and the callbacks.

The plugin lives here, not among the callbacks: Lightning takes it through ``Trainer(plugins=[...])``
(its ``LayerSync`` seam, the one behind ``sync_batchnorm=True``), not ``callbacks=[...]``.

Every class here works with ``pytorch_lightning.Trainer`` and with the unified package's
``lightning.pytorch.Trainer``, whichever of the two is installed (both when both are): see
:mod:`syncnorm._lightning_compat`.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from typing_extensions import override

from ._lightning_compat import LAYER_SYNC_BASES
from .callbacks import FreezeNormStats, NormConversion, PreciseBN, StatDivergenceMonitor
from .convert import conversion_kind, convert_norms, revert_norms

__all__ = ["FreezeNormStats", "NormConversion", "PreciseBN", "StatDivergenceMonitor", "SyncNormLayerSync"]


class SyncNormLayerSync(*LAYER_SYNC_BASES):
    """Lightning's own seam for synchronized norms (the one behind ``sync_batchnorm=True``), filled
    by syncnorm: exact, and CPU-capable (gloo) as well as GPU.

    The strategy calls ``apply`` on the LightningModule before wrapping it in DDP (when fitting) and
    ``revert`` at teardown, which restores the classes the model had (BatchNorm1d stays 1d).

    Args:
        kind: the conversion kind (default ``"sync"``; any of :func:`syncnorm.convert_norms`).
        **options: the kind's options (e.g. ``process_group``), checked here.

    Raises:
        ValueError: unknown kind, unknown or invalid option.

    Example::

        import lightning.pytorch as pl  # or: import pytorch_lightning as pl
        from syncnorm.lightning import SyncNormLayerSync

        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", plugins=[SyncNormLayerSync()])
    """

    def __init__(self, kind: str = "sync", **options: Any) -> None:
        row = conversion_kind(kind, "SyncNormLayerSync")
        row.check_options(options, f"SyncNormLayerSync({row.name!r})")
        self.kind = row.name
        self.options = options

    @override
    def apply(self, model: nn.Module) -> nn.Module:
        return convert_norms(model, self.kind, **self.options)

    @override
    def revert(self, model: nn.Module) -> nn.Module:
        return revert_norms(model)
