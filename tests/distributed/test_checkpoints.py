"""Checkpoints move between world sizes and between torch and syncnorm layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import syncnorm
from tests.distributed.test_sync_faults import _data, _small_cnn
from tests.helpers.dist import run_distributed

pytestmark = pytest.mark.distributed

GLOBAL_BATCH = 12  # divisible by 1, 2 and 3 ranks


def _ddp_steps(rank, world, state, steps, first_step):
    model = syncnorm.SyncBatchNorm.convert_sync_batchnorm(_small_cnn(nn.BatchNorm2d))
    if state is not None:
        model.load_state_dict(state, strict=True)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    per = GLOBAL_BATCH // world
    for step in range(first_step, first_step + steps):
        x, y = _data(step, GLOBAL_BATCH)
        loss = nn.functional.cross_entropy(ddp(x[rank * per:(rank + 1) * per]), y[rank * per:(rank + 1) * per])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _single(state, steps, first_step):
    model = _small_cnn(nn.BatchNorm2d)  # torch classes: the checkpoint is torch-compatible
    if state is not None:
        model.load_state_dict(state, strict=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(first_step, first_step + steps):
        x, y = _data(step, GLOBAL_BATCH)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.state_dict()


def test_save_on_two_ranks_resume_on_one_and_on_three():
    saved = run_distributed(_ddp_steps, 2, None, 3, 0)[0]  # rank 0's checkpoint after 3 steps
    assert int(saved["1.num_batches_tracked"]) == 3 and saved["1.running_var"].ne(1).all()
    reference = _single(_single(None, 3, 0), 3, 3)  # 6 uninterrupted single-process steps
    resumed_1 = _single(saved, 3, 3)  # W = 1, torch BatchNorm model
    resumed_3 = run_distributed(_ddp_steps, 3, saved, 3, 3)  # W = 3, elastic resize
    for name, got in [("W=1", resumed_1)] + [(f"W=3 rank {r}", s) for r, s in enumerate(resumed_3)]:
        for k, v in reference.items():
            torch.testing.assert_close(got[k], v, rtol=0, atol=1e-5, msg=lambda m: f"{name} {k}: {m}")


def test_torch_checkpoint_loads_into_every_syncnorm_kind_and_back():
    torch_model = _small_cnn(nn.BatchNorm2d)
    torch_model.train()(_data(0, 8)[0])
    state = torch_model.state_dict()
    for kind, opts in [("sync", {}), ("ghost", {"virtual_batch_size": 2}), ("renorm", {}), ("frozen", {})]:
        model = syncnorm.convert_norms(_small_cnn(nn.BatchNorm2d), kind, **opts)
        model.load_state_dict(state, strict=True)
        back = _small_cnn(nn.BatchNorm2d)
        back.load_state_dict(model.state_dict(), strict=True)
        for k, v in state.items():
            assert torch.equal(back.state_dict()[k], v), (kind, k)
        torch_model.eval(), model.eval()
        x = _data(1, 4)[0]
        torch.testing.assert_close(model(x), torch_model(x), rtol=0, atol=1e-6)
