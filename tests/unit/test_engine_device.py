"""The non-CPU code path never syncs with the host, and issues few kernels.

Run on the ``meta`` device under the one-process scaled group of 2 ranks (tests/helpers/scaled_pg.py):
a meta tensor has no data, so any ``.item()``, ``.tolist()``, ``bool()`` or ``float()`` of device
data raises. A layer's first synchronized call may read the host (the handshake): it runs on CPU,
then the layer moves to ``meta`` (its engine state moves along). In the steady state we check:
forward and backward complete (no host read), no host-to-device copy (neither through dispatch nor
through ``torch.tensor(<python data>, device=...)``, which dispatch cannot see), exactly one
collective each way, and the number of aten ops (views not counted; the backward count includes
autograd's 3 gradient accumulations into ``x.grad``, ``weight.grad`` and ``bias.grad``).
torch.nn.SyncBatchNorm's CUDA path issues about ten each way; the previous syncnorm issued 55/40
(SyncBatchNorm) and 82/43 (BatchRenorm).
"""

from __future__ import annotations

import pytest
import torch

import syncnorm
from tests.helpers.scaled_pg import (DeviceChecks, ScaledProcessGroup, no_tensor_from_host_data,
                                     register_meta_kernels, scaled_group)

FORWARD_OPS, BACKWARD_OPS = 32, 16
LAYERS = {
    "SyncBatchNorm": lambda: syncnorm.SyncBatchNorm(64),
    "BatchRenorm": lambda: syncnorm.BatchRenorm(64),
    "BatchRenorm(warmup, momentum=None)": lambda: syncnorm.BatchRenorm(64, warmup_steps=100, momentum=None),
    "SyncBatchNorm(momentum=None, on_nonfinite=raise)": lambda: _raising(syncnorm.SyncBatchNorm(64, momentum=None)),
    "BatchInstanceNorm": lambda: syncnorm.BatchInstanceNorm(64),
    "SwitchableNorm": lambda: syncnorm.SwitchableNorm(64),
}
BUDGETED = ("SyncBatchNorm", "BatchRenorm")


def _raising(layer):
    layer.on_nonfinite = "raise"
    return layer


def _steady_state_on_meta(make):
    register_meta_kernels()
    with scaled_group(2):
        layer = make()
        layer(torch.randn(4, 64, 5, 5, requires_grad=True)).sum().backward()  # first call, on CPU
        layer.to("meta")
        x = torch.randn(4, 64, 5, 5, device="meta", requires_grad=True)
        layer(x).sum().backward()  # the state follows the layer to the device
        fwd, bwd = DeviceChecks(), DeviceChecks()
        ScaledProcessGroup.calls.clear()
        with no_tensor_from_host_data() as built:
            with fwd:
                y = layer(x)
            grad = torch.ones_like(y)
            with bwd:
                y.backward(grad)
        return fwd, bwd, built, dict(ScaledProcessGroup.calls)


@pytest.mark.parametrize("name", list(LAYERS))
def test_steady_state_reads_nothing_back_and_copies_nothing_from_the_host(name):
    fwd, bwd, built, calls = _steady_state_on_meta(LAYERS[name])
    assert calls == {"all_reduce": 2}, calls  # one collective forward, one backward
    assert fwd.host_copies == [] and bwd.host_copies == [], (fwd.host_copies, bwd.host_copies)
    assert built == [], built
    if name in BUDGETED:
        assert len(fwd.ops) <= FORWARD_OPS, (len(fwd.ops), fwd.ops)
        assert len(bwd.ops) <= BACKWARD_OPS, (len(bwd.ops), bwd.ops)


def test_op_counts_are_what_the_readme_reports():
    counts = {name: tuple(len(c.ops) for c in _steady_state_on_meta(make)[:2]) for name, make in LAYERS.items()}
    assert counts["SyncBatchNorm"] == (20, 9), counts
    assert counts["BatchRenorm"] == (31, 11), counts
