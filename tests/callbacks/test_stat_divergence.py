"""StatDivergenceMonitor under real DDP: +3 sigma on one rank reads ~3, identical data reads ~0."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from pytorch_lightning.loggers import CSVLogger, WandbLogger

from syncnorm.callbacks import NormConversion, StatDivergenceMonitor, divergence_metrics
from tests.callbacks._lit import LitNet, trainer

pytestmark = pytest.mark.distributed


def _csv_metrics(folder) -> list[dict]:
    path = next(folder.rglob("metrics.csv"))
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("shift,same,expected,tol", [(3.0, False, 3.0, 0.3), (0.0, True, 0.0, 1e-6)])
def test_mean_divergence_of_shifted_and_identical_ranks(tmp_path, shift, same, expected, tol):
    model = LitNet(batch_size=8, n=64, shift_per_rank=shift, same_data=same)
    logger = CSVLogger(str(tmp_path), name="run")
    tr = trainer(tmp_path, max_steps=4, logger=logger, log_every_n_steps=1,
                 callbacks=[NormConversion("sync"), StatDivergenceMonitor(every_n_steps=2)])
    tr.fit(model)
    rows = [r for r in _csv_metrics(tmp_path) if r.get("norm/backbone.0/mean_div")]
    assert [int(r["step"]) for r in rows] == [0, 2]  # every 2 steps, nothing in between
    for r in rows:
        # layer 0 normalizes the raw input: its statistics are the data's (std 1, rank 1 shifted)
        assert abs(float(r["norm/backbone.0/mean_div"]) - expected) <= tol, r
        assert float(r["norm/backbone.0/var_div"]) < (0.3 if not same else 1e-6)
        for key in ("running_drift", "train_eval_gap"):
            assert r[f"norm/backbone.0/{key}"] != ""
        assert {f"norm/{n}/mean_div" for n in ("backbone.2", "backbone.5", "head.1")} <= set(r)
        assert float(r["norm/max_mean_div"]) >= float(r["norm/backbone.0/mean_div"])


def test_metric_definitions_on_known_numbers():
    c = 2  # rows: [count, mean(C), var(C), running_mean(C), running_var(C)]
    rows = torch.tensor([[100, 0.0, 0.0, 1.0, 4.0, 0.0, 0.0, 1.0, 1.0],
                         [100, 3.0, 6.0, 1.0, 4.0, 0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    m = divergence_metrics(rows, c)
    # channel 0: 3 sigma apart (sigma 1); channel 1: 3 sigma apart (sigma 2): RMS 3
    assert m["mean_div"] == pytest.approx(3.0)
    assert m["var_div"] == pytest.approx(0.0)
    assert m["running_drift"] == pytest.approx(0.0)
    # global mean (1.5, 3.0) vs running mean 0, running var 1: RMS of (1.5, 3.0)
    assert m["train_eval_gap"] == pytest.approx(((1.5 ** 2 + 3.0 ** 2) / 2) ** 0.5)
    rows[1, 3:5] = torch.tensor([4.0, 16.0])  # rank 1's variance 4x: log 4 in each channel
    assert divergence_metrics(rows, c)["var_div"] == pytest.approx(torch.log(torch.tensor(4.0)).item())


def test_wandb_offline_run_writes_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    logger = WandbLogger(project="syncnorm-test", save_dir=str(tmp_path), offline=True)
    model = LitNet(batch_size=8, n=32)
    monitor = StatDivergenceMonitor(every_n_steps=1)
    tr = trainer(tmp_path, devices=1, max_steps=3, logger=logger, log_every_n_steps=1, callbacks=[monitor])
    tr.fit(model)
    import wandb

    wandb.finish()
    # finish() returns once wandb-core has acknowledged the run's end, but the core closes (and
    # flushes) the run's .wandb file only when it handles the "finish" notice that follows, which
    # finish() sends without waiting: read right away on a loaded machine, the file held only its
    # 7-byte header (the data arrives a moment later; nothing is lost). teardown() waits for the
    # core process to exit, after every file is closed.
    wandb.teardown()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    record = next(runs[0].glob("run-*.wandb")).read_bytes()  # protobuf records; values as JSON text
    key = b"norm/backbone.0/train_eval_gap"
    assert record.count(key) >= 3  # logged at steps 0, 1 and 2 (history and summary records)
    # the value is stored as JSON text next to its key: the last logged value is the monitor's
    assert json.dumps(monitor.last_metrics[key.decode()]).encode() in record
    tables = sorted((runs[0] / "files" / "media" / "table" / "norm").glob("mean_div_by_layer_table_*.json"))
    assert len(tables) == 3  # the per-layer bar chart, once per logging step
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["layer", "mean_div", "var_div"]
    assert [row[0] for row in table["data"]] == ["backbone.0", "backbone.2", "backbone.5", "head.1"]
