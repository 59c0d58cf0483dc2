"""Hydra multirun (``-m``): one folder per job under ``logs/train/multiruns/<id>/``, in one process
and under Lightning's own DDP launch (rank 1 started by Lightning runs the job it belongs to, not the
whole sweep again, and writes no folder of its own)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from syncnorm.app.runtime import _child_argv

from ._helpers import check_ok, read_metrics, run_cli

SWEEP = ("-m", "norm=batch,group", "trainer.max_steps=2", "logger=csv", "model.width=4", "data.batch_size=8",
         "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
         "trainer.enable_model_summary=false", "~callbacks.stat_divergence")


def _jobs(cwd: Path) -> list[Path]:
    """The sweep's job folders, after checking that the sweep made exactly one folder in all."""
    train = cwd / "logs" / "train"
    assert [p.name for p in train.iterdir()] == ["multiruns"], list(train.iterdir())  # no runs/ of a child
    sweeps = list((train / "multiruns").iterdir())
    assert len(sweeps) == 1, sweeps  # no second sweep started by a DDP child
    jobs = sorted(p for p in sweeps[0].iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    for job, norm in zip(jobs, ("batch", "group")):
        assert yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())[0] == f"norm={norm}"
        assert [int(r["step"]) for r in read_metrics(job / "csv" / "metrics.csv") if r.get("train/loss")] == [0, 1]
        assert (job / "checkpoints" / "last.ckpt").is_file()
    return jobs


def test_child_command_is_the_job_with_the_config_folder_flags():
    argv = ["/x/syncnorm/train.py", "-m", "--config-dir", "/my/conf", "-cn=train", "norm=batch,group", "seed=1"]
    assert _child_argv(argv, ["norm=group", "seed=1"]) == \
        ["/x/syncnorm/train.py", "--config-dir", "/my/conf", "-cn=train", "norm=group", "seed=1"]


def test_multirun_in_one_process_gives_one_folder_per_job(tmp_path):
    out = check_ok(run_cli([*SWEEP, "trainer=cpu"], cwd=tmp_path))  # paths from the cwd (${syncnorm.cwd:})
    jobs = _jobs(tmp_path)
    assert out.count("syncnorm.train finished:") == 2 and f"run folder: {jobs[1]}" in out


@pytest.mark.distributed
def test_multirun_under_lightning_ddp_runs_each_job_once_on_both_ranks(tmp_path):
    out = check_ok(run_cli([*SWEEP, "trainer=ddp_cpu"], cwd=tmp_path))
    jobs = _jobs(tmp_path)
    assert out.count("syncnorm.train finished:") == 2
    for job in jobs:  # both ranks log into the job's own file: rank 1 ran this job, in this folder
        log = (job / "train.log").read_text()
        assert "GLOBAL_RANK: 0, MEMBER: 1/2" in log and "GLOBAL_RANK: 1, MEMBER: 2/2" in log, log[-2000:]
