"""Digits classification data: scikit-learn's shipped 8x8 handwritten digits, no download needed.

1797 real images, 10 classes, pixel values 0..16. The module scales them to ``[0, 1]``, optionally
standardizes them with the training split's mean and standard deviation, optionally upsamples
them (bilinear) and repeats the gray channel to 3, so the same data feeds 1- or 3-channel models
of any input size.

Example::

    >>> dm = DigitsDataModule(batch_size=16, image_size=16, channels=3)
    >>> dm.setup("fit")
    >>> images, labels = next(iter(dm.train_dataloader()))
    >>> tuple(images.shape), labels.dtype
    ((16, 3, 16, 16), torch.int64)
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import TensorDataset

from .sampling import ShardedDataModule

__all__ = ["DigitsDataModule", "load_digits_tensors", "stratified_split"]


def load_digits_tensors() -> tuple[Tensor, Tensor]:
    """scikit-learn's digits as ``(1797, 1, 8, 8)`` float32 in ``[0, 1]`` and ``(1797,)`` int64."""
    from sklearn.datasets import load_digits  # lazy: scikit-learn is an optional dependency

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    return images, labels


def stratified_split(labels: Tensor, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Deterministic per-class split: ``round(val_fraction * n_c)`` random samples of each class go to val.

    Args:
        labels: ``(N,)`` integer labels.
        val_fraction: share of each class held out, in ``[0, 1)``.
        seed: seed of the permutation.

    Returns:
        Sorted int64 index tensors ``(train_idx, val_idx)``.
    """
    gen = torch.Generator().manual_seed(int(seed))
    train, val = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        n_val = int(round(val_fraction * idx.numel()))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return torch.sort(torch.cat(train)).values, torch.sort(torch.cat(val)).values


class DigitsDataModule(ShardedDataModule):
    """LightningDataModule over scikit-learn's 8x8 digits (1797 samples, 10 classes).

    The split is stratified per class and fixed by ``seed``. The training loader shards and
    shuffles with its own ``DistributedSampler(W, r, shuffle=True, seed=seed, drop_last=True)``
    built from the attached Trainer (``W = 1`` without one), so the data order does not depend on
    the world size; validation is sharded without padding (see :mod:`syncnorm.app.data.sampling`).
    Run the Trainer with ``use_distributed_sampler=False``.

    Args:
        batch_size: samples per batch (per device). Default: 32.
        image_size: output side in pixels, at least 8; larger sizes are upsampled bilinearly.
            Default: 8.
        channels: 1 (gray) or 3 (gray repeated). Default: 1.
        val_fraction: share of each class held out for validation, in ``[0, 1)``. Default: 0.2.
        seed: seed of the split and of the training order. Default: 0.
        num_workers: ``DataLoader`` workers. Default: 0.
        normalize: standardize with the training split's mean and std (one scalar each); otherwise
            values stay in ``[0, 1]``. Default: ``True``.

    Raises:
        ValueError: an argument outside its range (the message names expected and received values).
    """

    num_classes = 10

    def __init__(self, batch_size: int = 32, image_size: int = 8, channels: int = 1, val_fraction: float = 0.2,
                 seed: int = 0, num_workers: int = 0, normalize: bool = True) -> None:
        super().__init__(batch_size, seed, num_workers)
        if not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"DigitsDataModule: expected image_size >= 8, got {image_size!r}")
        if channels not in (1, 3):
            raise ValueError(f"DigitsDataModule: expected channels in [1, 3], got {channels!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"DigitsDataModule: expected val_fraction in [0, 1), got {val_fraction!r}")
        self.save_hyperparameters()
        self.image_size = image_size
        self.in_channels = channels
        self.val_fraction = val_fraction
        self.normalize = normalize
        self.mean: Optional[float] = None
        self.std: Optional[float] = None

    def _transform(self, images: Tensor) -> Tensor:
        if self.normalize:
            images = (images - self.mean) / self.std
        if self.image_size != images.shape[-1]:
            size = (self.image_size, self.image_size)
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        if self.in_channels == 3:
            images = images.repeat(1, 3, 1, 1)
        return images.contiguous()

    def setup(self, stage: Optional[str] = None) -> None:
        """Load the digits, split them and build both datasets (idempotent)."""
        if self.train_dataset is not None:
            return
        images, labels = load_digits_tensors()
        train_idx, val_idx = stratified_split(labels, self.val_fraction, self.seed)
        self.mean = float(images[train_idx].mean())
        self.std = float(images[train_idx].std())
        self.train_dataset = TensorDataset(self._transform(images[train_idx]), labels[train_idx])
        self.val_dataset = TensorDataset(self._transform(images[val_idx]), labels[val_idx])
