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

A checkpoint saved mid-epoch (``callbacks.checkpoint.every_n_train_steps``, or validation inside
an epoch) resumes mid-epoch: the training loader is resumable (:class:`ResumableLoader`, Lightning
saves its ``state_dict`` in the checkpoint and calls ``load_state_dict`` on resume), and after a
resume its sampler skips the batches of the epoch that Lightning counts as done, so the resumed run
reads the rest of the same permutation. (A plain loader would restart the epoch's permutation from
its first batch while Lightning's counters continue: the first batches twice, the last never.)

Validation is sharded without padding (rank ``r`` gets samples ``r, r + W, ...``), so no sample is
counted twice; the LightningModules sum their metrics over ranks, which is exact for uneven shards.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterator, Optional

import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

__all__ = ["ResumableLoader", "ResumableSampler", "ShardedDataModule", "world_and_rank", "train_sampler",
           "val_shard"]


def world_and_rank(trainer: Optional[Any]) -> tuple[int, int]:
    """``(world_size, global_rank)`` of the attached Trainer, ``(1, 0)`` without one."""
    if trainer is None:
        return 1, 0
    return int(trainer.world_size), int(trainer.global_rank)


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` that can skip the leading samples of its next iteration, once (a resume)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._skip: Optional[Callable[[], int]] = None

    def skip_once(self, samples: Callable[[], int]) -> None:
        """Skip ``samples()`` samples (evaluated when the next iteration starts) of the next iteration."""
        self._skip = samples

    def __iter__(self) -> Iterator[int]:
        indices = super().__iter__()
        if self._skip is None:
            return indices
        skip, self._skip = int(self._skip()), None
        return itertools.islice(indices, skip, None)


class ResumableLoader(DataLoader):
    """The training loader, resumable mid-epoch (see the module docstring).

    Args:
        batches_done: the batches of the current epoch already trained, when asked (Lightning's
            restored ``batch_progress.current.ready``).
        *args, **kwargs: ``DataLoader``'s; the sampler must be a :class:`ResumableSampler`.
    """

    def __init__(self, *args: Any, batches_done: Callable[[], int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, ResumableSampler):
            raise TypeError(f"ResumableLoader: expected a ResumableSampler, got {type(self.sampler).__name__}")
        self._batches_done = batches_done

    def state_dict(self) -> dict[str, Any]:
        """Saved in the checkpoint by Lightning; the position itself is Lightning's own progress."""
        return {"epoch": int(self.sampler.epoch)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """On resume: the next iteration starts after the batches Lightning counts as done."""
        batch_size = int(self.batch_size or 1)
        self.sampler.skip_once(lambda: self._batches_done() * batch_size)


def train_sampler(dataset: Dataset, trainer: Optional[Any], seed: int) -> ResumableSampler:
    """The training sampler: ``DistributedSampler(W, r, shuffle=True, seed=seed, drop_last=True)``
    (a :class:`ResumableSampler`).

    Args:
        dataset: the training dataset.
        trainer: the Trainer the data module is attached to, or ``None`` (one process).
        seed: seed of the permutation (the same on every rank).
    """
    world, rank = world_and_rank(trainer)
    return ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=int(seed), drop_last=True)


def _batches_done(trainer: Optional[Any]) -> int:
    """The batches of the current training epoch Lightning counts as done (0 without a Trainer)."""
    if trainer is None:
        return 0
    return int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)


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
        common = dict(batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=self.collate_fn,
                      persistent_workers=self.num_workers > 0)
        if train:
            return ResumableLoader(dataset, sampler=train_sampler(dataset, trainer, self.seed), drop_last=True,
                                   batches_done=lambda: _batches_done(trainer), **common)
        return DataLoader(val_shard(dataset, trainer), drop_last=False, **common)

    def train_dataloader(self) -> DataLoader:
        """This rank's shard of the seeded permutation, ``drop_last=True``; resumable mid-epoch."""
        return self._loader(self.train_dataset, train=True)

    def val_dataloader(self) -> DataLoader:
        """In order; this rank's samples ``r, r + W, ...`` (every sample when ``W == 1``)."""
        return self._loader(self.val_dataset, train=False)
