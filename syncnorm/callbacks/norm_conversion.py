"""``NormConversion``: convert a LightningModule's norms before the strategy wraps it."""

from __future__ import annotations

import logging
from typing import Any, Optional, TYPE_CHECKING

from typing_extensions import override

from .._lightning_compat import CALLBACK_BASES, TORCH_SYNC_BATCHNORM, rank_zero_info
from .. import rules
from ..convert import AUTO, conversion_kind, convert_norms_with_summary
from ..engine import check_sync_errors, engine_state_dict, load_engine_state_dict
from ..factory import synchronizing_kinds
from ..distributed import new_sync_groups

if TYPE_CHECKING:  # annotations only: either namespace's classes
    import lightning.pytorch as pl

log = logging.getLogger(__name__)


class NormConversion(*CALLBACK_BASES):
    """Converts every batch-norm layer of the LightningModule to ``kind`` in ``setup``.

    ``setup`` runs before the strategy moves and wraps the model (DDP), before the optimizers are
    built, and before a checkpoint is restored, so the converted layers are the ones DDP sees and
    the checkpoint loads into (the ``state_dict`` keys do not change). Unlike Lightning's
    ``Trainer(sync_batchnorm=True)``, ``NormConversion("sync")`` works on CPU (gloo) as well as GPU.

    On logging steps (``trainer.log_every_n_steps``) and at each training epoch's end it raises the
    errors the synchronized layers recorded on the device instead of syncing
    (:func:`syncnorm.check_sync_errors`: a rank that ran another layer, non-finite statistics under
    ``on_nonfinite="raise"``; on CPU in eager mode they raise at once anyway).

    Its checkpoint state is what the synchronized layers carry between steps
    (:func:`syncnorm.engine.engine_state_dict`), so a run resumed from a checkpoint (``ckpt_path``)
    continues with exactly the arithmetic of the uninterrupted run (in eager mode).

    Args:
        kind: any kind of :func:`syncnorm.convert_norms` (the table of :mod:`syncnorm.factory`:
            ``batch``, ``sync``, ``ghost``, ``renorm``, ``frozen``, ``group``, ``batch_instance``,
            ``switchable``, registered ones) or ``auto``.
        **options: options of that kind, checked here. For ``auto``, ``per_device_batch`` defaults
            to the datamodule's (or the module's hparams') ``batch_size`` and ``world_size`` to the
            Trainer's. For a kind that synchronizes (``sync``, ``renorm``, ``batch_instance``,
            ``switchable``), ``sync_group_size=k`` synchronizes over groups of k consecutive ranks
            (see :func:`syncnorm.new_sync_groups`) instead of all of them, and ``sync_timeout_s=t``
            sets every converted layer's ``sync_timeout_s`` (the bound on a rank's wait for its peers
            on gloo; ``None`` keeps the layers' default, ``syncnorm.distributed.DEFAULT_TIMEOUT_S``).

    Raises:
        ValueError: unknown kind, unknown or invalid option (in ``__init__``); a ``sync_group_size``
            that does not divide the world size, or groups smaller than the world under a DDP strategy
            that broadcasts rank 0's buffers at each forward (they would overwrite the other groups'
            running statistics: use ``DDPStrategy(broadcast_buffers=False)``), ``auto`` without a
            discoverable batch size (in ``setup``).
        RuntimeError: combined with ``Trainer(sync_batchnorm=True)``.

    Works with ``pytorch_lightning.Trainer`` and ``lightning.pytorch.Trainer`` alike (the class
    derives from each installed namespace's ``Callback``, see :mod:`syncnorm._lightning_compat`).

    Example::

        import lightning.pytorch as pl  # or: import pytorch_lightning as pl
        from syncnorm.callbacks import NormConversion

        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp",
                             callbacks=[NormConversion("sync")])
    """

    def __init__(self, kind: str, **options: Any) -> None:
        row = conversion_kind(kind, "NormConversion")
        self.kind = row.name
        # options of the callback (not of convert_norms), for a kind that synchronizes
        self.sync_group_size = options.pop("sync_group_size", None)
        self.sync_timeout_s = options.pop("sync_timeout_s", None)
        for rule, value in ((rules.SYNC_GROUP_SIZE, self.sync_group_size), (rules.SYNC_TIMEOUT_S, self.sync_timeout_s)):
            if value is not None:
                if not row.synchronizes:
                    raise ValueError(f"NormConversion: {rule.name} applies to kinds {synchronizing_kinds()}, "
                                     f"got kind {self.kind!r}")
                rule.check(value, "NormConversion")
        row.check_options(options, f"NormConversion({self.kind!r})", require=self.kind != AUTO)
        self.options = options  # exactly convert_norms' options
        self.summary: Optional[str] = None
        self._module: Optional[pl.LightningModule] = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if _uses_torch_sync_batchnorm(trainer):
            raise RuntimeError(
                "NormConversion cannot be combined with Trainer(sync_batchnorm=True): both convert the "
                "norm layers. HINT: remove sync_batchnorm=True (NormConversion('sync') replaces it, on "
                "CPU too).")
        if self.summary is not None:  # fit then validate/test on the same module: convert once
            return
        self._module = pl_module
        options = dict(self.options)
        if self.sync_group_size is not None and trainer.world_size > 1:
            k = rules.check_sync_group_size(self.sync_group_size, trainer.world_size, "NormConversion")
            if k < trainer.world_size and _ddp_syncs_buffers_in_forward(trainer):
                raise ValueError(
                    f"NormConversion(sync_group_size={k}): each group of {k} ranks keeps its own running "
                    "statistics, but the strategy's DistributedDataParallel copies rank 0's buffers to every rank "
                    "at each forward (broadcast_buffers=True, DDP's default) and would overwrite them. HINT: "
                    "strategy=DDPStrategy(broadcast_buffers=False)")
            options["process_group"] = new_sync_groups(k)
        if self.kind == "auto":
            options.setdefault("world_size", trainer.world_size)
            if "per_device_batch" not in options:
                options["per_device_batch"] = _batch_size(trainer, pl_module)
        _, self.summary = convert_norms_with_summary(pl_module, self.kind, **options)
        if trainer.world_size == 1 and self.kind in synchronizing_kinds() and trainer.is_global_zero:
            log.warning("NormConversion(%r) in a run of one process: there is no other process to synchronize "
                        "with, so it trains as the local layer (sync: exactly BatchNorm on this process's batch). "
                        "Start several processes (e.g. trainer=ddp_cpu, or torchrun) to synchronize.", self.kind)
        if self.sync_timeout_s is not None:
            for module in pl_module.modules():
                if hasattr(module, "sync_timeout_s"):
                    module.sync_timeout_s = float(self.sync_timeout_s)
        rank_zero_info(f"NormConversion: {self.summary}")

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step % max(1, int(trainer.log_every_n_steps)) == 0:
            check_sync_errors(pl_module)  # one host read, on a step that reads for logging anyway

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_sync_errors(pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        # the kind: for messages about the checkpoint (it does not change what is restored)
        return {"kind": self.kind, "engine": engine_state_dict(self._module) if self._module is not None else {}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks after setup: the converted layers exist
        if self._module is not None and state_dict.get("engine"):
            load_engine_state_dict(self._module, state_dict["engine"])


def _uses_torch_sync_batchnorm(trainer: pl.Trainer) -> bool:
    # Trainer(sync_batchnorm=True) installs its namespace's TorchSyncBatchNorm on the connector, and on
    # the strategy only for parallel strategies
    candidates = (getattr(trainer.strategy, "_layer_sync", None),
                  getattr(getattr(trainer, "_accelerator_connector", None), "_layer_sync", None))
    return any(isinstance(c, TORCH_SYNC_BATCHNORM) for c in candidates)


def _ddp_syncs_buffers_in_forward(trainer: pl.Trainer) -> bool:
    """Whether the strategy wraps the model in a DistributedDataParallel that broadcasts rank 0's
    buffers at each forward (Lightning's DDP strategies keep the DDP arguments in ``_ddp_kwargs``;
    torch >= 2.13 names the setting ``forward_sync_buffers``, ``broadcast_buffers`` before)."""
    kwargs = getattr(trainer.strategy, "_ddp_kwargs", None)
    if not isinstance(kwargs, dict):
        return False
    for key in ("forward_sync_buffers", "broadcast_buffers"):
        if kwargs.get(key) is not None:
            return bool(kwargs[key])
    return True


def _batch_size(trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
    for source in (getattr(trainer, "datamodule", None), getattr(pl_module, "hparams", None)):
        value = getattr(source, "batch_size", None) if source is not None else None
        if value is None and isinstance(source, dict):
            value = source.get("batch_size")
        if isinstance(value, int):
            return value
    raise ValueError("NormConversion('auto'): pass per_device_batch=<int>; no batch_size found on the "
                     "datamodule or in the module's hparams")
