"""Models for syncnorm's training app: ResNet classifiers, a small YOLO-style detector, detection ops,
and the LightningModules that train them (:mod:`syncnorm.app.models.lit_module`).

The LightningModules are imported lazily (on first access), so the networks and ops do not need
pytorch-lightning.

Every network takes ``norm=`` (a kind string or a callable taking ``num_features`` first), resolved
through :func:`syncnorm.factory.get_norm_layer`, so a config only has to name the norm kind.
"""

from .ops import (
    average_precision_per_class,
    batched_nms,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    generalized_box_iou_loss,
    mean_average_precision,
    nms,
)
from .resnet import BasicBlock, Bottleneck, ResNet, build_resnet, resnet18, resnet50
from .yolo import YOLO

__all__ = [
    "ClassificationModule",
    "DetectionModule",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "build_resnet",
    "resnet18",
    "resnet50",
    "YOLO",
    "box_iou",
    "nms",
    "batched_nms",
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "generalized_box_iou_loss",
    "average_precision_per_class",
    "mean_average_precision",
]


_LIGHTNING = ("ClassificationModule", "DetectionModule")


def __getattr__(name: str):
    if name in _LIGHTNING:  # lazy: pytorch-lightning is an optional dependency
        from . import lit_module

        return getattr(lit_module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
