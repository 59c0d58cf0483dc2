"""Other people's models: drop-in fidelity with torch 2.13's SyncBatchNorm, norm + activation
subclasses (timm's ``BatchNormAct2d``), frozen look-alikes (torchvision's ``FrozenBatchNorm2d``),
lazy layers. The stand-ins below mimic those libraries' classes (the ``zoo`` group,
``tests/zoo``, runs the real ones where timm and torchvision are installed)."""

from __future__ import annotations

import copy
import inspect
import pickle
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import syncnorm
from syncnorm import (BatchInstanceNorm, BatchRenorm, FrozenBatchNorm, GhostBatchNorm, SwitchableNorm, SyncBatchNorm,
                      convert_norms, revert_norms)
from syncnorm.convert import TAIL
from syncnorm.factory import is_frozen_look_alike
from tests.helpers.models import randomize_norms

KINDS = ["batch", "sync", "ghost", "renorm", "frozen", "group", "batch_instance", "switchable"]
OPTIONS = {"ghost": {"virtual_batch_size": 2}, "group": {"num_groups": 2}}
SAME_IN_EVAL = {"batch", "sync", "ghost", "renorm", "frozen"}
"""Kinds whose eval function is BatchNorm's with the same tensors (group, batch_instance with a
learned gate, switchable compute something else by design)."""
LAYERS = [SyncBatchNorm, GhostBatchNorm, BatchRenorm, BatchInstanceNorm, SwitchableNorm]


# ------------------------------------------------------------------------------------ stand-ins

class NormAct2d(nn.BatchNorm2d):
    """Like timm's ``BatchNormAct2d``: batch norm, then ``self.drop``, then ``self.act``."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 act_layer=nn.ReLU, drop_rate=0.0):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats)
        self.drop = nn.Dropout(drop_rate) if drop_rate else nn.Identity()
        self.act = act_layer()

    def forward(self, x):
        use_batch = self.training or self.running_mean is None
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, use_batch, factor, self.eps)
        return self.act(self.drop(x))


class TorchvisionFrozenBN(nn.Module):
    """Like torchvision's ``FrozenBatchNorm2d``: four buffers and ``eps``, no ``num_features``, no
    momentum; the eval formula as one affine map."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        for name, fill in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((num_features,), fill))

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


TorchvisionFrozenBN.__name__ = TorchvisionFrozenBN.__qualname__ = "FrozenBatchNorm2d"


def _randomize(model: nn.Module) -> nn.Module:
    return randomize_norms(model, seed=3)


def _act_net(act_layer=nn.SiLU, drop_rate=0.2) -> nn.Sequential:
    torch.manual_seed(0)
    return _randomize(nn.Sequential(nn.Conv2d(3, 6, 3), NormAct2d(6, act_layer=act_layer, drop_rate=drop_rate),
                                    nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6)))


