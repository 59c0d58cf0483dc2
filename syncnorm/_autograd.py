"""``SyncBatchNormFunction``: (synchronized) batch norm with an explicit backward.

Forward: local moments -> one all_reduce of ``[count, sum, sum of squares]`` -> global mean and
variance -> normalize; running statistics updated with the unbiased *global* variance.
Backward: local ``sum(dy)`` and ``sum(dy * (x - mean))`` -> one all_reduce -> input gradient.
Weight and bias gradients stay local (DDP averages parameter gradients itself).
With ``spec.group is None`` the same code runs without communicating (one process).

Batch Renormalization reuses it unchanged but for one step: with ``renorm=(r_max, d_max)`` the
detached corrections ``r = clip(sigma_B / sigma, 1/r_max, r_max)`` and
``d = clip((mu_B - mu) / sigma, -d_max, d_max)`` fold into the affine transform
(``weight * r``, ``bias + weight * d``), so its statistics travel through the same exchange.

Saved for backward: the input, the global mean and inverse std (C values each) and the count:
no normalized copy of the activations is kept.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import Tensor

from . import functional as SF
from .distributed import (SyncError, SyncSpec, all_reduce_traceable, exchange_grad_sums, exchange_moments,
                          report_nonfinite)


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


def _check_nonfinite(local: SF.Moments, glob: SF.Moments, spec: SyncSpec) -> bool:
    """On CPU (a free host read), report NaN/inf statistics per the layer's policy; return whether
    there are any (then the running-stat update masks those channels)."""
    global_bad = ~(torch.isfinite(glob.mean) & torch.isfinite(glob.m2))
    if not bool(global_bad.any()):
        return False
    local_bad = ~(torch.isfinite(local.mean) & torch.isfinite(local.m2))
    message = report_nonfinite(spec, local_bad, global_bad)
    if spec.on_nonfinite == "raise":
        raise SyncError(message + "; HINT: set the layer's on_nonfinite='skip' to keep training")
    warnings.warn(message + "; the running statistics of those channels were not updated "
                  "(on_nonfinite='skip')", RuntimeWarning, stacklevel=2)
    return True


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
        renorm: Optional[tuple[Tensor, Tensor]] = None,
    ) -> Tensor:
        local = SF.batch_moments(x)
        if spec.group is None:
            glob = local
        else:
            glob = SF.unpack_moments(exchange_moments(SF.pack_moments(local), spec, x), spec.num_features)
        check_global_count(glob.count, x.numel() // max(x.shape[1], 1), spec.label, spec.num_features)

        invstd = torch.rsqrt(glob.var + eps)
        r = d = None
        scale, shift = weight, bias
        if renorm is not None:
            assert running_mean is not None and running_var is not None, "renorm needs running stats"
            r, d = SF.renorm_correction(glob.mean, glob.var, running_mean, running_var, eps, *renorm)
            scale, shift = SF.renorm_affine(weight, bias, r, d)
        out = SF.normalize(x, glob.mean, invstd, scale, shift, eps)
        if running_mean is not None or running_var is not None:
            skip = spec.on_nonfinite != "propagate"
            if skip and x.device.type == "cpu":  # a free host check: mask only when something is bad
                skip = _check_nonfinite(local, glob, spec)
            SF.update_running_stats(running_mean, running_var, glob.mean, glob.unbiased_var, factor, skip)

        ctx.save_for_backward(x, scale, glob.mean, invstd, glob.count, r, d)
        ctx.spec = spec
        ctx.weight_dtype = weight.dtype if weight is not None else None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor):  # type: ignore[override]
        x, scale, mean, invstd, count, r, d = ctx.saved_tensors
        spec: SyncSpec = ctx.spec
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        sum_dy, sum_dy_xmu = SF.backward_reduce(grad_out, x, mean, invstd)

        grad_w = grad_b = grad_x = None
        if need_w and ctx.weight_dtype is not None:
            gw = sum_dy_xmu.double() * invstd
            if r is not None:  # y = w * (x_hat * r + d) + b
                gw = gw * r + sum_dy.double() * d
            grad_w = gw.to(ctx.weight_dtype)
        if need_b and ctx.bias_dtype is not None:
            grad_b = sum_dy.to(ctx.bias_dtype)
        if need_x:
            c = spec.num_features
            sums = torch.cat([sum_dy, sum_dy_xmu])
            if spec.group is not None:
                sums = exchange_grad_sums(sums, spec)
            grad_x = SF.backward_elemt(grad_out, x, mean, invstd, scale, sums[:c], sums[c:], count)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


def _define_snapshot():
    """``snapshot(t)``: a copy of ``t`` that the compiler's partitioner never recomputes.

    The traced path reads the running buffers (for Batch Renorm's r and d) and then updates them in
    place in the same graph. AOTAutograd may recompute cheap values for the backward from graph
    inputs, and would then read the *updated* buffers (a wrong weight gradient; seen with torch 2.13).
    An opaque custom op is saved, not recomputed.
    """
    if not hasattr(torch.library, "custom_op"):  # torch < 2.4: no custom_op API
        return lambda t: t.clone()

    @torch.library.custom_op("syncnorm::snapshot", mutates_args=())
    def snapshot(t: Tensor) -> Tensor:
        return t.clone()

    @snapshot.register_fake
    def _(t: Tensor) -> Tensor:
        return torch.empty_like(t)

    return snapshot


_snapshot = _define_snapshot()


def sync_batch_norm_traceable(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    eps: float,
    factor: Any,
    spec: SyncSpec,
    renorm: Optional[tuple[Tensor, Tensor]] = None,
) -> Tensor:
    """The same synchronized batch norm for ``torch.compile(fullgraph=True)``.

    Differentiable tensor ops around one traceable all_reduce of the packed moments
    (:func:`syncnorm.distributed.all_reduce_traceable`); autograd's backward of it is one
    all_reduce of ``2C + 1`` values, the counterpart of the eager path's explicit one. No host sync
    and no data-dependent Python branch, so the graph has no breaks and CUDA graphs can capture it.
    The signature check, the wait timeout and the non-finite warning (host-side features) are left
    to the eager path; non-finite channels still skip their running-stat update. ``factor`` may be
    a tensor (``momentum=None``).
    """
    c = spec.num_features
    local = SF.batch_moments_differentiable(x)
    packed = SF.pack_moments(local)
    glob = SF.unpack_moments(packed if spec.group is None else all_reduce_traceable(packed, spec.group), c)
    invstd = torch.rsqrt(glob.var + eps)
    scale, shift = weight, bias
    if renorm is not None:
        r, d = SF.renorm_correction(glob.mean.detach(), glob.var.detach(), _snapshot(running_mean),
                                    _snapshot(running_var), eps, *renorm)
        scale, shift = SF.renorm_affine(weight, bias, r, d)
    out = SF.normalize(x, glob.mean, invstd, scale, shift, eps)
    if running_mean is not None or running_var is not None:
        SF.update_running_stats(running_mean, running_var, glob.mean.detach(), glob.unbiased_var.detach(),
                                factor, spec.on_nonfinite != "propagate")
    return out
