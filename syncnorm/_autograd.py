"""``SyncBatchNormFunction``: synchronized batch norm with an explicit backward.

Forward: local moments -> one all_reduce of ``[count, sum, sum of squares]`` -> global mean and
variance -> normalize; running statistics updated with the unbiased *global* variance.
Backward: local ``sum(dy)`` and ``sum(dy * (x - mean))`` -> one all_reduce -> input gradient.
Weight and bias gradients stay local (DDP averages parameter gradients itself).

Saved for backward: the input, the global mean and inverse std (C values each) and the count:
no normalized copy of the activations is kept.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from . import functional as SF
from .distributed import SyncSpec, exchange_grad_sums, exchange_moments


def check_global_count(count: Tensor, local_count: int, label: str, num_features: int) -> None:
    """Raise ``ValueError`` when the group's batch has at most one value per channel.

    Reads the reduced count on the host only when this rank alone cannot rule it out (its own
    count is 0 or 1), so the common case costs no device sync. Every rank of a group whose total is
    <= 1 has a local count <= 1, so all of them check and raise together.
    """
    if local_count > 1:
        return
    total = int(count.item())
    if total == 0:
        raise ValueError(
            f"{label}: expected a non-empty batch in training mode, got 0 values per channel on "
            f"every rank of the process group (num_features={num_features})"
        )
    if total == 1:
        raise ValueError(
            f"{label}: expected more than 1 value per channel when training, got 1 value per channel "
            f"over the whole process group (num_features={num_features})"
        )


class SyncBatchNormFunction(torch.autograd.Function):
    """Synchronized batch norm over ``spec.group``; see the module docstring."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        running_mean: Optional[Tensor],
        running_var: Optional[Tensor],
        eps: float,
        factor: float,
        spec: SyncSpec,
    ) -> Tensor:
        local = SF.batch_moments(x)
        reduced = exchange_moments(SF.pack_moments(local), spec, x)
        glob = SF.unpack_moments(reduced, spec.num_features)
        check_global_count(glob.count, x.numel() // max(x.shape[1], 1), spec.label, spec.num_features)

        invstd = torch.rsqrt(glob.var + eps)
        out = SF.normalize(x, glob.mean, invstd, weight, bias)
        if running_mean is not None or running_var is not None:
            SF.update_running_stats(running_mean, running_var, glob.mean, glob.unbiased_var, factor)

        ctx.save_for_backward(x, weight, glob.mean, invstd, glob.count)
        ctx.spec = spec
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor):  # type: ignore[override]
        x, weight, mean, invstd, count = ctx.saved_tensors
        spec: SyncSpec = ctx.spec
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        sum_dy, sum_dy_xmu = SF.backward_reduce(grad_out, x, mean, invstd)

        grad_w = grad_b = grad_x = None
        if need_w and weight is not None:
            grad_w = (sum_dy_xmu.double() * invstd).to(weight.dtype)
        if need_b and ctx.bias_dtype is not None:
            grad_b = sum_dy.to(ctx.bias_dtype)
        if need_x:
            c = spec.num_features
            summed = exchange_grad_sums(torch.cat([sum_dy, sum_dy_xmu]), spec)
            grad_x = SF.backward_elemt(grad_out, x, mean, invstd, weight, summed[:c], summed[c:], count)
        return grad_x, grad_w, grad_b, None, None, None, None, None
