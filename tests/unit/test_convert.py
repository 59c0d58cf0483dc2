"""convert_norms / revert_norms / auto policy / factory on a small CNN."""

from __future__ import annotations

import functools
import logging

import pytest
import torch
from torch import nn

import syncnorm
from syncnorm import BatchRenorm, FrozenBatchNorm, GhostBatchNorm, SyncBatchNorm, convert_norms, revert_norms
from syncnorm.factory import create_norm_layer, get_norm_layer

TARGET = {"sync": SyncBatchNorm, "ghost": GhostBatchNorm, "renorm": BatchRenorm, "frozen": FrozenBatchNorm,
          "group": nn.GroupNorm}
OPTIONS = {"ghost": {"virtual_batch_size": 2}, "group": {"num_groups": 4}}


def _cnn(dtype=torch.float32):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 6), nn.BatchNorm1d(6), nn.Linear(6, 2),
    ).to(dtype)
    net.train()
    for _ in range(3):
        net(torch.randn(8, 3, 5, 5, dtype=dtype) * 2 + 1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_()
    return net


NORM_PATHS = ["1", "3.1", "7"]


def _get(net, path):
    m = net
    for p in path.split("."):
        m = m[int(p)]
    return m


@pytest.mark.parametrize("kind", list(TARGET))
def test_round_trip_keeps_types_parameters_buffers_and_outputs(kind):
    net = _cnn()
    net[1].weight.requires_grad_(False)
    old = {p: _get(net, p) for p in NORM_PATHS}
    state = {k: v.clone() for k, v in net.state_dict().items()}
    net.eval()
    x = torch.randn(4, 3, 5, 5)
    y_before = net(x)
    out = convert_norms(net, kind, **OPTIONS.get(kind, {}))
    assert out is net
    for p in NORM_PATHS:
        new = _get(net, p)
        assert isinstance(new, TARGET[kind]) and new.layer_name == p and not new.training
        if kind != "frozen":
            assert new.weight is old[p].weight and new.bias is old[p].bias  # shared Parameters
        else:
            assert torch.equal(new.weight, old[p].weight) and list(new.parameters()) == []
        if kind in ("sync", "ghost", "renorm"):
            assert new.running_mean is old[p].running_mean and new.running_var is old[p].running_var
    assert not _get(net, "1").weight.requires_grad or kind == "frozen"
    assert isinstance(net[0], nn.Conv2d) and isinstance(net[3][0], nn.Conv2d)
    if kind != "group":  # GroupNorm normalizes differently; every other kind is BatchNorm in eval
        torch.testing.assert_close(net(x), y_before, rtol=0, atol=1e-6)
    back = revert_norms(net)
    assert [type(_get(back, p)) for p in NORM_PATHS] == [nn.BatchNorm2d, nn.BatchNorm2d, nn.BatchNorm1d]
    for k, v in back.state_dict().items():
        if kind == "group" and ("running" in k or "num_batches" in k):
            continue  # statistics are dropped by GroupNorm
        torch.testing.assert_close(v, state[k], rtol=0, atol=0, msg=k)
    assert not _get(back, "1").weight.requires_grad


@pytest.mark.parametrize("cls,kw", [(SyncBatchNorm, {}), (GhostBatchNorm, {"virtual_batch_size": 2}),
                                    (BatchRenorm, {}), (FrozenBatchNorm, {})])
def test_torch_state_dict_loads_strictly_both_ways(cls, kw):
    bn = nn.BatchNorm2d(6)
    bn(torch.randn(4, 6, 2, 2) + 3)
    layer = cls(6, **kw)
    layer.load_state_dict(bn.state_dict(), strict=True)
    back = nn.BatchNorm2d(6)
    back.load_state_dict(layer.state_dict(), strict=True)
    for k, v in bn.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_device_dtype_preserved_and_auto_policy_logged(caplog):
    net = _cnn(torch.float64)
    with caplog.at_level(logging.INFO, logger="syncnorm"):
        convert_norms(net, "auto", per_device_batch=2, world_size=8)
    assert isinstance(net[1], SyncBatchNorm) and net[1].weight.dtype == torch.float64
    assert "auto chose 'sync'" in caplog.text and "global batch 16" in caplog.text
    assert syncnorm.choose_auto_kind(32, 4)[0] == "batch"
    assert syncnorm.choose_auto_kind(2, 2)[0] == "group"
    assert syncnorm.choose_auto_kind(4, 4)[0] == "sync"
    assert syncnorm.choose_auto_kind(4, 4, min_global_batch=32)[0] == "group"
    convert_norms(net, "auto", per_device_batch=1, world_size=1, num_groups=4)
    assert isinstance(net[1], nn.GroupNorm) and net[1].num_groups == 4


@pytest.mark.parametrize("c,requested,expected", [(48, 32, 24), (64, 32, 32), (7, 32, 7), (8, 1, 1), (10, 4, 2)])
def test_group_uses_largest_divisor_and_says_so(c, requested, expected, caplog):
    with caplog.at_level(logging.INFO, logger="syncnorm"):
        net = convert_norms(nn.Sequential(nn.BatchNorm2d(c)), "group", num_groups=requested)
    assert net[0].num_groups == expected and net[0].num_channels == c
    assert (f"using {expected} groups" in caplog.text) == (expected != requested)


def test_group_divisor_note_is_logged_once_per_conversion_not_per_layer(caplog):
    net = nn.Sequential(*[nn.BatchNorm2d(16) for _ in range(5)], nn.BatchNorm2d(48), nn.BatchNorm2d(64))
    with caplog.at_level(logging.INFO, logger="syncnorm"):
        convert_norms(net, "group", num_groups=32)
    assert [m.num_groups for m in net] == [16] * 5 + [24, 32]
    assert len(caplog.records) == 1  # the conversion's one summary line
    text = caplog.records[0].getMessage()
    assert text.count("C=16 is not divisible by num_groups=32; using 16 groups (the largest divisor) (x5 layers)") == 1
    assert text.count("C=48 is not divisible by num_groups=32; using 24 groups") == 1 and "C=64" not in text
    assert not any(hasattr(m, "_syncnorm_conversion_note") for m in net)  # the note does not stay on the layer


def test_errors_name_valid_choices():
    with pytest.raises(ValueError, match=r"unknown norm kind 'foo'; expected one of \['batch', 'sync'"):
        convert_norms(_cnn(), "foo")
    with pytest.raises(ValueError, match="unknown options \\['r_max'\\]"):
        convert_norms(_cnn(), "sync", r_max=2.0)
    with pytest.raises(ValueError, match="virtual_batch_size"):
        convert_norms(_cnn(), "ghost")
    with pytest.raises(ValueError, match="per_device_batch"):
        convert_norms(_cnn(), "auto")
    with pytest.raises(ValueError, match=r"unknown norm kind 'bn'; expected one of"):
        get_norm_layer("bn")


def test_revert_without_record_needs_dim():
    net = nn.Sequential(SyncBatchNorm(4), nn.ReLU())
    with pytest.raises(ValueError, match="pass dim=1, 2 or 3"):
        revert_norms(net)
    assert isinstance(revert_norms(net, dim=3)[0], nn.BatchNorm3d)
    torch_sync = convert_norms(nn.Sequential(nn.SyncBatchNorm(4)), "ghost", virtual_batch_size=2)
    assert type(revert_norms(torch_sync)[0]) is nn.SyncBatchNorm  # exactly the recorded class


def test_factory_accepts_names_classes_and_partials():
    assert isinstance(create_norm_layer("SYNC", 4), SyncBatchNorm)
    layer = create_norm_layer(functools.partial(GhostBatchNorm, virtual_batch_size=3), 4, momentum=0.2)
    assert layer.virtual_batch_size == 3 and layer.momentum == 0.2
    assert isinstance(create_norm_layer(None, 4), nn.Identity)
    assert create_norm_layer("group", 12, num_groups=8).num_groups == 6
    assert set(syncnorm.norm_kinds()) >= {"batch", "sync", "ghost", "renorm", "frozen", "group"}
