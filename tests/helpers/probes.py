"""Test-only Lightning callbacks added to the app's runs with Hydra overrides
(``+callbacks.<name>._target_=tests.helpers.probes.<Class>``); workers import them through
``PYTHONPATH`` (the repository root).

* :class:`SaveRankState`: every rank writes its final ``state_dict`` (weights and its own running
  statistics) to ``<folder>/rank<global rank>.pt``; the checkpoint holds only rank 0's.
* :class:`PauseInLayer`: places a network fault at a known point of a step: once per job (not after
  ``signal_file`` exists: a restarted worker group does not pause again, whatever its torchrun restart
  count) and only in processes whose environment has ``env_flag``, at global step ``step`` the
  forward of ``layer`` first writes ``signal_file`` and then sleeps ``pause_s`` before the layer runs
  (and exchanges its statistics). The peers are then already waiting inside that layer's exchange, so
  a link cut during the pause is met there. With ``linger_until`` (a file path), the paused process
  does not end after the run fails: it waits until that file exists and then up to ``linger_s``
  more seconds (SIGTERM ends it at once), so its torchrun agent still sees a running worker group when
  the link comes back.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Optional

import pytorch_lightning as pl
import torch

__all__ = ["SaveRankState", "PauseInLayer"]


class SaveRankState(pl.Callback):
    """At the end of training, each rank saves ``pl_module.state_dict()`` to ``folder/rank<r>.pt``."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        torch.save({"global_step": trainer.global_step, "state_dict": state},
                   self.folder / f"rank{trainer.global_rank}.pt")


class PauseInLayer(pl.Callback):
    """See the module docstring. With ``in_gradient=True`` the pause is in the backward instead, when
    the gradient of ``layer``'s weight is computed (before DDP's all_reduce of its bucket): the peers
    then wait in DDP's gradient all_reduce, outside any synchronized layer."""

    def __init__(self, layer: str, step: int, signal_file: str, pause_s: float, env_flag: str,
                 in_gradient: bool = False, linger_until: Optional[str] = None, linger_s: float = 0.0) -> None:
        self.layer, self.step, self.pause_s = layer, int(step), float(pause_s)
        self.signal_file, self.env_flag, self.in_gradient = Path(signal_file), env_flag, bool(in_gradient)
        self.linger_until, self.linger_s = (Path(linger_until) if linger_until else None), float(linger_s)
        self.active = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.active = bool(os.environ.get(self.env_flag)) and not self.signal_file.exists()
        if not self.active:
            return
        layer = pl_module.get_submodule(self.layer)
        fired = []

        def pause(*_: object) -> None:
            if pl_module.training and trainer.global_step == self.step and not fired:
                fired.append(True)
                self.signal_file.write_text(f"rank {trainer.global_rank} pausing in {self.layer}\n")
                time.sleep(self.pause_s)

        if self.in_gradient:
            layer.weight.register_hook(pause)
        else:
            layer.register_forward_pre_hook(pause)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not (self.active and self.linger_until):
            return
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the agent's stop ends this process at once
        print(f"rank {trainer.global_rank} lingers until {self.linger_until} after "
              f"{type(exception).__name__}: {exception}", flush=True)
        deadline = time.monotonic() + 300  # bounded even if the test never writes the file
        while not self.linger_until.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(self.linger_s)


class RowGroupBatchNorm(torch.nn.Module):
    """Reference for synchronization groups in one process: rows ``p`` of a batch with
    ``(p % world) // group_size == g`` (the rows rank ``p % world`` holds under the data modules'
    sampler) are normalized with their own statistics and update running buffers of their own
    (``running_mean_g<g>``...). Shares the weight and bias Parameters of the BatchNorm it replaces."""

    def __init__(self, bn: torch.nn.modules.batchnorm._BatchNorm, world: int, group_size: int) -> None:
        super().__init__()
        self.weight, self.bias, self.eps, self.momentum = bn.weight, bn.bias, bn.eps, bn.momentum
        self.world, self.group_size = world, group_size
        for g in range(world // group_size):
            self.register_buffer(f"running_mean_g{g}", bn.running_mean.detach().clone())
            self.register_buffer(f"running_var_g{g}", bn.running_var.detach().clone())
            self.register_buffer(f"num_batches_tracked_g{g}", bn.num_batches_tracked.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:  # evaluation is not compared; group 0's statistics
            return torch.nn.functional.batch_norm(x, self.running_mean_g0, self.running_var_g0, self.weight,
                                                  self.bias, False, 0.0, self.eps)
        out = torch.empty_like(x)
        group = (torch.arange(x.shape[0]) % self.world) // self.group_size
        for g in range(self.world // self.group_size):
            rows = group == g
            getattr(self, f"num_batches_tracked_g{g}").add_(1)
            out[rows] = torch.nn.functional.batch_norm(
                x[rows], getattr(self, f"running_mean_g{g}"), getattr(self, f"running_var_g{g}"), self.weight,
                self.bias, True, self.momentum, self.eps)
        return out


class SplitBatchNormByGroup(pl.Callback):
    """In ``setup``, replace every ``BatchNorm2d`` of the module by :class:`RowGroupBatchNorm`."""

    def __init__(self, world: int, group_size: int) -> None:
        self.world, self.group_size = int(world), int(group_size)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for name, module in list(pl_module.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, torch.nn.BatchNorm2d):
                    setattr(module, child_name, RowGroupBatchNorm(child, self.world, self.group_size))
