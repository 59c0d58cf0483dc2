"""Helpers of the end-to-end tests: compose the real config, run the CLI in subprocesses, read CSVs."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from syncnorm.app.train import CONF_DIR

REPO = CONF_DIR.parent

# a tiny version of the main job: 8x8 digits... upsampled to 16, width 8, 3 batches x 2 epochs
TINY = (
    "model.width=8",
    "data.batch_size=8",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_model_summary=false",
    "callbacks.stat_divergence.every_n_steps=2",
)


def compose_cfg(output_dir: Path, overrides: Sequence[str] = ()) -> DictConfig:
    """The real ``conf/train.yaml`` with ``overrides``, every path under ``output_dir``, and
    ``HydraConfig`` set (as ``@hydra.main`` would), for in-process ``train(cfg)`` calls."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir = str(REPO)
        cfg.paths.log_dir = str(output_dir / "logs")
        cfg.paths.output_dir = str(output_dir)
    return cfg


def env(**extra: str) -> dict[str, str]:
    """The parent's environment, offline and without W&B keys, plus ``extra``."""
    out = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "SLURM_"))}
    out.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true",
               HYDRA_FULL_ERROR="0", PYTHONUNBUFFERED="1")
    out.update(extra)
    return out


def run_cli(args: Sequence[str], cwd: Path, timeout: float = 240, extra_env: Optional[dict] = None,
            torchrun: Optional[Sequence[str]] = None) -> subprocess.CompletedProcess:
    """``python -m syncnorm.train args`` (or through ``python -m torch.distributed.run <torchrun>``),
    with a hard timeout; stdout and stderr merged."""
    cmd = [sys.executable]
    if torchrun is not None:
        cmd += ["-m", "torch.distributed.run", *torchrun]
    cmd += ["-m", "syncnorm.train", *args]
    return subprocess.run(cmd, cwd=cwd, env=env(**(extra_env or {})), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


def check_ok(proc: subprocess.CompletedProcess) -> str:
    """The output, after asserting a zero exit code (the output's tail is the failure message)."""
    assert proc.returncode == 0, f"exit code {proc.returncode}; output tail:\n{proc.stdout[-6000:]}"
    assert "terminate called" not in proc.stdout, proc.stdout[-3000:]
    return proc.stdout


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def step_losses(path: Path, key: str = "train/loss") -> dict[int, float]:
    """``{global step: value}`` of a per-step metric in a CSVLogger ``metrics.csv``."""
    return {int(r["step"]): float(r[key]) for r in read_metrics(path) if r.get(key)}


def last_value(path: Path, key: str) -> float:
    values = [float(r[key]) for r in read_metrics(path) if r.get(key)]
    assert values, f"no {key} in {path}"
    return values[-1]
