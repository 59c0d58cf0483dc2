"""Distributed failure modes of SyncBatchNorm end in clear errors, on every rank, in bounded time."""

from __future__ import annotations

import re
import time

import pytest
import torch

import syncnorm
from tests.helpers.dist import run_distributed

pytestmark = pytest.mark.distributed


def _catch(fn):
    t0 = time.monotonic()
    try:
        fn()
    except (ValueError, RuntimeError) as err:
        return {"type": type(err).__name__, "msg": str(err), "seconds": time.monotonic() - t0}
    return {"type": None, "msg": "", "seconds": time.monotonic() - t0}


def _different_layers_worker(rank, world):
    a, b = syncnorm.SyncBatchNorm(4), syncnorm.SyncBatchNorm(4)
    a.layer_name, b.layer_name = "backbone.bn1", "head.bn"
    layer = a if rank == 0 else b  # rank 1 "skipped" backbone.bn1 and is already in head.bn
    return _catch(lambda: layer(torch.randn(3, 4, 2)))


def test_rank_in_a_different_layer_is_named_on_every_rank():
    res = run_distributed(_different_layers_worker, 2, clean_exit=False, timeout=60)
    for r in res:
        assert r["type"] == "SyncError", r
        assert "ranks disagree" in r["msg"]
        assert "rank 0: SyncBatchNorm 'backbone.bn1'" in r["msg"] and "rank 1: SyncBatchNorm 'head.bn'" in r["msg"]


def _dtype_worker(rank, world):
    layer = syncnorm.SyncBatchNorm(3, dtype=torch.float64 if rank == 1 else torch.float32)
    x = torch.randn(4, 3, dtype=torch.float64 if rank == 1 else torch.float32)
    return _catch(lambda: layer(x))


def test_ranks_with_different_dtypes_get_a_clear_error():
    res = run_distributed(_dtype_worker, 2, clean_exit=False, timeout=60)
    for r in res:
        assert r["type"] == "SyncError", r
        # unnamed layers are shown with where they were built
        assert re.search(r"rank 0: SyncBatchNorm \[built at tests\.distributed\.test_sync_faults:\d+ #0 \(\w+\)\] "
                         r"\(C=3, float32, cpu\)", r["msg"]), r["msg"]
        assert re.search(r"rank 1: SyncBatchNorm \[built at [^]]*\] \(C=3, float64, cpu\)", r["msg"]), r["msg"]


def _skip_worker(rank, world):
    layer = syncnorm.SyncBatchNorm(5)
    layer.layer_name = "layer3.1.bn2"
    layer.sync_timeout_s = 3.0
    if rank == 0:
        return _catch(lambda: layer(torch.randn(4, 5, 3)))
    time.sleep(6)  # rank 1 took a branch without this layer and is busy elsewhere
    return {"type": None, "msg": "", "seconds": 0.0}


def test_rank_that_skips_the_layer_fails_within_the_timeout():
    res = run_distributed(_skip_worker, 2, clean_exit=False, timeout=60)
    r = res[0]
    assert r["type"] == "SyncError", r
    assert "SyncBatchNorm 'layer3.1.bn2'" in r["msg"] and "did not complete" in r["msg"] and "3 s" in r["msg"]
    assert 2.5 < r["seconds"] < 10, r["seconds"]


def _count_worker(rank, world, sizes):
    layer = syncnorm.SyncBatchNorm(3)
    return _catch(lambda: layer(torch.randn(sizes[rank], 3)))


@pytest.mark.parametrize("sizes,expected", [((1, 0, 0), "got 1 value per channel over the whole process group"),
                                            ((0, 0, 0), "expected a non-empty batch")])
def test_one_or_zero_values_per_channel_globally_raise_on_every_rank(sizes, expected):
    res = run_distributed(_count_worker, 3, sizes, timeout=60)
    for r in res:
        assert r["type"] == "ValueError" and expected in r["msg"] and "SyncBatchNorm" in r["msg"], r


def _small_cnn(norm):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), norm(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1, stride=2), norm(8), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4),
    )


def _data(step, n):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, 3, 6, 6, generator=g) * 2 + 1, torch.randint(0, 4, (n,), generator=g)


def _train(model, rank, world, per_rank, steps):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for step in range(steps):
        x, y = _data(step, per_rank * world)
        x, y = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _ddp_worker(rank, world, steps):
    model = syncnorm.SyncBatchNorm.convert_sync_batchnorm(_small_cnn(torch.nn.BatchNorm2d))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    _train(ddp, rank, world, 4, steps)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_under_ddp_training_equals_single_process_on_the_full_batch():
    steps = 4
    results = run_distributed(_ddp_worker, 2, steps)
    ref = _small_cnn(torch.nn.BatchNorm2d)
    _train(ref, 0, 1, 8, steps)
    for rank, state in enumerate(results):
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(state[k], v, rtol=0, atol=1e-5, msg=lambda m: f"rank {rank} {k}: {m}")


