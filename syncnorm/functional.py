"""Pure math of batch normalization: moments, their count-weighted merge, normalize, backward.

Nothing here communicates or imports ``torch.distributed``: the synchronized layers call these
functions on each rank and move only the small per-channel results through
:mod:`syncnorm.distributed`.

Conventions, for input ``x`` of shape ``(N, C, *)``:

* ``count`` is the number of values per channel (``N * prod(*)``), the same for every channel.
* Moments are ``(mean, m2)`` with ``m2 = sum((x - mean)**2)``; variance is ``m2 / count``
  (biased, used to normalize) or ``m2 / (count - 1)`` (unbiased, stored in ``running_var``).
* Statistics are computed in float32 (float64 for float64 input) whatever the input dtype, and are
  returned in float64 so that per-rank moments can be merged without losing digits.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "Moments",
    "reduce_dims",
    "stats_dtype",
    "batch_moments",
    "pack_moments",
    "unpack_moments",
    "merge_moments",
    "normalize",
    "backward_reduce",
    "backward_elemt",
    "update_running_stats",
    "momentum_factor",
    "renorm_correction",
    "renorm_affine",
    "renorm_limits",
]


class Moments(NamedTuple):
    """Per-channel moments of a batch: ``count`` values, their ``mean`` and ``m2``."""

    count: Tensor  # 0-dim float64
    mean: Tensor  # (C,) float64
    m2: Tensor  # (C,) float64

    @property
    def var(self) -> Tensor:
        """Biased (population) variance, ``m2 / count``."""
        return self.m2 / self.count

    @property
    def unbiased_var(self) -> Tensor:
        """Unbiased variance, ``m2 / (count - 1)``, the estimator ``running_var`` tracks."""
        return self.m2 / (self.count - 1)


def reduce_dims(x: Tensor) -> list[int]:
    """Dimensions reduced by batch norm for ``(N, C, *)`` input: all but the channel one."""
    return [0] + list(range(2, x.dim()))


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Working dtype of the statistics: float64 for float64 input, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _channel_view(t: Tensor, ndim: int) -> Tensor:
    """Reshape a ``(C,)`` tensor to broadcast against ``(N, C, *)`` input with ``ndim`` dims."""
    return t.view([1, -1] + [1] * (ndim - 2))


CHUNK_ELEMENTS = 1 << 19
"""Above this many elements, :func:`batch_moments` works through the batch in chunks of about this
size with one reused buffer, instead of allocating a centred copy of the whole input (on CPU, a
fresh multi-megabyte allocation costs page faults comparable to the arithmetic)."""


def batch_moments(x: Tensor) -> Moments:
    """Per-channel moments of ``x`` (``(N, C, *)``), numerically stable.

    Two passes: a float32 mean ``m0``, then the sums of ``d = x - m0`` and ``d**2``. Because
    ``d`` is centred, the sum of squares has no catastrophic cancellation, and the rounding of
    ``m0`` is corrected exactly by ``sum(d)`` (the result is as if the mean were known in float64).
    An empty batch gives ``count == 0`` and zero sums, so an empty rank still contributes the
    identity element to a merge.
    """
    c = x.shape[1]
    acc = stats_dtype(x.dtype)
    if x.numel() == 0:
        zeros = torch.zeros(c, dtype=torch.float64, device=x.device)
        return Moments(torch.zeros((), dtype=torch.float64, device=x.device), zeros, zeros.clone())
    dims = reduce_dims(x)
    n = x.numel() // c
    m0 = x.mean(dims, dtype=acc)
    centre = _channel_view(m0, x.dim())
    per_sample = x.numel() // x.shape[0]
    step = max(1, CHUNK_ELEMENTS // max(per_sample, 1))
    if step >= x.shape[0]:
        d = x - centre  # promotes half/bf16 to float32, no extra cast pass
        s1 = d.sum(dims, dtype=acc).double()
        s2 = d.square_().sum(dims, dtype=acc).double()
    else:  # large input: centred sums chunk by chunk in one reused, cache-sized buffer
        buf = torch.empty_like(x[:step], dtype=acc)
        s1 = torch.zeros(c, dtype=torch.float64, device=x.device)
        s2 = torch.zeros(c, dtype=torch.float64, device=x.device)
        for start in range(0, x.shape[0], step):
            chunk = x[start:start + step]
            d = torch.sub(chunk, centre, out=buf[:chunk.shape[0]])
            s1 += d.sum(dims, dtype=acc)
            s2 += d.square_().sum(dims, dtype=acc)
    count = torch.tensor(float(n), dtype=torch.float64, device=x.device)
    mean = m0.double() + s1 / n
    m2 = (s2 - s1 * s1 / n).clamp_(min=0.0)
    return Moments(count, mean, m2)


def batch_moments_differentiable(x: Tensor) -> Moments:
    """:func:`batch_moments` as differentiable tensor ops (for ``torch.compile``'s traced path).

    Same shifted two-pass numerics; the shift is a detached float32 mean, so autograd differentiates
    through the centred sums only. Requires a non-empty batch (the caller checks the shape).
    """
    c = x.shape[1]
    acc = stats_dtype(x.dtype)
    dims = reduce_dims(x)
    n = x.numel() // c
    m0 = x.detach().mean(dims, dtype=acc)
    d = x.to(acc) - _channel_view(m0, x.dim())
    s1 = d.sum(dims).double()
    s2 = (d * d).sum(dims).double()
    count = torch.full((), float(n), dtype=torch.float64, device=x.device)
    return Moments(count, m0.double() + s1 / n, s2 - s1 * s1 / n)


def pack_moments(m: Moments) -> Tensor:
    """Pack moments into one float64 vector ``[count, sum, sum of squares]`` of length ``2C + 1``.

    Sums are additive across ranks, so a single ``all_reduce(SUM)`` of packed vectors merges the
    moments of every rank, count-weighted (uneven and empty ranks are exact).
    """
    s1 = m.mean * m.count
    s2 = m.m2 + m.mean * s1
    return torch.cat([m.count.reshape(1), s1, s2])


def unpack_moments(packed: Tensor, num_features: int) -> Moments:
    """Inverse of :func:`pack_moments` applied to a (possibly summed) packed vector.

    The caller must make sure the total count is positive.
    """
    count = packed[0]
    s1 = packed[1 : 1 + num_features]
    s2 = packed[1 + num_features : 1 + 2 * num_features]
    mean = s1 / count
    m2 = (s2 - mean * s1).clamp_(min=0.0)
    return Moments(count, mean, m2)


def merge_moments(parts: Sequence[Moments]) -> Moments:
    """Exact count-weighted merge of moments (Chan et al.), for chunks held in one process."""
    count = torch.stack([p.count for p in parts]).sum()
    mean = sum(p.mean * p.count for p in parts) / count
    m2 = sum(p.m2 + p.count * (p.mean - mean) ** 2 for p in parts)
    return Moments(count, mean, m2)


OFFSET_RATIO_LIMIT = 64.0
"""Above this ``max |mean| / std`` over channels, the fused kernels (which form ``x * a + b`` with
``b ~ -mean * a``) lose digits to cancellation in float32; the exact composite path is used instead."""


def _fused_ok(x: Tensor, mean: Tensor, invstd: Tensor) -> bool:
    """Whether torch's fused per-channel kernels are accurate for this data.

    Needs a host read of C values: done for CPU tensors (free); CUDA tensors always take the fused
    path (no sync), which has the precision of torch's own BatchNorm kernels. Under
    ``torch.compile`` the exact composite path is taken (no data-dependent branch; the compiler
    fuses it anyway).
    """
    if torch.compiler.is_compiling():
        return False
    if x.dtype == torch.float64 or x.device.type != "cpu":
        return True
    return bool((mean.abs() * invstd).max() <= OFFSET_RATIO_LIMIT) if mean.numel() else True


def normalize(
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float = 0.0,
) -> Tensor:
    """``(x - mean) * invstd * weight + bias`` per channel, returned in ``x.dtype``.

    ``mean`` and ``invstd`` are float64 ``(C,)``, with ``invstd = 1 / sqrt(var + eps)``. Usually one
    pass of torch's fused inference kernel. For data with a large offset (``|mean| / std`` above
    :data:`OFFSET_RATIO_LIMIT`, e.g. mean 1e4 and std 1e-2) the float32 rounding of the mean is
    subtracted first (exact near the mean) and its remainder folded into the shift, so the output
    keeps float32 precision where the fused kernel would lose digits.
    """
    acc = stats_dtype(x.dtype)
    traced = torch.is_grad_enabled() and any(  # autograd differentiates this call (traced path)
        t is not None and t.requires_grad for t in (x, mean, invstd, weight, bias))
    if not traced and _fused_ok(x, mean, invstd):
        var = (invstd.reciprocal().square() - eps).to(acc)
        w = weight.to(acc) if weight is not None else None
        b = bias.to(acc) if bias is not None else None
        return torch.batch_norm(x, w, b, mean.to(acc), var, False, 0.0, eps, False)
    scale = invstd if weight is None else invstd * weight.double()
    mean_lo = mean.to(acc)
    shift = -(mean - mean_lo.double()) * scale
    if bias is not None:
        shift = shift + bias.double()
    nd = x.dim()
    if traced:
        out = (x - _channel_view(mean_lo, nd)) * _channel_view(scale.to(acc), nd) + _channel_view(shift.to(acc), nd)
        return out.to(x.dtype)
    out = x - _channel_view(mean_lo, nd)
    out = torch.addcmul(_channel_view(shift.to(acc), nd), out, _channel_view(scale.to(acc), nd), out=out)
    return out.to(x.dtype)


def backward_reduce(grad_out: Tensor, x: Tensor, mean: Tensor, invstd: Tensor) -> tuple[Tensor, Tensor]:
    """Local per-channel ``sum(dy)`` and ``sum(dy * (x - mean))`` in the statistics dtype.

    ``sum(dy)`` is ``grad_bias``; ``sum(dy * (x - mean)) * invstd`` is ``grad_weight``. One fused
    pass (torch's batch-norm backward reduction, given our mean) on CPU.
    """
    acc = stats_dtype(x.dtype)
    c = x.shape[1]
    if x.numel() == 0:
        z = torch.zeros(c, dtype=acc, device=x.device)
        return z, z.clone()
    mean_lo = mean.to(acc)
    if x.device.type == "cpu":
        ones = torch.ones(c, dtype=acc, device=x.device)
        _, sum_dy_xmu, sum_dy = torch.ops.aten.native_batch_norm_backward(
            grad_out, x, None, None, None, mean_lo, ones, True, 0.0, [False, True, True])
        sum_dy, sum_dy_xmu = sum_dy.to(acc), sum_dy_xmu.to(acc)
    else:
        dims = reduce_dims(x)
        sum_dy = grad_out.sum(dims, dtype=acc)
        xmu = x - _channel_view(mean_lo, x.dim())
        sum_dy_xmu = xmu.mul_(grad_out).sum(dims, dtype=acc)
    # (x - mean) = (x - mean_lo) + (mean_lo - mean): correct for the rounding of the mean
    sum_dy_xmu = sum_dy_xmu + ((mean_lo.double() - mean) * sum_dy.double()).to(acc)
    return sum_dy, sum_dy_xmu


def backward_elemt(
    grad_out: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Optional[Tensor],
    sum_dy: Tensor,
    sum_dy_xmu: Tensor,
    count: Tensor,
) -> Tensor:
    """Input gradient of batch norm given the *global* sums and count.

    ``dx = w * invstd * (dy - sum_dy / n - (x - mean) * invstd**2 * sum_dy_xmu / n)``, computed as
    ``dy * a + x * k + c`` per channel (three passes, one allocation) or, for large-offset data
    (see :func:`normalize`), around the rounded mean.
    """
    acc = stats_dtype(x.dtype)
    nd = x.dim()
    w = invstd if weight is None else invstd * weight.double()
    k = -w * invstd * invstd * sum_dy_xmu.double() / count
    c = -w * sum_dy.double() / count
    if _fused_ok(x, mean, invstd):
        grad = torch.mul(grad_out, _channel_view(w.to(acc), nd))
        grad = grad.to(acc) if grad.dtype != acc else grad
        grad.addcmul_(x, _channel_view(k.to(acc), nd))
        grad.add_(_channel_view((c - k * mean).to(acc), nd))
        return grad.to(x.dtype)
    mean_lo = mean.to(acc)
    t = x - _channel_view(mean_lo, nd)
    # the float32 rounding of the mean moves (x - mean) by a per-channel constant: fold it into c
    c = c + k * (mean_lo.double() - mean)
    t.mul_(_channel_view(k.to(acc), nd)).add_(_channel_view(c.to(acc), nd))
    return t.addcmul_(grad_out, _channel_view(w.to(acc), nd)).to(x.dtype)


@torch.no_grad()
def update_running_stats(
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    mean: Tensor,
    unbiased_var: Tensor,
    factor: float | Tensor,
    skip_nonfinite: bool = False,
) -> None:
    """In-place ``running = (1 - factor) * running + factor * batch`` for mean and variance.

    With ``skip_nonfinite``, channels whose batch mean or variance is NaN/inf keep their running
    values (selected on the device, no host sync) instead of being poisoned.
    """
    keep = None
    if skip_nonfinite:
        keep = ~(torch.isfinite(mean) & torch.isfinite(unbiased_var))
    for running, batch in ((running_mean, mean), (running_var, unbiased_var)):
        if running is None:
            continue
        weight = factor.to(running.dtype) if isinstance(factor, Tensor) else factor
        new = torch.lerp(running, batch.to(running.dtype), weight)
        running.copy_(new if keep is None else torch.where(keep, running, new))


def momentum_factor(momentum: Optional[float], num_batches_tracked: Optional[Tensor]) -> float:
    """The exponential-average factor torch uses: ``momentum``, or ``1 / batches`` when ``None``.

    Call after ``num_batches_tracked`` has been incremented for the current batch.
    """
    if momentum is not None:
        return float(momentum)
    if num_batches_tracked is None:
        return 0.0
    return 1.0 / float(num_batches_tracked)


def renorm_correction(
    mean: Tensor,
    var: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    r_max: Tensor | float,
    d_max: Tensor | float,
) -> tuple[Tensor, Tensor]:
    """Batch Renormalization's ``r`` and ``d`` (Ioffe 2017), float64, without gradient.

    ``r = clip(sigma_B / sigma, 1/r_max, r_max)``, ``d = clip((mu_B - mu) / sigma, -d_max, d_max)``
    with ``sigma_B = sqrt(var_B + eps)`` from the batch and ``mu``, ``sigma = sqrt(running_var +
    eps)`` from the running statistics *before* this step's update.
    """
    with torch.no_grad():
        sigma = torch.sqrt(running_var.double() + eps)
        r_max_t = torch.as_tensor(r_max, dtype=torch.float64, device=mean.device)
        d_max_t = torch.as_tensor(d_max, dtype=torch.float64, device=mean.device)
        r = torch.clamp(torch.sqrt(var.double() + eps) / sigma, min=1.0 / r_max_t, max=r_max_t)
        d = torch.clamp((mean.double() - running_mean.double()) / sigma, min=-d_max_t, max=d_max_t)
    return r, d


def renorm_affine(weight: Optional[Tensor], bias: Optional[Tensor], r: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """Fold Batch Renorm's ``r``, ``d`` into the affine transform (float64):
    ``w * (x_hat * r + d) + b = x_hat * (w * r) + (w * d + b)``."""
    w64 = weight.double() if weight is not None else torch.ones_like(r)
    shift = w64 * d
    return w64 * r, (shift + bias.double()) if bias is not None else shift


def renorm_limits(r_max: float, d_max: float, step: Tensor, warmup_steps: int) -> tuple[Tensor, Tensor]:
    """Limits at training step ``step`` (counting from 0), ramped linearly over ``warmup_steps``.

    ``r_max_t = 1 + (r_max - 1) * min(1, t / T)``, ``d_max_t = d_max * min(1, t / T)``; computed on
    the device from a tensor step, so no host sync.
    """
    if warmup_steps <= 0:
        ramp = torch.ones((), dtype=torch.float64, device=step.device)
    else:
        ramp = torch.clamp(step.double() / warmup_steps, max=1.0)
    return 1.0 + (r_max - 1.0) * ramp, d_max * ramp
