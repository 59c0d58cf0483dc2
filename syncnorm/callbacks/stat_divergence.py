"""``StatDivergenceMonitor``: how far each rank's batch statistics are from the rest of the group."""

from __future__ import annotations

import math
from typing import Any, TYPE_CHECKING

import torch
from torch import Tensor
from typing_extensions import override

from .._lightning_compat import CALLBACK_BASES, rank_zero_warn, wandb_logger_classes
from .. import functional as SF
from ..distributed import gather_rows
from ._select import Selection, select_norm_layers

if TYPE_CHECKING:  # annotations only: either namespace's classes
    import lightning.pytorch as pl


def divergence_metrics(stats: Tensor, num_features: int) -> dict[str, float]:
    """Metrics of one layer from the gathered per-rank rows ``[count, mean(C), var(C), rm(C), rv(C)]``.

    * ``mean_div``: max over ranks r of ``RMS_c((mu_r - mu_rest) / sigma)``, where ``mu_rest`` is the
      mean of the other ranks' samples and ``sigma`` the pooled within-rank std: a rank whose data is
      shifted by k standard deviations from the others scores k.
    * ``var_div``: max over ranks of ``RMS_c(log(var_r / var_rest))`` (0 when the spreads agree).
    * ``running_drift``: max over ranks of ``RMS_c((rm_r - mean_r(rm)) / sqrt(mean_r(rv)))``; DDP's
      ``broadcast_buffers=True`` makes it 0 at every forward.
    * ``train_eval_gap``: ``RMS_c((mu - running_mean) / sqrt(running_var))`` for the global batch mean
      ``mu``: how different training-mode and eval-mode normalization are right now.
    """
    c = num_features
    count = stats[:, 0].double()
    mean, var = stats[:, 1:1 + c].double(), stats[:, 1 + c:1 + 2 * c].double()
    rm, rv = stats[:, 1 + 2 * c:1 + 3 * c].double(), stats[:, 1 + 3 * c:1 + 4 * c].double()
    present = count > 0
    out: dict[str, float] = {}
    n_total = count.sum()
    if n_total <= 0:
        return out
    glob_mean = (count[:, None] * mean).sum(0) / n_total
    pooled_var = (count[:, None] * var).sum(0) / n_total
    sigma = pooled_var.clamp_min(1e-12).sqrt()
    mean_div, var_div = 0.0, 0.0
    for r in range(stats.shape[0]):
        rest = count.sum() - count[r]
        if not present[r] or rest <= 0:
            continue
        mu_rest = ((count[:, None] * mean).sum(0) - count[r] * mean[r]) / rest
        var_rest = ((count[:, None] * var).sum(0) - count[r] * var[r]) / rest
        mean_div = max(mean_div, ((mean[r] - mu_rest) / sigma).square().mean().sqrt().item())
        ratio = (var[r].clamp_min(1e-12) / var_rest.clamp_min(1e-12)).log()
        var_div = max(var_div, ratio.square().mean().sqrt().item())
    out["mean_div"], out["var_div"] = mean_div, var_div
    rm_avg, rv_avg = rm.mean(0), rv.mean(0).clamp_min(1e-12)
    out["running_drift"] = ((rm - rm_avg) / rv_avg.sqrt()).square().mean(1).sqrt().max().item()
    out["train_eval_gap"] = ((glob_mean - rm_avg) / rv_avg.sqrt()).square().mean().sqrt().item()
    return out


