"""``FreezeNormStats``: fine-tune with frozen normalization statistics, persistently."""

from __future__ import annotations

from typing import Any, Optional, TYPE_CHECKING

from torch import nn
from typing_extensions import override

from .._lightning_compat import CALLBACK_BASES, rank_zero_info
from ._select import FROZEN_STATS_ATTR, Selection, select_norm_layers

_HOOK_ATTR = "_syncnorm_freeze_hook"

if TYPE_CHECKING:  # annotations only: either namespace's classes
    import lightning.pytorch as pl


def _force_eval(module: nn.Module, args: Any) -> None:
    module.training = False  # this layer only; runs before every forward, whatever .train() did


def freeze_stats(layer: nn.Module, train_affine: bool) -> None:
    """Freeze one batch-norm layer's statistics: it normalizes with its running statistics and never
    updates them, in every later forward, whatever ``.train()`` calls happen in between."""
    if getattr(layer, _HOOK_ATTR, None) is None:
        setattr(layer, _HOOK_ATTR, layer.register_forward_pre_hook(_force_eval))
    setattr(layer, FROZEN_STATS_ATTR, True)
    layer.training = False
    for p in layer.parameters(recurse=False):
        p.requires_grad_(train_affine)


def unfreeze_stats(layer: nn.Module) -> None:
    """Undo :func:`freeze_stats` (statistics update again in training mode)."""
    handle = getattr(layer, _HOOK_ATTR, None)
    if handle is not None:
        handle.remove()
        setattr(layer, _HOOK_ATTR, None)
    setattr(layer, FROZEN_STATS_ATTR, False)


class FreezeNormStats(*CALLBACK_BASES):
    """Freezes the statistics of the selected batch-norm layers for the whole run.

    The selected layers normalize with their running statistics and never update them, however
    often Lightning or user code calls ``.train()`` (a forward pre-hook puts the layer, and only it,
    in eval mode right before each of its forwards). This is what Lightning's
    ``BaseFinetuning.freeze(train_bn=False)`` does not do: it sets ``track_running_stats=False``,
    which makes the layer normalize with *batch* statistics in training. It composes with
    ``BackboneFinetuning``: that callback decides when the backbone's parameters train, this one keeps
    the statistics frozen throughout. Synchronized layers in eval mode do not communicate, so frozen
    layers cost no collectives.

    Args:
        modules: which layers: ``None`` (all batch-norm layers), a glob pattern on qualified names
            (``"backbone.*"``), a module, or a list of those.
        train_affine: keep the layers' weight and bias trainable (``True``) or freeze them too.

    The selection is saved in the callback's checkpoint state and re-applied on resume.

    Example::

        from pytorch_lightning import Trainer
        from syncnorm.callbacks import FreezeNormStats

        trainer = Trainer(callbacks=[FreezeNormStats(modules="backbone.*", train_affine=False)])
    """

    def __init__(self, modules: Selection = None, train_affine: bool = True) -> None:
        self.modules = modules
        self.train_affine = bool(train_affine)
        self.frozen: list[str] = []

    def _apply(self, pl_module: pl.LightningModule, names: Optional[list[str]] = None) -> None:
        layers = select_norm_layers(pl_module, self.modules if names is None else names)
        for layer in layers.values():
            freeze_stats(layer, self.train_affine)
        self.frozen = sorted(set(self.frozen) | set(layers))

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # before the strategy wraps the model, so DDP sees the final requires_grad flags
        self._apply(pl_module)
        rank_zero_info(f"FreezeNormStats: statistics frozen in {len(self.frozen)} layers "
                       f"(affine {'trainable' if self.train_affine else 'frozen'})")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.frozen:  # re-apply what a restored checkpoint said (idempotent)
            self._apply(pl_module, list(self.frozen))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"frozen": list(self.frozen), "train_affine": self.train_affine}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.frozen = sorted(set(self.frozen) | set(state_dict.get("frozen", [])))
