"""The oracle for synchronized norms: per-rank slices vs ``torch.nn.BatchNorm`` on the full batch.

A *case* describes the input layout and layer options. ``case_data`` builds, from the case's seed,
the full batch, the upstream gradient and how it is split over the ranks; every process rebuilds
the same tensors, so nothing large crosses process boundaries. ``run_layer`` runs a layer for a few
training steps (forward, then backward of ``sum(y * g)``) and returns what is compared: outputs,
input gradients, parameter gradients and buffers. ``assert_parity`` compares the concatenated
per-rank results with ``run_layer`` of a ``torch.nn.BatchNorm`` on the full batch; parameter
gradients are summed over ranks (the loss is a sum over the global batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class Case:
    sizes: tuple  # per-rank batch sizes
    spatial: tuple = (3, 4)  # trailing dims after (N, C)
    channels: int = 5
    affine: bool = True
    track_running_stats: bool = True
    momentum: Optional[float] = 0.1
    steps: int = 3
    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    seed: int = 0
    label: str = field(default="")


def case_data(case: Case, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(case.seed * 1000 + step)
    n = sum(case.sizes)
    shape = (n, case.channels, *case.spatial)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2.0 + torch.linspace(-3, 3, case.channels, dtype=torch.float64).view(1, -1, *([1] * len(case.spatial)))
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    return x.to(case.dtype), dy.to(case.dtype)


def rank_slice(case: Case, rank: int, t: torch.Tensor) -> torch.Tensor:
    start = sum(case.sizes[:rank])
    return t[start : start + case.sizes[rank]]


def run_layer(layer: torch.nn.Module, case: Case, rank: Optional[int]) -> dict:
    """Train ``layer`` for ``case.steps`` steps on the full batch (rank None) or on rank's slice."""
    outs, grads, wgrads, bgrads = [], [], [], []
    for step in range(case.steps):
        x, dy = case_data(case, step)
        if rank is not None:
            x, dy = rank_slice(case, rank, x), rank_slice(case, rank, dy)
        if case.channels_last and x.dim() in (4, 5):
            fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
            x = x.contiguous(memory_format=fmt)
        x = x.clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        y = layer(x)
        assert y.dtype == x.dtype and y.shape == x.shape
        (y.float() * dy.float()).sum().backward()
        outs.append(y.detach().double())
        grads.append(x.grad.detach().double())
        if layer.weight is not None:
            wgrads.append(layer.weight.grad.detach().double().clone())
            bgrads.append(layer.bias.grad.detach().double().clone())
    res = {"out": outs, "grad": grads, "wgrad": wgrads, "bgrad": bgrads}
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        b = getattr(layer, name, None)
        res[name] = None if b is None else b.detach().clone()
    return res


def reference_layer(case: Case) -> torch.nn.Module:
    dims = len(case.spatial)
    cls = {0: torch.nn.BatchNorm1d, 1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}[dims]
    return cls(case.channels, momentum=case.momentum, affine=case.affine,
               track_running_stats=case.track_running_stats, dtype=param_dtype(case))


def param_dtype(case: Case) -> torch.dtype:
    """Parameters in float64 for float64 cases (torch's CPU kernel wants one dtype), else float32."""
    return torch.float64 if case.dtype == torch.float64 else torch.float32


def init_affine(layer: torch.nn.Module, case: Case) -> torch.nn.Module:
    if layer.weight is not None:
        g = torch.Generator().manual_seed(case.seed + 77)
        with torch.no_grad():
            layer.weight.copy_(torch.rand(case.channels, generator=g) + 0.5)
            layer.bias.copy_(torch.randn(case.channels, generator=g))
    return layer


def assert_parity(case: Case, per_rank: list[dict], atol: float = 1e-5, rtol: float = 0.0,
                  reference: Optional[torch.nn.Module] = None) -> None:
    """Per-rank results vs ``reference`` (default: torch BatchNorm) run on the full batch."""
    ref_layer = reference if reference is not None else reference_layer(case)
    ref = run_layer(init_affine(ref_layer, case), case, None)
    tag = case.label or repr(case)

    def close(a, b, what):
        assert a.shape == b.shape, f"{tag}: {what} shape {tuple(a.shape)} vs {tuple(b.shape)}"
        err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
        assert torch.allclose(a.double(), b.double(), atol=atol, rtol=rtol), f"{tag}: {what} max abs err {err:.3g} > {atol}"

    for step in range(case.steps):
        close(torch.cat([r["out"][step] for r in per_rank]), ref["out"][step], f"output step {step}")
        close(torch.cat([r["grad"][step] for r in per_rank]), ref["grad"][step], f"input grad step {step}")
        if case.affine:
            close(sum(r["wgrad"][step] for r in per_rank), ref["wgrad"][step], f"weight grad step {step}")
            close(sum(r["bgrad"][step] for r in per_rank), ref["bgrad"][step], f"bias grad step {step}")
    for r, res in enumerate(per_rank):
        for name in ("running_mean", "running_var"):
            if ref[name] is None:
                assert res[name] is None, f"{tag}: rank {r} has {name} but torch has none"
            else:
                close(res[name], ref[name], f"rank {r} {name}")
        if ref["num_batches_tracked"] is not None:
            assert int(res["num_batches_tracked"]) == int(ref["num_batches_tracked"]), f"{tag}: num_batches_tracked"
