"""SyncNormLayerSync through Lightning's plugin seam, under real DDP on 2 CPU processes."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from syncnorm.callbacks import NormConversion
from syncnorm.lightning import SyncNormLayerSync
from tests.callbacks._lit import NAMESPACES, Record, dataset, lit_net, load_records, make_net, trainer

pytestmark = pytest.mark.distributed


class RecordTeardown(pl.Callback):
    """Writes the norm classes after the strategy's teardown (which calls LayerSync.revert)."""

    def __init__(self, folder):
        self.folder = folder

    def on_fit_end(self, trainer, pl_module):
        self.module = pl_module

    def teardown(self, trainer, pl_module, stage):
        kinds = {n: type(m).__name__ for n, m in pl_module.named_modules() if "Norm" in type(m).__name__}
        torch.save(kinds, f"{self.folder}/teardown{trainer.global_rank}.pt")


@pytest.mark.parametrize("ns", list(NAMESPACES))
def test_plugin_under_ddp_equals_single_process_and_reverts(tmp_path, ns):
    # one SyncNormLayerSync class for both Trainers: each accepts only its own namespace's LayerSync
    steps, per_rank = 5, 4
    model = lit_net(ns, lr=0.1, batch_size=per_rank, n=steps * per_rank * 2)
    tr = trainer(tmp_path, ns=ns, max_steps=steps, plugins=[SyncNormLayerSync("sync")],
                 callbacks=[Record(str(tmp_path)), RecordTeardown(str(tmp_path))])
    tr.fit(model)
    ref = make_net(0)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    data = dataset(steps * per_rank * 2)
    for step in range(steps):
        x, y = data.tensors[0][step * 8:(step + 1) * 8], data.tensors[1][step * 8:(step + 1) * 8]
        loss = nn.functional.cross_entropy(ref(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for rank, rec in enumerate(load_records(tmp_path)):
        assert set(rec["kinds"].values()) == {"SyncBatchNorm"}, rec["kinds"]
        got = {k.replace("backbone.", "0.").replace("head.", "1."): v for k, v in rec["state"].items()}
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(got[k], v, rtol=0, atol=1e-5, msg=lambda m: f"rank {rank} {k}: {m}")
        after = torch.load(f"{tmp_path}/teardown{rank}.pt")
        assert after == {"backbone.0": "BatchNorm2d", "backbone.2": "BatchNorm2d", "backbone.5": "BatchNorm2d",
                         "head.1": "BatchNorm1d"}, after


def test_sync_group_size_option_of_norm_conversion(tmp_path):
    # k = 1 on 2 ranks: each rank normalizes with its own statistics (a group of one rank); under
    # lightning.pytorch's Trainer (NormConversion's DDP exactness test runs under pytorch_lightning's)
    model = lit_net("lightning.pytorch", lr=0.1, batch_size=4, n=16)
    tr = trainer(tmp_path, ns="lightning.pytorch", max_steps=2, callbacks=[NormConversion("sync", sync_group_size=1), Record(str(tmp_path))])
    tr.fit(model)
    for rec in load_records(tmp_path):
        assert set(rec["kinds"].values()) == {"SyncBatchNorm"}
    with pytest.raises(ValueError, match=r"sync_group_size applies to kinds \['sync', 'renorm'"):
        NormConversion("group", sync_group_size=2)
