"""Ranks that run different synchronized layers are caught without names; ranks that run the same
layers are never stopped; eval mode never communicates.

Layers here are built directly (``SyncBatchNorm(C)``), never converted, so none has a name: the
engine tells them apart by where they were built. A rank "skips" a layer as a data-dependent branch
would: rank 0 runs A then B, rank 1 runs only B, so A on rank 0 meets B on rank 1 (same C, dtype
and device: only the identity differs).
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.distributed as dist

import syncnorm
from tests.helpers.dist import run_distributed

pytestmark = pytest.mark.distributed

C = 6
KINDS = {"sync": syncnorm.SyncBatchNorm, "renorm": syncnorm.BatchRenorm, "switchable": syncnorm.SwitchableNorm}


def _skip_worker(rank: int, world: int, kind: str, when: str) -> dict:
    torch.manual_seed(0)
    a = KINDS[kind](C)
    b = KINDS[kind](C)
    x = torch.randn(4, C, 3)
    if when == "steady":  # a normal step first: both layers past their first-call handshake
        a(x), b(x)
    start = time.monotonic()
    try:
        if rank != 1:
            a(x)
        b(x)
        return {"error": None}
    except syncnorm.SyncError as err:
        return {"error": str(err), "seconds": time.monotonic() - start}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("when", ["first", "steady"])
def test_a_rank_that_skips_an_unnamed_layer_gets_sync_error_on_every_rank(kind, when):
    results = run_distributed(_skip_worker, 2, kind, when, timeout=120, clean_exit=False)
    cls = KINDS[kind].__name__
    for rank, res in enumerate(results):
        assert res["error"] is not None, f"rank {rank} was not stopped"
        assert res["seconds"] < 30, res
        msg = res["error"]
        assert "ranks disagree on the synchronized layer" in msg, msg
        # what each rank ran: rank 0 the first layer built in _skip_worker (A), rank 1 the second (B)
        line_a, line_b = _build_lines()
        assert f"rank 0: {cls} [built at tests.distributed.test_skip_detection:{line_a} #" in msg, msg
        assert f"rank 1: {cls} [built at tests.distributed.test_skip_detection:{line_b} #" in msg, msg


def _build_lines() -> tuple[int, int]:
    """Source lines of ``a = ...`` and ``b = ...`` in :func:`_skip_worker`."""
    import inspect

    lines, first = inspect.getsourcelines(_skip_worker)
    at = [first + i for i, line in enumerate(lines) if line.strip().startswith(("a = KINDS", "b = KINDS"))]
    return at[0], at[1]


def _no_false_alarm_worker(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    if rank == 0:  # only rank 0 builds an evaluation copy, before the training model
        evaluation = torch.nn.Sequential(syncnorm.SyncBatchNorm(C), syncnorm.BatchRenorm(C)).eval()
    model = torch.nn.Sequential(syncnorm.SyncBatchNorm(C), syncnorm.BatchRenorm(C), syncnorm.SwitchableNorm(C))
    twin = copy.deepcopy(model[0])  # a deep copy is the same layer: it may stand in for it
    x = torch.randn(4, C, 3, generator=torch.Generator().manual_seed(rank))
    for step in range(3):
        model(x)
        if rank == 0:
            evaluation(x)  # eval: no communication, nothing to match
    twin(x)  # every rank runs the copy
    return {"mean": model[0].running_mean.clone(), "twin": twin.running_mean.clone()}


def test_ranks_that_run_the_same_layers_are_never_stopped():
    results = run_distributed(_no_false_alarm_worker, 2, timeout=120)
    torch.testing.assert_close(results[0]["mean"], results[1]["mean"], rtol=0, atol=0)
    torch.testing.assert_close(results[0]["twin"], results[1]["twin"], rtol=0, atol=0)


def _eval_one_rank_worker(rank: int, world: int, track: bool) -> dict:
    torch.manual_seed(0)
    layers = [syncnorm.SwitchableNorm(C, track_running_stats=track),
              syncnorm.BatchInstanceNorm(C, track_running_stats=track),
              syncnorm.SyncBatchNorm(C, track_running_stats=track)]
    calls = {"n": 0}
    original = dist.all_reduce

    def counted(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    x = torch.randn(4, C, 3, generator=torch.Generator().manual_seed(rank))
    for layer in layers:
        layer(x)  # a training step on every rank
    dist.all_reduce = counted
    try:
        if rank == 0:  # an extra evaluation batch on rank 0 only
            for layer in layers:
                layer.eval()
                layer(x)
                layer.train()
    finally:
        dist.all_reduce = original
    for layer in layers:  # the ranks are still in step
        layer(x)
    return {"eval_collectives": calls["n"]}


@pytest.mark.parametrize("track", [True, False])
def test_eval_on_one_rank_only_communicates_nothing_and_never_hangs(track):
    results = run_distributed(_eval_one_rank_worker, 2, track, timeout=120)
    assert [r["eval_collectives"] for r in results] == [0, 0]


def _compiled_mismatch_worker(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    a, b, c = syncnorm.SyncBatchNorm(C), syncnorm.SyncBatchNorm(C), syncnorm.SyncBatchNorm(C)

    def step(x):  # rank 1 runs c where rank 0 runs a: same collectives, different layers
        return b(a(x) if rank == 0 else c(x))

    fn = torch.compile(step, fullgraph=True, backend="aot_eager")
    model = torch.nn.ModuleList([a, b, c])
    x = torch.randn(4, C, 3)
    fn(x)
    fn(x)
    try:
        syncnorm.check_sync_errors(model)
        return {"error": None}
    except syncnorm.SyncError as err:
        return {"error": str(err)}


def test_compiled_mismatch_is_recorded_on_the_device_and_raised_at_the_next_check():
    for rank, res in enumerate(run_distributed(_compiled_mismatch_worker, 2, timeout=240)):
        assert res["error"] is not None, rank
        assert "ranks ran different synchronized layers at the same step" in res["error"], res
        # rank 0's a met rank 1's c; b met b and is not reported
        flagged, clean = ("'0'", "'2'") if rank == 0 else ("'2'", "'0'")
        assert f"SyncBatchNorm {flagged}" in res["error"] and f"SyncBatchNorm {clean}" not in res["error"], res
        assert "SyncBatchNorm '1'" not in res["error"], res
