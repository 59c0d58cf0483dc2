"""The YOLO-style detector through the app: a smoke run (default suite) and a benchmark run (slow)."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate

from syncnorm.app.train import _net_from_data, train

from ._helpers import check_ok, compose_cfg, read_metrics, run_cli, step_losses

SMOKE = ("experiment=yolo_shapes", "trainer=cpu", "logger=csv", "data.num_train=32", "data.num_val=16",
         "data.image_size=32", "data.batch_size=8", "model.width=4", "trainer.max_epochs=1",
         "trainer.log_every_n_steps=1", "callbacks.stat_divergence.every_n_steps=2",
         "trainer.enable_model_summary=false")


def test_yolo_smoke(tmp_path):
    cfg = compose_cfg(tmp_path, SMOKE)
    metrics = train(cfg)
    for key in ("train/loss", "train/loss_box", "train/loss_obj", "train/loss_cls", "val/loss", "val/map50"):
        assert math.isfinite(metrics[key]), key
    assert 0.0 <= metrics["val/map50"] <= 1.0
    assert len(step_losses(tmp_path / "csv" / "metrics.csv")) == 4
    # the trained detector decodes a validation batch
    dm = instantiate(cfg.data)
    module = instantiate(cfg.model, net=_net_from_data(cfg.model.net, dm))
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    module.load_state_dict(state["state_dict"])
    images, targets = next(iter(dm.val_dataloader()))
    module.eval()
    with torch.no_grad():
        detections = module.net.decode(module(images), conf_threshold=0.0, max_det=10)
    assert len(detections) == len(targets) == 8
    for det in detections:
        assert det["boxes"].shape[1] == 4 and det["boxes"].shape[0] == det["scores"].shape[0] <= 10
        assert torch.all(det["boxes"] >= 0) and torch.all(det["boxes"] <= 32)


MAP50_THRESHOLD = 0.6  # measured: 0.75 after 12 epochs (2 ranks x 16, 2048 images)


@pytest.mark.slow
@pytest.mark.distributed
def test_yolo_benchmark_learns(tmp_path):
    """The benchmark command of launch/README.md (2 CPU processes, 3-5 min on 2 cores): the training
    loss falls and val mAP@0.5 ends above MAP50_THRESHOLD."""
    proc = run_cli(["experiment=yolo_shapes", "logger=csv", "hydra.run.dir=run"], cwd=tmp_path, timeout=900,
                   torchrun=["--standalone", "--nproc_per_node=2"])
    check_ok(proc)
    csv_file = tmp_path / "run" / "csv" / "metrics.csv"
    losses = list(step_losses(csv_file).values())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    maps = [float(r["val/map50"]) for r in read_metrics(csv_file) if r.get("val/map50")]
    print(f"train/loss {first:.3f} -> {last:.3f}; val/map50 per epoch {[round(m, 3) for m in maps]}")
    assert last < 0.5 * first
    assert maps[-1] > MAP50_THRESHOLD and maps[-1] > maps[0]
