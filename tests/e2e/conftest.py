"""Fixtures of the end-to-end tests: one tiny 2-process torchrun run shared by several tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from ._helpers import TINY, check_ok, run_cli


@dataclass
class Run:
    """A finished CLI run: its folder (Hydra's run dir) and its merged output."""

    dir: Path
    output: str


@pytest.fixture(scope="session")
def ddp_run(tmp_path_factory) -> Run:
    """``torchrun --standalone --nproc_per_node=2 -m syncnorm.train`` with the default config
    (resnet18, norm=sync, digits, ddp_cpu), shrunk by ``TINY`` (6 steps), CSV logger, the run folder
    chosen by the config itself (``${syncnorm.run_id:}``: both ranks must agree on it)."""
    root = tmp_path_factory.mktemp("ddp_run")
    proc = run_cli([*TINY, "logger=csv", f"paths.log_dir={root}/logs"], cwd=root,
                   torchrun=["--standalone", "--nproc_per_node=2"])
    output = check_ok(proc)
    runs = sorted((root / "logs" / "train" / "runs").iterdir())
    assert len(runs) == 1, f"the two ranks chose different run folders: {runs}"
    return Run(runs[0], output)
