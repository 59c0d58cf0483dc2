"""Generated detection data: coloured rectangles, ellipses (and triangles) on noisy backgrounds.

Every image is drawn on demand from its own random stream, seeded by ``(seed, split, index)``, so
a dataset of any size costs no memory, is identical across runs, workers and ranks, and sample
``i`` does not depend on the others. Classes: 0 rectangle, 1 ellipse, 2 triangle (with
``num_classes=3``). Boxes are xyxy in pixels, tight around the drawn pixels' squares.

Example::

    >>> ds = ShapesDataset(8, image_size=64, seed=0)
    >>> image, target = ds[0]
    >>> tuple(image.shape), sorted(target)
    ((3, 64, 64), ['boxes', 'labels'])
    >>> images, targets = collate_detection([ds[0], ds[1]])
    >>> tuple(images.shape), len(targets)
    ((2, 3, 64, 64), 2)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .sampling import ShardedDataModule

__all__ = ["CLASS_NAMES", "ShapesDataset", "ShapesDataModule", "collate_detection"]

CLASS_NAMES = ("rectangle", "ellipse", "triangle")

_SPLITS = ("train", "val")


def _box_iou_np(box: np.ndarray, others: list) -> float:
    """Largest IoU of ``box`` with any of ``others`` (xyxy integer boxes)."""
    best = 0.0
    for o in others:
        iw = max(0, min(box[2], o[2]) - max(box[0], o[0]))
        ih = max(0, min(box[3], o[3]) - max(box[1], o[1]))
        inter = iw * ih
        union = (box[2] - box[0]) * (box[3] - box[1]) + (o[2] - o[0]) * (o[3] - o[1]) - inter
        best = max(best, inter / union)
    return best


def _shape_mask(cls: int, box: np.ndarray, size: int) -> np.ndarray:
    """Boolean ``(size, size)`` mask of a shape filling ``box``, tested at pixel centers."""
    x0, y0, x1, y1 = (float(v) for v in box)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    inside = (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)
    if cls == 0:
        return inside
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    if cls == 1:
        return inside & (((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0)
    # triangle: apex at the top middle, base along the bottom edge
    half_width = (yy - y0) / (y1 - y0) * rx
    return inside & (np.abs(xx - cx) <= half_width + 0.5)


class ShapesDataset(Dataset):
    """``num_images`` generated detection samples ``(image, {"boxes", "labels"})``.

    Args:
        num_images: dataset length.
        image_size: square image side in pixels, at least 16. Default: 64.
        num_classes: 2 (rectangle, ellipse) or 3 (plus triangle). Default: 2.
        min_objects: fewest objects per image. Default: 1.
        max_objects: most objects per image (fewer when no free spot is found). Default: 4.
        seed: seed of the whole dataset. Default: 0.
        split: ``"train"`` or ``"val"``; part of every image's seed, so splits never share images.
            Default: ``"train"``.
        noise: standard deviation of the background's Gaussian pixel noise. Default: 0.08.
        max_overlap: largest IoU allowed between two objects of one image. Default: 0.3.

    Shape:
        - image: ``(3, image_size, image_size)`` float32 in ``[0, 1]``.
        - boxes: ``(K, 4)`` float32 xyxy pixels, ``0 <= x1 < x2 <= image_size``; labels ``(K,)`` int64.

    Raises:
        ValueError: an argument outside its range.
    """

    def __init__(self, num_images: int, image_size: int = 64, num_classes: int = 2, min_objects: int = 1,
                 max_objects: int = 4, seed: int = 0, split: str = "train", noise: float = 0.08,
                 max_overlap: float = 0.3) -> None:
        if num_images < 0:
            raise ValueError(f"ShapesDataset: expected num_images >= 0, got {num_images!r}")
        if image_size < 16:
            raise ValueError(f"ShapesDataset: expected image_size >= 16, got {image_size!r}")
        if num_classes not in (2, 3):
            raise ValueError(f"ShapesDataset: expected num_classes in [2, 3], got {num_classes!r}")
        if not 1 <= min_objects <= max_objects:
            raise ValueError(
                f"ShapesDataset: expected 1 <= min_objects <= max_objects, got {min_objects} and {max_objects}"
            )
        if split not in _SPLITS:
            raise ValueError(f"ShapesDataset: expected split in {list(_SPLITS)}, got {split!r}")
        self.num_images = int(num_images)
        self.image_size = int(image_size)
        self.num_classes = num_classes
        self.min_objects, self.max_objects = min_objects, max_objects
        self.seed = int(seed)
        self.split = split
        self.noise = noise
        self.max_overlap = max_overlap

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        if not 0 <= index < self.num_images:
            raise IndexError(f"ShapesDataset: index {index} out of range [0, {self.num_images})")
        rng = np.random.default_rng([self.seed, _SPLITS.index(self.split), int(index)])
        s = self.image_size
        # background: a random dark colour, a soft gradient and pixel noise
        base = rng.uniform(0.0, 0.35, size=(3, 1, 1))
        ramp = np.linspace(0.0, 1.0, s, dtype=np.float32)
        gradient = rng.uniform(-0.1, 0.1) * ramp[None, :, None] + rng.uniform(-0.1, 0.1) * ramp[None, None, :]
        image = base + gradient + rng.normal(0.0, self.noise, size=(3, s, s))
        boxes: list[np.ndarray] = []
        labels: list[int] = []
        wanted = int(rng.integers(self.min_objects, self.max_objects + 1))
        lo, hi = max(4, s // 8), max(5, s // 2)
        for _ in range(wanted * 20):  # placement attempts
            if len(boxes) == wanted:
                break
            w, h = (int(v) for v in rng.integers(lo, hi + 1, size=2))
            x0, y0 = int(rng.integers(0, s - w + 1)), int(rng.integers(0, s - h + 1))
            box = np.array([x0, y0, x0 + w, y0 + h])
            if boxes and _box_iou_np(box, boxes) > self.max_overlap:
                continue
            cls = int(rng.integers(0, self.num_classes))
            colour = rng.uniform(0.55, 1.0, size=3)
            colour[rng.integers(0, 3)] *= rng.uniform(0.0, 0.5)  # vary the hue
            mask = _shape_mask(cls, box, s)
            image[:, mask] = colour[:, None]
            ys, xs = np.nonzero(mask)
            boxes.append(np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]))
            labels.append(cls)
        image = np.clip(image, 0.0, 1.0).astype(np.float32)
        target = {
            "boxes": torch.as_tensor(np.stack(boxes), dtype=torch.float32).reshape(-1, 4),
            "labels": torch.as_tensor(labels, dtype=torch.int64),
        }
        return torch.from_numpy(image), target


def collate_detection(batch: Sequence[tuple[Tensor, dict[str, Tensor]]]) -> tuple[Tensor, list[dict[str, Tensor]]]:
    """Stack images to ``(B, 3, H, W)`` and keep the targets as a list of dicts (sizes differ)."""
    images = torch.stack([image for image, _ in batch])
    return images, [target for _, target in batch]


class ShapesDataModule(ShardedDataModule):
    """LightningDataModule over :class:`ShapesDataset` (train and val drawn from separate streams).

    Batches are ``(images (B, 3, H, W), [ {"boxes", "labels"} ] * B)`` via :func:`collate_detection`.
    The training loader shards and shuffles with its own ``DistributedSampler(W, r, shuffle=True,
    seed=seed, drop_last=True)`` built from the attached Trainer (``W = 1`` without one); validation
    is sharded without padding (see :mod:`syncnorm.app.data.sampling`). Run the Trainer with
    ``use_distributed_sampler=False``.

    Args:
        batch_size: samples per batch (per device). Default: 16.
        image_size: square image side, at least 16 (a multiple of 16 for :class:`~syncnorm.app.models.YOLO`).
            Default: 64.
        num_train: training images. Default: 512.
        num_val: validation images. Default: 128.
        num_classes: 2 or 3. Default: 2.
        min_objects: fewest objects per image. Default: 1.
        max_objects: most objects per image. Default: 4.
        seed: dataset seed, also the seed of the training order. Default: 0.
        num_workers: ``DataLoader`` workers. Default: 0.

    Example::

        >>> dm = ShapesDataModule(batch_size=4, num_train=8, num_val=4)
        >>> dm.setup("fit")
        >>> images, targets = next(iter(dm.val_dataloader()))
        >>> tuple(images.shape), len(targets)
        ((4, 3, 64, 64), 4)
    """

    in_channels = 3
    collate_fn = staticmethod(collate_detection)

    def __init__(self, batch_size: int = 16, image_size: int = 64, num_train: int = 512, num_val: int = 128,
                 num_classes: int = 2, min_objects: int = 1, max_objects: int = 4, seed: int = 0,
                 num_workers: int = 0) -> None:
        super().__init__(batch_size, seed, num_workers)
        self.save_hyperparameters()
        self.image_size = image_size
        self.num_classes = num_classes
        options = dict(image_size=image_size, num_classes=num_classes, min_objects=min_objects,
                       max_objects=max_objects, seed=seed)
        # datasets are lazy, so building them here is free and validates the arguments early
        self.train_dataset = ShapesDataset(num_train, split="train", **options)
        self.val_dataset = ShapesDataset(num_val, split="val", **options)
