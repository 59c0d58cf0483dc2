"""ResNet-18/50 and the YOLO-style detector: shapes, norm plumbing, names, loss, decode, training."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from syncnorm import SyncBatchNorm
from syncnorm.app.data import ShapesDataset, collate_detection
from syncnorm.app.models import YOLO, BasicBlock, Bottleneck, build_resnet, resnet18, resnet50


@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.parametrize("stem", ["small", "imagenet"])
@pytest.mark.parametrize("size", [8, 32])
def test_resnet_forward_shapes(depth, stem, size):
    torch.manual_seed(0)
    model = build_resnet(depth, num_classes=7, in_channels=3, width=4, stem=stem)
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    expansion = 1 if depth == 18 else 4
    assert model.fc.in_features == 4 * 8 * expansion
    assert model.forward_features(torch.randn(2, 3, size, size)).shape == (2, 32 * expansion)


def test_resnet_stems_differ():
    small = resnet18(num_classes=3, width=4, stem="small", in_channels=1).eval()
    big = resnet18(num_classes=3, width=4, stem="imagenet", in_channels=1).eval()
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    assert big.conv1.kernel_size == (7, 7) and big.conv1.stride == (2, 2)
    assert isinstance(big.maxpool, nn.MaxPool2d)
    # small: 32 -> 32 -> 4 after the stages; imagenet: 32 -> 8 -> 1
    x = torch.randn(1, 1, 32, 32)
    assert small.layer4(small.layer3(small.layer2(small.layer1(small.relu(small.bn1(small.conv1(x))))))).shape[-1] == 4
    stem = big.maxpool(big.relu(big.bn1(big.conv1(x))))
    assert big.layer4(big.layer3(big.layer2(big.layer1(stem)))).shape[-1] == 1


@pytest.mark.parametrize("depth, params, tensors, state", [(18, 11_689_512, 62, 122), (50, 25_557_032, 161, 320)])
def test_resnet_matches_torchvision_layout(depth, params, tensors, state):
    """Full-width ImageNet models have torchvision's parameter count and state_dict size."""
    torch.manual_seed(0)
    model = build_resnet(depth, num_classes=1000, stem="imagenet")
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(list(model.parameters())) == tensors
    assert len(model.state_dict()) == state


def test_resnet_parameter_names():
    torch.manual_seed(0)
    r18 = resnet18(num_classes=10, width=4)
    names = set(r18.state_dict())
    for key in ["conv1.weight", "bn1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer1.0.bn1.weight",
                "layer1.1.bn2.bias", "layer2.0.downsample.0.weight", "layer2.0.downsample.1.running_var",
                "layer4.1.conv2.weight", "fc.weight", "fc.bias"]:
        assert key in names, key
    assert "layer1.0.downsample.0.weight" not in names  # 18: identity shortcut in the first stage
    r50 = resnet50(num_classes=10, width=4)
    names = set(r50.state_dict())
    for key in ["layer1.0.downsample.0.weight", "layer1.0.downsample.1.weight", "layer1.2.bn3.weight",
                "layer3.5.conv3.weight", "layer4.2.bn3.num_batches_tracked"]:
        assert key in names, key
    assert "layer3.6.conv1.weight" not in names  # [3, 4, 6, 3]


def test_resnet_norm_string_and_callable():
    torch.manual_seed(0)
    batch = resnet18(num_classes=5, width=4, norm="batch")
    norms = [m for m in batch.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 1 + 8 * 2 + 3  # stem, two per block, three downsample projections
    group = resnet50(num_classes=5, width=4, norm=lambda c: nn.GroupNorm(2, c))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in group.modules())
    assert isinstance(group.layer1[0].bn1, nn.GroupNorm) and group.layer1[0].bn1.num_groups == 2
    assert isinstance(group.layer1[0].downsample[1], nn.GroupNorm)
    sync = resnet18(num_classes=5, width=4, norm="sync")
    assert isinstance(sync.layer2[0].downsample[1], SyncBatchNorm)
    x = torch.randn(4, 3, 16, 16)
    for model in (batch, group, sync):
        assert model(x).shape == (4, 5)
    # outside a process group, SyncBatchNorm is plain BatchNorm
    sync.load_state_dict(batch.state_dict())
    torch.testing.assert_close(sync(x), batch(x))


def test_resnet_zero_init_residual():
    torch.manual_seed(0)
    r18 = resnet18(num_classes=3, width=4, zero_init_residual=True)
    r50 = resnet50(num_classes=3, width=4, zero_init_residual=True)
    blocks = [m for m in list(r18.modules()) + list(r50.modules()) if isinstance(m, (BasicBlock, Bottleneck))]
    assert len(blocks) == 8 + 16
    for block in blocks:
        last = block.bn2 if isinstance(block, BasicBlock) else block.bn3
        assert torch.count_nonzero(last.weight) == 0
        assert torch.all(block.bn1.weight == 1)
    assert torch.all(resnet18(num_classes=3, width=4).layer1[0].bn2.weight == 1)


def test_resnet_errors():
    with pytest.raises(ValueError, match=r"expected depth in \[18, 50\], got 7"):
        build_resnet(7, num_classes=10)
    with pytest.raises(ValueError, match=r"expected stem in \['small', 'imagenet'\], got 'cifar'"):
        build_resnet(18, num_classes=10, stem="cifar")
    with pytest.raises(ValueError, match="expected width to be a positive int, got 0"):
        build_resnet(18, num_classes=10, width=0)
    with pytest.raises(ValueError, match="unknown norm kind 'nope'"):
        build_resnet(18, num_classes=10, norm="nope")
    model = build_resnet(18, num_classes=10, width=4, in_channels=1)
    with pytest.raises(ValueError, match=r"expected input \(N, 1, H, W\), got \(2, 3, 8, 8\)"):
        model(torch.randn(2, 3, 8, 8))


