"""NormConversion under real DDP (2 CPU processes, gloo) equals one process on the combined batch."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from syncnorm.callbacks import NormConversion
from tests.callbacks._lit import LitNet, Record, dataset, load_records, make_net, trainer

pytestmark = pytest.mark.distributed


def test_sync_under_ddp_equals_single_process_on_combined_batch(tmp_path):
    steps, per_rank = 6, 4
    model = LitNet(lr=0.1, batch_size=per_rank, n=steps * per_rank * 2)
    tr = trainer(tmp_path, callbacks=[NormConversion("sync"), Record(str(tmp_path))], max_steps=steps)
    tr.fit(model)
    records = load_records(tmp_path)
    for rec in records:  # what each DDP worker trained
        assert len(rec["kinds"]) == 4 and set(rec["kinds"].values()) == {"SyncBatchNorm"}, rec["kinds"]

    ref = make_net(0)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    data = dataset(steps * per_rank * 2)
    for step in range(steps):  # DistributedSampler(shuffle=False) interleaves: the union is contiguous
        x, y = data.tensors[0][step * 8:(step + 1) * 8], data.tensors[1][step * 8:(step + 1) * 8]
        loss = nn.functional.cross_entropy(ref(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for rank, rec in enumerate(records):
        got = {k.replace("backbone.", "0.").replace("head.", "1."): v for k, v in rec["state"].items()}
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(got[k], v, rtol=0, atol=1e-5, msg=lambda m: f"rank {rank} {k}: {m}")


def test_refuses_lightning_sync_batchnorm(tmp_path):
    tr = trainer(tmp_path, devices=1, sync_batchnorm=True, callbacks=[NormConversion("sync")], max_steps=1)
    with pytest.raises(RuntimeError, match="cannot be combined with Trainer\\(sync_batchnorm=True\\)"):
        tr.fit(LitNet())


@pytest.mark.parametrize("kind, warns", [("sync", True), ("renorm", True), ("batch", False)])
def test_synchronizing_kind_in_one_process_warns_that_it_trains_locally(tmp_path, caplog, kind, warns):
    tr = trainer(tmp_path, devices=1, max_steps=1)
    with caplog.at_level(logging.WARNING, logger="syncnorm"):
        NormConversion(kind).setup(tr, LitNet(), "fit")
    found = [r.getMessage() for r in caplog.records if "one process" in r.getMessage()]
    assert len(found) == int(warns), caplog.text
    if warns:
        assert f"NormConversion('{kind}') in a run of one process" in found[0] and "trains as the local layer" in found[0]


def test_unknown_kind_is_refused_at_construction():
    with pytest.raises(ValueError, match="unknown norm kind 'syncbn'; expected one of"):
        NormConversion("syncbn")


def test_callbacks_work_with_validate_and_resume(tmp_path):
    from syncnorm.callbacks import FreezeNormStats, PreciseBN, StatDivergenceMonitor

    cbs = lambda: [NormConversion("ghost", virtual_batch_size=2), FreezeNormStats(modules="head.*"),  # noqa: E731
                   StatDivergenceMonitor(every_n_steps=1), PreciseBN(num_batches=2)]
    model = LitNet(batch_size=4, n=16)
    tr = trainer(tmp_path, devices=1, max_epochs=1, limit_val_batches=1, enable_checkpointing=True, callbacks=cbs())
    tr.fit(model)
    metrics = tr.validate(model, verbose=False)
    assert metrics and "val_loss" in metrics[0]
    ckpt = next(tmp_path.rglob("*.ckpt"))
    resumed = LitNet(batch_size=4, n=16)
    tr2 = trainer(tmp_path / "r", devices=1, max_epochs=2, limit_val_batches=1, callbacks=cbs())
    tr2.fit(resumed, ckpt_path=str(ckpt))
    assert type(resumed.backbone[2]).__name__ == "GhostBatchNorm" and tr2.global_step == 8
