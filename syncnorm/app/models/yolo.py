"""A small anchor-free YOLO-style detector with a pluggable normalization layer.

Layout (``w = width``, ``n = depth``):

* backbone: conv-norm-SiLU stem (stride 2), then three stages, each a stride-2 conv and a CSP block
  of ``n`` residual units, giving features at strides 8 (``4w`` channels) and 16 (``8w``);
* neck: PAN-lite over the two scales (top-down upsample + concat + CSP, then bottom-up stride-2 conv
  + concat + CSP);
* head: per scale, a conv-norm-SiLU and a 1x1 conv to ``5 + num_classes`` channels per grid cell:
  objectness, box ``(tx, ty, tw, th)`` and class logits. The box is decoded as
  ``cx = (gx + sigmoid(tx)) * s``, ``cy = (gy + sigmoid(ty)) * s``, ``w = exp(tw) * s``,
  ``h = exp(th) * s`` for the cell ``(gx, gy)`` at stride ``s``.

Training uses center sampling: each ground-truth box goes to the scale whose stride is closest (in
log scale) to its longer side divided by ``assign_ratio`` (default 2: boxes up to about 23 pixels at
stride 8, larger ones at stride 16), and the cell holding its center is the one positive (the
smaller box wins a shared cell). Objectness and classes use BCE, boxes GIoU; see :meth:`YOLO.loss`.

Example::

    >>> import torch
    >>> model = YOLO(num_classes=2, width=8)
    >>> outputs = model(torch.randn(2, 3, 64, 64))
    >>> [tuple(o.shape) for o in outputs]
    [(2, 7, 8, 8), (2, 7, 4, 4)]
    >>> targets = [{"boxes": torch.tensor([[8.0, 8, 30, 24]]), "labels": torch.tensor([1])}] * 2
    >>> sorted(model.loss(outputs, targets))
    ['loss', 'loss_box', 'loss_cls', 'loss_obj']
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from syncnorm.factory import NormSpec, get_norm_layer
from .ops import batched_nms, box_cxcywh_to_xyxy, generalized_box_iou_loss

__all__ = ["ConvNormAct", "CSPBlock", "YOLO"]


class ConvNormAct(nn.Module):
    """``Conv2d`` (no bias, same padding) -> norm -> SiLU.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: square kernel size. Default: 1.
        stride: conv stride. Default: 1.
        norm: norm kind or callable taking ``num_features`` first. Default: ``"batch"``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1, norm: NormSpec = "batch"
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False)
        self.bn = get_norm_layer(norm)(out_channels)
        self.act = nn.SiLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class _ResidualUnit(nn.Module):
    """1x1 then 3x3 conv-norm-SiLU with an identity shortcut."""

    def __init__(self, channels: int, norm: NormSpec) -> None:
        super().__init__()
        self.cv1 = ConvNormAct(channels, channels, 1, norm=norm)
        self.cv2 = ConvNormAct(channels, channels, 3, norm=norm)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.cv2(self.cv1(x))


class CSPBlock(nn.Module):
    """Cross-stage partial block (C3-like): half the channels go through ``depth`` residual units,
    half bypass them; the two halves are concatenated and fused by a 1x1 conv.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        depth: number of residual units. Default: 1.
        norm: norm kind or callable taking ``num_features`` first. Default: ``"batch"``.
    """

    def __init__(self, in_channels: int, out_channels: int, depth: int = 1, norm: NormSpec = "batch") -> None:
        super().__init__()
        hidden = max(out_channels // 2, 1)
        self.cv1 = ConvNormAct(in_channels, hidden, 1, norm=norm)
        self.cv2 = ConvNormAct(in_channels, hidden, 1, norm=norm)
        self.m = nn.Sequential(*(_ResidualUnit(hidden, norm) for _ in range(depth)))
        self.cv3 = ConvNormAct(2 * hidden, out_channels, 1, norm=norm)

    def forward(self, x: Tensor) -> Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), dim=1))