def _nonfinite_worker(rank, world, policy, bad_value):
    import warnings

    layer = syncnorm.SyncBatchNorm(3, momentum=0.5)
    layer.layer_name, layer.on_nonfinite = "stem.bn", policy
    x = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(rank)) + 2
    if rank == 1:
        x[2, 1, 3] = bad_value
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = _catch(lambda: setattr(layer, "_out", layer(x)))
    res["warnings"] = [str(w.message) for w in caught]
    res["out"] = getattr(layer, "_out", torch.empty(0)).detach()
    res["running_mean"], res["running_var"] = layer.running_mean.clone(), layer.running_var.clone()
    res["x"] = x
    return res


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_nan_or_inf_on_one_rank_poisons_only_its_channel_and_not_the_running_stats(bad_value):
    res = run_distributed(_nonfinite_worker, 2, "skip", bad_value)
    full = torch.cat([r["x"] for r in res])
    ok = [0, 2]
    for r in res:
        assert r["type"] is None, r
        assert not torch.isfinite(r["out"][:, 1]).all()  # the affected channel, on every rank
        assert torch.isfinite(r["out"][:, ok]).all()
        # the other channels are exactly the full-batch statistics; channel 1 kept its running values
        mean, var = full[:, ok].mean((0, 2)), full[:, ok].var((0, 2), unbiased=True)
        torch.testing.assert_close(r["running_mean"][ok], 0.5 * mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(r["running_var"][ok], 0.5 + 0.5 * var, rtol=0, atol=1e-5)
        assert r["running_mean"][1] == 0.0 and r["running_var"][1] == 1.0
        assert any("SyncBatchNorm 'stem.bn': non-finite batch statistics (NaN/inf) in channels [1], "
                   "from the input of rank 1: channels [1]" in w for w in r["warnings"]), r["warnings"]


def test_nonfinite_policy_raise_names_layer_and_rank_on_every_rank():
    res = run_distributed(_nonfinite_worker, 2, "raise", float("nan"), clean_exit=False)
    for r in res:
        assert r["type"] == "SyncError" and "'stem.bn'" in r["msg"] and "rank 1: channels [1]" in r["msg"], r


def _channels_worker(rank, world):
    layer = syncnorm.SyncBatchNorm(4 if rank == 0 else 6)  # the ranks built different models
    layer.layer_name = "neck.bn"
    return _catch(lambda: layer(torch.randn(3, layer.num_features, 2)))


def test_ranks_with_different_channel_counts_get_a_clear_error_not_an_abort():
    res = run_distributed(_channels_worker, 2, clean_exit=False, timeout=60)
    for r in res:
        assert r["type"] == "SyncError", r
        assert "rank 0: SyncBatchNorm 'neck.bn' (C=4, float32, cpu)" in r["msg"], r
        assert "rank 1: SyncBatchNorm 'neck.bn' (C=6, float32, cpu)" in r["msg"], r


def _cumulative_skip_worker(rank, world, mode):
    """momentum=None (cumulative average) with a NaN batch in between: the bad batch is not counted."""
    layer = syncnorm.SyncBatchNorm(3, momentum=None)
    layer.on_nonfinite = "skip"
    fn = torch.compile(layer, fullgraph=True, backend="aot_eager") if mode == "compiled" else layer
    batches = [torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(10 * step + rank)) + step
               for step in range(3)]
    if rank == 1:
        batches[1][0, 1, 0] = float("nan")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for x in batches:
            fn(x)
    return {"batches": batches, "mean": layer.running_mean.clone(), "var": layer.running_var.clone(),
            "count": int(layer.num_batches_tracked)}


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_cumulative_average_skips_a_nonfinite_batch_entirely(mode):
    res = run_distributed(_cumulative_skip_worker, 2, mode, timeout=240)
    good = [torch.cat([r["batches"][step] for r in res]) for step in (0, 2)]  # batch 1 had a NaN
    mean = sum(b.double().mean((0, 2)) for b in good) / 2
    var = sum(b.double().var((0, 2), unbiased=True) for b in good) / 2
    for r in res:
        assert r["count"] == 2, r["count"]  # the skipped batch is not counted in the average
        torch.testing.assert_close(r["mean"].double(), mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(r["var"].double(), var, rtol=0, atol=1e-5)


def _compiled_raise_worker(rank, world):
    layer = syncnorm.SyncBatchNorm(3)
    layer.on_nonfinite = "raise"
    fn = torch.compile(layer, fullgraph=True, backend="aot_eager")
    fn(torch.randn(4, 3, 2))
    x = torch.randn(4, 3, 2)
    if rank == 0:
        x[1, 2, 0] = float("inf")
    fn(x)  # no host read in a compiled graph: recorded on the device
    recorded = _catch(lambda: syncnorm.check_sync_errors(torch.nn.Sequential(layer)))
    return {**recorded, "running_mean": layer.running_mean.clone()}


def test_compiled_nonfinite_raise_is_recorded_and_raised_at_the_next_check():
    for r in run_distributed(_compiled_raise_worker, 2, timeout=240):
        assert r["type"] == "SyncError", r
        assert "SyncBatchNorm '0'" in r["msg"] and "non-finite batch statistics" in r["msg"], r
        assert torch.isfinite(r["running_mean"]).all()  # the bad channel kept its running value
