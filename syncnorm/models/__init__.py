"""Models for syncnorm's training app: ResNet classifiers, a small YOLO-style detector, detection ops.

Every model takes ``norm=`` (a kind string or a callable taking ``num_features`` first), resolved
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
