"""Synchronized members of the family: BatchRenorm over 2 gloo ranks equals the full batch."""

from __future__ import annotations

import pytest
import torch

import syncnorm
from tests.helpers.dist import run_distributed
from tests.helpers.parity import Case, assert_parity, init_affine, run_layer

pytestmark = pytest.mark.distributed


def _renorm(case: Case) -> torch.nn.Module:
    layer = syncnorm.BatchRenorm(case.channels, momentum=0.3, r_max=1.5, d_max=0.5, warmup_steps=2)
    with torch.no_grad():  # running stats away from the data so that r and d are clipped
        layer.running_mean.copy_(torch.linspace(-1, 1, case.channels))
        layer.running_var.copy_(torch.linspace(0.5, 9, case.channels))
    return layer


def _renorm_worker(rank, world, cases):
    return [run_layer(init_affine(_renorm(c), c), c, rank) for c in cases]


def test_synchronized_renorm_equals_single_process_renorm_on_full_batch():
    cases = [Case((3, 5), spatial=(4,), steps=4, label="renorm uneven"),
             Case((4, 4), spatial=(2, 3), steps=4, label="renorm 4D")]
    results = run_distributed(_renorm_worker, 2, cases)
    for i, case in enumerate(cases):
        assert_parity(case, [results[r][i] for r in range(2)], reference=_renorm(case))
