"""Data modules: digits split, shapes, dtypes and determinism; generated shapes boxes and labels."""

from __future__ import annotations

import pytest
import torch

from syncnorm.app.data import DigitsDataModule, ShapesDataModule, ShapesDataset, collate_detection
from syncnorm.app.data.digits import stratified_split

# scikit-learn's digits: 1797 images; per class, round(0.2 * count) go to validation
NUM_DIGITS = 1797
NUM_VAL = 359  # 36 + 36 + 35 + 37 + 36 + 36 + 36 + 36 + 35 + 36


@pytest.fixture(scope="module")
def digits():
    dm = DigitsDataModule()
    dm.setup("fit")
    return dm


def test_digits_shapes_dtypes_and_split(digits):
    x_train, y_train = digits.train_dataset.tensors
    x_val, y_val = digits.val_dataset.tensors
    assert x_train.shape == (NUM_DIGITS - NUM_VAL, 1, 8, 8) and x_val.shape == (NUM_VAL, 1, 8, 8)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert digits.num_classes == 10 and digits.in_channels == 1
    for y in (y_train, y_val):
        assert int(y.min()) == 0 and int(y.max()) == 9
    # stratified: every class keeps ~20% of its samples in validation
    share = torch.bincount(y_val, minlength=10) / (torch.bincount(y_val, minlength=10) + torch.bincount(y_train))
    assert torch.all((share - 0.2).abs() < 0.01)
    # normalized with the training split's statistics
    assert abs(float(x_train.mean())) < 1e-4 and abs(float(x_train.std()) - 1) < 1e-3


def test_digits_split_is_deterministic_and_disjoint():
    torch.manual_seed(0)
    labels = torch.randint(0, 5, (300,))
    train, val = stratified_split(labels, 0.25, seed=3)
    assert torch.equal(torch.sort(torch.cat((train, val))).values, torch.arange(300))
    again = stratified_split(labels, 0.25, seed=3)
    assert torch.equal(train, again[0]) and torch.equal(val, again[1])
    other = stratified_split(labels, 0.25, seed=4)
    assert other[1].numel() == val.numel() and not torch.equal(other[1], val)


def test_digits_determinism_by_seed(digits):
    same = DigitsDataModule(seed=0)
    same.setup()
    assert torch.equal(same.val_dataset.tensors[0], digits.val_dataset.tensors[0])
    assert torch.equal(same.val_dataset.tensors[1], digits.val_dataset.tensors[1])
    other = DigitsDataModule(seed=1)
    other.setup()
    assert len(other.val_dataset) == NUM_VAL
    assert not torch.equal(other.val_dataset.tensors[0], digits.val_dataset.tensors[0])


def test_digits_upsample_three_channels_unnormalized():
    dm = DigitsDataModule(batch_size=16, image_size=32, channels=3, normalize=False, val_fraction=0.1)
    dm.setup("fit")
    x, y = dm.val_dataset.tensors
    assert x.shape == (179, 3, 32, 32) and dm.in_channels == 3
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0 and float(x.max()) > 0.9
    # bilinear upsampling keeps the mean of each image close to the original's
    small = DigitsDataModule(normalize=False, val_fraction=0.1)
    small.setup()
    orig = small.val_dataset.tensors[0]
    assert torch.allclose(x[:, 0].mean(dim=(1, 2)), orig[:, 0].mean(dim=(1, 2)), atol=0.02)


def test_digits_dataloaders(digits):
    torch.manual_seed(0)
    train = digits.train_dataloader()
    batches = list(train)
    assert len(batches) == (NUM_DIGITS - NUM_VAL) // 32  # drop_last
    assert all(b[0].shape == (32, 1, 8, 8) and b[1].shape == (32,) for b in batches)
    first_labels = batches[0][1]
    assert not torch.equal(first_labels, digits.train_dataset.tensors[1][:32])  # shuffled
    val = list(digits.val_dataloader())
    assert sum(b[1].numel() for b in val) == NUM_VAL  # last partial batch kept
    assert torch.equal(val[0][1], digits.val_dataset.tensors[1][:32])  # in order


