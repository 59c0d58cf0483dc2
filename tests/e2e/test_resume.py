"""Resuming in the same run folder (``ckpt_path=last``) after crashes: the CSV keeps every logged step
once, in order; a mid-epoch checkpoint resumes mid-epoch with the rest of the epoch's data (the same
losses as an uninterrupted run); W&B continues the run folder's run id."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import pytorch_lightning as pl

from syncnorm.app.loggers import WANDB_ID_FILE, HistoryCSVLogger
from syncnorm.app.train import train

from ._helpers import compose_cfg, read_metrics, step_losses

BASE = ("trainer=cpu", "norm=batch", "model.width=4", "data.batch_size=8", "trainer.max_epochs=2",
        "trainer.limit_train_batches=5", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "~callbacks.stat_divergence",
        "callbacks.checkpoint.every_n_epochs=null", "callbacks.checkpoint.every_n_train_steps=2", "ckpt_path=last")


class CrashAt(pl.Callback):
    """Raises once the run has made ``step`` optimizer steps (odd steps: after the last checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash at step {self.step}")


def _attempt(run: Path, crash_at: int | None, extra: tuple[str, ...] = ()) -> None:
    crash = (f"+callbacks.crash._target_={__name__}.CrashAt", f"+callbacks.crash.step={crash_at}") if crash_at else ()
    cfg = compose_cfg(run, [*BASE, *extra, *crash])
    if crash_at is None:
        train(cfg)
        return
    with pytest.raises(RuntimeError, match=f"simulated crash at step {crash_at}"):
        train(cfg)


def test_two_resumes_keep_every_step_once_resume_mid_epoch_and_continue_the_wandb_run(tmp_path, recwarn,
                                                                                     monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)  # W&B offline
    monkeypatch.setenv("WANDB_SILENT", "true")
    reference = tmp_path / "uninterrupted"
    _attempt(reference, None, ("logger=csv",))
    run, loggers = tmp_path / "crashing", ("logger=[csv,wandb]",)
    _attempt(run, 3, loggers)  # last checkpoint: step 2 (epoch 0, 2 of 5 batches)
    _attempt(run, 7, loggers)  # resumed at step 2; last checkpoint: step 6 (epoch 1, 1 of 5)
    _attempt(run, None, loggers)  # resumed at step 6, to the end (10 steps)

    rows = read_metrics(run / "csv" / "metrics.csv")
    logged = [(int(r["step"]), k) for r in rows for k, v in r.items() if v and k not in ("step", "epoch")]
    assert [k for k, n in Counter(logged).items() if n > 1] == []  # no step logged twice
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(steps)
    assert [(int(r["step"]), int(r["epoch"])) for r in rows if r.get("train/loss")] == \
        [(s, s // 5) for s in range(10)]  # steps 2-4 resumed inside epoch 0, 6-9 inside epoch 1
    assert len([r for r in rows if r.get("val/acc")]) == 2  # one validation per epoch
    # the resumed attempts read the rest of each epoch's permutation: the same losses, step for step
    got, ref = step_losses(run / "csv" / "metrics.csv"), step_losses(reference / "csv" / "metrics.csv")
    assert got.keys() == ref.keys() and all(got[s] == pytest.approx(ref[s], rel=1e-6, abs=0) for s in ref), (got, ref)
    assert not [w for w in recwarn if "not resumable" in str(w.message)]

    # W&B: every attempt wrote an offline run with the run folder's id (its ``run-<id>.wandb`` file; the
    # folder is ``offline-run-<second>-<id>``, and W&B appends ``-1`` when two attempts start in one second)
    run_id = (run / "wandb" / WANDB_ID_FILE).read_text().strip()
    folders = sorted((run / "wandb").glob("offline-run-*"))
    assert len(folders) == 3, folders
    assert all(sorted(f.name for f in folder.glob("*.wandb")) == [f"run-{run_id}.wandb"] for folder in folders), \
        (run_id, {f.name: sorted(x.name for x in f.glob("*.wandb")) for f in folders})


def test_csv_rows_reach_the_disk_with_each_checkpoint(tmp_path):
    logger = HistoryCSVLogger(str(tmp_path), name="csv", version="")
    for step in range(3):
        logger.log_metrics({"train/loss": 1.0 / (step + 1)}, step=step)
    path = tmp_path / "csv" / "metrics.csv"
    assert not path.exists()  # Lightning's CSVLogger buffers rows (flush_logs_every_n_steps=100)
    logger.after_save_checkpoint(None)
    assert [int(r["step"]) for r in read_metrics(path)] == [0, 1, 2]