class StatDivergenceMonitor(*CALLBACK_BASES):
    """Logs, every ``every_n_steps`` training steps, per norm layer, how far each rank's batch
    statistics are from the others' (see :func:`divergence_metrics` for the definitions).

    On a logging step, forward pre-hooks record each selected layer's local input moments (one extra
    pass over those activations, no gradient), and one ``all_gather`` after the step carries every
    layer's per-rank ``[count, mean, var, running_mean, running_var]``. Other steps cost nothing.
    Metrics are logged through every logger the Trainer has (W&B, CSV, TensorBoard) as
    ``norm/<layer>/mean_div``, ``.../var_div``, ``.../running_drift``, ``.../train_eval_gap``, plus
    ``norm/max_mean_div`` and ``norm/max_var_div``; with a W&B logger also a bar chart per step
    (``norm/mean_div_by_layer``) so the diverging layers are visible without reading numbers.
    With one process the per-rank metrics are 0 and only ``train_eval_gap`` is informative.

    Args:
        every_n_steps: log every this many optimizer steps (``trainer.global_step``). Default: 50.
        layers: which layers (``None`` = all batch-norm layers; glob patterns, modules, lists).

    Example::

        from pytorch_lightning import Trainer
        from pytorch_lightning.loggers import CSVLogger
        from syncnorm.callbacks import StatDivergenceMonitor

        trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=CSVLogger("logs"),
                          callbacks=[StatDivergenceMonitor(every_n_steps=20)])
    """

    def __init__(self, every_n_steps: int = 50, layers: Selection = None) -> None:
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"StatDivergenceMonitor: expected every_n_steps to be an int >= 1, got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self.layers = layers
        self._names: list[str] = []
        self._modules: list[Any] = []
        self._handles: list[Any] = []
        self._captured: dict[str, Tensor] = {}
        self._active = False
        self._step = 0
        self.last_metrics: dict[str, float] = {}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.loggers:
            rank_zero_warn("StatDivergenceMonitor: the Trainer has no logger; metrics are only kept in "
                           "`last_metrics`. HINT: pass logger=CSVLogger(...) or WandbLogger(...).")
        selected = select_norm_layers(pl_module, self.layers)
        self._names, self._modules = list(selected), list(selected.values())
        for name, layer in selected.items():
            self._handles.append(layer.register_forward_pre_hook(self._make_hook(name)))

    def _make_hook(self, name: str):
        def hook(module: Any, args: tuple) -> None:
            if self._active and name not in self._captured and args and isinstance(args[0], Tensor):
                with torch.no_grad():
                    m = SF.batch_moments(args[0].detach())
                    self._captured[name] = torch.cat([m.count.reshape(1), m.mean, m.m2 / m.count.clamp_min(1)])
        return hook

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._active = trainer.global_step % self.every_n_steps == 0
        self._step = trainer.global_step  # the step the captured statistics belong to
        self._captured = {}

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._active:
            return
        self._active = False
        rows = []
        for name, layer in zip(self._names, self._modules):
            c = layer.num_features
            local = self._captured.get(name)
            if local is None:  # layer not run on this rank this step
                local = torch.zeros(1 + 2 * c, dtype=torch.float64)
            rm = getattr(layer, "running_mean", None)
            rv = getattr(layer, "running_var", None)
            rm = rm.detach().double().cpu() if rm is not None else torch.zeros(c, dtype=torch.float64)
            rv = rv.detach().double().cpu() if rv is not None else torch.ones(c, dtype=torch.float64)
            rows.append(torch.cat([local.cpu(), rm, rv]))
        if not rows:
            return
        flat = torch.cat(rows)
        gathered = gather_rows(flat)
        metrics: dict[str, float] = {}
        offset = 0
        for name, layer in zip(self._names, self._modules):
            width = 1 + 4 * layer.num_features
            for key, value in divergence_metrics(gathered[:, offset:offset + width], layer.num_features).items():
                metrics[f"norm/{name}/{key}"] = value
            offset += width
        for key in ("mean_div", "var_div"):
            vals = [v for k, v in metrics.items() if k.endswith("/" + key) and math.isfinite(v)]
            if vals:
                metrics[f"norm/max_{key}"] = max(vals)
        self.last_metrics = metrics
        step = self._step
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            _wandb_chart(logger, self._names, metrics, step)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _wandb_chart(logger: Any, names: list[str], metrics: dict[str, float], step: int) -> None:
    if not isinstance(logger, wandb_logger_classes()) or logger.experiment is None:
        return
    import wandb

    if not hasattr(logger.experiment, "log"):  # rank > 0: a dummy experiment
        return
    rows = [[n, metrics.get(f"norm/{n}/mean_div", 0.0), metrics.get(f"norm/{n}/var_div", 0.0)] for n in names]
    table = wandb.Table(data=rows, columns=["layer", "mean_div", "var_div"])
    logger.experiment.log({
        "norm/mean_div_by_layer": wandb.plot.bar(table, "layer", "mean_div", title=f"mean divergence by layer (step {step})"),
        "norm/var_div_by_layer": wandb.plot.bar(table, "layer", "var_div", title=f"variance divergence by layer (step {step})"),
        "trainer/global_step": step,
    })
