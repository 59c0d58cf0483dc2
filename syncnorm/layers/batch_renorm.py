"""``BatchRenorm``: Batch Renormalization (Ioffe, 2017), optionally synchronized."""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor

from .. import engine, rules
from ._base import BatchNormBase


class BatchRenorm(BatchNormBase):
    r"""Batch Renormalization: batch statistics corrected towards the running ones.

    Paper: https://arxiv.org/abs/1702.03275. In training,

    .. math::
        \hat{x} = \frac{x - \mu_B}{\sigma_B} r + d, \quad
        r = \mathrm{clip}_{[1/r_{max}, r_{max}]}\left(\frac{\sigma_B}{\sigma}\right), \quad
        d = \mathrm{clip}_{[-d_{max}, d_{max}]}\left(\frac{\mu_B - \mu}{\sigma}\right)

    with ``y = weight * x_hat + bias``, ``sigma_B = sqrt(var_B + eps)``, and ``mu``, ``sigma`` the running
    statistics *before* this step's update; ``r`` and ``d`` carry no gradient. Running statistics are
    then updated as BatchNorm does (unbiased variance, ``momentum`` = weight of the new batch). With
    ``r_max=1, d_max=0`` it is BatchNorm in training. Eval uses the running statistics.

    ``warmup_steps = T > 0`` ramps the limits over the first T training steps:
    ``r_max_t = 1 + (r_max - 1) * min(1, t / T)``, ``d_max_t = d_max * min(1, t / T)``, with ``t``
    counted from 0 by ``num_batches_tracked`` (so it survives a checkpoint).

    With a process group of size > 1 the batch statistics are those of the whole group, exchanged
    by the same code as :class:`SyncBatchNorm` (one all_reduce in forward, one in backward).

    Args:
        num_features: C from an expected input of size ``(N, C, *)``.
        eps: added to the variances. Default: 1e-5.
        momentum: weight of the new batch in the running statistics. Default: 0.01.
        affine: learnable weight and bias. Default: ``True``.
        r_max: bound of ``r`` (>= 1). Default: 3.0.
        d_max: bound of ``|d|`` (>= 0). Default: 5.0.
        warmup_steps: steps over which the limits ramp up from (1, 0). Default: 0.
        process_group: group whose statistics to use in training; ``None`` = WORLD when a process
            group is initialized. Default: ``None``.

    Shape:
        - Input: ``(N, C, *)``; Output: same shape and dtype.

    Raises:
        ValueError: bad arguments, wrong channel count, one value per channel in training.

    Example::

        >>> import torch, syncnorm
        >>> layer = syncnorm.BatchRenorm(8, r_max=3.0, d_max=5.0, warmup_steps=1000)
        >>> layer(torch.randn(4, 8, 5, 5)).shape
        torch.Size([4, 8, 5, 5])
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.01,
                 affine: bool = True, r_max: float = 3.0, d_max: float = 5.0, warmup_steps: int = 0,
                 process_group: Optional[Any] = None, device=None, dtype=None, *, bias: bool = True) -> None:
        for rule, value in ((rules.R_MAX, r_max), (rules.D_MAX, d_max), (rules.WARMUP_STEPS, warmup_steps)):
            rule.check(value, "BatchRenorm")
        super().__init__(num_features, eps, momentum, affine, True, device=device, dtype=dtype, bias=bias)
        self.r_max, self.d_max, self.warmup_steps = float(r_max), float(d_max), int(warmup_steps)
        self.process_group = process_group

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        renorm = engine.Renorm(self.r_max, self.d_max, self.warmup_steps)
        return engine.batch_norm(self, input, self.weight, self.bias, renorm)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", r_max={self.r_max}, d_max={self.d_max}"
                + f", warmup_steps={self.warmup_steps}")
