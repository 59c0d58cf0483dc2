"""SyncNormLayerSync through Lightning's plugin seam, under real DDP on 2 CPU processes."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from syncnorm.callbacks import NormConversion
from syncnorm.lightning import SyncNormLayerSync
from tests.callbacks._lit import NAMESPACES, Record, dataset, lit_net, load_records, make_net, trainer
from tests.helpers.probes import RowGroupBatchNorm

pytestmark = pytest.mark.distributed


def train_reference(ref: nn.Module, steps: int, per_rank: int, world: int = 2) -> nn.Module:
    """``ref`` trained in one process on the ranks' combined batches (the modules' sampler gives rank r
    rows r, r + W, ...: step t's union is rows t*W*B .. (t+1)*W*B - 1), SGD lr 0.1 as ``lit_net``."""
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    data, batch = dataset(steps * per_rank * world), per_rank * world
    for step in range(steps):
        x, y = data.tensors[0][step * batch:(step + 1) * batch], data.tensors[1][step * batch:(step + 1) * batch]
        loss = nn.functional.cross_entropy(ref(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ref


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
    ref = train_reference(make_net(0), steps, per_rank)
    for rank, rec in enumerate(load_records(tmp_path)):
        assert set(rec["kinds"].values()) == {"SyncBatchNorm"}, rec["kinds"]
        got = {k.replace("backbone.", "0.").replace("head.", "1."): v for k, v in rec["state"].items()}
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(got[k], v, rtol=0, atol=1e-5, msg=lambda m: f"rank {rank} {k}: {m}")
        after = torch.load(f"{tmp_path}/teardown{rank}.pt")
        assert after == {"backbone.0": "BatchNorm2d", "backbone.2": "BatchNorm2d", "backbone.5": "BatchNorm2d",
                         "head.1": "BatchNorm1d"}, after


def test_sync_group_size_keeps_each_groups_running_statistics(tmp_path):
    """k = 1 on 2 ranks: each rank is a group of its own. Equal to one process in which rank r's rows
    (``p % 2 == r`` under the module's sampler) are normalized with their own statistics and update
    running statistics of their own (:class:`tests.helpers.probes.RowGroupBatchNorm`): weights and
    every rank's running statistics. Under lightning.pytorch's Trainer (NormConversion's DDP
    exactness test runs under pytorch_lightning's)."""
    ns, steps, per_rank = "lightning.pytorch", 4, 4
    strategy = NAMESPACES[ns][0].strategies.DDPStrategy(broadcast_buffers=False, start_method="fork")
    model = lit_net(ns, lr=0.1, batch_size=per_rank, n=steps * per_rank * 2)
    tr = trainer(tmp_path, ns=ns, max_steps=steps, strategy=strategy,
                 callbacks=[NormConversion("sync", sync_group_size=1), Record(str(tmp_path))])
    tr.fit(model)

    ref = make_net(0)
    for module in list(ref.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(module, name, RowGroupBatchNorm(child, world=2, group_size=1))
    train_reference(ref, steps, per_rank)
    want = ref.state_dict()
    records = load_records(tmp_path)
    for rank, rec in enumerate(records):
        assert set(rec["kinds"].values()) == {"SyncBatchNorm"}, rec["kinds"]
        got = {k.replace("backbone.", "0.").replace("head.", "1."): v for k, v in rec["state"].items()}
        for k, v in got.items():
            stat = k.endswith(("running_mean", "running_var", "num_batches_tracked"))
            torch.testing.assert_close(v, want[f"{k}_g{rank}" if stat else k], rtol=0, atol=1e-5,
                                       msg=lambda m: f"rank {rank} {k}: {m}")
    key = "backbone.0.running_mean"  # the groups did see different data
    assert (records[0]["state"][key] - records[1]["state"][key]).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"sync_group_size applies to kinds \['sync', 'renorm'"):
        NormConversion("group", sync_group_size=2)


def test_sync_groups_under_ddp_that_broadcasts_buffers_are_refused(tmp_path):
    """DDP's default (``broadcast_buffers=True``) copies rank 0's buffers to every rank at each forward:
    the other groups' running statistics would silently be rank 0's. Refused in setup, on every rank."""
    tr = trainer(tmp_path, max_steps=1, callbacks=[NormConversion("sync", sync_group_size=1)])
    with pytest.raises(Exception, match=r"sync_group_size=1\): each group of 1 ranks keeps its own running "
                                        r"statistics.*broadcast_buffers=True.*HINT: strategy=DDPStrategy"):
        tr.fit(lit_net(batch_size=4, n=16))
