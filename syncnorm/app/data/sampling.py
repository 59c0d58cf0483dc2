"""Samplers shared by the data modules: one data order for every world size.

Training uses an explicit :class:`torch.utils.data.DistributedSampler` with
``shuffle=True, seed=seed, drop_last=True``, built in ``train_dataloader`` from the attached
Trainer's ``world_size`` and ``global_rank`` (``W = 1, r = 0`` without a Trainer), also when
``W == 1``. Its permutation of epoch ``e`` depends only on ``seed + e``, never on ``W``, and rank
``r`` reads positions ``r, r + W, r + 2W, ...`` of it. So with a per-rank batch of ``B``, the union of
the ``W`` ranks' step-``t`` batches is exactly the single-process step-``t`` batch of size ``W * B``:
"2 ranks x batch B" and "1 process x batch 2B" see the same samples at every step, which is what
makes a SyncBatchNorm run comparable, step for step, with a single-process BatchNorm run.

Lightning calls ``sampler.set_epoch(epoch)`` at the start of every training epoch for any sampler
that has it (``use_distributed_sampler=False`` only stops Lightning from *replacing* the sampler),
so each epoch gets a new permutation, identical on every rank.

Validation is sharded without padding (rank ``r`` gets samples ``r, r + W, ...``), so no sample is
counted twice; the LightningModules sum their metrics over ranks, which is exact for uneven shards.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

__all__ = ["ShardedDataModule", "world_and_rank", "train_sampler", "val_shard"]


def world_and_rank(trainer: Optional[Any]) -> tuple[int, int]:
    """``(world_size, global_rank)`` of the attached Trainer, ``(1, 0)`` without one."""
    if trainer is None:
        return 1, 0
    return int(trainer.world_size), int(trainer.global_rank)


def train_sampler(dataset: Dataset, trainer: Optional[Any], seed: int) -> DistributedSampler:
    """The training sampler: ``DistributedSampler(W, r, shuffle=True, seed=seed, drop_last=True)``.

    Args:
        dataset: the training dataset.
        trainer: the Trainer the data module is attached to, or ``None`` (one process).
        seed: seed of the permutation (the same on every rank).
    """
    world, rank = world_and_rank(trainer)
    return DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=int(seed),
                              drop_last=True)


def val_shard(dataset: Dataset, trainer: Optional[Any]) -> Dataset:
    """Rank ``r``'s validation samples ``r, r + W, r + 2W, ...`` (the whole dataset when ``W == 1``)."""
    world, rank = world_and_rank(trainer)
    if world == 1:
        return dataset
    return Subset(dataset, list(range(rank, len(dataset), world)))


class ShardedDataModule(pl.LightningDataModule):
    """The data modules' common part: argument checks, and loaders that shard as described above.

    Subclasses set ``train_dataset``/``val_dataset`` (in ``__init__`` or ``setup``) and may set
    ``collate_fn``.

    Args:
        batch_size: samples per batch (per device), >= 1.
        seed: seed of the training order (the same on every rank).
        num_workers: ``DataLoader`` workers, >= 0.

    Raises:
        ValueError: ``batch_size < 1`` or ``num_workers < 0`` (the message names the subclass).
    """

    collate_fn: Optional[Callable[[list], Any]] = None

    def __init__(self, batch_size: int, seed: int, num_workers: int) -> None:
        super().__init__()
        name = type(self).__name__
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"{name}: expected batch_size >= 1, got {batch_size!r}")
        if num_workers < 0:
            raise ValueError(f"{name}: expected num_workers >= 0, got {num_workers!r}")
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.train_dataset: Optional[Dataset] = None
        self.val_dataset: Optional[Dataset] = None

    def _loader(self, dataset: Optional[Dataset], train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for a dataloader")
        trainer = getattr(self, "trainer", None)
        return DataLoader(
            dataset if train else val_shard(dataset, trainer),
            batch_size=self.batch_size,
            sampler=train_sampler(dataset, trainer, self.seed) if train else None,
            drop_last=train,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """This rank's shard of the seeded permutation, ``drop_last=True``."""
        return self._loader(self.train_dataset, train=True)

    def val_dataloader(self) -> DataLoader:
        """In order; this rank's samples ``r, r + W, ...`` (every sample when ``W == 1``)."""
        return self._loader(self.val_dataset, train=False)
