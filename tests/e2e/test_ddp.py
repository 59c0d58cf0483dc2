"""The CLI under torchrun on CPU: the main job, W&B offline, two "nodes", and SyncBN == big-batch BN."""

from __future__ import annotations

import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import yaml
from hydra.utils import instantiate

from syncnorm.app.train import _net_from_data, train

from ._helpers import TINY, check_ok, compose_cfg, env, free_port, last_value, read_metrics, run_cli, step_losses

pytestmark = pytest.mark.distributed

STEPS = 6  # TINY: 3 batches x 2 epochs


def test_torchrun_main_job_writes_checkpoint_and_norm_metrics(ddp_run):
    assert "Starting with 2 processes" in ddp_run.output and "GLOBAL_RANK: 1" in ddp_run.output
    assert "SyncBatchNorm x20" in ddp_run.output  # NormConversion('sync') on the ResNet-18
    ckpt = ddp_run.dir / "checkpoints" / "last.ckpt"
    assert f"checkpoint: {ckpt}" in ddp_run.output  # rank 0's final report
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == STEPS and state["epoch"] == 1  # saved at the end of the last epoch (index 1)
    assert "net.layer1.0.bn1.running_mean" in state["state_dict"]
    rows = read_metrics(ddp_run.dir / "csv" / "metrics.csv")
    columns = set(rows[0])
    for key in ("train/loss", "train/acc", "val/loss", "val/acc", "norm/max_mean_div", "norm/max_var_div",
                "norm/net.layer1.0.bn1/mean_div", "norm/net.bn1/var_div", "norm/net.bn1/running_drift",
                "norm/net.bn1/train_eval_gap"):
        assert key in columns, sorted(columns)[:20]
    logged = [float(r["norm/max_mean_div"]) for r in rows if r.get("norm/max_mean_div")]
    assert len(logged) == STEPS // 2 and all(v > 0 for v in logged)  # every 2 steps; ranks see different data
    assert len(step_losses(ddp_run.dir / "csv" / "metrics.csv")) == STEPS
    assert 0.0 <= last_value(ddp_run.dir / "csv" / "metrics.csv", "val/acc") <= 1.0
    hydra_cfg = yaml.safe_load((ddp_run.dir / ".hydra" / "config.yaml").read_text())
    assert hydra_cfg["norm"]["kind"] == "sync" and hydra_cfg["trainer"]["accelerator"] == "cpu"


def test_two_ranks_sync_equal_one_process_with_the_double_batch(ddp_run, tmp_path):
    """2 ranks x batch 8 with norm=sync give the single-process batch-16 norm=batch loss curve:
    same seed, same permutation (DistributedSampler, W=2 vs W=1), two epochs (set_epoch)."""
    cfg = compose_cfg(tmp_path, [*TINY, "logger=csv", "trainer=cpu", "norm=batch", "data.batch_size=16"])
    metrics = train(cfg)
    assert metrics["train/loss"] > 0
    single = step_losses(tmp_path / "csv" / "metrics.csv")
    ddp = step_losses(ddp_run.dir / "csv" / "metrics.csv")
    assert sorted(single) == sorted(ddp) == list(range(STEPS))
    for step in range(STEPS):
        assert abs(single[step] - ddp[step]) < 1e-4, (step, single, ddp)
    assert len(set(round(v, 3) for v in single.values())) > 3  # the weights did move
    # and local statistics (norm=batch on 2 ranks x 8) do not give that curve
    local = _first_loss_with_local_bn(tmp_path)
    assert abs(single[0] - local) > 1e-3, (single[0], local)


def _first_loss_with_local_bn(tmp_path) -> float:
    """Step-0 loss of the global batch when each rank's half is normalized with its own statistics."""
    cfg = compose_cfg(tmp_path / "local", [*TINY, "trainer=cpu", "norm=batch", "data.batch_size=16"])
    pl.seed_everything(cfg.seed)  # as train() does: the same initial weights
    dm = instantiate(cfg.data)
    dm.setup("fit")
    module = instantiate(cfg.model, net=_net_from_data(cfg.model.net, dm))
    x, y = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        logits = torch.cat([module(x[0::2]), module(x[1::2])])  # rank 0's and rank 1's samples
    return float(F.cross_entropy(logits, torch.cat([y[0::2], y[1::2]])))


def test_torchrun_with_wandb_offline_writes_a_run(tmp_path):
    proc = run_cli([*TINY, "logger=wandb", "hydra.run.dir=run", "trainer.max_epochs=1"], cwd=tmp_path,
                   torchrun=["--standalone", "--nproc_per_node=2"], extra_env={"WANDB_MODE": "offline"})
    check_ok(proc)
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "run").rglob("*"))[:20]
    (data,) = runs[0].glob("run-*.wandb")
    raw = data.read_bytes()  # the offline transaction log keeps metric names and config text verbatim
    for key in (b"train/loss", b"val/acc", b"norm/max_mean_div", b"norm/net.bn1/mean_div",
                b"syncnorm.callbacks.NormConversion"):
        assert key in raw, key
    charts = list((runs[0] / "files" / "media" / "table" / "norm").glob("mean_div_by_layer_*.table.json"))
    assert charts, "StatDivergenceMonitor's per-layer bar chart was not logged"
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_two_nodes_on_one_machine(tmp_path):
    """Two torchrun agents (one process each) meet through a c10d rendezvous and train together."""
    port = free_port()
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
               "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
               "--rdzv_id=e2e", "-m", "syncnorm.train", *TINY, "trainer=multinode", "logger=csv",
               f"hydra.run.dir=node{node}"]
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-5000:]
    both = "\n".join(outputs)
    assert "Starting with 2 processes" in both and "GLOBAL_RANK: 1, MEMBER: 2/2" in both
    (ckpt,) = list(tmp_path.glob("node*/checkpoints/last.ckpt"))  # written once, by global rank 0
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == STEPS
    (csv_file,) = list(tmp_path.glob("node*/csv/metrics.csv"))
    assert len(step_losses(csv_file)) == STEPS