X = torch.randn(4, 3, 7, 7, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------- drop-in fidelity (torch 2.13)

@pytest.mark.parametrize("cls", LAYERS)
def test_bias_is_keyword_only_as_in_torch(cls):
    torch_param = inspect.signature(nn.SyncBatchNorm).parameters["bias"]
    ours = inspect.signature(cls).parameters["bias"]
    assert (ours.kind, ours.default) == (torch_param.kind, torch_param.default) == (inspect.Parameter.KEYWORD_ONLY, True)
    layer = cls(4, bias=False, **({"virtual_batch_size": 3} if cls is GhostBatchNorm else {}))
    assert layer.bias is None and isinstance(layer.weight, nn.Parameter) and "bias=False" in repr(layer)
    y = layer.train()(torch.randn(6, 4, 3, 3))
    y.square().sum().backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


def test_sync_batchnorm_without_bias_equals_torch():
    ours, theirs = SyncBatchNorm(4, bias=False), nn.SyncBatchNorm(4, bias=False)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    bn = nn.BatchNorm2d(4, bias=False)  # torch's SyncBatchNorm needs a process group; without one it is this
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        ours.weight.copy_(bn.weight)
    x = torch.randn(8, 4, 3, 3) * 2 + 1
    torch.testing.assert_close(ours(x), bn(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.running_var, bn.running_var, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(SAME_IN_EVAL - {"batch"}))
def test_conversion_keeps_a_missing_bias(kind):
    net = _randomize(nn.Sequential(nn.BatchNorm2d(4, bias=False)))
    x = torch.randn(4, 4, 3, 3)
    ref = net(x)
    out = convert_norms(net, kind, **OPTIONS.get(kind, {}))
    torch.testing.assert_close(out(x), ref, rtol=0, atol=1e-5)
    if kind != "frozen":  # frozen's bias is a buffer: the missing bias is a zero one there
        assert out[0].bias is None
    back = revert_norms(out)
    assert type(back[0]) is nn.BatchNorm2d
    torch.testing.assert_close(back(x), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("convert", ["convert_norms", "convert_sync_batchnorm"])
def test_qconfig_is_kept_as_torch_keeps_it(convert):
    net = nn.Sequential(nn.BatchNorm2d(4))
    qconfig = net[0].qconfig = torch.ao.quantization.get_default_qat_qconfig("x86")
    assert nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(net))[0].qconfig is not None  # torch's keeps it
    out = convert_norms(net, "sync") if convert == "convert_norms" else SyncBatchNorm.convert_sync_batchnorm(net)
    assert type(out[0]) is SyncBatchNorm and out[0].qconfig is qconfig
    assert revert_norms(out)[0].qconfig is qconfig


def _torch_outcome(ctor, value):
    """(accepted?, running_mean after one training step) for ``ctor(momentum=value)``."""
    torch.manual_seed(0)
    x = torch.randn(6, 4, 3, 3)
    try:
        layer = ctor(value)
        layer.train()(x)
    except (TypeError, ValueError, RuntimeError):
        return False, None
    return True, layer.running_mean.clone()


MOMENTA = [0.1, 1, 0, 1.5, -0.5, True, float("nan"), None, np.float32(0.3), np.float64(0.2), np.int64(1),
           np.float16(0.1), np.bool_(True), torch.tensor(0.1), torch.tensor(1), "0.1", Fraction(1, 10),
           Decimal("0.1"), 1 + 0j, np.array(0.1), torch.tensor([0.1]), [0.1]]


@pytest.mark.parametrize("value", MOMENTA, ids=lambda v: f"{type(v).__name__}:{v!r}"[:40])
def test_momentum_accepted_exactly_where_torch_accepts_it(value):
    ok_torch, rm_torch = _torch_outcome(lambda v: nn.BatchNorm2d(4, momentum=v), value)
    ok_ours, rm_ours = _torch_outcome(lambda v: SyncBatchNorm(4, momentum=v), value)
    assert ok_ours == ok_torch, (value, ok_torch)
    if ok_torch:
        torch.testing.assert_close(rm_ours, rm_torch, rtol=0, atol=1e-6, equal_nan=True)
    else:
        with pytest.raises(ValueError, match=r"SyncBatchNorm: expected momentum to be None or a real number.*got"):
            SyncBatchNorm(4, momentum=value)


def test_numpy_num_features_and_eps_are_plain_numbers():
    layer = SyncBatchNorm(np.int64(4), eps=np.float32(1e-3), momentum=np.float64(0.2))
    assert (type(layer.num_features), type(layer.eps), type(layer.momentum)) == (int, float, float)
    bn = nn.BatchNorm2d(4, eps=1e-3, momentum=0.2)
    x = torch.randn(8, 4, 2, 2)
    torch.testing.assert_close(layer(x), bn(x), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"expected eps to be a real number >= 0 .*got -1"):
        SyncBatchNorm(4, eps=-1)


@pytest.mark.parametrize("convert", ["convert_norms", "convert_sync_batchnorm"])
def test_lazy_layers_convert_after_their_first_forward(convert):
    run = (lambda m: convert_norms(m, "sync")) if convert == "convert_norms" else SyncBatchNorm.convert_sync_batchnorm
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match=r"LazyBatchNorm2d '1' has uninitialized parameters.*run one forward pass"
                                         r".*it becomes BatchNorm2d"):
        run(net)
    assert isinstance(net[1], nn.LazyBatchNorm2d)  # refused before anything changed
    net(torch.randn(4, 3, 5, 5))  # materializes: now a BatchNorm2d
    _randomize(net)
    x = torch.randn(4, 3, 5, 5)
    ref = net(x)
    out = run(net)
    assert type(out[1]) is SyncBatchNorm
    torch.testing.assert_close(out(x), ref, rtol=0, atol=1e-5)
    assert type(revert_norms(out)[1]) is nn.BatchNorm2d


def test_convert_sync_batchnorm_keeps_syncnorm_kinds():
    ghost, renorm, bin_, sw, frozen = (GhostBatchNorm(4, virtual_batch_size=2), BatchRenorm(4), BatchInstanceNorm(4),
                                       SwitchableNorm(4), FrozenBatchNorm(4))
    group = convert_norms(nn.Sequential(nn.BatchNorm2d(4)), "group", num_groups=2)[0]
    net = nn.Sequential(nn.BatchNorm2d(4), nn.SyncBatchNorm(4), SyncBatchNorm(4), ghost, renorm, bin_, sw, frozen,
                        group, TorchvisionFrozenBN(4))
    kept = [net[i] for i in range(3, 10)]
    pg = object()
    out = SyncBatchNorm.convert_sync_batchnorm(net, process_group=pg)
    assert [type(out[i]) for i in range(3)] == [SyncBatchNorm] * 3
    assert all(out[i].process_group is pg for i in range(3))
    assert [out[i] for i in range(3, 10)] == kept  # the same objects
    # torch's own converter replaces every _BatchNorm (ghost, renorm, ... included): syncnorm's does not
    assert type(nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(GhostBatchNorm(4, virtual_batch_size=2)))[0]) \
        is nn.SyncBatchNorm


