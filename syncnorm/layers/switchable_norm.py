"""``SwitchableNorm``: statistics mixed from instance, layer and (synchronized) batch norm."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import engine
from ._base import MixedNorm


class SwitchableNorm(MixedNorm):
    r"""Switchable Normalization (Luo et al., 2018, https://arxiv.org/abs/1806.10779).

    .. math::
        \mu = \sum_k w_k \mu_k, \quad \sigma^2 = \sum_k w'_k \sigma^2_k, \quad
        y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} \gamma + \beta, \quad k \in \{IN, LN, BN\}

    with ``w = softmax(mean_weight)`` and ``w' = softmax(var_weight)`` (learned, 3 logits each,
    initialized equal). IN statistics are per sample and channel over the trailing dims, LN per
    sample over (C, *), BN per channel over (N, *): in training the BN statistics are those of the
    whole ``process_group`` (differentiable, one all_reduce in forward and one in backward), and
    the running statistics track them as BatchNorm does (unbiased variance); in eval the BN branch
    uses the running statistics. All variances are biased (population) in the mix.

    Takes :class:`SyncBatchNorm`'s arguments (see :class:`~syncnorm.layers._base.MixedNorm`).

    Example::

        >>> import torch, syncnorm
        >>> layer = syncnorm.SwitchableNorm(8)
        >>> layer(torch.randn(4, 8, 5, 5)).shape
        torch.Size([4, 8, 5, 5])
    """

    def _init_mix(self, device, dtype) -> None:
        self.mean_weight = nn.Parameter(torch.zeros(3, device=device, dtype=dtype))
        self.var_weight = nn.Parameter(torch.zeros(3, device=device, dtype=dtype))

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        n, c = input.shape[:2]
        x = input
        spatial = list(range(2, x.dim()))
        var_in, mean_in = torch.var_mean(x, spatial, correction=0, keepdim=True)  # (N, C, 1..)
        mean_ln = mean_in.mean(1, keepdim=True)  # (N, 1, 1..)
        var_ln = (var_in + mean_in.square()).mean(1, keepdim=True) - mean_ln.square()
        mean_bn, var_bn = engine.batch_stats(self, x)
        shape = [1, c] + [1] * len(spatial)
        mean_bn, var_bn = mean_bn.view(shape), var_bn.view(shape)
        wm = torch.softmax(self.mean_weight, 0)
        wv = torch.softmax(self.var_weight, 0)
        mean = wm[0] * mean_in + wm[1] * mean_ln + wm[2] * mean_bn
        var = wv[0] * var_in + wv[1] * var_ln + wv[2] * var_bn
        out = (x - mean) * torch.rsqrt(var + self.eps)
        return self._affine(out)
