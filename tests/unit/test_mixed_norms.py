"""Batch-Instance Norm and Switchable Norm at their pure settings equal the norms they mix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from syncnorm import BatchInstanceNorm, SwitchableNorm, SyncBatchNorm, create_norm_layer


def _affine(layer, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        c = layer.weight.numel()
        layer.weight.copy_(torch.rand(c, generator=g) + 0.5)
        layer.bias.copy_(torch.randn(c, generator=g))
    return layer


def _pair(cls, mode):
    layer = _affine(cls(4))
    with torch.no_grad():
        if cls is BatchInstanceNorm:
            layer.gate.fill_({"bn": 1.0, "in": 0.0}[mode])
        else:
            logits = {"in": [0.0, -1e4, -1e4], "ln": [-1e4, 0.0, -1e4], "bn": [-1e4, -1e4, 0.0]}[mode]
            layer.mean_weight.copy_(torch.tensor(logits)), layer.var_weight.copy_(torch.tensor(logits))
    ref = {"bn": SyncBatchNorm(4), "in": nn.InstanceNorm2d(4, affine=True), "ln": nn.GroupNorm(1, 4)}[mode]
    return layer, _affine(ref)


@pytest.mark.parametrize("cls,mode", [(BatchInstanceNorm, "bn"), (BatchInstanceNorm, "in"),
                                      (SwitchableNorm, "bn"), (SwitchableNorm, "in"), (SwitchableNorm, "ln")])
def test_pure_settings_equal_the_reference_norm_in_train_and_eval(cls, mode):
    layer, ref = _pair(cls, mode)
    for step in range(3):
        x = (torch.randn(6, 4, 5, 5) * 2 + step).requires_grad_()
        xr = x.detach().clone().requires_grad_()
        y, yr = layer(x), ref(xr)
        torch.testing.assert_close(y, yr, rtol=0, atol=1e-5)
        dy = torch.randn_like(y)
        y.backward(dy), yr.backward(dy)
        torch.testing.assert_close(x.grad, xr.grad, rtol=0, atol=1e-5)
        torch.testing.assert_close(layer.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-5)
        layer.zero_grad(), ref.zero_grad()
    if mode == "bn":
        torch.testing.assert_close(layer.running_mean, ref.running_mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(layer.running_var, ref.running_var, rtol=0, atol=1e-5)
        layer.eval(), ref.eval()
        x = torch.randn(2, 4, 5, 5)
        torch.testing.assert_close(layer(x), ref(x), rtol=0, atol=1e-5)


def test_mixes_are_learnable_and_registered():
    sn = create_norm_layer("switchable", 4)
    bin_ = create_norm_layer("batch_instance", 4)
    x = torch.randn(4, 4, 3, 3)
    (sn(x).square().mean() + bin_(x).square().mean()).backward()
    assert sn.mean_weight.grad.abs().sum() > 0 and bin_.gate.grad is not None
    with pytest.raises(ValueError, match="at least one trailing dim"):
        sn(torch.randn(4, 4))
