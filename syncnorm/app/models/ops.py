"""Small detection ops: box conversions, IoU, GIoU loss, NMS and mAP@IoU.

Written in plain torch so the project needs no torchvision. Boxes are ``(x1, y1, x2, y2)``
("xyxy", pixels, ``x1 <= x2``, ``y1 <= y2``) unless a name says ``cxcywh``. Semantics follow
``torchvision.ops`` where a function of the same name exists there.

Example::

    >>> import torch
    >>> boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]])
    >>> nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)
    tensor([0, 2])
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

__all__ = [
    "box_area",
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "box_iou",
    "generalized_box_iou_loss",
    "nms",
    "batched_nms",
    "average_precision_per_class",
    "mean_average_precision",
]


def _check_boxes(name: str, boxes: Tensor) -> None:
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name}: expected boxes of shape (K, 4), got {tuple(boxes.shape)}")


def box_area(boxes: Tensor) -> Tensor:
    """Area of xyxy boxes ``(..., 4) -> (...)``; inverted boxes count as 0."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``(cx, cy, w, h) -> (x1, y1, x2, y2)`` over the last dim."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """``(x1, y1, x2, y2) -> (cx, cy, w, h)`` over the last dim."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise intersection over union of two sets of xyxy boxes.

    Args:
        boxes1: ``(N, 4)``.
        boxes2: ``(M, 4)``.

    Returns:
        ``(N, M)`` IoU; a pair whose union is empty has IoU 0.

    Example::

        >>> box_iou(torch.tensor([[0.0, 0, 2, 2]]), torch.tensor([[1.0, 1, 3, 3]]))
        tensor([[0.1429]])
    """
    _check_boxes("box_iou", boxes1)
    _check_boxes("box_iou", boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(boxes1)[:, None] + box_area(boxes2)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(inter.dtype).tiny), torch.zeros_like(inter))


