"""Sync groups of k ranks; synchronized Batch-Instance and Switchable Norm equal the full batch."""

from __future__ import annotations

import pytest
import torch

import syncnorm
from tests.helpers.dist import run_distributed
from tests.helpers.parity import Case, assert_parity, init_affine, run_layer

pytestmark = pytest.mark.distributed


def _k_worker(rank, world, k, cases):
    group = syncnorm.new_sync_groups(k)
    local_rank = rank % k
    results = []
    for c in cases[rank // k]:
        results.append(run_layer(init_affine(syncnorm.SyncBatchNorm(c.channels, process_group=group), c), c, local_rank))
    return results


@pytest.mark.parametrize("k", [2, 4])
def test_sync_groups_of_k_ranks_equal_batchnorm_over_each_group(k):
    world = 4
    groups = world // k
    cases = [[Case(tuple([3, 1, 2, 2][:k]), seed=40 + g, label=f"k={k} group {g}")] for g in range(groups)]
    results = run_distributed(_k_worker, world, k, cases)
    for g in range(groups):
        assert_parity(cases[g][0], [results[g * k + r][0] for r in range(k)])


def test_sync_group_size_must_divide_world():
    assert all("dividing the world size 4, got 3" in r for r in run_distributed(_bad_k_worker, 4))


def _bad_k_worker(rank, world):
    try:
        syncnorm.new_sync_groups(3)
    except ValueError as err:
        return str(err)
    return ""


def _mixed(cls, case):
    layer = cls(case.channels)
    with torch.no_grad():  # a non-trivial mix, the same on every rank
        if cls is syncnorm.BatchInstanceNorm:
            layer.gate.copy_(torch.linspace(0.2, 0.9, case.channels))
        else:
            layer.mean_weight.copy_(torch.tensor([0.3, -0.2, 0.5]))
            layer.var_weight.copy_(torch.tensor([-0.1, 0.4, 0.2]))
    return init_affine(layer, case)


def _mixed_worker(rank, world, cases):
    return [run_layer(_mixed(cls, c), c, rank) for cls, c in cases]


def test_synchronized_batch_instance_and_switchable_norm_equal_full_batch():
    cases = [(syncnorm.BatchInstanceNorm, Case((3, 5), spatial=(4, 3), label="BIN uneven")),
             (syncnorm.SwitchableNorm, Case((3, 5), spatial=(4, 3), label="SN uneven")),
             (syncnorm.SwitchableNorm, Case((4, 4), spatial=(6,), label="SN 3D"))]
    results = run_distributed(_mixed_worker, 2, cases)
    for i, (cls, case) in enumerate(cases):
        ref = _mixed(cls, case)
        per_rank = [results[r][i] for r in range(2)]
        assert_parity(case, per_rank, reference=ref)
