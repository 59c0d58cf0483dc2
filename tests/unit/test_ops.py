"""Detection ops: IoU and GIoU by hand, NMS against a brute-force reference, mAP by hand."""

from __future__ import annotations

import math

import pytest
import torch

from syncnorm.app.models.ops import (
    average_precision_per_class,
    batched_nms,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    generalized_box_iou_loss,
    mean_average_precision,
    nms,
)


def _t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_box_iou_hand_computed():
    a = _t([[0, 0, 2, 2], [0, 0, 4, 2]])
    b = _t([[1, 1, 3, 3], [0, 0, 2, 2], [2, 2, 4, 4], [10, 10, 10, 12]])
    expected = _t([
        [1 / 7, 1.0, 0.0, 0.0],  # overlap 1 / union 7; identical; touching corner; degenerate
        [2 / 10, 0.5, 0.0, 0.0],  # overlap 2 / union 8 + 4 - 2; 4 / 8
    ])
    torch.testing.assert_close(box_iou(a, b), expected)
    assert box_iou(a, b[:0]).shape == (2, 0)


def test_box_iou_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"expected boxes of shape \(K, 4\), got \(3,\)"):
        box_iou(torch.zeros(3), torch.zeros(1, 4))


def test_cxcywh_round_trip():
    torch.manual_seed(0)
    cxcywh = _t([[5, 6, 4, 2]])
    torch.testing.assert_close(box_cxcywh_to_xyxy(cxcywh), _t([[3, 5, 7, 7]]))
    boxes = torch.rand(20, 4) * 50
    boxes[:, 2:] += boxes[:, :2]
    torch.testing.assert_close(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(boxes)), boxes)


def test_giou_loss_hand_computed():
    a = _t([[0, 0, 1, 1], [0, 0, 2, 2], [0, 0, 2, 2]])
    b = _t([[2, 0, 3, 1], [0, 0, 2, 2], [1, 1, 3, 3]])
    # disjoint: IoU 0, enclosing area 3, union 2 -> GIoU -1/3; identical -> 0;
    # overlap 1, union 7, enclosing 9 -> GIoU 1/7 - 2/9
    expected = _t([4 / 3, 0.0, 1 - (1 / 7 - 2 / 9)])
    torch.testing.assert_close(generalized_box_iou_loss(a, b), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(generalized_box_iou_loss(a, b, reduction="sum"), expected.sum(), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="reduction"):
        generalized_box_iou_loss(a, b, reduction="max")


def _nms_reference(boxes, scores, thr):
    """Brute force: walk by decreasing score, keep a box unless it overlaps a kept one by more than thr."""
    def iou(p, q):
        iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
        ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
        union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - iw * ih
        return iw * ih / union if union > 0 else 0.0

    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    kept = []
    for i in order:
        if all(iou(boxes[i], boxes[k]) <= thr for k in kept):
            kept.append(i)
    return kept


@pytest.mark.parametrize("thr", [0.0, 0.3, 0.5, 0.9])
def test_nms_matches_brute_force(thr):
    torch.manual_seed(1)
    for _ in range(5):
        xy = torch.rand(60, 2) * 40
        boxes = torch.cat((xy, xy + 2 + torch.rand(60, 2) * 20), dim=1)
        scores = torch.rand(60)
        kept = nms(boxes, scores, thr)
        assert kept.dtype == torch.int64
        assert kept.tolist() == _nms_reference(boxes.tolist(), scores.tolist(), thr)
        assert torch.all(scores[kept][:-1] >= scores[kept][1:])


def test_nms_small_cases():
    boxes = _t([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]])
    assert nms(boxes, _t([0.8, 0.9, 0.7]), 0.5).tolist() == [1, 2]
    assert nms(boxes, _t([0.8, 0.9, 0.7]), 0.7).tolist() == [1, 0, 2]  # IoU 81/119 = 0.68 is kept
    assert nms(boxes[:0], torch.zeros(0), 0.5).tolist() == []
    with pytest.raises(ValueError, match=r"expected scores of shape \(3,\), got \(2,\)"):
        nms(boxes, torch.zeros(2), 0.5)


