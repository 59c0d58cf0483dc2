"""torch.compile(fullgraph=True) of synchronized layers on 2 gloo ranks: no graph breaks, equal to eager."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import syncnorm
from tests.helpers.dist import run_distributed

pytestmark = pytest.mark.distributed


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=None), nn.ReLU(),
        nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6), nn.Flatten(), nn.Linear(6 * 36, 4),
    )


def _convert(net):
    net = syncnorm.convert_norms(net, "sync")
    net[7] = syncnorm.convert_norms(nn.Sequential(net[7]), "renorm", r_max=1.5, d_max=0.5)[0]
    return net


def _compile_worker(rank, world, backend):
    torch.set_num_threads(1)
    eager = _convert(_net())
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend=backend)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1)
    opt_c = torch.optim.SGD(compiled_model.parameters(), lr=0.1)
    diffs = []
    for step in range(3):
        x = torch.randn(4 + rank, 3, 6, 6, generator=torch.Generator().manual_seed(10 * step + rank))  # uneven
        outs = []
        for model, params, opt in ((eager, eager, opt_e), (compiled, compiled_model, opt_c)):
            y = model(x)
            opt.zero_grad()
            y.square().mean().backward()
            for p in params.parameters():  # what DDP does: average the gradients, ranks stay in step
                torch.distributed.all_reduce(p.grad)
                p.grad /= world
            outs.append((y.detach(), [p.grad.clone() for p in params.parameters()]))
            opt.step()
        diffs.append({
            "out": (outs[0][0] - outs[1][0]).abs().max().item(),
            "grad": max((a - b).abs().max().item() for a, b in zip(outs[0][1], outs[1][1])),
        })
    buffers = max((a - b).abs().max().item() for a, b in zip(eager.buffers(), compiled_model.buffers())
                  if a.is_floating_point())
    explain = torch._dynamo.explain(copy.deepcopy(eager))(x)
    return {"diffs": diffs, "buffers": buffers, "breaks": explain.graph_break_count,
            "reasons": [str(r.reason) for r in explain.break_reasons]}


@pytest.mark.parametrize("backend", ["inductor"])
def test_compiled_fullgraph_equals_eager_with_no_graph_breaks(backend):
    for rank, res in enumerate(run_distributed(_compile_worker, 2, backend, timeout=300)):
        assert res["breaks"] == 0, res["reasons"]
        for step, d in enumerate(res["diffs"]):
            assert d["out"] <= 1e-5 and d["grad"] <= 1e-5, (rank, step, d)
        assert res["buffers"] <= 1e-5, (rank, res["buffers"])
