"""Helpers for tests on whole models (the default suite's stand-ins and the optional zoo group)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["randomize_norms"]

NORM_VALUES = (("running_mean", -1.0, 1.0), ("running_var", 0.5, 2.0), ("weight", 0.5, 1.5), ("bias", -1.0, 1.0))
"""``(name, low, high)``: the uniform range each norm tensor is drawn from by default."""


def randomize_norms(model: nn.Module, seed: int = 0,
                    values: Sequence[tuple[str, float, float]] = NORM_VALUES) -> nn.Module:
    """Non-trivial running statistics and affine values in every norm layer (a module with ``eps``:
    torch's, timm's and torchvision's norms, frozen ones included, whose four tensors are buffers),
    drawn from ``values``' ranges with a generator seeded ``seed``. Returns ``model.eval()``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if not hasattr(m, "eps"):
                continue
            for name, lo, hi in values:
                t = m._buffers.get(name, m._parameters.get(name))
                if t is not None and t.dim() == 1 and t.is_floating_point():
                    t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)
    return model.eval()