def test_batched_nms_is_per_class():
    torch.manual_seed(2)
    xy = torch.rand(40, 2) * 30
    boxes = torch.cat((xy, xy + 5 + torch.rand(40, 2) * 15), dim=1)
    scores = torch.rand(40)
    labels = torch.randint(0, 3, (40,))
    kept = batched_nms(boxes, scores, labels, 0.4)
    expected = []
    for c in range(3):
        idx = torch.nonzero(labels == c).flatten()
        expected += idx[nms(boxes[idx], scores[idx], 0.4)].tolist()
    expected.sort(key=lambda i: -float(scores[i]))
    assert kept.tolist() == expected
    same = _t([[0, 0, 10, 10], [0, 0, 10, 10]])
    assert batched_nms(same, _t([0.9, 0.8]), torch.tensor([0, 1]), 0.5).tolist() == [0, 1]
    assert batched_nms(same, _t([0.9, 0.8]), torch.tensor([1, 1]), 0.5).tolist() == [0]


def _pred(boxes, scores, labels):
    return {"boxes": _t(boxes).reshape(-1, 4), "scores": _t(scores), "labels": torch.tensor(labels, dtype=torch.int64)}


def _gt(boxes, labels):
    return {"boxes": _t(boxes).reshape(-1, 4), "labels": torch.tensor(labels, dtype=torch.int64)}


TARGETS = [
    _gt([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 1]),
    _gt([[5, 5, 25, 25]], [0]),
]


def test_map_perfect_and_empty():
    torch.manual_seed(0)
    perfect = [_pred(t["boxes"].tolist(), [0.9] * len(t["labels"]), t["labels"].tolist()) for t in TARGETS]
    assert mean_average_precision(perfect, TARGETS) == pytest.approx(1.0)
    empty = [_pred([], [], []) for _ in TARGETS]
    assert mean_average_precision(empty, TARGETS) == 0.0
    assert mean_average_precision(empty, [_gt([], []), _gt([], [])]) == 0.0
    wrong_class = [_pred(t["boxes"].tolist(), [0.9] * len(t["labels"]), [2] * len(t["labels"])) for t in TARGETS]
    assert mean_average_precision(wrong_class, TARGETS) == 0.0


def test_map_false_positive_ranked_first():
    # class 0 has 2 GTs. Ranked: FP (0.9), TP (0.8), TP (0.7)
    # -> precision 0, 1/2, 2/3 at recall 0, 1/2, 1; envelope 2/3 everywhere -> AP = 2/3.
    # class 1 has 1 GT. Ranked: FP (0.95, wrong place), TP (0.6) -> precision 1/2 at recall 1 -> AP = 1/2.
    preds = [
        _pred([[40, 40, 50, 50], [0, 0, 10, 10], [60, 60, 70, 70], [20, 20, 30, 30]], [0.9, 0.8, 0.95, 0.6],
              [0, 0, 1, 1]),
        _pred([[5, 5, 25, 24]], [0.7], [0]),  # IoU 380 / 400 = 0.95
    ]
    aps = average_precision_per_class(preds, TARGETS)
    assert aps == pytest.approx({0: 2 / 3, 1: 1 / 2})
    assert mean_average_precision(preds, TARGETS) == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_map_duplicate_is_false_positive_and_threshold():
    # class 0: TP on GT a (0.9), duplicate on a (0.8, FP), TP on GT b (0.7)
    # precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1 -> AP = 1/2 * 1 + 1/2 * 2/3 = 5/6
    preds = [_pred([[0, 0, 10, 10], [0, 0, 10, 9], [20, 20, 30, 30]], [0.9, 0.8, 0.7], [0, 0, 0])]
    targets = [_gt([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 0])]
    assert mean_average_precision(preds, targets) == pytest.approx(5 / 6)
    # a box with IoU 0.5 exactly matches at 0.5 but not at 0.75
    half = [_pred([[0, 0, 10, 5]], [0.9], [0])]
    one = [_gt([[0, 0, 10, 10]], [0])]
    assert mean_average_precision(half, one, iou_threshold=0.5) == pytest.approx(1.0)
    assert mean_average_precision(half, one, iou_threshold=0.75) == 0.0
    assert not math.isnan(mean_average_precision(half, one))
    with pytest.raises(ValueError, match="got 1 predictions for 2 targets"):
        mean_average_precision(half, one * 2)
