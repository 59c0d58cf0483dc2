"""LightningModules of the training app: :class:`ClassificationModule` and :class:`DetectionModule`.

Both wrap a network built with ``norm="batch"``; the normalization kind is applied afterwards by
:class:`syncnorm.callbacks.NormConversion` (the config's ``norm`` group), so one model config works
with every norm. Both share the optimizer setup (SGD with momentum or AdamW, weight decay only on
weights of rank >= 2, i.e. not on norm affine parameters and biases; cosine or no schedule, stepped
per epoch) and the optional backbone freezing used for fine-tuning.

Metrics (every one logged with ``sync_dist=True``):

* ``train/loss``, ``train/acc`` (classification) or ``train/loss`` and its parts (detection), per
  step, averaged over ranks: with equal per-rank batches this is the global batch's value;
* ``val/loss`` and ``val/acc``: sums of per-sample loss and of correct predictions, and the sample
  count, reduced over ranks at epoch end, then divided: exact for uneven validation shards;
* ``val/map50`` (detection): mAP at IoU 0.5 by :func:`syncnorm.app.models.ops.mean_average_precision`
  on the *rank-gathered* predictions (every rank's detections and targets are collected with
  ``all_gather_object``), i.e. the mAP of the whole validation set, not an average of per-rank mAPs
  (AP does not average over subsets).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from syncnorm.distributed import gather_lists

from .ops import mean_average_precision

__all__ = ["ClassificationModule", "DetectionModule", "OPTIMIZERS", "SCHEDULERS"]

OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("cosine", "none")


class _Base(pl.LightningModule):
    """Shared optimizer, schedule and backbone freezing (see the module docstring)."""

    def __init__(self, net: nn.Module, optimizer: str, lr: float, momentum: float, weight_decay: float,
                 scheduler: str, max_epochs: int, freeze_backbone: bool, head: Sequence[str] | str) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"{type(self).__name__}: expected optimizer in {list(OPTIMIZERS)}, got {optimizer!r}")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"{type(self).__name__}: expected scheduler in {list(SCHEDULERS)}, got {scheduler!r}")
        if not lr > 0:
            raise ValueError(f"{type(self).__name__}: expected lr > 0, got {lr!r}")
        if scheduler == "cosine" and (not isinstance(max_epochs, int) or max_epochs < 1):
            raise ValueError(f"{type(self).__name__}: the cosine schedule needs max_epochs as an int >= 1, got "
                             f"{max_epochs!r} (or use scheduler='none')")
        self.net = net
        self.head = [head] if isinstance(head, str) else list(head)
        if freeze_backbone:
            self._freeze_backbone()

    def _freeze_backbone(self) -> None:
        """``requires_grad=False`` on every parameter of ``net`` outside the ``head`` submodules."""
        names = dict(self.net.named_modules())
        missing = [h for h in self.head if h not in names]
        if missing:
            raise ValueError(f"{type(self).__name__}: head module(s) {missing} not found in the network; "
                             f"top-level modules are {[n for n, _ in self.net.named_children()]}")
        keep = {id(p) for h in self.head for p in names[h].parameters()}
        for p in self.net.parameters():
            p.requires_grad_(id(p) in keep)

    def forward(self, x: Tensor) -> Any:
        return self.net(x)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        # after NormConversion/FreezeNormStats (setup): only what is still trainable
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError(f"{type(self).__name__}: no trainable parameter left "
                               "(frozen backbone, frozen head and frozen norm affine?)")
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": hp.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum)
        else:
            opt = torch.optim.AdamW(groups, lr=hp.lr)
        if hp.scheduler == "none":
            return opt
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=hp.max_epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def _reduce_sum(self, t: Tensor) -> Tensor:
        """Sum a tensor over the ranks (unchanged with one process)."""
        return self.trainer.strategy.reduce(t, reduce_op="sum") if self.trainer.world_size > 1 else t


class ClassificationModule(_Base):
    """Image classification with cross-entropy.

    Args:
        net: the network (``(N, C, H, W) -> (N, num_classes)``), built with ``norm="batch"``.
        optimizer: ``"sgd"`` (with ``momentum``) or ``"adamw"``. Default: ``"sgd"``.
        lr: learning rate. Default: 0.1.
        momentum: SGD momentum. Default: 0.9.
        weight_decay: on weights of rank >= 2 only. Default: 5e-4.
        scheduler: ``"cosine"`` (per epoch, to 0 at ``max_epochs``) or ``"none"``. Default: ``"cosine"``.
        max_epochs: length of the cosine schedule (unused with ``scheduler="none"``). Default: 10.
        freeze_backbone: train only the ``head`` submodule(s) (fine-tuning). Default: ``False``.
        head: name(s) of the head submodule(s) of ``net``. Default: ``"fc"``.
        **arch: the architecture settings ``net`` was built from (``depth``, ``width``, ``stem``...);
            recorded with the hyperparameters (checkpoint, W&B config), not used otherwise.

    Raises:
        ValueError: unknown optimizer or scheduler, non-positive ``lr``, unknown ``head``, a cosine
            schedule without a positive ``max_epochs``.

    Example::

        >>> from syncnorm.app.models import build_resnet
        >>> module = ClassificationModule(build_resnet(18, num_classes=10, width=4), lr=0.05, depth=18)
        >>> module.hparams.depth, module.hparams.lr
        (18, 0.05)
    """

    def __init__(self, net: nn.Module, optimizer: str = "sgd", lr: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 5e-4, scheduler: str = "cosine", max_epochs: int = 10,
                 freeze_backbone: bool = False, head: Sequence[str] | str = "fc", **arch: Any) -> None:
        super().__init__(net, optimizer, lr, momentum, weight_decay, scheduler, max_epochs, freeze_backbone, head)
        self.save_hyperparameters(ignore=["net"])
        self._val_sums: Optional[Tensor] = None

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(dim=1) == y).float().mean()
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, sync_dist=True)
        self.log("train/acc", acc, on_step=True, on_epoch=False, sync_dist=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(3, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        loss_sum = F.cross_entropy(logits, y, reduction="sum")
        correct = (logits.argmax(dim=1) == y).sum()
        self._val_sums += torch.stack([loss_sum.double(), correct.double(), torch.tensor(float(y.numel()),
                                       dtype=torch.float64, device=self.device)])

    def on_validation_epoch_end(self) -> None:
        loss_sum, correct, count = self._reduce_sum(self._val_sums).tolist()
        count = max(count, 1.0)
        # values are already global (identical on every rank); sync_dist keeps Lightning's
        # epoch-level bookkeeping consistent across ranks
        self.log("val/loss", loss_sum / count, prog_bar=True, sync_dist=True)
        self.log("val/acc", correct / count, prog_bar=True, sync_dist=True)


class DetectionModule(_Base):
    """Object detection with the YOLO-style detector's own loss and decoding.

    Args:
        net: a :class:`~syncnorm.app.models.YOLO` (``forward``, ``loss(outputs, targets)``, ``decode``).
        optimizer: ``"sgd"`` or ``"adamw"``. Default: ``"adamw"``.
        lr: learning rate. Default: 2e-3.
        momentum: SGD momentum. Default: 0.9.
        weight_decay: on weights of rank >= 2 only. Default: 5e-4.
        scheduler: ``"cosine"`` or ``"none"``. Default: ``"cosine"``.
        max_epochs: length of the cosine schedule. Default: 30.
        freeze_backbone: train only the ``head`` submodule(s). Default: ``False``.
        head: name(s) of the head submodule(s). Default: ``"heads"``.
        conf_threshold: minimum score kept by ``decode`` at validation. Default: 0.05.
        nms_iou: NMS IoU threshold at validation. Default: 0.5.
        map_iou: IoU threshold of the reported mAP. Default: 0.5.
        **arch: the architecture settings ``net`` was built from; recorded with the hyperparameters.

    ``val/map50`` is computed on the predictions of every rank gathered together (see the module
    docstring), on every rank, so all ranks log the same value.
    """

    def __init__(self, net: nn.Module, optimizer: str = "adamw", lr: float = 2e-3, momentum: float = 0.9,
                 weight_decay: float = 5e-4, scheduler: str = "cosine", max_epochs: int = 30,
                 freeze_backbone: bool = False, head: Sequence[str] | str = "heads",
                 conf_threshold: float = 0.05, nms_iou: float = 0.5, map_iou: float = 0.5, **arch: Any) -> None:
        super().__init__(net, optimizer, lr, momentum, weight_decay, scheduler, max_epochs, freeze_backbone, head)
        for name in ("loss", "decode"):
            if not callable(getattr(net, name, None)):
                raise TypeError(f"DetectionModule: expected a detector with .{name}(), got {type(net).__name__}")
        self.save_hyperparameters(ignore=["net"])
        self._val_sums: Optional[Tensor] = None
        self._preds: list[dict[str, Tensor]] = []
        self._targets: list[dict[str, Tensor]] = []

    def training_step(self, batch: tuple[Tensor, list[dict[str, Tensor]]], batch_idx: int) -> Tensor:
        images, targets = batch
        losses = self.net.loss(self(images), targets)
        self.log("train/loss", losses["loss"], on_step=True, on_epoch=False, prog_bar=True, sync_dist=True)
        for key in ("loss_box", "loss_obj", "loss_cls"):
            self.log(f"train/{key}", losses[key], on_step=True, on_epoch=False, sync_dist=True)
        return losses["loss"]

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        self._preds, self._targets = [], []

    def validation_step(self, batch: tuple[Tensor, list[dict[str, Tensor]]], batch_idx: int) -> None:
        images, targets = batch
        outputs = self(images)
        loss = self.net.loss(outputs, targets)["loss"]
        n = float(images.shape[0])
        self._val_sums += torch.tensor([float(loss) * n, n], dtype=torch.float64, device=self.device)
        hp = self.hparams
        preds = self.net.decode(outputs, conf_threshold=hp.conf_threshold, iou_threshold=hp.nms_iou)
        self._preds += [{k: v.detach().cpu() for k, v in p.items()} for p in preds]
        self._targets += [{k: v.detach().cpu() for k, v in t.items()} for t in targets]

    def on_validation_epoch_end(self) -> None:
        loss_sum, count = self._reduce_sum(self._val_sums).tolist()
        preds, targets = gather_lists(self._preds), gather_lists(self._targets)
        map50 = mean_average_precision(preds, targets, iou_threshold=self.hparams.map_iou)
        self.log("val/loss", loss_sum / max(count, 1.0), prog_bar=True, sync_dist=True)
        self.log("val/map50", float(map50), prog_bar=True, sync_dist=True)
        self._preds, self._targets = [], []
