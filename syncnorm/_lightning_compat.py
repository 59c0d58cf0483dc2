"""Both Lightning namespaces: ``pytorch_lightning`` and the unified package's ``lightning.pytorch``.

Lightning ships one Trainer under two import names, from two pip packages: ``pytorch-lightning``
(``import pytorch_lightning as pl``) and ``lightning`` (``import lightning.pytorch as pl``). Their
classes are distinct objects: a ``lightning.pytorch.Trainer`` accepts a plugin only if it is an
instance of *its own* ``LayerSync``, and recognizes ``Trainer(sync_batchnorm=True)`` by its own
``TorchSyncBatchNorm``. A class built on one namespace's base is therefore foreign to the other's
Trainer.

syncnorm's Lightning classes (the callbacks of :mod:`syncnorm.callbacks` and
:class:`syncnorm.lightning.SyncNormLayerSync`) derive from the base class of *every installed*
namespace (:data:`CALLBACK_BASES`, :data:`LAYER_SYNC_BASES`): with both packages installed, one
``NormConversion`` object is an instance of ``pytorch_lightning.Callback`` and of
``lightning.pytorch.Callback`` at once, so the same import works with either Trainer; with one
package installed, only that one is imported and needed. The base classes of both namespaces are
the same code (hooks that do nothing; ``LayerSync``'s two abstract methods), so deriving from both
changes no behaviour. Nothing is registered with or patched into Lightning.

This is the only module of syncnorm's library that imports Lightning; it raises ``ImportError`` with
the install hint when neither package is importable.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional

__all__ = ["CALLBACK_BASES", "LAYER_SYNC_BASES", "NAMESPACES", "TORCH_SYNC_BATCHNORM", "installed_namespaces",
           "rank_zero_info", "rank_zero_warn", "wandb_logger_classes"]

NAMESPACES = ("pytorch_lightning", "lightning.pytorch")
"""The two import names of Lightning's Trainer, in the order syncnorm lists them."""


def _import(name: str) -> Optional[ModuleType]:
    try:
        return importlib.import_module(name)
    except ImportError:  # not installed (or blocked): the other namespace may still serve
        return None


_MODULES = tuple(m for m in (_import(name) for name in NAMESPACES) if m is not None)
if not _MODULES:
    raise ImportError("syncnorm's Lightning integration (syncnorm.callbacks, syncnorm.lightning) needs "
                      "pytorch-lightning or lightning >= 2.4; neither is importable. HINT: pip install "
                      "'syncnorm[lightning]'")


def installed_namespaces() -> list[str]:
    """The Lightning namespaces syncnorm's classes work with here (see the module docstring)."""
    return [m.__name__ for m in _MODULES]


def _from_each(module: str, attr: str) -> tuple[type, ...]:
    return tuple(getattr(importlib.import_module(f"{m.__name__}.{module}"), attr) for m in _MODULES)


CALLBACK_BASES: tuple[type, ...] = tuple(m.Callback for m in _MODULES)
"""``Callback`` of each installed namespace: the bases of syncnorm's callbacks."""

LAYER_SYNC_BASES: tuple[type, ...] = _from_each("plugins.layer_sync", "LayerSync")
"""``LayerSync`` of each installed namespace: the bases of ``SyncNormLayerSync``."""

TORCH_SYNC_BATCHNORM: tuple[type, ...] = _from_each("plugins.layer_sync", "TorchSyncBatchNorm")
"""What ``Trainer(sync_batchnorm=True)`` installs, in each installed namespace."""

def wandb_logger_classes() -> tuple[type, ...]:
    """``WandbLogger`` of each installed namespace (imported on first use: it is only needed to chart)."""
    return _from_each("loggers", "WandbLogger")


# one function object in both namespaces (lightning_utilities'), rank set by whichever Trainer runs
rank_zero_info = _MODULES[0].utilities.rank_zero_info
rank_zero_warn = _MODULES[0].utilities.rank_zero_warn
