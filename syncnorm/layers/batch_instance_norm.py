"""``BatchInstanceNorm``: a learned per-channel mix of (synchronized) batch and instance norm."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .. import engine
from ._base import BatchNormBase


class BatchInstanceNorm(BatchNormBase):
    r"""Batch-Instance Normalization (Nam & Kim, 2018, https://arxiv.org/abs/1805.07925).

    .. math::
        y = \left(\rho \, \hat{x}^{(B)} + (1 - \rho) \, \hat{x}^{(I)}\right) \gamma + \beta,
        \quad \rho \in [0, 1]

    per channel, where :math:`\hat{x}^{(B)}` is batch norm without affine and
    :math:`\hat{x}^{(I)}` instance norm (per sample and channel, over the trailing dims). ``rho`` is
    the parameter ``gate``, clipped to [0, 1] in forward (initialized to 1: pure batch norm). The
    batch branch is :class:`SyncBatchNorm`'s engine: statistics over ``process_group`` in training,
    running statistics in eval, exactly BatchNorm without a group. Input needs at least one trailing
    dim (instance statistics).

    Args:
        num_features: as in :class:`SyncBatchNorm`.
        eps: as in :class:`SyncBatchNorm`.
        momentum: as in :class:`SyncBatchNorm`.
        affine: as in :class:`SyncBatchNorm`.
        track_running_stats: as in :class:`SyncBatchNorm`.
        process_group: as in :class:`SyncBatchNorm`.

    Example::

        >>> import torch, syncnorm
        >>> layer = syncnorm.BatchInstanceNorm(8)
        >>> layer(torch.randn(4, 8, 5, 5)).shape
        torch.Size([4, 8, 5, 5])
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group: Optional[Any] = None,
                 device=None, dtype=None, *, bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype, bias=bias)
        self.process_group = process_group
        self.gate = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if input.dim() < 3:
            raise ValueError(f"BatchInstanceNorm: expected input (N, {self.num_features}, *) with at least one "
                             f"trailing dim for instance statistics, got shape {tuple(input.shape)}")
        shape = [1, -1] + [1] * (input.dim() - 2)
        batch = engine.batch_norm(self, input, None, None)
        instance = F.instance_norm(input, eps=self.eps)
        rho = self.gate.clamp(0.0, 1.0).view(shape)
        out = rho * batch + (1.0 - rho) * instance
        return self._affine(out)
