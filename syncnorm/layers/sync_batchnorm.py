"""``SyncBatchNorm``: batch statistics over a whole process group, on every backend."""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor, nn

from .. import engine
from ._base import BatchNormBase


class SyncBatchNorm(BatchNormBase):
    r"""Batch normalization with statistics over all ranks of a process group.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    where mean and (biased) variance are taken per channel over the *global* batch: every sample of
    every rank in ``process_group``. W ranks with B samples each give the same outputs, gradients and
    running statistics as ``torch.nn.BatchNorm*d`` on the W*B batch; uneven batches and ranks with an
    empty batch are exact (statistics are count-weighted). Drop-in for ``torch.nn.SyncBatchNorm``:
    same arguments, defaults, parameters, buffers and ``state_dict`` keys, but it runs on gloo (CPU)
    as well as NCCL (GPU). See the package README for the paper and the exchange design.

    Communication: one ``all_reduce`` of ``2C + 3`` float64 values in forward, one of ``2C`` values in
    backward, and only when ``self.training`` and the group has more than one rank. In eval mode,
    outside an initialized process group, or in a group of size 1 it is exactly ``BatchNorm`` (the
    same kernel) and communicates nothing. ``running_var`` is updated with the unbiased global
    variance ``n / (n - 1)`` with ``n`` the global count, as torch does.

    .. note::
        ``momentum`` is the weight of the new batch (torch's convention, the Keras one is
        ``1 - momentum``): ``running = (1 - momentum) * running + momentum * batch``. With
        ``momentum=None`` the running statistics are a cumulative average.

    Args:
        num_features: C from an expected input of size ``(N, C, *)``.
        eps: added to the variance for numerical stability. Default: 1e-5.
        momentum: weight of the new batch in the running statistics, or ``None`` for a
            cumulative average. Default: 0.1.
        affine: learnable per-channel weight and bias. Default: ``True``.
        track_running_stats: keep ``running_mean``/``running_var``; when ``False`` batch statistics
            are used in eval mode too (local, not synchronized). Default: ``True``.
        process_group: group to synchronize over; ``None`` means the default (WORLD) group,
            resolved at call time. Default: ``None``.

    Shape:
        - Input: ``(N, C, *)``, any number of trailing dims, any memory format; fp32, fp64, fp16 or
          bf16 (statistics in fp32 or wider).
        - Output: same shape and dtype as the input.

    Raises:
        ValueError: input with fewer than 2 dims or a channel count other than ``num_features``; a
            training batch with at most one value per channel over the whole group.
        SyncError: (a ``RuntimeError``) the ranks are in different layers, disagree on dtype or
            device type, or a rank does not arrive within ``sync_timeout_s``.

    Examples::

        >>> import torch, syncnorm
        >>> bn = syncnorm.SyncBatchNorm(4)
        >>> y = bn(torch.randn(8, 4, 5, 5))  # no process group: plain batch norm
        >>> model = syncnorm.SyncBatchNorm.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(4)))
        >>> type(model[0]).__name__
        'SyncBatchNorm'
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 process_group: Optional[Any] = None, device=None, dtype=None, *, bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype, bias=bias)
        self.process_group = process_group

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        return engine.batch_norm(self, input, self.weight, self.bias)

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Optional[Any] = None) -> nn.Module:
        """Replace every batch-norm layer in ``module`` by ``SyncBatchNorm`` (``cls``), keeping
        syncnorm's other kinds.

        Same contract as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: recursive, the new layers
        share the old ones' ``Parameter`` and buffer objects and copy ``training`` and ``qconfig``;
        returns the (possibly new) root. Unlike torch's, it keeps syncnorm's own kinds
        (``GhostBatchNorm``, ``BatchRenorm``, ``BatchInstanceNorm``, ``SwitchableNorm``,
        ``FrozenBatchNorm``: they synchronize already or are local on purpose) and the activation of
        norm + activation layers (timm's ``BatchNormAct2d``); see
        :func:`syncnorm.convert.convert_sync_batchnorm`. The class each layer had is recorded for
        :func:`syncnorm.revert_norms`.

        Example::

            >>> import torch, syncnorm
            >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
            >>> net = syncnorm.SyncBatchNorm.convert_sync_batchnorm(net)
            >>> isinstance(net[1], syncnorm.SyncBatchNorm)
            True
        """
        from ..convert import convert_sync_batchnorm  # convert imports the layers

        return convert_sync_batchnorm(module, process_group, cls)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", process_group=custom" if self.process_group is not None else "")

