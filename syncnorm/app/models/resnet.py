"""ResNet-18 and ResNet-50 with a pluggable normalization layer.

The layout and the parameter names follow torchvision (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer1.0.bn1``, ``layer1.0.downsample.0``/``.1``, ``fc``), so checkpoints look familiar and a
config only has to name the norm kind. ``norm`` is anything :func:`syncnorm.factory.get_norm_layer`
accepts: a kind string (``"batch"``, ``"sync"``, ``"group"``, ...) or a callable taking the channel
count first.

Two stems are offered: ``"imagenet"`` (7x7 conv, stride 2, then a 3x3 max pool; input downsampled
32x overall) and ``"small"`` (3x3 conv, stride 1, no max pool; downsampled 8x overall), which suits
8x8 to 32x32 images such as the digits or CIFAR.

Example::

    >>> import torch
    >>> from syncnorm.app.models import build_resnet
    >>> model = build_resnet(18, num_classes=10, width=8, stem="small")
    >>> model(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from types import MappingProxyType
from typing import Callable, Mapping, Optional, Sequence, Type, Union

import torch
from torch import Tensor, nn

from syncnorm.factory import NormSpec, get_norm_layer

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet50", "build_resnet", "RESNET_DEPTHS"]

NormMaker = Callable[[int], nn.Module]

STEMS = ("small", "imagenet")


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class _ResidualBlock(nn.Module, ABC):
    """``relu(residual(x) + shortcut(x))``: the frame of both ResNet blocks.

    Args:
        inplanes: input channels.
        planes: the block's width; it outputs ``planes * expansion`` channels.
        stride: stride of the block's strided conv (and of the projection). Default: 1.
        downsample: projection applied to the shortcut when shapes differ. Default: ``None``.
        norm_layer: ``make(num_features) -> nn.Module``. Default: ``nn.BatchNorm2d``.
    """

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        norm_layer: NormMaker = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self._build(inplanes, planes, stride, norm_layer)  # torchvision's names, in its order
        self.downsample = downsample
        self.stride = stride

    @abstractmethod
    def _build(self, inplanes: int, planes: int, stride: int, norm_layer: NormMaker) -> None:
        """Create the block's layers (torchvision's names, in its order)."""

    @abstractmethod
    def _residual(self, x: Tensor) -> Tensor:
        """The residual branch."""

    @abstractmethod
    def last_norm(self) -> nn.Module:
        """The norm layer just before the residual sum (zero-initialised on request)."""

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self._residual(x) + identity)


class BasicBlock(_ResidualBlock):
    """Two 3x3 conv-norm pairs with an identity (or projected) shortcut; ResNet-18/34's block
    (``expansion = 1``; arguments as in :class:`_ResidualBlock`)."""

    expansion = 1

    def _build(self, inplanes: int, planes: int, stride: int, norm_layer: NormMaker) -> None:
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)

    def last_norm(self) -> nn.Module:
        return self.bn2

    def _residual(self, x: Tensor) -> Tensor:
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))


class Bottleneck(_ResidualBlock):
    """1x1 reduce, 3x3, 1x1 expand (``expansion = 4``), stride on the 3x3 conv as in torchvision
    (arguments as in :class:`_ResidualBlock`; ``planes`` is the bottleneck width)."""

    expansion = 4

    def _build(self, inplanes: int, planes: int, stride: int, norm_layer: NormMaker) -> None:
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = norm_layer(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = norm_layer(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)

    def last_norm(self) -> nn.Module:
        return self.bn3

    def _residual(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))


Block = Union[Type[BasicBlock], Type[Bottleneck]]


class ResNet(nn.Module):
    """A ResNet classifier with torchvision's module names and a pluggable norm layer.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: number of blocks in each of the four stages, e.g. ``[2, 2, 2, 2]``.
        num_classes: size of the classifier output.
        in_channels: input image channels. Default: 3.
        norm: norm kind or callable taking ``num_features`` first (see
            :func:`syncnorm.factory.get_norm_layer`). Default: ``"batch"``.
        stem: ``"small"`` (3x3 conv, stride 1, no max pool) or ``"imagenet"`` (7x7 conv, stride 2,
            3x3 max pool). Default: ``"small"``.
        width: channels of the first stage; the stages use ``width * (1, 2, 4, 8)``. Default: 64.
        zero_init_residual: zero the weight of the last norm layer in every residual block, so each
            block starts as the identity. Default: ``False``.

    Shape:
        - Input: ``(N, in_channels, H, W)``.
        - Output: ``(N, num_classes)``.

    Raises:
        ValueError: a non-positive size, an empty or wrong-length ``layers``, or an unknown ``stem``.
    """

    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        num_classes: int,
        in_channels: int = 3,
        norm: NormSpec = "batch",
        stem: str = "small",
        width: int = 64,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("in_channels", in_channels), ("width", width)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ResNet: expected {name} to be a positive int, got {value!r}")
        if len(layers) != 4 or any(int(n) < 1 for n in layers):
            raise ValueError(f"ResNet: expected 4 positive stage lengths, got {list(layers)}")
        if stem not in STEMS:
            raise ValueError(f"ResNet: expected stem in {list(STEMS)}, got {stem!r}")
        make = get_norm_layer(norm)
        self.stem = stem
        self.inplanes = width
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = _conv3x3(in_channels, width)
            self.maxpool = nn.Identity()
        self.bn1 = make(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, width, layers[0], 1, make)
        self.layer2 = self._make_layer(block, width * 2, layers[1], 2, make)
        self.layer3 = self._make_layer(block, width * 4, layers[2], 2, make)
        self.layer4 = self._make_layer(block, width * 8, layers[3], 2, make)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)
        self._init_weights(zero_init_residual)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int, make: NormMaker) -> nn.Sequential:
        downsample = None
        out = planes * block.expansion
        if stride != 1 or self.inplanes != out:
            downsample = nn.Sequential(_conv1x1(self.inplanes, out, stride), make(out))
        layers = [block(self.inplanes, planes, stride, downsample, make)]
        self.inplanes = out
        layers += [block(out, planes, 1, None, make) for _ in range(1, int(blocks))]
        return nn.Sequential(*layers)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    weight = getattr(m.last_norm(), "weight", None)
                    if isinstance(weight, Tensor):
                        nn.init.zeros_(weight)

    def forward_features(self, x: Tensor) -> Tensor:
        """The pooled, flattened features before ``fc``: ``(N, width * 8 * expansion)``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.conv1.in_channels:
            raise ValueError(
                f"ResNet: expected input (N, {self.conv1.in_channels}, H, W), got {tuple(x.shape)}"
            )
        return self.fc(self.forward_features(x))


