"""One rule per value: the same rule, and the same words, wherever a value enters syncnorm."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import syncnorm
from syncnorm import rules
from syncnorm.callbacks import NormConversion
from syncnorm.factory import get_norm_layer
from syncnorm.lightning import SyncNormLayerSync


@pytest.mark.parametrize("momentum", [0.1, None, 0.0, 1.0, 1.5, -0.5, 2, np.float32(0.3)])
def test_momentum_accepts_what_torch_accepts_and_updates_like_torch(momentum):
    ref = nn.BatchNorm2d(3, momentum=momentum)
    x = torch.randn(6, 3, 2, 2) * 3 + 1
    ref(x)
    for cls, kw in ((syncnorm.SyncBatchNorm, {}), (syncnorm.GhostBatchNorm, {"virtual_batch_size": 6})):
        layer = cls(3, momentum=momentum, **kw)
        layer(x)
        torch.testing.assert_close(layer.running_mean, ref.running_mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(layer.running_var, ref.running_var, rtol=0, atol=1e-5)


def test_momentum_refused_with_one_text_where_it_enters():
    with pytest.raises(TypeError):  # torch stores it, then its kernel refuses it at the first forward
        nn.BatchNorm2d(3, momentum="0.1")(torch.randn(4, 3, 2, 2))
    with pytest.raises(ValueError) as info:
        syncnorm.SyncBatchNorm(3, momentum="0.1")
    assert str(info.value) == rules.MOMENTUM.message("0.1", "SyncBatchNorm")
    assert "None or a real number" in str(info.value)
    with pytest.raises(ValueError, match=r"convert_norms\(kind='renorm'\): expected momentum to be None or a real"):
        syncnorm.convert_norms(nn.BatchNorm2d(3), "renorm", momentum="x")


def test_virtual_batch_size_has_one_rule_everywhere():
    texts = []
    for make in (lambda: syncnorm.GhostBatchNorm(4, 0),
                 lambda: syncnorm.convert_norms(nn.BatchNorm2d(4), "ghost", virtual_batch_size=0),
                 lambda: NormConversion("ghost", virtual_batch_size=0),
                 lambda: get_norm_layer("ghost", virtual_batch_size=0)):
        with pytest.raises(ValueError) as info:
            make()
        texts.append(str(info.value))
    assert all(t.endswith("expected virtual_batch_size to be an int >= 1, got 0") for t in texts), texts
    assert [t.split(":")[0] for t in texts] == ["GhostBatchNorm", "convert_norms(kind='ghost')",
                                                "NormConversion('ghost')", "get_norm_layer('ghost')"]


def test_num_groups_and_sync_group_size():
    with pytest.raises(ValueError, match=r"convert_norms\(kind='group'\): expected num_groups to be an int >= 1"):
        syncnorm.convert_norms(nn.BatchNorm2d(4), "group", num_groups=0)
    with pytest.raises(ValueError, match=r"NormConversion: expected sync_group_size to be None \(all ranks\) or an "
                                         r"int >= 1 dividing the world size, got 0"):
        NormConversion("sync", sync_group_size=0)
    with pytest.raises(ValueError, match=r"dividing the world size, got 3 \(world size 4\)"):
        rules.check_sync_group_size(3, 4, "NormConversion")
    assert rules.check_sync_group_size(2, 4, "NormConversion") == 2


def test_a_kind_name_has_one_error_text():
    kinds = [*syncnorm.factory.layer_kinds(), "auto"]
    for where, call in (("convert_norms", lambda: syncnorm.convert_norms(nn.BatchNorm2d(4), "bn")),
                        ("NormConversion", lambda: NormConversion("bn")),
                        ("SyncNormLayerSync", lambda: SyncNormLayerSync("bn"))):
        with pytest.raises(ValueError) as info:
            call()
        assert str(info.value) == f"{where}: unknown norm kind 'bn'; expected one of {kinds}"
    with pytest.raises(ValueError) as info:
        get_norm_layer("bn")  # a layer builder: "auto" (a policy, not a layer) is not among its kinds
    assert str(info.value) == f"get_norm_layer: unknown norm kind 'bn'; expected one of {kinds[:-1]}"


@pytest.mark.parametrize("kind, cls", [("batch_instance", syncnorm.BatchInstanceNorm),
                                       ("switchable", syncnorm.SwitchableNorm)])
def test_convert_norms_accepts_every_registered_kind(kind, cls):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    net(torch.randn(4, 3, 5, 5))
    weight, running_var = net[1].weight, net[1].running_var
    syncnorm.convert_norms(net, kind)
    assert type(net[1]) is cls and net[1].weight is weight and net[1].running_var is running_var
    assert net(torch.randn(4, 3, 5, 5)).shape == (4, 4, 3, 3)
    syncnorm.revert_norms(net)
    assert type(net[1]) is nn.BatchNorm2d and net[1].weight is weight


@pytest.mark.parametrize("option,value,expected", [("r_max", 0.5, "a number >= 1"), ("d_max", -1.0, "a number >= 0"),
                                                   ("warmup_steps", 1.5, "an int >= 0")])
def test_batch_renorm_options_use_the_rules_text(option, value, expected):
    """The layer, the conversion and the factory give the one rule's text for Batch Renorm's options."""
    texts = []
    for make in (lambda: syncnorm.BatchRenorm(4, **{option: value}),
                 lambda: syncnorm.convert_norms(torch.nn.BatchNorm2d(4), "renorm", **{option: value})):
        with pytest.raises(ValueError) as err:
            make()
        texts.append(str(err.value))
    assert all(f"expected {option} to be {expected}, got {value!r}" in t for t in texts), texts