# --------------------------------------------------------------- norm + activation subclasses

@pytest.mark.parametrize("kind", KINDS)
def test_act_subclass_keeps_its_activation_under_every_kind(kind):
    net = _act_net()
    act, drop = net[1].act, net[1].drop
    ref = net(X)
    original = net[1]
    out = convert_norms(net, kind, **OPTIONS.get(kind, {}))
    layer = out[1]
    if kind == "batch":  # already a batch norm of its original class: kept as it is
        assert layer is original
        return
    assert type(layer) is not NormAct2d and layer.act is act and layer.drop is drop
    # the new layer applies drop then act after its own norm, in eval and in training
    h = out[0](X).detach()
    for mode in (False, True):
        layer.train(mode)
        state = copy.deepcopy(layer.state_dict())
        torch.manual_seed(5)
        got = layer(h)
        layer.load_state_dict(state)  # the same running statistics for the second call
        torch.manual_seed(5)
        plain = layer.forward(h)  # forward() alone: the norm without the hook
        torch.testing.assert_close(got, act(drop(plain)), rtol=0, atol=1e-6)
        layer.load_state_dict(state)
    out.eval()
    if kind in SAME_IN_EVAL:
        torch.testing.assert_close(out(X), ref, rtol=0, atol=1e-5)
    back = revert_norms(out)
    assert type(back[1]) is NormAct2d and back[1].act is act and back[1].drop is drop
    assert type(back[3]) is nn.BatchNorm2d and not back[1]._forward_hooks
    if kind in SAME_IN_EVAL:
        torch.testing.assert_close(back(X), ref, rtol=0, atol=1e-5)


def test_act_subclass_under_convert_sync_batchnorm_and_training():
    net, ref_net = _act_net(), _act_net()
    out = SyncBatchNorm.convert_sync_batchnorm(net)
    assert type(out[1]) is SyncBatchNorm and isinstance(out[1].act, nn.SiLU)
    torch.testing.assert_close(out(X), ref_net(X), rtol=0, atol=1e-5)
    out.train(), ref_net.train()
    torch.manual_seed(7)
    y = out(X)
    torch.manual_seed(7)
    y_ref = ref_net(X)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-5)  # same dropout mask, same statistics
    torch.testing.assert_close(out[1].running_var, ref_net[1].running_var, rtol=0, atol=1e-6)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    torch.testing.assert_close(out[0].weight.grad, ref_net[0].weight.grad, rtol=1e-4, atol=1e-5)
    assert type(revert_norms(out)[1]) is NormAct2d


def test_act_layer_state_dict_keys_pickling_and_parameters():
    net = _act_net(act_layer=nn.PReLU, drop_rate=0.0)  # an activation with a parameter
    keys = list(net.state_dict())
    out = convert_norms(net, "sync")
    assert list(out.state_dict()) == keys and "1.act.weight" in keys
    assert any(p is out[1].act.weight for p in out.parameters())  # optimizers see it
    again = pickle.loads(pickle.dumps(out))  # ddp_spawn pickles the model
    torch.testing.assert_close(again(X), out(X), rtol=0, atol=0)
    torch.testing.assert_close(copy.deepcopy(out)(X), out(X), rtol=0, atol=0)