#: depth -> (block, blocks per stage); read-only.
RESNET_DEPTHS: Mapping[int, tuple[Block, tuple[int, ...]]] = MappingProxyType(
    {18: (BasicBlock, (2, 2, 2, 2)), 50: (Bottleneck, (3, 4, 6, 3))}
)


def build_resnet(depth: int, **kwargs) -> ResNet:
    """Build the ResNet of the given depth; ``kwargs`` go to :class:`ResNet`.

    Args:
        depth: 18 (BasicBlock, ``[2, 2, 2, 2]``) or 50 (Bottleneck, ``[3, 4, 6, 3]``).
        **kwargs: ``num_classes`` (required), ``in_channels``, ``norm``, ``stem``, ``width``,
            ``zero_init_residual``.

    Raises:
        ValueError: ``depth`` is not one of the valid depths (the message lists them).

    Example::

        >>> model = build_resnet(50, num_classes=10, width=4, norm="group")
        >>> norm = model.layer1[0].downsample[1]
        >>> type(norm).__name__, norm.num_groups, norm.num_channels
        ('GroupNorm', 16, 16)
    """
    if depth not in RESNET_DEPTHS:
        raise ValueError(f"build_resnet: expected depth in {sorted(RESNET_DEPTHS)}, got {depth!r}")
    block, layers = RESNET_DEPTHS[depth]
    return ResNet(block, layers, **kwargs)


def resnet18(num_classes: int, **kwargs) -> ResNet:
    """ResNet-18: :class:`BasicBlock`, ``[2, 2, 2, 2]``. ``kwargs`` go to :class:`ResNet`."""
    return build_resnet(18, num_classes=num_classes, **kwargs)


def resnet50(num_classes: int, **kwargs) -> ResNet:
    """ResNet-50: :class:`Bottleneck`, ``[3, 4, 6, 3]``. ``kwargs`` go to :class:`ResNet`."""
    return build_resnet(50, num_classes=num_classes, **kwargs)