def generalized_box_iou_loss(boxes1: Tensor, boxes2: Tensor, reduction: str = "none", eps: float = 1e-7) -> Tensor:
    """``1 - GIoU`` of matched pairs of xyxy boxes (Rezatofighi et al., 2019), as in torchvision.

    Args:
        boxes1: ``(..., 4)`` predicted boxes.
        boxes2: ``(..., 4)`` target boxes, same shape.
        reduction: ``"none"``, ``"mean"`` or ``"sum"``. Default: ``"none"``.
        eps: added to the union and the enclosing area. Default: ``1e-7``.

    Returns:
        The loss, in ``[0, 2]``, per pair or reduced.

    Raises:
        ValueError: shapes differ or ``reduction`` is unknown.
    """
    if boxes1.shape != boxes2.shape or boxes1.shape[-1:] != (4,):
        raise ValueError(
            f"generalized_box_iou_loss: expected two (..., 4) tensors of equal shape, "
            f"got {tuple(boxes1.shape)} and {tuple(boxes2.shape)}"
        )
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"generalized_box_iou_loss: expected reduction in ['none', 'mean', 'sum'], got {reduction!r}")
    lt = torch.max(boxes1[..., :2], boxes2[..., :2])
    rb = torch.min(boxes1[..., 2:], boxes2[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(boxes1) + box_area(boxes2) - inter
    iou = inter / (union + eps)
    enc = (torch.max(boxes1[..., 2:], boxes2[..., 2:]) - torch.min(boxes1[..., :2], boxes2[..., :2])).clamp(min=0)
    enc_area = enc[..., 0] * enc[..., 1]
    loss = 1 - (iou - (enc_area - union) / (enc_area + eps))
    if reduction == "mean":
        return loss.mean() if loss.numel() else loss.sum()
    return loss.sum() if reduction == "sum" else loss


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression, same semantics as ``torchvision.ops.nms``.

    Boxes are visited by decreasing score; each kept box removes every later box whose IoU with it
    is strictly greater than ``iou_threshold``.

    Args:
        boxes: ``(K, 4)`` xyxy.
        scores: ``(K,)``.
        iou_threshold: suppression threshold.

    Returns:
        int64 indices of the kept boxes, sorted by decreasing score.

    Raises:
        ValueError: ``boxes`` is not ``(K, 4)`` or ``scores`` is not ``(K,)``.
    """
    _check_boxes("nms", boxes)
    if scores.shape != boxes.shape[:1]:
        raise ValueError(f"nms: expected scores of shape ({boxes.shape[0]},), got {tuple(scores.shape)}")
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    iou = box_iou(boxes[order], boxes[order])
    suppressed = torch.zeros(order.numel(), dtype=torch.bool, device=boxes.device)
    keep = []
    for i in range(order.numel()):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou[i] > iou_threshold
    return order[torch.tensor(keep, dtype=torch.int64, device=boxes.device)]


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS run independently per category ``idxs`` (boxes of different categories never suppress).

    Same contract as ``torchvision.ops.batched_nms``: returns int64 indices into ``boxes``, sorted
    by decreasing score.
    """
    _check_boxes("batched_nms", boxes)
    if idxs.shape != boxes.shape[:1]:
        raise ValueError(f"batched_nms: expected idxs of shape ({boxes.shape[0]},), got {tuple(idxs.shape)}")
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    # Shift each category to its own region of the plane so boxes of different categories are disjoint.
    offsets = idxs.to(boxes) * (boxes.max() - boxes.min() + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def _average_precision(tp: Tensor, num_gt: int) -> float:
    """All-point interpolated AP from a TP (1) / FP (0) vector ordered by decreasing score."""
    if num_gt == 0 or tp.numel() == 0:
        return 0.0
    tp = tp.double()
    ctp = torch.cumsum(tp, 0)
    cfp = torch.cumsum(1 - tp, 0)
    recall = ctp / num_gt
    precision = ctp / (ctp + cfp)
    mrec = torch.cat((recall.new_zeros(1), recall, recall.new_ones(1)))
    mpre = torch.cat((precision.new_zeros(1), precision, precision.new_zeros(1)))
    mpre = torch.flip(torch.cummax(torch.flip(mpre, (0,)), 0).values, (0,))  # precision envelope
    return float(torch.sum((mrec[1:] - mrec[:-1]) * mpre[1:]))


def average_precision_per_class(
    preds: Sequence[Mapping[str, Tensor]],
    targets: Sequence[Mapping[str, Tensor]],
    iou_threshold: float = 0.5,
) -> dict[int, float]:
    """AP at one IoU threshold for every class that has ground truth.

    Matching is VOC-style: over all images, a class's predictions are visited by decreasing score;
    each is a true positive when its best-IoU ground-truth box of that class in the same image has
    IoU ``>= iou_threshold`` and was not matched before, otherwise a false positive. AP is the area
    under the all-point interpolated precision/recall curve (VOC 2010+, COCO's ``AP50`` without the
    101-point sampling). A class with ground truth but no prediction has AP 0; predicted classes
    without ground truth are ignored.

    Args:
        preds: one dict per image: ``boxes (K, 4)`` xyxy, ``scores (K,)``, ``labels (K,)``.
        targets: one dict per image: ``boxes (G, 4)`` xyxy, ``labels (G,)``.
        iou_threshold: IoU needed for a match. Default: 0.5.

    Returns:
        ``{class_id: AP}`` for the classes present in ``targets``.

    Raises:
        ValueError: ``preds`` and ``targets`` have different lengths.
    """
    if len(preds) != len(targets):
        raise ValueError(f"mean_average_precision: expected one prediction per target image, "
                         f"got {len(preds)} predictions for {len(targets)} targets")
    classes = sorted({int(c) for t in targets for c in t["labels"].reshape(-1).tolist()})
    result: dict[int, float] = {}
    for c in classes:
        records = []  # (score, image index, box)
        gt_boxes, matched, num_gt = [], [], 0
        for i, (p, t) in enumerate(zip(preds, targets)):
            g = t["boxes"].reshape(-1, 4)[t["labels"].reshape(-1) == c].double()
            gt_boxes.append(g)
            matched.append(torch.zeros(g.shape[0], dtype=torch.bool))
            num_gt += g.shape[0]
            sel = p["labels"].reshape(-1) == c
            for s, b in zip(p["scores"].reshape(-1)[sel].tolist(), p["boxes"].reshape(-1, 4)[sel].double()):
                records.append((s, i, b))
        records.sort(key=lambda r: -r[0])  # stable: ties keep image order
        tp = torch.zeros(len(records))
        for k, (_, i, b) in enumerate(records):
            if gt_boxes[i].shape[0] == 0:
                continue
            ious = box_iou(b[None], gt_boxes[i])[0]
            best = int(torch.argmax(ious))
            if ious[best] >= iou_threshold and not matched[i][best]:
                matched[i][best] = True
                tp[k] = 1.0
        result[c] = _average_precision(tp, num_gt)
    return result


def mean_average_precision(
    preds: Sequence[Mapping[str, Tensor]],
    targets: Sequence[Mapping[str, Tensor]],
    iou_threshold: float = 0.5,
) -> float:
    """mAP at one IoU threshold: :func:`average_precision_per_class` averaged over classes with
    ground truth (0.0 when no image has any ground truth).

    Example::

        >>> t = [{"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([0])}]
        >>> p = [{"boxes": torch.tensor([[30.0, 30, 40, 40], [0, 0, 10, 10]]),
        ...       "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([0, 0])}]
        >>> mean_average_precision(p, t)  # a false positive ranked first: precision 1/2 at recall 1
        0.5
    """
    aps = average_precision_per_class(preds, targets, iou_threshold)
    return sum(aps.values()) / len(aps) if aps else 0.0
