"""NormConversion under real DDP (2 CPU processes, gloo) equals one process on the combined batch."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from syncnorm.callbacks import NormConversion
from tests.callbacks._lit import NAMESPACES, Record, dataset, lit_net, load_records, make_net, trainer

pytestmark = pytest.mark.distributed

both_namespaces = pytest.mark.parametrize("ns", list(NAMESPACES))
"""The same test under ``pytorch_lightning.Trainer`` and ``lightning.pytorch.Trainer`` (the DDP runs
are shared out instead, to keep the suite fast: this exactness test runs under pytorch_lightning,
``test_layer_sync``'s plugin test under both, its ``sync_group_size`` test under lightning.pytorch)."""


def test_sync_under_ddp_equals_single_process_on_combined_batch(tmp_path):
    ns, steps, per_rank = "pytorch_lightning", 6, 4
    model = lit_net(ns, lr=0.1, batch_size=per_rank, n=steps * per_rank * 2)
    tr = trainer(tmp_path, ns=ns, callbacks=[NormConversion("sync"), Record(str(tmp_path))], max_steps=steps)
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


@both_namespaces
def test_refuses_lightning_sync_batchnorm(tmp_path, ns):
    tr = trainer(tmp_path, devices=1, ns=ns, sync_batchnorm=True, callbacks=[NormConversion("sync")], max_steps=1)
    with pytest.raises(RuntimeError, match="cannot be combined with Trainer\\(sync_batchnorm=True\\)"):
        tr.fit(lit_net(ns))


@pytest.mark.parametrize("kind, warns", [("sync", True), ("renorm", True), ("batch", False)])
def test_synchronizing_kind_in_one_process_warns_that_it_trains_locally(tmp_path, caplog, kind, warns):
    tr = trainer(tmp_path, devices=1, max_steps=1)
    with caplog.at_level(logging.WARNING, logger="syncnorm"):
        NormConversion(kind).setup(tr, lit_net(), "fit")
    found = [r.getMessage() for r in caplog.records if "one process" in r.getMessage()]
    assert len(found) == int(warns), caplog.text
    if warns:
        assert f"NormConversion('{kind}') in a run of one process" in found[0] and "trains as the local layer" in found[0]


def test_unknown_kind_is_refused_at_construction():
    with pytest.raises(ValueError, match="unknown norm kind 'syncbn'; expected one of"):
        NormConversion("syncbn")


@both_namespaces
def test_callbacks_work_with_validate_and_resume(tmp_path, ns):
    from syncnorm.callbacks import FreezeNormStats, PreciseBN, StatDivergenceMonitor

    cbs = lambda: [NormConversion("ghost", virtual_batch_size=2), FreezeNormStats(modules="head.*"),  # noqa: E731
                   StatDivergenceMonitor(every_n_steps=1), PreciseBN(num_batches=2)]
    model = lit_net(ns, batch_size=4, n=16)
    tr = trainer(tmp_path, devices=1, ns=ns, max_epochs=1, limit_val_batches=1, enable_checkpointing=True, callbacks=cbs())
    tr.fit(model)
    metrics = tr.validate(model, verbose=False)
    assert metrics and "val_loss" in metrics[0]
    ckpt = next(tmp_path.rglob("*.ckpt"))
    resumed = lit_net(ns, batch_size=4, n=16)
    tr2 = trainer(tmp_path / "r", devices=1, ns=ns, max_epochs=2, limit_val_batches=1, callbacks=cbs())
    tr2.fit(resumed, ckpt_path=str(ckpt))
    assert type(resumed.backbone[2]).__name__ == "GhostBatchNorm" and tr2.global_step == 8


def test_raises_errors_recorded_on_the_device_on_logging_steps_and_epoch_ends():
    """Off CPU (or compiled) the synchronized layers record a skipped layer or non-finite statistics
    on the device; NormConversion reads them back where the host reads anyway."""
    from types import SimpleNamespace

    import syncnorm
    from tests.helpers.scaled_pg import scaled_group

    callback = NormConversion("sync")
    with scaled_group(2):
        module = nn.Sequential(syncnorm.SyncBatchNorm(3))
        module(torch.randn(4, 3))
    state = module[0]._engine_state
    quiet = SimpleNamespace(global_step=7, log_every_n_steps=5)
    logging = SimpleNamespace(global_step=10, log_every_n_steps=5)
    callback.on_train_batch_end(logging, module, None, None, 0)  # nothing recorded: no error
    state.nonfinite.fill_(True)  # what a non-finite batch under on_nonfinite="raise" records off CPU
    callback.on_train_batch_end(quiet, module, None, None, 0)  # not a logging step: no host read
    with pytest.raises(syncnorm.SyncError, match=r"SyncBatchNorm '0'.*non-finite batch statistics"):
        callback.on_train_batch_end(logging, module, None, None, 0)
    with pytest.raises(syncnorm.SyncError, match="non-finite"):
        callback.on_train_epoch_end(logging, module)
