"""The data modules' own DistributedSampler: one data order for every world size."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from syncnorm.app.data import DigitsDataModule, ShapesDataModule


def _loader(dm, world: int, rank: int, train: bool = True):
    dm.trainer = SimpleNamespace(world_size=world, global_rank=rank)  # what Lightning attaches
    return dm.train_dataloader() if train else dm.val_dataloader()


def test_two_ranks_of_b_are_one_process_of_2b_at_every_step_and_epoch():
    dm = DigitsDataModule(batch_size=4, seed=7)
    dm.setup()
    single_dm = DigitsDataModule(batch_size=8, seed=7)
    single_dm.setup()
    firsts = []
    for epoch in range(2):
        loaders = [_loader(dm, 2, r) for r in range(2)]
        single = _loader(single_dm, 1, 0)
        for loader in loaders + [single]:
            loader.sampler.set_epoch(epoch)  # what Lightning's fit loop does each epoch
        assert len(loaders[0]) == len(loaders[1]) == len(single) == (1797 - 359) // 8
        for step, (a, b, whole) in enumerate(zip(*loaders, single)):
            assert torch.equal(whole[0][0::2], a[0]) and torch.equal(whole[0][1::2], b[0])
            assert torch.equal(whole[1], torch.stack([a[1], b[1]], 1).flatten())
            if step == 0:
                firsts.append(whole[1])
    assert not torch.equal(firsts[0], firsts[1])  # set_epoch reshuffles


def test_validation_shards_are_disjoint_and_complete():
    dm = ShapesDataModule(batch_size=4, image_size=32, num_train=8, num_val=7)
    shards = [[t["labels"] for _, targets in _loader(dm, 2, r, train=False) for t in targets] for r in range(2)]
    assert [len(s) for s in shards] == [4, 3]
    whole = [t["labels"] for _, targets in _loader(dm, 1, 0, train=False) for t in targets]
    merged = [shards[i % 2][i // 2] for i in range(7)]
    assert all(torch.equal(x, y) for x, y in zip(merged, whole))
