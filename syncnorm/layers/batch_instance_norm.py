"""``BatchInstanceNorm``: a learned per-channel mix of (synchronized) batch and instance norm."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .. import engine
from ._base import MixedNorm


class BatchInstanceNorm(MixedNorm):
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

    Takes :class:`SyncBatchNorm`'s arguments (see :class:`~syncnorm.layers._base.MixedNorm`).

    Example::

        >>> import torch, syncnorm
        >>> layer = syncnorm.BatchInstanceNorm(8)
        >>> layer(torch.randn(4, 8, 5, 5)).shape
        torch.Size([4, 8, 5, 5])
    """

    def _init_mix(self, device, dtype) -> None:
        self.gate = nn.Parameter(torch.ones(self.num_features, device=device, dtype=dtype))

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        shape = [1, -1] + [1] * (input.dim() - 2)
        batch = engine.batch_norm(self, input, None, None)
        instance = F.instance_norm(input, eps=self.eps)
        rho = self.gate.clamp(0.0, 1.0).view(shape)
        out = rho * batch + (1.0 - rho) * instance
        return self._affine(out)
