"""OmegaConf resolvers used by ``conf/``: process counts from the launcher, a run id shared by ranks.

Registered by :func:`register_resolvers` (idempotent), which :mod:`syncnorm.app.train` calls on import,
before Hydra composes the config:

* ``${syncnorm.devices:<default>}``: processes on this node, from the launcher when there is one:
  torchrun's ``LOCAL_WORLD_SIZE``, else SLURM's ``SLURM_NTASKS_PER_NODE`` (``srun`` with one task
  per device), else ``<default>``;
* ``${syncnorm.num_nodes:<default>}``: torchrun's ``GROUP_WORLD_SIZE`` (its ``--nnodes``), else
  SLURM's ``SLURM_NNODES``, else ``<default>``;
* ``${syncnorm.run_id:}``: the name of the run folder, identical in every process of one run, so
  all ranks agree on ``hydra.run.dir``: ``$SYNCNORM_RUN_ID`` when set; under torchrun, the start
  time of the torchrun agent (the common parent of the node's ranks); under SLURM,
  ``slurm-<job id>``; else the current time. Computed once per process;
* ``${syncnorm.cwd:}``: the directory the command was started in (the configs' ``paths.root_dir``).
  Unlike ``${hydra:runtime.cwd}`` it also resolves where Hydra has not set its runtime yet: a
  multirun's ``hydra.sweep.dir`` is resolved before any job runs. Lightning starts its extra DDP
  processes in the same directory, and ``hydra.job.chdir`` stays false, so it is the same in every rank.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

__all__ = ["register_resolvers", "launcher_devices", "launcher_num_nodes", "run_id", "start_dir"]

_STAMP = "%Y-%m-%d_%H-%M-%S"


def _env_int(*names: str) -> Optional[int]:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return None


def launcher_devices(default: Any = 1) -> Any:
    """Processes per node set by the launcher (torchrun, then srun), else ``default``."""
    found = _env_int("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE")
    return default if found is None else found


def launcher_num_nodes(default: Any = 1) -> Any:
    """Nodes set by the launcher (torchrun, then SLURM), else ``default``."""
    found = _env_int("GROUP_WORLD_SIZE", "SLURM_NNODES")
    return default if found is None else found


def _parent_start_time() -> Optional[float]:
    """Start time (epoch seconds) of the parent process, from ``/proc`` (Linux); ``None`` elsewhere."""
    try:
        fields = Path(f"/proc/{os.getppid()}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 of proc(5): starttime, clock ticks after boot
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


@functools.lru_cache(maxsize=1)
def run_id() -> str:
    """The run folder's name, the same in every rank of one run (see the module docstring)."""
    if os.environ.get("SYNCNORM_RUN_ID"):
        return os.environ["SYNCNORM_RUN_ID"]
    if "TORCHELASTIC_RUN_ID" in os.environ:
        start = _parent_start_time()
        if start is not None:
            return time.strftime(_STAMP, time.localtime(start))
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm-{os.environ['SLURM_JOB_ID']}"
    return time.strftime(_STAMP)


def start_dir() -> str:
    """The directory the command was started in (absolute)."""
    return os.getcwd()


def register_resolvers() -> None:
    """Register the ``syncnorm.*`` resolvers (safe to call more than once)."""
    for name, fn in (("syncnorm.devices", launcher_devices), ("syncnorm.num_nodes", launcher_num_nodes),
                     ("syncnorm.run_id", run_id), ("syncnorm.cwd", start_dir)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