def test_unknown_child_of_a_subclass_is_refused():
    class Gated(nn.BatchNorm2d):
        def __init__(self, c):
            super().__init__(c)
            self.gate = nn.Conv2d(c, c, 1)

        def forward(self, x):
            return super().forward(x) * torch.sigmoid(self.gate(x))

    for run in (lambda m: convert_norms(m, "ghost", virtual_batch_size=2), SyncBatchNorm.convert_sync_batchnorm):
        net = nn.Sequential(Gated(4))
        with pytest.raises(ValueError, match=r"Gated '0' has child modules \['gate'\].*\['drop', 'act'\]"):
            run(net)
        assert type(net[0]) is Gated


def test_children_of_torch_classes_move_along_unapplied():
    bn = nn.BatchNorm2d(4)
    bn.act = nn.ReLU()  # torch's forward ignores it: so does the converted layer (as in torch's converter)
    net = _randomize(nn.Sequential(bn))
    x = torch.randn(4, 4, 3, 3)
    ref = net(x)
    out = convert_norms(net, "sync")
    assert out[0].act is bn.act and not out[0]._forward_hooks
    torch.testing.assert_close(out(x), ref, rtol=0, atol=1e-5)
    assert TAIL == ("drop", "act")


# ------------------------------------------------------------------------ frozen look-alikes

def _frozen_net() -> nn.Sequential:
    torch.manual_seed(0)
    return _randomize(nn.Sequential(nn.Conv2d(3, 6, 3), TorchvisionFrozenBN(6), nn.ReLU(), nn.Conv2d(6, 4, 1),
                                    TorchvisionFrozenBN(4)))


@pytest.mark.parametrize("kind", ["sync", "batch", "frozen"])
def test_torchvision_frozen_converts_and_comes_back(kind):
    net = _frozen_net()
    ref, buffers = net(X), {k: v.clone() for k, v in net.state_dict().items()}
    out = convert_norms(net, kind)
    expected = {"sync": SyncBatchNorm, "batch": nn.BatchNorm2d, "frozen": FrozenBatchNorm}[kind]
    assert type(out[1]) is expected and type(out[4]) is expected and out[1].num_features == 6
    if kind != "frozen":  # trainable again
        assert isinstance(out[1].weight, nn.Parameter) and out[1].weight.requires_grad
        assert out[1].momentum == 0.1 and out[1].track_running_stats
    torch.testing.assert_close(out.eval()(X), ref, rtol=0, atol=1e-5)
    back = revert_norms(out)
    assert type(back[1]).__name__ == "FrozenBatchNorm2d" and type(back[1]) is TorchvisionFrozenBN
    assert not list(back[1].parameters()) and back[1].eps == 1e-5
    assert set(back.state_dict()) == set(buffers)
    for k, v in back.state_dict().items():
        torch.testing.assert_close(v, buffers[k], rtol=0, atol=0)
    torch.testing.assert_close(back(X), ref, rtol=0, atol=1e-5)


def test_frozen_look_alike_rule():
    assert is_frozen_look_alike(TorchvisionFrozenBN(4))
    assert not is_frozen_look_alike(FrozenBatchNorm(4))  # syncnorm's own: the frozen kind's builder
    assert syncnorm.factory.get_kind("frozen", "t").is_layer(FrozenBatchNorm(4))

    class FrozenBatchNormWithParam(TorchvisionFrozenBN):
        def __init__(self, c):
            super().__init__(c)
            self.extra = nn.Parameter(torch.ones(c))

    class AffineMap(nn.Module):  # the right buffers under another name: not recognized
        def __init__(self, c):
            super().__init__()
            for name in ("weight", "bias", "running_mean", "running_var"):
                self.register_buffer(name, torch.ones(c))
            self.eps = 1e-5

    mismatched = TorchvisionFrozenBN(4)
    mismatched.running_var = torch.ones(5)
    for module in (FrozenBatchNormWithParam(4), AffineMap(4), mismatched, nn.BatchNorm2d(4)):
        assert not is_frozen_look_alike(module), type(module).__name__
    net = nn.Sequential(AffineMap(4))
    assert convert_norms(net, "sync")[0] is net[0]  # left alone
