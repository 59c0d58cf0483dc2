"""Lightning integration in one import: the ``SyncNormLayerSync`` plugin and the callbacks.

The plugin lives here, not among the callbacks: Lightning takes it through ``Trainer(plugins=[...])``
(its ``LayerSync`` seam, the one behind ``sync_batchnorm=True``), not ``callbacks=[...]``.
"""

from __future__ import annotations

from typing import Any

from pytorch_lightning.plugins.layer_sync import LayerSync
from torch import nn
from typing_extensions import override

from .callbacks import FreezeNormStats, NormConversion, PreciseBN, StatDivergenceMonitor
from .convert import conversion_kind, convert_norms, revert_norms

__all__ = ["FreezeNormStats", "NormConversion", "PreciseBN", "StatDivergenceMonitor", "SyncNormLayerSync"]


class SyncNormLayerSync(LayerSync):
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

        from pytorch_lightning import Trainer
        from syncnorm.lightning import SyncNormLayerSync

        trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", plugins=[SyncNormLayerSync()])
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
