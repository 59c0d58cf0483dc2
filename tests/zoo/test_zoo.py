"""Optional model-zoo group (marker ``zoo``): every conversion kind on real timm and torchvision CNNs.

Runs only where ``timm`` and ``torchvision`` import (the default suite skips this module with a
message saying so). Models are built with random weights (``pretrained=False`` / ``weights=None``:
nothing is downloaded), their norm layers get non-trivial running statistics and affine values,
and they run in eval mode. For each kind:

* the kinds whose eval function is batch norm's with the same tensors and kernel (``SAME_IN_EVAL``:
  sync, batch, ghost, renorm, frozen) leave the outputs unchanged (max abs difference <= ``TOL``);
  batch_instance (its gate starts at 1: batch norm, computed as normalize-then-affine, another
  rounding) within ``TOL`` relative to the largest output (cspdarknet53's logits reach ~5e3);
* every kind (group and switchable too, whose function changes by design) reverts to exactly the
  original classes with the original activation modules (the same objects), and the reverted model
  gives the original outputs (not for group, which keeps no running statistics).

``python -m tests.zoo.test_zoo`` prints the table (model x kind: max eval difference, revert ok).
"""

from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch
from torch import nn

try:
    import timm
    import torchvision
    from torchvision.ops.misc import FrozenBatchNorm2d
except ImportError as e:  # the optional group: explicit, module-level skip
    pytest.skip(f"optional zoo group (tests/zoo, marker 'zoo'): needs timm and torchvision, not importable here "
                f"({e}); install them (pip install timm torchvision) to run it", allow_module_level=True)

import syncnorm
from tests.helpers.models import randomize_norms

pytestmark = pytest.mark.zoo

TOL = 1e-5
KINDS = ["sync", "batch", "ghost", "renorm", "frozen", "batch_instance", "switchable", "group"]
OPTIONS = {"ghost": {"virtual_batch_size": 2}, "group": {"num_groups": 8}}
SAME_IN_EVAL = {"sync", "batch", "ghost", "renorm", "frozen"}
SAME_UP_TO_ROUNDING = {"batch_instance"}
KEEPS_STATS = set(KINDS) - {"group"}

MODELS: dict[str, Callable[[], nn.Module]] = {
    "timm/efficientnet_b0": lambda: timm.create_model("efficientnet_b0", pretrained=False),
    "timm/mobilenetv3_small_100": lambda: timm.create_model("mobilenetv3_small_100", pretrained=False),
    "timm/regnetx_002": lambda: timm.create_model("regnetx_002", pretrained=False),
    "timm/cspdarknet53": lambda: timm.create_model("cspdarknet53", pretrained=False),
    "timm/resnet18": lambda: timm.create_model("resnet18", pretrained=False),
    "torchvision/resnet18": lambda: torchvision.models.resnet18(weights=None),
    "torchvision/mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(weights=None),
    "torchvision/resnet18_frozen_bn": lambda: torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d),
}

_BUILT: dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor]] = {}


def _randomize(model: nn.Module) -> nn.Module:
    """Narrow ranges: deep pretrained-style models stay in float32's comfortable range."""
    return randomize_norms(model, seed=0, values=(("running_mean", -0.2, 0.2), ("running_var", 0.5, 1.5),
                                                  ("weight", 0.8, 1.2), ("bias", -0.1, 0.1)))