class YOLO(nn.Module):
    """Small anchor-free detector over two scales (strides 8 and 16).

    Args:
        num_classes: number of object classes.
        in_channels: input image channels. Default: 3.
        width: base channel count; features use ``4 * width`` and ``8 * width``. Default: 16.
        depth: residual units per CSP block. Default: 1.
        norm: norm kind or callable taking ``num_features`` first. Default: ``"batch"``.
        box_weight: weight of the GIoU loss in the total. Default: 5.0.
        obj_weight: weight of the objectness loss. Default: 1.0.
        cls_weight: weight of the classification loss. Default: 1.0.
        assign_ratio: a box is assigned to the stride nearest, in log scale, to its longer side
            divided by this ratio. Default: 2.0.

    Shape:
        - Input: ``(B, in_channels, H, W)`` with ``H`` and ``W`` multiples of 16.
        - Output: a list with one raw map per stride, ``(B, 5 + num_classes, H / s, W / s)``; channel
          0 is the objectness logit, 1..4 the box ``(tx, ty, tw, th)``, the rest class logits.

    Raises:
        ValueError: a non-positive size argument, or (in ``forward``) an input of the wrong shape.
    """

    strides = (8, 16)

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 16, depth: int = 1,
                 norm: NormSpec = "batch", box_weight: float = 5.0, obj_weight: float = 1.0,
                 cls_weight: float = 1.0, assign_ratio: float = 2.0) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("in_channels", in_channels), ("width", width),
                            ("depth", depth)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"YOLO: expected {name} to be a positive int, got {value!r}")
        self.num_classes = num_classes
        self.in_channels = in_channels
        if not assign_ratio > 0:
            raise ValueError(f"YOLO: expected assign_ratio > 0, got {assign_ratio!r}")
        self.box_weight, self.obj_weight, self.cls_weight = box_weight, obj_weight, cls_weight
        self.assign_ratio = float(assign_ratio)
        w = width
        # backbone
        self.stem = ConvNormAct(in_channels, w, 3, 2, norm)  # /2
        self.stage1 = nn.Sequential(ConvNormAct(w, 2 * w, 3, 2, norm), CSPBlock(2 * w, 2 * w, depth, norm))  # /4
        self.stage2 = nn.Sequential(ConvNormAct(2 * w, 4 * w, 3, 2, norm), CSPBlock(4 * w, 4 * w, depth, norm))  # /8
        self.stage3 = nn.Sequential(ConvNormAct(4 * w, 8 * w, 3, 2, norm), CSPBlock(8 * w, 8 * w, depth, norm))  # /16
        # neck (PAN-lite)
        self.lateral = ConvNormAct(8 * w, 4 * w, 1, norm=norm)
        self.top_down = CSPBlock(8 * w, 4 * w, depth, norm)
        self.down = ConvNormAct(4 * w, 4 * w, 3, 2, norm)
        self.bottom_up = CSPBlock(8 * w, 8 * w, depth, norm)
        # heads, one per stride
        out = 5 + num_classes
        self.heads = nn.ModuleList(
            nn.Sequential(ConvNormAct(c, c, 3, norm=norm), nn.Conv2d(c, out, 1)) for c in (4 * w, 8 * w)
        )
        self._init_head_bias(prior=0.01)

    def _init_head_bias(self, prior: float) -> None:
        bias = -math.log((1 - prior) / prior)
        for head in self.heads:
            conv = head[-1]
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
            with torch.no_grad():
                conv.bias[0] = bias
                conv.bias[5:] = bias

    def forward(self, x: Tensor) -> list[Tensor]:
        m = max(self.strides)
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[2] % m or x.shape[3] % m:
            raise ValueError(
                f"YOLO: expected input (B, {self.in_channels}, H, W) with H and W multiples of {m}, "
                f"got {tuple(x.shape)}"
            )
        c3 = self.stage2(self.stage1(self.stem(x)))
        c4 = self.stage3(c3)
        l4 = self.lateral(c4)
        p3 = self.top_down(torch.cat((F.interpolate(l4, scale_factor=2.0, mode="nearest"), c3), dim=1))
        p4 = self.bottom_up(torch.cat((self.down(p3), l4), dim=1))
        return [head(p) for head, p in zip(self.heads, (p3, p4))]

    def _flatten(self, outputs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Raw predictions ``(B, N, 5 + C)`` over all cells and the decoded xyxy boxes ``(B, N, 4)``."""
        if len(outputs) != len(self.strides):
            raise ValueError(f"YOLO: expected {len(self.strides)} output maps, got {len(outputs)}")
        raws, boxes = [], []
        for out, s in zip(outputs, self.strides):
            b, ch, h, w = out.shape
            raw = out.permute(0, 2, 3, 1).reshape(b, h * w, ch)
            gy, gx = torch.meshgrid(
                torch.arange(h, device=out.device), torch.arange(w, device=out.device), indexing="ij"
            )
            grid = torch.stack((gx, gy), dim=-1).reshape(1, h * w, 2).to(raw.dtype)
            xy = (grid + torch.sigmoid(raw[..., 1:3])) * s
            wh = torch.exp(raw[..., 3:5].clamp(max=8.0)) * s
            raws.append(raw)
            boxes.append(box_cxcywh_to_xyxy(torch.cat((xy, wh), dim=-1)))
        return torch.cat(raws, dim=1), torch.cat(boxes, dim=1)

    def _assign(self, outputs: Sequence[Tensor], target: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Positive cell index ``(P,)`` and its ground-truth index ``(P,)`` for one image."""
        sizes = [(o.shape[2], o.shape[3]) for o in outputs]
        offsets = [0]
        for h, w in sizes[:-1]:
            offsets.append(offsets[-1] + h * w)
        boxes = target["boxes"].reshape(-1, 4)
        side = (boxes[:, 2:] - boxes[:, :2]).amax(dim=1).clamp(min=1e-6)
        strides = torch.tensor(self.strides, dtype=boxes.dtype, device=boxes.device)
        levels = torch.argmin((torch.log2(side[:, None] / self.assign_ratio) - torch.log2(strides)[None]).abs(), dim=1)
        cell_to_gt: dict[int, int] = {}
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        for j in torch.argsort(area, descending=True, stable=True).tolist():  # smaller boxes overwrite
            lvl = int(levels[j])
            s, (h, w) = self.strides[lvl], sizes[lvl]
            cx = float(boxes[j, 0] + boxes[j, 2]) / 2
            cy = float(boxes[j, 1] + boxes[j, 3]) / 2
            gx = min(max(int(cx // s), 0), w - 1)
            gy = min(max(int(cy // s), 0), h - 1)
            cell_to_gt[offsets[lvl] + gy * w + gx] = j
        cells = torch.tensor(list(cell_to_gt), dtype=torch.int64, device=boxes.device)
        gts = torch.tensor(list(cell_to_gt.values()), dtype=torch.int64, device=boxes.device)
        return cells, gts

    def loss(self, outputs: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """Detection loss with center sampling.

        Objectness: BCE over every cell (target 1 at positives), summed. Classes: BCE against
        one-hot labels at positives, summed. Boxes: ``1 - GIoU`` at positives, summed. Each part is
        divided by the number of positives in the batch (at least 1), then
        ``loss = box_weight * loss_box + obj_weight * loss_obj + cls_weight * loss_cls``.

        Args:
            outputs: the list returned by :meth:`forward`.
            targets: one dict per image: ``boxes (G, 4)`` xyxy in pixels, ``labels (G,)`` int64.

        Returns:
            ``{"loss", "loss_box", "loss_obj", "loss_cls"}``, scalar tensors (``loss`` has a graph).

        Raises:
            ValueError: the number of targets differs from the batch size, or a label is out of range.
        """
        raw, pred_boxes = self._flatten(outputs)
        if len(targets) != raw.shape[0]:
            raise ValueError(f"YOLO.loss: expected {raw.shape[0]} target dicts (one per image), got {len(targets)}")
        obj_target = torch.zeros_like(raw[..., 0])
        cls_logits, cls_target, box_pred, box_target = [], [], [], []
        for i, t in enumerate(targets):
            labels = t["labels"].reshape(-1).to(device=raw.device, dtype=torch.int64)
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(f"YOLO.loss: expected labels in [0, {self.num_classes - 1}], got {labels.tolist()}")
            if labels.numel() == 0:
                continue
            cells, gts = self._assign(outputs, {"boxes": t["boxes"].to(raw), "labels": labels})
            obj_target[i, cells] = 1.0
            cls_logits.append(raw[i, cells, 5:])
            cls_target.append(F.one_hot(labels[gts], self.num_classes).to(raw.dtype))
            box_pred.append(pred_boxes[i, cells])
            box_target.append(t["boxes"].reshape(-1, 4).to(raw)[gts])
        num_pos = max(sum(int(c.shape[0]) for c in cls_logits), 1)
        loss_obj = F.binary_cross_entropy_with_logits(raw[..., 0], obj_target, reduction="sum") / num_pos
        if cls_logits:
            loss_cls = F.binary_cross_entropy_with_logits(
                torch.cat(cls_logits), torch.cat(cls_target), reduction="sum"
            ) / num_pos
            loss_box = generalized_box_iou_loss(torch.cat(box_pred), torch.cat(box_target), reduction="sum") / num_pos
        else:  # keep the graph connected so every parameter gets a (zero) gradient
            loss_cls = raw[..., 5:].sum() * 0.0
            loss_box = pred_boxes.sum() * 0.0
        total = self.box_weight * loss_box + self.obj_weight * loss_obj + self.cls_weight * loss_cls
        return {"loss": total, "loss_box": loss_box, "loss_obj": loss_obj, "loss_cls": loss_cls}

    @torch.no_grad()
    def decode(
        self,
        outputs: Sequence[Tensor],
        conf_threshold: float = 0.05,
        iou_threshold: float = 0.5,
        max_det: int = 100,
        pre_nms_topk: int = 1000,
    ) -> list[dict[str, Tensor]]:
        """Turn raw outputs into per-image detections.

        Each cell predicts its best class with score ``sigmoid(obj) * sigmoid(class)``; cells above
        ``conf_threshold`` (at most ``pre_nms_topk``) go through per-class NMS, and the best
        ``max_det`` survivors are returned with boxes clipped to the image.

        Args:
            outputs: the list returned by :meth:`forward`.
            conf_threshold: minimum score kept. Default: 0.05.
            iou_threshold: NMS threshold. Default: 0.5.
            max_det: detections kept per image. Default: 100.
            pre_nms_topk: candidates kept per image before NMS. Default: 1000.

        Returns:
            One dict per image: ``boxes (K, 4)`` xyxy pixels, ``scores (K,)``, ``labels (K,)`` int64,
            sorted by decreasing score.
        """
        raw, boxes = self._flatten(outputs)
        height = outputs[0].shape[2] * self.strides[0]
        width = outputs[0].shape[3] * self.strides[0]
        boxes = torch.stack(
            (boxes[..., 0].clamp(0, width), boxes[..., 1].clamp(0, height),
             boxes[..., 2].clamp(0, width), boxes[..., 3].clamp(0, height)), dim=-1
        )
        scores, labels = (torch.sigmoid(raw[..., :1]) * torch.sigmoid(raw[..., 5:])).max(dim=-1)
        results = []
        for b in range(raw.shape[0]):
            keep = torch.nonzero(scores[b] > conf_threshold).flatten()
            if keep.numel() > pre_nms_topk:
                keep = keep[torch.topk(scores[b, keep], pre_nms_topk).indices]
            bx, sc, lb = boxes[b, keep], scores[b, keep], labels[b, keep]
            kept = batched_nms(bx, sc, lb, iou_threshold)[:max_det]
            results.append({"boxes": bx[kept], "scores": sc[kept], "labels": lb[kept]})
        return results
