"""Test-only Lightning callbacks added to the app's runs with Hydra overrides
(``+callbacks.<name>._target_=tests.helpers.probes.<Class>``); workers import them through
``PYTHONPATH`` (the repository root).

* :class:`SaveRankState`: every rank writes its final ``state_dict`` (weights and its own running
  statistics) to ``<folder>/rank<global rank>.pt``; the checkpoint holds only rank 0's.
* :class:`PauseInLayer`: places a network fault at a known point of a step: in the first attempt
  (``TORCHELASTIC_RESTART_COUNT`` 0) and only in processes whose environment has ``env_flag``, at
  global step ``step`` the forward of ``layer`` first writes ``signal_file`` and then sleeps
  ``pause_s`` before the layer runs (and exchanges its statistics). The peers are then already
  waiting inside that layer's exchange, so a link cut during the pause is met there.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

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
    """See the module docstring."""

    def __init__(self, layer: str, step: int, signal_file: str, pause_s: float, env_flag: str) -> None:
        self.layer, self.step, self.pause_s = layer, int(step), float(pause_s)
        self.signal_file, self.env_flag = Path(signal_file), env_flag

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0" or not os.environ.get(self.env_flag):
            return
        layer = pl_module.get_submodule(self.layer)
        fired = []

        def pause(module: torch.nn.Module, args: tuple) -> None:
            if module.training and trainer.global_step == self.step and not fired:
                fired.append(True)
                self.signal_file.write_text(f"rank {trainer.global_rank} pausing in {self.layer}\n")
                time.sleep(self.pause_s)

        layer.register_forward_pre_hook(pause)
