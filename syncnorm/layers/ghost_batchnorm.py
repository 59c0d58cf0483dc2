"""``GhostBatchNorm``: batch norm over virtual batches (chunks) of a larger batch."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.nn import functional as F

from .. import rules
from ._base import BatchNormBase, check_batch_size


class GhostBatchNorm(BatchNormBase):
    """Batch norm whose training statistics come from chunks of ``virtual_batch_size`` samples.

    Paper: https://arxiv.org/abs/1705.08741 ("Train longer, generalize better"). In training the
    batch is split along N into chunks of ``virtual_batch_size`` (the last one may be smaller) and
    each chunk is normalized with its own statistics: the output equals BatchNorm applied to each
    chunk separately. The running statistics are updated once per chunk, in order, exactly as that
    sequence of BatchNorm calls would (``num_batches_tracked`` counts chunks); this is not the
    one-update-per-batch approximation some frameworks use. Eval uses the running statistics.

    Chunks are processed together: the full chunks are viewed as ``(vbs, K*C, *)`` and normalized by
    one call of torch's batch-norm kernel, so there is no Python loop over chunks when N is a
    multiple of ``virtual_batch_size`` (a smaller last chunk costs one more call).

    Args:
        num_features: C from an expected input of size ``(N, C, *)``.
        virtual_batch_size: samples per chunk (>= 1).
        eps: as in ``torch.nn.BatchNorm2d``.
        momentum: as in ``torch.nn.BatchNorm2d``.
        affine: as in ``torch.nn.BatchNorm2d``.
        track_running_stats: as in ``torch.nn.BatchNorm2d``.

    Shape:
        - Input: ``(N, C, *)``; Output: same shape and dtype.

    Raises:
        ValueError: bad arguments, wrong channel count, a chunk with one value per channel.

    Example::

        >>> import torch, syncnorm
        >>> gbn = syncnorm.GhostBatchNorm(16, virtual_batch_size=4)
        >>> gbn(torch.randn(10, 16, 3, 3)).shape  # chunks of 4, 4 and 2 samples
        torch.Size([10, 16, 3, 3])
    """

    def __init__(self, num_features: int, virtual_batch_size: int, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True, track_running_stats: bool = True,
                 device=None, dtype=None, *, bias: bool = True) -> None:
        rules.VIRTUAL_BATCH_SIZE.check(virtual_batch_size, "GhostBatchNorm")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype, bias=bias)
        self.virtual_batch_size = virtual_batch_size

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if not self._uses_batch_stats():
            return self._local_batch_norm(input, 0.0)
        n, vbs = input.shape[0], self.virtual_batch_size
        k, rest = divmod(n, vbs)
        pieces = []
        if k:
            pieces.append(self._chunks(input[: k * vbs], k))
        if rest:
            pieces.append(self._chunks(input[k * vbs:], 1))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def _chunks(self, x: Tensor, k: int) -> Tensor:
        """Normalize ``x`` as ``k`` equal chunks; update the running statistics chunk by chunk."""
        n, c = x.shape[0], x.shape[1]
        rest = x.shape[2:]
        check_batch_size(self, x[: n // k])
        # (k*v, C, *) -> (v, k*C, *): channel j of chunk i becomes channel i*C + j
        xs = x.reshape(k, n // k, c, *rest).transpose(0, 1).reshape(n // k, k * c, *rest)
        w = None if self.weight is None else self.weight.repeat(k)
        b = None if self.bias is None else self.bias.repeat(k)
        y = F.batch_norm(xs, None, None, w, b, True, 0.0, self.eps)
        if self.training and self.track_running_stats:
            self._update_running(xs.detach(), k)
        return y.reshape(n // k, k, c, *rest).transpose(0, 1).reshape(x.shape)

    @torch.no_grad()
    def _update_running(self, xs: Tensor, k: int) -> None:
        dims = [0] + list(range(2, xs.dim()))
        var, mean = torch.var_mean(xs, dims, correction=1)
        mean, var = mean.view(k, -1).double(), var.view(k, -1).double()
        if self.momentum is None:  # cumulative average over all chunks ever seen
            seen = float(self.num_batches_tracked)
            new_mean = (self.running_mean.double() * seen + mean.sum(0)) / (seen + k)
            new_var = (self.running_var.double() * seen + var.sum(0)) / (seen + k)
        else:  # k sequential lerps in closed form: weights m(1-m)^(k-1-i) for chunk i
            m = float(self.momentum)
            w = m * (1.0 - m) ** torch.arange(k - 1, -1, -1, dtype=torch.float64, device=xs.device)
            keep = (1.0 - m) ** k
            new_mean = self.running_mean.double() * keep + (w[:, None] * mean).sum(0)
            new_var = self.running_var.double() * keep + (w[:, None] * var).sum(0)
        self.running_mean.copy_(new_mean)
        self.running_var.copy_(new_var)
        self.num_batches_tracked.add_(k)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", virtual_batch_size={self.virtual_batch_size}"
