"""Data with a large offset, differently offset on each rank: the merged statistics are those of
float64 on the full batch, from a fresh layer's first step and after a few steps.

float32 data with mean 1e4 and std 1e-2 (``|mean| / std = 1e6``): variance within 1e-6 relative,
outputs within 1e-5. float64 data with mean 1e8 and std 1: variance within 1e-9 relative; outputs
within 1e-7, since a float64 value near 1e8 is itself quantized at 1.5e-8. Raw sums (what the
previous release sent) are off by 1e-4 and by 100 % on these. The reference is the two-pass float64
mean and variance of the concatenated batch.
"""

from __future__ import annotations

import pytest
import torch

import syncnorm
from tests.helpers.dist import run_distributed

pytestmark = pytest.mark.distributed

C, STEPS, EPS = 3, 4, 1e-5
CASES = {"float32": (torch.float32, 1e4, 1e-2, 1e-6, 1e-5), "float64": (torch.float64, 1e8, 1.0, 1e-9, 1e-7)}


def _batch(case: str, step: int, world: int) -> torch.Tensor:
    dtype, offset, std, *_ = CASES[case]
    g = torch.Generator().manual_seed(step)
    sizes = [3 + r for r in range(world)]
    parts = [torch.randn(n, C, 5, generator=g, dtype=torch.float64) * std + offset + 3 * r * std
             for r, n in enumerate(sizes)]  # rank r's data sits 3 r std above rank 0's
    return torch.cat(parts).to(dtype), sizes


MODES = ("eager", "compiled")


def _run_case(rank: int, world: int, case: str, mode: str) -> list:
    # momentum 1: the running statistics are this step's global mean and unbiased variance
    layer = syncnorm.SyncBatchNorm(C, eps=EPS, momentum=1.0, dtype=CASES[case][0])
    fn = torch.compile(layer, fullgraph=True, backend="aot_eager") if mode == "compiled" else layer
    seen = []
    for step in range(STEPS):
        x, sizes = _batch(case, step, world)
        start = sum(sizes[:rank])
        y = fn(x[start:start + sizes[rank]])
        seen.append({"out": y.detach().double(), "running_var": layer.running_var.double().clone(),
                     "running_mean": layer.running_mean.double().clone()})
    return seen


def _worker(rank: int, world: int) -> dict:
    torch.set_num_threads(1)
    # every case and mode in one launch of the group (a fresh layer each: first step included)
    return {(case, mode): _run_case(rank, world, case, mode) for case in CASES for mode in MODES}


def _failures(per_rank: list, world: int, case: str, mode: str) -> list[str]:
    dtype, offset, std, var_tol, out_tol = CASES[case]
    failures = []
    for step in range(STEPS):
        x, _ = _batch(case, step, world)
        xd = x.double()
        mean = xd.mean((0, 2), keepdim=True)
        var = (xd - mean).square().mean((0, 2))
        n = xd.numel() // C
        unbiased = var * n / (n - 1)
        ref = (xd - mean) / torch.sqrt(var.view(1, C, 1) + EPS)
        out = torch.cat([r[case, mode][step]["out"] for r in per_rank])
        err = (out - ref).abs().max().item()
        if not err < out_tol:
            failures.append(f"{case}/{mode} step {step}: output off by {err:.3g} (tolerance {out_tol})")
        for rank, r in enumerate(per_rank):
            got = r[case, mode][step]
            rel = ((got["running_var"] - unbiased).abs() / unbiased).max().item()
            if not rel < var_tol:
                failures.append(f"{case}/{mode} step {step} rank {rank}: running_var off by {rel:.3g} relative")
            # running_mean is stored in the input dtype: exact up to its rounding at the offset
            mean_err = ((got["running_mean"] - mean.flatten()).abs() / var.sqrt()).max().item()
            if not mean_err <= max(var_tol, torch.finfo(dtype).eps * offset / std):
                failures.append(f"{case}/{mode} step {step} rank {rank}: running_mean off by {mean_err:.3g} std")
    return failures


@pytest.mark.parametrize("world", [2, 3])
def test_offset_data_merges_exactly_from_the_first_step(world):
    """Both cases, eager and compiled, on fresh layers (the first step) and over the next steps."""
    per_rank = run_distributed(_worker, world, timeout=400)
    failures = [f for case in CASES for mode in MODES for f in _failures(per_rank, world, case, mode)]
    assert not failures, "\n".join(failures)
    assert {key for key in per_rank[0]} == {(c, m) for c in CASES for m in MODES}
