"""Loggers that keep a run's history when it resumes from a checkpoint in the same run folder.

* :class:`HistoryCSVLogger`: Lightning's ``CSVLogger`` deletes ``metrics.csv`` when a new logger opens
  the folder ("Previous log files in this directory will be deleted"), so ``ckpt_path=last`` lost
  every row written before the restart. This one keeps them: it rewrites the file at once with the
  previous rows, then, when the checkpoint is loaded (:class:`KeepLogHistory`), drops the rows of
  the steps at or after the checkpoint's ``global_step``: those steps are trained again, and logged
  again, by the resumed run (a crashed attempt may have logged some before it died). It also writes
  the file at every checkpoint, so the rows up to a checkpoint survive a crash (a killed process
  flushes nothing). After any number of restarts the file holds every logged step once, in order.
* :func:`wandb_resume_options`: the W&B run id of the run folder (created on the first start, kept
  in ``<run dir>/wandb/syncnorm-run-id``) with ``resume="allow"``, so a restarted run continues the
  same W&B run (online) or writes a new offline folder with the same id (``wandb sync`` uploads both
  into one run).
"""

from __future__ import annotations

import csv
import os
import secrets
from typing import Any, Optional

import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.utilities.rank_zero import rank_zero_only

__all__ = ["HistoryCSVLogger", "KeepLogHistory", "wandb_resume_options", "WANDB_ID_FILE"]

WANDB_ID_FILE = "syncnorm-run-id"
"""File under ``<save_dir>/wandb/`` holding the run folder's W&B run id."""


class HistoryCSVLogger(CSVLogger):
    """``CSVLogger`` that keeps the rows of earlier attempts in the same folder (see the module
    docstring); same arguments. Use it with the :class:`KeepLogHistory` callback."""

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is not None:
            return self._experiment
        path = os.path.join(self.log_dir, "metrics.csv")
        previous = _read_rows(path)
        writer = super().experiment  # Lightning's writer: removes metrics.csv
        if previous:
            writer.metrics = previous
            writer.save()  # the previous rows, at once (nothing is lost if this attempt dies early)
        return writer

    def drop_steps_from(self, step: int) -> None:
        """Remove the rows with ``step >= step`` from ``metrics.csv`` (rank 0; nothing else pending)."""
        if rank_zero_only.rank != 0:
            return
        writer = self.experiment
        writer.save()
        rows = _read_rows(writer.metrics_file_path)
        kept = [r for r in rows if _step(r) < step]
        if len(kept) == len(rows):
            return
        with open(writer.metrics_file_path, "w", newline="") as file:
            out = csv.DictWriter(file, fieldnames=writer.metrics_keys)
            out.writeheader()
            out.writerows(kept)

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        super().after_save_checkpoint(checkpoint_callback)
        if rank_zero_only.rank == 0 and self._experiment is not None:
            self.save()  # the rows up to this checkpoint are on disk: a crash cannot lose them


class KeepLogHistory(pl.Callback):
    """On loading a checkpoint (``ckpt_path``), tell every :class:`HistoryCSVLogger` the checkpoint's
    step: the rows from that step on belong to steps the resumed run trains (and logs) again."""

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        step = int(checkpoint.get("global_step", 0))
        for logger in trainer.loggers:
            if isinstance(logger, HistoryCSVLogger):
                logger.drop_steps_from(step)


def wandb_resume_options(save_dir: str) -> dict[str, Any]:
    """``{"id": ..., "resume": "allow"}`` for a ``WandbLogger`` writing to ``save_dir`` (the run
    folder): the id stored in ``<save_dir>/wandb/syncnorm-run-id``, created (rank 0) on the first start."""
    path = os.path.join(save_dir, "wandb", WANDB_ID_FILE)
    run_id: Optional[str] = None
    if os.path.isfile(path):
        with open(path) as f:
            run_id = f.read().strip() or None
    if run_id is None and rank_zero_only.rank == 0:
        run_id = secrets.token_hex(4)  # 8 characters of [0-9a-f], valid as a W&B run id
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(run_id + "\n")
    return {"id": run_id, "resume": "allow"}


def _read_rows(path: str) -> list[dict[str, str]]:
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _step(row: dict[str, str]) -> float:
    try:
        return float(row.get("step") or 0)
    except ValueError:
        return 0.0
