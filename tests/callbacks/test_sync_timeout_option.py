"""``NormConversion(..., sync_timeout_s=t)`` (the app's ``norm.sync_timeout_s``) sets the bounded wait
of every converted layer; without it the layers keep the library default."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
from torch import nn

from syncnorm.callbacks import NormConversion
from syncnorm.distributed import DEFAULT_TIMEOUT_S


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))


@pytest.mark.parametrize("kind, option, expected", [("sync", 7, 7.0), ("renorm", 2.5, 2.5), ("sync", None, DEFAULT_TIMEOUT_S)])
def test_sync_timeout_reaches_every_converted_layer(kind, option, expected):
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    module = Tiny()
    NormConversion(kind, sync_timeout_s=option).setup(trainer, module, "fit")
    timeouts = [m.sync_timeout_s for m in module.modules() if hasattr(m, "sync_timeout_s")]
    assert timeouts == [expected, expected]


@pytest.mark.parametrize("option", [0, -1, True, "5"])
def test_invalid_sync_timeout_is_refused(option):
    with pytest.raises(ValueError, match=r"NormConversion: expected sync_timeout_s to be None \(the layers' default\) "
                                         r"or a number of seconds > 0, got"):
        NormConversion("sync", sync_timeout_s=option)


def test_sync_timeout_needs_a_kind_that_synchronizes():
    with pytest.raises(ValueError, match="NormConversion: sync_timeout_s applies to kinds"):
        NormConversion("group", sync_timeout_s=5)
