"""SyncBatchNorm in one process: torch-identical fallback, the synchronized path through the scaled
one-process group of W ranks (gradcheck, mixed precision, channels_last), checkpoints, conversion,
pickling, errors."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from torch import nn

import syncnorm
from syncnorm import SyncBatchNorm, engine
from tests.helpers.scaled_pg import ScaledProcessGroup, scaled_group

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


def _repeated_reference(layer_cls, x, dy, world, **kw):
    """torch BatchNorm in float64 on ``x`` repeated ``world`` times: what ``world`` ranks holding
    ``x`` compute together; returns this rank's output and input gradient, and the layer."""
    ref = layer_cls(x.shape[1], dtype=torch.float64, **kw)
    xr = torch.cat([x.detach().double()] * world).requires_grad_()
    y = ref(xr)
    y.backward(torch.cat([dy.double()] * world))
    n = x.shape[0]
    return y[:n].detach(), xr.grad[:n], ref


def test_synchronized_path_gradcheck():
    with scaled_group(2):
        layer = SyncBatchNorm(3, dtype=torch.float64, track_running_stats=False)
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5), layer.bias.normal_()
        x = (torch.randn(5, 3, 4, dtype=torch.float64) * 2 + 1).requires_grad_()
        layer(x)  # first call: handshake and shift
        calls = ScaledProcessGroup.calls["all_reduce"]
        fn = lambda x, w, b: engine.batch_norm(layer, x, w, b)  # noqa: E731  (the layer's path, any w, b)
        assert torch.autograd.gradcheck(fn, (x, layer.weight, layer.bias), eps=1e-6, atol=1e-6)
        assert ScaledProcessGroup.calls["all_reduce"] > calls  # the synchronized path ran


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-2), (torch.bfloat16, 8e-2)])
def test_synchronized_path_mixed_precision(dtype, tol):
    # values ~300: their squares (9e4) overflow float16, the statistics must not
    x64 = torch.randn(6, 4, 5, 5, dtype=torch.float64) * 20 + 300
    x = x64.to(dtype).requires_grad_()
    dy = torch.randn(6, 4, 5, 5, dtype=torch.float64)
    with scaled_group(2):
        layer = SyncBatchNorm(4)
        y = layer(x)
        y.backward(dy.to(dtype))
    ref_y, ref_grad, ref_layer = _repeated_reference(nn.BatchNorm2d, x.detach().double(), dy, 2)
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert (y.double() - ref_y).abs().max().item() < tol
    assert x.grad.dtype == dtype
    assert (x.grad.double() - ref_grad).abs().max().item() < tol * 4
    torch.testing.assert_close(layer.running_mean.double(), ref_layer.running_mean, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(layer.running_var.double(), ref_layer.running_var, rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize("world", [2, 3])
def test_synchronized_path_channels_last_and_5d(world):
    for shape, fmt in [((4, 3, 5, 6), torch.channels_last), ((2, 3, 3, 4, 2), torch.channels_last_3d)]:
        x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
        dy = torch.randn(shape)
        with scaled_group(world):
            layer = SyncBatchNorm(3)
            y = layer(x)
            y.backward(dy)
        ref_y, ref_grad, ref = _repeated_reference(TORCH_BN[len(shape)], x, dy, world)
        torch.testing.assert_close(y.double(), ref_y, rtol=0, atol=1e-5)
        torch.testing.assert_close(x.grad.double(), ref_grad, rtol=0, atol=1e-5)
        torch.testing.assert_close(layer.running_var.double(), ref.running_var, rtol=0, atol=1e-6)


def test_double_backward_is_refused_with_a_clear_error():
    with scaled_group(2):
        layer = SyncBatchNorm(3)
        x = torch.randn(4, 3, 2, requires_grad=True)
        (g,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="once_differentiable|differentiate twice"):
            g.sum().backward()


def test_engine_state_is_kept_by_deepcopy_and_dropped_by_pickle():
    import copy

    with scaled_group(2):
        layer = SyncBatchNorm(3)
        layer(torch.randn(4, 3, 2) + 5)
        state = layer._engine_state
        twin = copy.deepcopy(layer)
        assert twin._engine_state.group is state.group and twin._engine_state.ready
        torch.testing.assert_close(twin._engine_state.shift, state.shift)
        assert twin._engine_state.shift is not state.shift
        assert twin._built_at == layer._built_at  # a deep copy is the same layer on every rank
        clone = pickle.loads(pickle.dumps(layer))
        assert clone._engine_state.group is None  # a new process starts with a handshake


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


def test_engine_state_dict_makes_a_resumed_layer_round_exactly_like_the_uninterrupted_one():
    """The shift a merge is centred on is not in the ``state_dict``: with ``engine_state_dict`` a
    restored layer continues bit for bit; without it, to rounding only."""
    gen = torch.Generator().manual_seed(3)
    # 16 values per row: the CPU path sums centred on the shift (functional.shifted_sums_cpu)
    batches = [torch.randn(6, 4, 16, generator=gen) * 0.01 + 100 for _ in range(4)]
    with scaled_group(2):
        live = SyncBatchNorm(4)
        for x in batches[:3]:
            live(x)
        saved, engine_saved = live.state_dict(), engine.engine_state_dict(nn.Sequential(live))
        assert set(engine_saved) == {"0"} and engine_saved["0"]["shift"].shape == (4,)
        resumed, fresh = SyncBatchNorm(4), SyncBatchNorm(4)
        resumed.load_state_dict(saved), fresh.load_state_dict(saved)
        assert engine.load_engine_state_dict(nn.Sequential(resumed), engine_saved) == 1
        y_live, y_resumed, y_fresh = live(batches[3]), resumed(batches[3]), fresh(batches[3])
    torch.testing.assert_close(y_resumed, y_live, rtol=0, atol=0)
    torch.testing.assert_close(resumed.running_var, live.running_var, rtol=0, atol=0)
    torch.testing.assert_close(y_fresh, y_live, rtol=0, atol=1e-5)  # float32 rounding of values ~1
    assert not torch.equal(y_fresh, y_live)  # this data shows the difference the saved shift makes
    with pytest.raises(ValueError, match="expected {'shift': Tensor, 'exact': bool} for layer '0'"):
        engine.load_engine_state_dict(nn.Sequential(resumed), {"0": {"shift": [1.0]}})
