"""The benchmark's networks: ResNet-18 (32x32 inputs) and ResNet-50, with BatchNorm2d norms.

ResNet-50 comes from :func:`syncnorm.models.resnet.build_resnet` (small stem, configurable width).
For ResNet-18:

Uses :func:`syncnorm.models.resnet.build_resnet` when that module exists and builds plain
``torch.nn.BatchNorm2d`` layers through it; otherwise a compact ResNet-18 defined here (CIFAR
layout: 3x3 stem without max-pool, four stages of two basic blocks, 64-128-256-512 channels,
20 batch-norm layers with 4,800 channels in total). Either way every variant of the benchmark starts
from a model whose norm layers are exactly ``torch.nn.BatchNorm2d``.
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch
from torch import Tensor, nn

__all__ = ["MODELS", "build_model", "bn_layers"]

NormBuilder = Callable[[int], nn.Module]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (1x1 projection when the shape changes)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, norm: NormBuilder) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = norm(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), norm(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class SmallResNet18(nn.Module):
    """ResNet-18 with the small (CIFAR) stem; ``norm(num_channels)`` builds every norm layer."""

    def __init__(self, num_classes: int = 10, norm: NormBuilder = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = norm(64)
        self.relu = nn.ReLU(inplace=True)
        stages, in_ch = [], 64
        for i, ch in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(in_ch, ch, stride, norm), BasicBlock(ch, ch, 1, norm)))
            in_ch = ch
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def bn_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """``(qualified name, layer)`` of every batch-norm layer (torch's or syncnorm's), in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


MODELS = ("resnet18", "resnet50")


def build_model(name: str, num_classes: int = 10, width: int = 64) -> tuple[nn.Module, str]:
    """Build ``name`` (``"resnet18"`` or ``"resnet50"``) with ``torch.nn.BatchNorm2d`` norms.

    ``width`` is the first stage's channel count (64: the standard layout; ResNet-50 then has 53
    batch-norm layers with 26,560 channels, ResNet-18 20 with 4,800). Both use the small stem (3x3
    conv, no max pool).
    Returns the model and a short description of where it came from (for the results file).

    Raises:
        ValueError: an unknown model name.
        ImportError, RuntimeError: ``resnet50`` when :mod:`syncnorm.models.resnet` cannot build it
            (ResNet-18 falls back to a local definition instead).
    """
    if name not in MODELS:
        raise ValueError(f"syncnorm.bench: expected --model in {list(MODELS)}, got {name!r}")
    if name == "resnet50":
        from syncnorm.models.resnet import build_resnet

        # zero-initialised last norm of each block (Goyal et al.): the usual ResNet-50 recipe; without
        # it this small-image, small-batch network has gradient norms ~250 whose float32 rounding
        # (~1 % relative, in any BN implementation) makes the step-2 parity check meaningless
        model = build_resnet(50, num_classes=num_classes, norm=nn.BatchNorm2d, stem="small", width=width,
                             zero_init_residual=True)
        kinds = {type(m) for _, m in bn_layers(model)}
        if kinds != {nn.BatchNorm2d}:
            raise RuntimeError(f"build_resnet gave norm layers {sorted(k.__name__ for k in kinds)}, not BatchNorm2d")
        return model, f"syncnorm.models.resnet.build_resnet(50, stem='small', width={width}, zero_init_residual=True)"
    # The model package is developed alongside the benchmark: when it is missing or broken, fall
    # back to the local definition (width 64 only) and say why in the results instead of failing.
    try:
        resnet = importlib.import_module("syncnorm.models.resnet")
    except ModuleNotFoundError:
        resnet, reason = None, "syncnorm.models.resnet not found"
    except Exception as err:  # noqa: BLE001 - reported in the results
        resnet, reason = None, f"import failed: {err!r}"
    else:
        reason = "syncnorm.models.resnet.build_resnet not found"
    if resnet is not None and hasattr(resnet, "build_resnet"):
        try:
            model = resnet.build_resnet(18, num_classes=num_classes, norm=nn.BatchNorm2d, stem="small", width=width)
        except Exception as err:  # noqa: BLE001 - reported in the results
            reason = f"syncnorm.models.resnet.build_resnet failed: {err!r}"
        else:
            kinds = {type(m) for _, m in bn_layers(model)}
            if kinds == {nn.BatchNorm2d}:
                return model, f"syncnorm.models.resnet.build_resnet(18, stem='small', width={width})"
            reason = f"build_resnet gave norm layers {sorted(k.__name__ for k in kinds)}, not BatchNorm2d"
    if width != 64:
        raise ValueError(f"syncnorm.bench: resnet18 with width {width} needs syncnorm.models.resnet ({reason})")
    return SmallResNet18(num_classes), f"syncnorm.bench._resnet.SmallResNet18 ({reason})"
