"""SyncBatchNorm in one process: torch-identical fallback, the synchronized path through a one-rank
group (gradcheck, mixed precision, channels_last), checkpoints, conversion, pickling, errors."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from torch import nn

import syncnorm
from syncnorm import SyncBatchNorm
from syncnorm._autograd import SyncBatchNormFunction
from syncnorm.distributed import SyncSpec

TORCH_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


@pytest.mark.parametrize("shape", [(8, 4), (8, 4, 6), (4, 4, 3, 5), (2, 4, 3, 2, 2)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_without_process_group_is_exactly_batchnorm(shape, momentum):
    ours, ref = SyncBatchNorm(4, momentum=momentum), TORCH_BN[len(shape)](4, momentum=momentum)
    for step in range(3):
        x = torch.randn(shape) * 2 + step
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name), rtol=0, atol=0)
    ours.eval(), ref.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)


def test_state_dict_is_torch_compatible_both_ways():
    ref = nn.BatchNorm2d(6)
    ref.train()(torch.randn(4, 6, 3, 3))
    ours = SyncBatchNorm(6)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    back = nn.BatchNorm2d(6)
    back.load_state_dict(ours.state_dict(), strict=True)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0)
    torch_sync = nn.SyncBatchNorm(6)
    torch_sync.load_state_dict(ours.state_dict(), strict=True)
    ours.load_state_dict(torch_sync.state_dict(), strict=True)


def test_convert_sync_batchnorm_shares_tensors_and_keeps_state():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8),
                        nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), nn.SyncBatchNorm(8))
    net[1].weight.requires_grad_(False)
    net[1].running_mean.fill_(0.5)
    net.eval()
    w, rm = net[1].weight, net[1].running_mean
    out = SyncBatchNorm.convert_sync_batchnorm(net)
    assert out is net
    assert isinstance(net[1], SyncBatchNorm) and isinstance(net[2][1], SyncBatchNorm) and isinstance(net[3], SyncBatchNorm)
    assert net[1].weight is w and net[1].running_mean is rm and not net[1].weight.requires_grad
    assert not net[1].training and isinstance(net[0], nn.Conv2d)
    assert net[2][1].layer_name == "2.1"
    root = SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm3d(2))
    assert isinstance(root, SyncBatchNorm)


def test_pickles_and_saves_with_default_group():
    layer = SyncBatchNorm(3)
    clone = pickle.loads(pickle.dumps(layer))
    assert isinstance(clone, SyncBatchNorm) and clone.process_group is None
    buf = io.BytesIO()
    torch.save(nn.Sequential(layer), buf)
    buf.seek(0)
    assert isinstance(torch.load(buf, weights_only=False)[0], SyncBatchNorm)


def test_error_messages_name_layer_expected_and_received():
    layer = SyncBatchNorm(64)
    with pytest.raises(ValueError, match=r"SyncBatchNorm: expected input with 64 channels, got 32"):
        layer(torch.randn(2, 32, 4))
    with pytest.raises(ValueError, match=r"SyncBatchNorm: expected input \(N, 64, \*\) with at least 2 dims, got 1D"):
        layer(torch.randn(64))
    with pytest.raises(ValueError, match=r"SyncBatchNorm: expected more than 1 value per channel when training, got 1"):
        layer(torch.randn(1, 64))
    layer.eval()
    assert layer(torch.randn(1, 64)).shape == (1, 64)  # eval with batch size 1 works
    with pytest.raises(ValueError, match="num_features"):
        SyncBatchNorm(0)


def _sync_apply(x, layer, group):
    spec = SyncSpec("SyncBatchNorm", layer.num_features, group, 30.0, True)
    return SyncBatchNormFunction.apply(x, layer.weight, layer.bias, layer.running_mean, layer.running_var,
                                       layer.eps, 0.1, spec)


def test_synchronized_path_gradcheck(one_rank_group):
    layer = SyncBatchNorm(3, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5), layer.bias.normal_()
    x = (torch.randn(5, 3, 4, dtype=torch.float64) * 2 + 1).requires_grad_()
    fn = lambda x, w, b: SyncBatchNormFunction.apply(  # noqa: E731
        x, w, b, None, None, 1e-5, 0.1, SyncSpec("SyncBatchNorm", 3, one_rank_group, 30.0, True))
    assert torch.autograd.gradcheck(fn, (x, layer.weight, layer.bias), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-2), (torch.bfloat16, 8e-2)])
def test_synchronized_path_mixed_precision(one_rank_group, dtype, tol):
    # values ~300: their squares (9e4) overflow float16, the statistics must not
    x64 = torch.randn(6, 4, 5, 5, dtype=torch.float64) * 20 + 300
    x = x64.to(dtype).requires_grad_()
    layer = SyncBatchNorm(4)
    y = _sync_apply(x, layer, one_rank_group)
    assert y.dtype == dtype and torch.isfinite(y).all()
    ref_layer = nn.BatchNorm2d(4, dtype=torch.float64)
    xr = x.detach().double().requires_grad_()
    ref = ref_layer(xr)
    assert (y.double() - ref).abs().max().item() < tol
    dy = torch.randn_like(ref)
    y.backward(dy.to(dtype))
    ref.backward(dy)
    assert x.grad.dtype == dtype
    assert (x.grad.double() - xr.grad).abs().max().item() < tol * 4
    torch.testing.assert_close(layer.running_mean.double(), ref_layer.running_mean, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(layer.running_var.double(), ref_layer.running_var, rtol=2e-2, atol=1e-2)


def test_synchronized_path_channels_last_and_5d(one_rank_group):
    for shape, fmt in [((4, 3, 5, 6), torch.channels_last), ((2, 3, 3, 4, 2), torch.channels_last_3d)]:
        x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
        layer, ref = SyncBatchNorm(3, process_group=one_rank_group), TORCH_BN[len(shape)](3)
        y = _sync_apply(x, layer, one_rank_group)
        xr = x.detach().clone().requires_grad_()
        r = ref(xr)
        torch.testing.assert_close(y, r, rtol=0, atol=1e-5)
        dy = torch.randn(shape)
        y.backward(dy), r.backward(dy)
        torch.testing.assert_close(x.grad, xr.grad, rtol=0, atol=1e-5)


def test_group_of_size_one_falls_back_without_collectives(one_rank_group, monkeypatch):
    import torch.distributed as dist

    def boom(*a, **k):
        raise AssertionError("no collective expected at world size 1")

    monkeypatch.setattr(dist, "all_reduce", boom)
    layer, ref = SyncBatchNorm(3), nn.BatchNorm1d(3)
    x = torch.randn(7, 3)
    torch.testing.assert_close(layer(x), ref(x), rtol=0, atol=0)


def test_public_names():
    assert syncnorm.SyncBatchNorm is SyncBatchNorm
    assert issubclass(SyncBatchNorm, nn.modules.batchnorm._BatchNorm)
    assert not issubclass(SyncBatchNorm, nn.SyncBatchNorm)  # DDP refuses that class on CPU
