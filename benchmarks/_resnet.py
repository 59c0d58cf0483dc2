"""The benchmark's networks: ResNet-18 and ResNet-50 with ``torch.nn.BatchNorm2d`` norms, built by
the app's :func:`syncnorm.app.models.resnet.build_resnet` (small stem: 3x3 conv, no max pool)."""

from __future__ import annotations

from torch import nn

from syncnorm.app.models.resnet import build_resnet

__all__ = ["MODELS", "build_model", "bn_layers"]

MODELS = ("resnet18", "resnet50")


def bn_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """``(qualified name, layer)`` of every batch-norm layer (torch's or syncnorm's), in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def build_model(name: str, num_classes: int = 10, width: int = 64) -> tuple[nn.Module, str]:
    """Build ``name`` (``"resnet18"`` or ``"resnet50"``) with ``torch.nn.BatchNorm2d`` norms.

    ``width`` is the first stage's channel count (64: the standard layout; ResNet-50 then has 53
    batch-norm layers with 26,560 channels, ResNet-18 20 with 4,800). Returns the model and a short
    description of how it was built (for the results file).

    Raises:
        ValueError: an unknown model name.
    """
    if name not in MODELS:
        raise ValueError(f"benchmarks: expected --model in {list(MODELS)}, got {name!r}")
    depth = int(name[len("resnet"):])
    # ResNet-50: zero-initialised last norm of each block (Goyal et al.), the usual recipe; without it
    # this small-image, small-batch network has gradient norms ~250 whose float32 rounding (~1 %
    # relative, in any BN implementation) makes the step-2 parity check meaningless
    zero_init = depth == 50
    model = build_resnet(depth, num_classes=num_classes, norm=nn.BatchNorm2d, stem="small", width=width,
                         zero_init_residual=zero_init)
    extra = ", zero_init_residual=True" if zero_init else ""
    return model, f"syncnorm.app.models.resnet.build_resnet({depth}, stem='small', width={width}{extra})"