def _shapes_batch(n=4, size=64, seed=0):
    return collate_detection([ShapesDataset(n, image_size=size, seed=seed)[i] for i in range(n)])


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_yolo_forward_loss_backward(norm):
    torch.manual_seed(0)
    model = YOLO(num_classes=2, width=8, norm=norm)
    images, targets = _shapes_batch(2)
    outputs = model(images)
    assert [tuple(o.shape) for o in outputs] == [(2, 7, 8, 8), (2, 7, 4, 4)]
    losses = model.loss(outputs, targets)
    assert set(losses) == {"loss", "loss_box", "loss_obj", "loss_cls"}
    for value in losses.values():
        assert value.dim() == 0 and torch.isfinite(value)
    assert 0 < losses["loss_box"].item() < 2
    # fresh head: class logits start near log(0.01 / 0.99), so the positive-class BCE is about 4.6
    assert losses["loss_cls"].item() > 4.0
    losses["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.heads[0][-1].weight.grad.abs().sum() > 0


def test_yolo_loss_without_objects():
    torch.manual_seed(0)
    model = YOLO(num_classes=3, width=4)
    outputs = model(torch.randn(2, 3, 32, 48))
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    losses = model.loss(outputs, [empty, empty])
    assert losses["loss_box"].item() == 0.0 and losses["loss_cls"].item() == 0.0
    assert 0 < losses["loss_obj"].item() < 2  # 24 + 6 cells, each with obj probability ~0.01
    losses["loss"].backward()


def test_yolo_assignment_scale_and_cell():
    model = YOLO(num_classes=2, width=4)
    outputs = [torch.zeros(1, 7, 8, 8), torch.zeros(1, 7, 4, 4)]
    boxes = torch.tensor([[10.0, 10, 20, 18], [4, 4, 60, 44], [30, 2, 60, 22], [11, 9, 19, 17]])
    target = {"boxes": boxes, "labels": torch.tensor([0, 1, 0, 1])}
    cells, gts = model._assign(outputs, target)
    # side / 2 picks the stride: 10 / 2 = 5 -> 8; 56 / 2 = 28 -> 16; 30 / 2 = 15 -> 16; 8 / 2 = 4 -> 8.
    # box 0: center (15, 14) -> stride-8 cell (1, 1) = index 9, taken over by the smaller box 3 (15, 13)
    # box 1: center (32, 24) -> stride-16 cell (2, 1) -> 64 + 1 * 4 + 2 = 70
    # box 2: center (45, 12) -> stride-16 cell (2, 0) -> 64 + 2 = 66
    assert dict(zip(cells.tolist(), gts.tolist())) == {9: 3, 70: 1, 66: 2}


def test_yolo_decode_and_nms():
    model = YOLO(num_classes=2, width=4)
    p3 = torch.full((1, 7, 8, 8), -10.0)
    p4 = torch.full((1, 7, 4, 4), -10.0)
    p3[0, 1:5] = 0.0
    p3[0, 3:5] = math.log(2.0)  # w = h = 2 * 8 = 16
    for gx, logit in ((3, 10.0), (4, 3.0)):  # two overlapping detections of class 1
        p3[0, 0, 2, gx] = logit
        p3[0, 6, 2, gx] = logit
    p3[0, 1, 2, 4] = -20.0  # second center x = (4 + ~0) * 8 = 32: box (24, 12, 40, 28), IoU 192 / 320 = 0.6
    dets = model.decode([p3, p4], conf_threshold=0.05, iou_threshold=0.5)
    assert len(dets) == 1
    torch.testing.assert_close(dets[0]["boxes"], torch.tensor([[20.0, 12, 36, 28]]))  # center (28, 20)
    assert dets[0]["labels"].tolist() == [1]
    torch.testing.assert_close(dets[0]["scores"], torch.sigmoid(torch.tensor([10.0])) ** 2)
    both = model.decode([p3, p4], iou_threshold=0.7)
    assert both[0]["boxes"].shape == (2, 4) and both[0]["scores"][0] > both[0]["scores"][1]
    torch.testing.assert_close(both[0]["boxes"][1], torch.tensor([24.0, 12, 40, 28]))
    assert model.decode([p3, p4], conf_threshold=0.99999)[0]["boxes"].shape == (0, 4)
    assert model.decode([p3, p4], iou_threshold=0.7, max_det=1)[0]["labels"].shape == (1,)


def test_yolo_errors():
    model = YOLO(num_classes=2, width=4)
    with pytest.raises(ValueError, match=r"multiples of 16, got \(1, 3, 40, 64\)"):
        model(torch.randn(1, 3, 40, 64))
    with pytest.raises(ValueError, match="expected num_classes to be a positive int, got 0"):
        YOLO(num_classes=0)
    outputs = model(torch.randn(2, 3, 32, 32))
    bad = {"boxes": torch.tensor([[0.0, 0, 8, 8]]), "labels": torch.tensor([2])}
    with pytest.raises(ValueError, match=r"expected labels in \[0, 1\], got \[2\]"):
        model.loss(outputs, [bad, bad])
    with pytest.raises(ValueError, match="expected 2 target dicts"):
        model.loss(outputs, [bad])


def test_yolo_few_steps_reduce_loss():
    torch.manual_seed(0)
    model = YOLO(num_classes=2, width=8)
    images, targets = _shapes_batch(4, seed=3)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = []
    for _ in range(8):
        loss = model.loss(model(images), targets)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert all(math.isfinite(v) for v in history)
    assert history[-1] < 0.8 * history[0], history