def test_digits_argument_errors():
    with pytest.raises(ValueError, match="expected image_size >= 8, got 4"):
        DigitsDataModule(image_size=4)
    with pytest.raises(ValueError, match=r"expected channels in \[1, 3\], got 2"):
        DigitsDataModule(channels=2)
    with pytest.raises(ValueError, match=r"expected val_fraction in \[0, 1\), got 1.0"):
        DigitsDataModule(val_fraction=1.0)
    with pytest.raises(RuntimeError, match="call setup"):
        DigitsDataModule().train_dataloader()


def _check_sample(image, target, size, num_classes):
    assert image.shape == (3, size, size) and image.dtype == torch.float32
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    boxes, labels = target["boxes"], target["labels"]
    assert boxes.dtype == torch.float32 and labels.dtype == torch.int64
    assert 1 <= labels.numel() <= 4 and boxes.shape == (labels.numel(), 4)
    assert torch.all(boxes >= 0) and torch.all(boxes <= size)
    assert torch.all(boxes[:, 2] - boxes[:, 0] >= 4) and torch.all(boxes[:, 3] - boxes[:, 1] >= 4)
    assert torch.all((labels >= 0) & (labels < num_classes))


@pytest.mark.parametrize("size, num_classes", [(64, 2), (32, 3)])
def test_shapes_samples_valid(size, num_classes):
    ds = ShapesDataset(40, image_size=size, num_classes=num_classes, seed=5)
    seen = torch.zeros(num_classes, dtype=torch.int64)
    counts = set()
    for i in range(len(ds)):
        image, target = ds[i]
        _check_sample(image, target, size, num_classes)
        seen += torch.bincount(target["labels"], minlength=num_classes)
        counts.add(target["labels"].numel())
    assert torch.all(seen > 0)  # every class appears
    assert len(counts) >= 3  # object counts vary


def test_shapes_objects_differ_from_background():
    ds = ShapesDataset(10, image_size=64, seed=0)
    for i in range(len(ds)):
        image, target = ds[i]
        x0, y0, x1, y1 = (int(v) for v in target["boxes"][-1])  # drawn last: never occluded
        inside = image[:, y0:y1, x0:x1]
        # the object's colour is flat, the noisy background is not: the box holds a constant pixel value
        colours, freq = torch.unique(inside.reshape(3, -1), dim=1, return_counts=True)
        assert int(freq.max()) >= 0.4 * (x1 - x0) * (y1 - y0)


def test_shapes_determinism():
    a = ShapesDataset(16, seed=7)
    b = ShapesDataset(16, seed=7)
    for i in (0, 5, 15):
        assert torch.equal(a[i][0], b[i][0])
        assert torch.equal(a[i][1]["boxes"], b[i][1]["boxes"])
        assert torch.equal(a[i][1]["labels"], b[i][1]["labels"])
    assert torch.equal(ShapesDataset(100, seed=7)[5][0], a[5][0])  # sample i ignores the dataset size
    assert not torch.equal(ShapesDataset(16, seed=8)[5][0], a[5][0])
    assert not torch.equal(ShapesDataset(16, seed=7, split="val")[5][0], a[5][0])
    with pytest.raises(IndexError):
        a[16]


def test_shapes_collate_and_datamodule():
    torch.manual_seed(0)
    dm = ShapesDataModule(batch_size=4, image_size=32, num_train=10, num_val=6, num_classes=3)
    assert dm.num_classes == 3 and dm.in_channels == 3
    train = list(dm.train_dataloader())
    assert len(train) == 2  # drop_last
    images, targets = train[0]
    assert images.shape == (4, 3, 32, 32) and len(targets) == 4
    for image, target in zip(images, targets):
        _check_sample(image, target, 32, 3)
    val = list(dm.val_dataloader())
    assert [len(t) for _, t in val] == [4, 2]
    assert torch.equal(val[0][0][0], dm.val_dataset[0][0])
    images, targets = collate_detection([dm.val_dataset[0], dm.val_dataset[1]])
    assert images.shape == (2, 3, 32, 32) and torch.equal(targets[1]["labels"], dm.val_dataset[1][1]["labels"])


def test_shapes_argument_errors():
    with pytest.raises(ValueError, match=r"expected num_classes in \[2, 3\], got 4"):
        ShapesDataset(4, num_classes=4)
    with pytest.raises(ValueError, match="expected image_size >= 16, got 8"):
        ShapesDataModule(image_size=8)
    with pytest.raises(ValueError, match="expected 1 <= min_objects <= max_objects, got 3 and 2"):
        ShapesDataset(4, min_objects=3, max_objects=2)