def _model(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """``(model, input, reference output)``; built once per model (tests convert deep copies)."""
    if name not in _BUILT:
        torch.manual_seed(0)
        model = _randomize(MODELS[name]())
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            _BUILT[name] = (model, x, model(x))
    return _BUILT[name]


def _acts(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if n.endswith((".act", ".drop"))}


def check(name: str, kind: str) -> dict:
    """Convert a copy of ``name`` to ``kind`` and back: the figures the tests assert on."""
    model, x, ref = _model(name)
    model = copy.deepcopy(model)
    classes = {n: type(m) for n, m in model.named_modules()}
    acts = _acts(model)
    converted = syncnorm.convert_norms(model, kind, **OPTIONS.get(kind, {}))
    with torch.no_grad():
        diff = float((converted(x) - ref).abs().max())
        kinds = {type(m).__name__ for m in converted.modules() if syncnorm.factory.get_kind(kind, "t").is_layer(m)}
        reverted = syncnorm.revert_norms(converted)
        back_diff = float((reverted(x) - ref).abs().max())
    back_classes = {n: type(m) for n, m in reverted.named_modules()}
    back_acts = _acts(reverted)
    return {"diff": diff, "back_diff": back_diff, "kinds": kinds,
            "classes_ok": back_classes == classes,
            "acts_ok": back_acts.keys() == acts.keys() and all(back_acts[k] is acts[k] for k in acts),
            "class_diff": {n: (classes.get(n), back_classes.get(n)) for n in set(classes) | set(back_classes)
                           if classes.get(n) is not back_classes.get(n)}}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(MODELS))
def test_every_kind_keeps_eval_outputs_and_reverts(name, kind):
    r = check(name, kind)
    assert r["classes_ok"], f"revert gave other classes: {dict(list(r['class_diff'].items())[:5])}"
    assert r["acts_ok"], "revert did not give back the original activation/drop modules"
    if kind in SAME_IN_EVAL:
        assert r["diff"] <= TOL, f"{name} as {kind}: eval outputs moved by {r['diff']:.3g}"
    if kind in SAME_UP_TO_ROUNDING:
        scale = float(_model(name)[2].abs().max())
        assert r["diff"] <= TOL * max(1.0, scale), f"{name} as {kind}: moved by {r['diff']:.3g} (outputs up to {scale:.3g})"
    if kind in KEEPS_STATS:
        assert r["back_diff"] <= TOL, f"{name} reverted from {kind}: eval outputs moved by {r['back_diff']:.3g}"


@pytest.mark.parametrize("name", [n for n in MODELS if not n.endswith("frozen_bn")])
def test_convert_sync_batchnorm_keeps_activations(name):
    model, x, ref = _model(name)
    model = copy.deepcopy(model)
    acts = _acts(model)
    out = syncnorm.SyncBatchNorm.convert_sync_batchnorm(model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, syncnorm.SyncBatchNorm)
                   for m in out.modules())
    assert all(_acts(out)[k] is v for k, v in acts.items())
    with torch.no_grad():
        assert float((out(x) - ref).abs().max()) <= TOL


def test_frozen_bn_resnet_becomes_trainable_and_comes_back():
    model, x, ref = _model("torchvision/resnet18_frozen_bn")
    for kind, cls in (("sync", syncnorm.SyncBatchNorm), ("batch", nn.BatchNorm2d)):
        m = syncnorm.convert_norms(copy.deepcopy(model), kind)
        layers = [l for l in m.modules() if isinstance(l, cls)]
        assert len(layers) == 20 and not any(isinstance(l, FrozenBatchNorm2d) for l in m.modules())
        assert all(l.weight.requires_grad and isinstance(l.weight, nn.Parameter) for l in layers)
        with torch.no_grad():
            assert float((m(x) - ref).abs().max()) <= TOL
        back = syncnorm.revert_norms(m)
        assert sum(isinstance(l, FrozenBatchNorm2d) for l in back.modules()) == 20
        assert not any(isinstance(l, nn.modules.batchnorm._BatchNorm) for l in back.modules())


def main() -> None:
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}")
    print("| model | " + " | ".join(KINDS) + " |")
    print("|---|" + "---|" * len(KINDS))
    for name in MODELS:
        cells = []
        for kind in KINDS:
            r = check(name, kind)
            ok = r["classes_ok"] and r["acts_ok"] and (kind not in KEEPS_STATS or r["back_diff"] <= TOL)
            cells.append(f"{r['diff']:.1e} / {'ok' if ok else 'FAIL'}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
