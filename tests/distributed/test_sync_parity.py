"""SyncBatchNorm on W gloo ranks equals torch.nn.BatchNorm on the concatenated batch.

Each test spawns one process group and runs a list of cases in it (start-up dominates the cost on
2 cores); the parent computes the full-batch reference and compares outputs, input gradients,
summed parameter gradients, running statistics and num_batches_tracked (max abs err <= 1e-5).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import syncnorm
from tests.helpers.dist import run_distributed
from tests.helpers.parity import Case, assert_parity, init_affine, param_dtype, run_layer

pytestmark = pytest.mark.distributed


def _layer_for(case: Case, group=None) -> torch.nn.Module:
    layer = syncnorm.SyncBatchNorm(case.channels, momentum=case.momentum, affine=case.affine,
                                   track_running_stats=case.track_running_stats, process_group=group,
                                   dtype=param_dtype(case))
    return init_affine(layer, case)


def _parity_worker(rank: int, world: int, cases: list[Case]) -> list[dict]:
    return [run_layer(_layer_for(c), c, rank) for c in cases]


def _cases(world: int) -> list[Case]:
    even = (4,) * world
    uneven = {2: (1, 5), 3: (1, 5, 2), 4: (3, 1, 5, 2)}[world]
    empty = {2: (0, 6), 3: (4, 0, 3), 4: (2, 0, 5, 1)}[world]
    return [
        Case(even, spatial=(), label="2D (N, C)"),
        Case(even, spatial=(7,), label="3D (N, C, L)"),
        Case(even, spatial=(3, 4), label="4D (N, C, H, W)"),
        Case(even, spatial=(2, 3, 2), label="5D (N, C, D, H, W)"),
        Case(uneven, spatial=(3, 4), label=f"uneven {uneven}"),
        Case(empty, spatial=(3, 4), label=f"one empty rank {empty}"),
        Case(even, affine=False, label="affine off"),
        Case(even, track_running_stats=False, label="track_running_stats off"),
        Case(uneven, momentum=None, steps=4, label="momentum None (cumulative)"),
        Case(even, spatial=(3, 4), channels_last=True, label="channels_last"),
        Case(even, dtype=torch.float64, label="float64"),
    ]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_parity_with_full_batch_batchnorm(world):
    cases = _cases(world)
    results = run_distributed(_parity_worker, world, cases)
    for i, case in enumerate(cases):
        assert_parity(case, [results[r][i] for r in range(world)])


def _subgroup_worker(rank: int, world: int, cases: list[Case]) -> list[dict]:
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
    mine, local_rank = groups[rank // 2], rank % 2
    return [run_layer(_layer_for(c, mine), c, local_rank) for c in cases]


def test_subgroups_of_four_ranks_sync_only_within_their_pair():
    # ranks {0,1} and {2,3} each see a different pair of slices of their own full batch
    pair_cases = [[Case((3, 2), seed=10, label="pair 0"), Case((1, 4), seed=11, label="pair 0 uneven")],
                  [Case((3, 2), seed=20, label="pair 1"), Case((1, 4), seed=21, label="pair 1 uneven")]]
    results = run_distributed(_subgroup_worker_by_pair, 4, pair_cases)
    for pair in (0, 1):
        for i, case in enumerate(pair_cases[pair]):
            assert_parity(case, [results[2 * pair][i], results[2 * pair + 1][i]])


def _subgroup_worker_by_pair(rank: int, world: int, pair_cases: list[list[Case]]) -> list[dict]:
    return _subgroup_worker(rank, world, pair_cases[rank // 2])


def _eval_worker(rank: int, world: int) -> dict:
    """Eval mode never communicates: rank 1 runs eval forwards that rank 0 does not run."""
    layer = syncnorm.SyncBatchNorm(3)
    layer.train()
    x = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(rank))
    layer(x)
    layer.eval()
    outs = [layer(torch.randn(1, 3, 2)) for _ in range(3 if rank == 1 else 1)]
    dist.barrier()
    return {"running_mean": layer.running_mean.clone(), "eval_ok": all(o.shape == (1, 3, 2) for o in outs)}


def test_eval_mode_uses_running_stats_and_never_communicates():
    res = run_distributed(_eval_worker, 2)
    assert res[0]["eval_ok"] and res[1]["eval_ok"]
    torch.testing.assert_close(res[0]["running_mean"], res[1]["running_mean"], rtol=0, atol=0)
