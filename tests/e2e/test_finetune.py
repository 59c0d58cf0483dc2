"""experiment=finetune_frozen from the checkpoint of a finished run: statistics stay frozen."""

from __future__ import annotations

import pytest
import torch

from syncnorm.app.train import train

from ._helpers import TINY, compose_cfg


@pytest.mark.distributed  # uses the shared 2-process run's checkpoint
@pytest.mark.parametrize("train_affine", [False, True])
def test_finetune_frozen_keeps_statistics_and_trains_the_head(ddp_run, tmp_path, train_affine):
    source = ddp_run.dir / "checkpoints" / "last.ckpt"
    cfg = compose_cfg(tmp_path, [*TINY, "experiment=finetune_frozen", f"ckpt_path={source}", "trainer=cpu",
                                 "logger=csv", f"callbacks.freeze_norm_stats.train_affine={train_affine}"])
    metrics = train(cfg)
    assert 0.0 <= metrics["val/acc"] <= 1.0 and metrics["train/loss"] > 0
    before = torch.load(source, map_location="cpu", weights_only=True)["state_dict"]
    tuned = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    after = tuned["state_dict"]
    assert tuned["global_step"] == 6 and tuned["epoch"] == 1  # a fresh run: counters not resumed (epoch index 1: the last)
    stats = [k for k in before if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(stats) == 60  # 20 norm layers
    for k in stats:
        assert torch.equal(before[k], after[k]), k
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    affine = {k for k in before if ("bn" in k or "downsample.1" in k) and k.endswith(("weight", "bias"))}
    assert {"net.fc.weight", "net.fc.bias"} <= changed
    assert not any(".conv" in k or "downsample.0" in k for k in changed)  # the backbone is frozen
    if train_affine:
        assert changed & affine  # the norm layers' weight and bias trained...
    else:
        assert changed == {"net.fc.weight", "net.fc.bias"}  # ...or not
