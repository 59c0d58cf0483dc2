"""GhostBatchNorm, BatchRenorm and FrozenBatchNorm against torch BatchNorm and float64 formulas."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from syncnorm import BatchRenorm, FrozenBatchNorm, GhostBatchNorm


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("n,vbs,chunks", [(10, 4, [(0, 4), (4, 8), (8, 10)]), (12, 4, [(0, 4), (4, 8), (8, 12)]),
                                          (3, 4, [(0, 3)])])
def test_ghost_equals_batchnorm_chunk_by_chunk(momentum, n, vbs, chunks):
    ghost, ref = GhostBatchNorm(3, vbs, momentum=momentum), nn.BatchNorm2d(3, momentum=momentum)
    with torch.no_grad():
        ghost.weight.uniform_(0.5, 1.5), ghost.bias.normal_()
        ref.weight.copy_(ghost.weight), ref.bias.copy_(ghost.bias)
    for step in range(3):
        x = (torch.randn(n, 3, 4, 5) * 2 + step).requires_grad_()
        xr = x.detach().clone().requires_grad_()
        y = ghost(x)
        yr = torch.cat([ref(xr[a:b]) for a, b in chunks])
        torch.testing.assert_close(y, yr, rtol=0, atol=1e-6)
        dy = torch.randn_like(y)
        y.backward(dy), yr.backward(dy)
        torch.testing.assert_close(x.grad, xr.grad, rtol=0, atol=1e-5)
        torch.testing.assert_close(ghost.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ghost.running_mean, ref.running_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(ghost.running_var, ref.running_var, rtol=0, atol=1e-6)
    assert int(ghost.num_batches_tracked) == int(ref.num_batches_tracked) == 3 * len(chunks)
    ghost.eval(), ref.eval()
    x = torch.randn(5, 3, 4, 5)
    torch.testing.assert_close(ghost(x), ref(x), rtol=0, atol=1e-5)


def test_ghost_has_no_python_loop_over_chunks(monkeypatch):
    calls = []
    orig = torch.nn.functional.batch_norm
    monkeypatch.setattr(torch.nn.functional, "batch_norm", lambda *a, **k: calls.append(1) or orig(*a, **k))
    GhostBatchNorm(4, 2)(torch.randn(16, 4, 3))
    assert len(calls) == 1  # 8 chunks, one kernel call


def test_ghost_rejects_bad_arguments():
    with pytest.raises(ValueError, match="virtual_batch_size"):
        GhostBatchNorm(4, 0)
    with pytest.raises(ValueError, match="GhostBatchNorm: expected more than 1 value per channel"):
        GhostBatchNorm(4, 2)(torch.randn(5, 4))  # last chunk: 1 sample, no spatial dims


def _renorm_reference(x, w, b, rm, rv, eps, r_max, d_max):
    """Batch Renorm in float64 with r, d detached (the paper's formula, written out)."""
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    mu = x.mean(dims)
    sigma_b = torch.sqrt(x.var(dims, unbiased=False) + eps)
    sigma = torch.sqrt(rv + eps)
    r = torch.clamp(sigma_b.detach() / sigma, 1 / r_max, r_max)
    d = torch.clamp((mu.detach() - rm) / sigma, -d_max, d_max)
    xhat = (x - mu.view(shape)) / sigma_b.view(shape) * r.view(shape) + d.view(shape)
    return xhat * w.view(shape) + b.view(shape), r, d


def test_batch_renorm_matches_float64_formula_and_r_d_carry_no_gradient():
    layer = BatchRenorm(4, r_max=1.5, d_max=0.5, momentum=0.3, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5), layer.bias.normal_()
        layer.running_mean.copy_(torch.tensor([0.0, 3.0, -2.0, 1.0]))
        layer.running_var.copy_(torch.tensor([1.0, 0.1, 9.0, 2.0]))
    rm0, rv0 = layer.running_mean.clone(), layer.running_var.clone()
    x = (torch.randn(6, 4, 5, dtype=torch.float64) * 2 + 1).requires_grad_()
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    y = layer(x)
    ref, r, d = _renorm_reference(x, w, b, rm0, rv0, 1e-5, 1.5, 0.5)
    assert (r == 1.5).any() and (r < 1.5).any() and (d.abs() == 0.5).any()  # clipping is exercised
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    dy = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(ref, (x, w, b), dy)
    y.backward(dy)
    torch.testing.assert_close(x.grad, gx, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(layer.weight.grad, gw, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(layer.bias.grad, gb, rtol=1e-9, atol=1e-10)
    xd = x.detach()
    torch.testing.assert_close(layer.running_mean, 0.7 * rm0 + 0.3 * xd.mean((0, 2)))
    torch.testing.assert_close(layer.running_var, 0.7 * rv0 + 0.3 * xd.var((0, 2), unbiased=True))


def test_batch_renorm_with_unit_limits_is_batchnorm_in_training():
    layer, ref = BatchRenorm(3, r_max=1.0, d_max=0.0, momentum=0.1), nn.BatchNorm1d(3, momentum=0.1)
    for _ in range(3):
        x = torch.randn(8, 3, 6) * 3 + 2
        torch.testing.assert_close(layer(x), ref(x), rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.running_var, ref.running_var, rtol=0, atol=1e-6)
    layer.eval(), ref.eval()
    x = torch.randn(2, 3, 6)
    torch.testing.assert_close(layer(x), ref(x), rtol=0, atol=1e-5)


def test_batch_renorm_warmup_ramps_limits_from_one_and_zero():
    layer = BatchRenorm(2, r_max=3.0, d_max=4.0, warmup_steps=4, momentum=0.0, dtype=torch.float64)
    with torch.no_grad():
        layer.running_mean.fill_(1000.0)  # batch mean far away: d hits its limit every step
        layer.running_var.fill_(1e4)  # batch std far smaller: r hits 1/r_max_t
    x = torch.randn(16, 2, dtype=torch.float64)
    mu, sb = x.mean(0), torch.sqrt(x.var(0, unbiased=False) + 1e-5)
    for t in range(6):
        ramp = min(1.0, t / 4)
        r_lim, d_lim = 1 + 2.0 * ramp, 4.0 * ramp
        y = layer(x)
        expected = (x - mu) / sb / r_lim - d_lim
        torch.testing.assert_close(y, expected, rtol=1e-9, atol=1e-9, msg=f"step {t}")


def test_frozen_equals_batchnorm_eval_in_both_modes_and_never_changes():
    bn = nn.BatchNorm2d(5)
    bn.train()(torch.randn(8, 5, 3, 3) * 2 + 1)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.normal_()
    frozen = FrozenBatchNorm(5)
    frozen.load_state_dict(bn.state_dict(), strict=True)
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    bn.eval()
    head = nn.Conv2d(5, 2, 1)
    opt = torch.optim.SGD(list(frozen.parameters()) + list(head.parameters()), lr=0.5)
    assert list(frozen.parameters()) == []
    for mode in (True, False, True):
        frozen.train(mode)
        x = torch.randn(4, 5, 3, 3) * 3
        torch.testing.assert_close(frozen(x), bn(x), rtol=0, atol=0)
        loss = head(frozen(x.requires_grad_())).square().mean()
        opt.zero_grad(), loss.backward(), opt.step()
        assert x.grad is not None and x.grad.abs().sum() > 0  # gradient flows through to the input
    for k, v in frozen.state_dict().items():
        assert torch.equal(v, before[k]), k
    back = nn.BatchNorm2d(5)
    back.load_state_dict(frozen.state_dict(), strict=True)
