"""Pure math of batch normalization: local moments, the shifted cross-rank merge, normalize, backward.

Nothing here communicates or imports ``torch.distributed``: :mod:`syncnorm.engine` calls these
functions on each rank and moves only small per-channel vectors through
:mod:`syncnorm.distributed`.

Conventions, for input ``x`` of shape ``(N, C, *)``:

* ``n`` is the number of values per channel on this rank (``N * prod(*)``), a Python int.
* Variances are biased (population, ``m2 / n``) where they normalize and unbiased
  (``m2 / (n - 1)``) where they enter ``running_var``, as in torch.
* Statistics are computed in float32 (float64 for float64 input) whatever the input dtype.

The cross-rank merge (:func:`fill_payload`, :func:`merge_payload`) sums, over ranks, moments taken
about a *shift* ``k`` that every rank holds identically (the previous step's global mean):
``n * d`` and ``n * (var + d**2)`` with ``d = mean - k``. The global mean is ``k + sum(n d) / N``
and ``m2 = sum(n (var + d**2)) - N * (mean - k)**2``: the subtraction loses only
``~1e-16 * ((mean - k) / std)**2`` of the variance (relative), which is nothing when ``k`` is near
the mean. Raw sums (``k = 0``) would lose ``1e-16 * (mean / std)**2``: all of it for float64 data
with mean 1e8 and std 1.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Moments",
    "reduce_dims",
    "stats_dtype",
    "batch_moments",
    "merge_moments",
    "batch_moments_differentiable",
    "local_stats_cpu",
    "shifted_sums_cpu",
    "fast_shifted_sums",
    "fill_payload",
    "merge_payload",
    "merge_sums_cpu",
    "elemt_coefficients_cpu",
    "offset_ratios",
    "normalize",
    "backward_reduce",
    "backward_elemt",
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
    """Per-channel moments of ``x`` (``(N, C, *)``), exact to float64 rounding.

    Two passes: a float32 mean ``m0``, then the sums of ``d = x - m0`` and ``d**2``. Because
    ``d`` is centred, the sum of squares has no catastrophic cancellation, and the rounding of
    ``m0`` is corrected exactly by ``sum(d)`` (the result is as if the mean were known in float64).
    An empty batch gives ``count == 0`` and zero sums.
    """
    c = x.shape[1]
    if x.numel() == 0:
        zeros = torch.zeros(c, dtype=torch.float64, device=x.device)
        return Moments(torch.zeros((), dtype=torch.float64, device=x.device), zeros, zeros.clone())
    n = x.numel() // c
    m0, q, var = _moments_split(x)
    count = torch.full((), float(n), dtype=torch.float64, device=x.device)
    return Moments(count, m0 + q, var * n)


def merge_moments(a: Moments, b: Moments) -> Moments:
    """The moments of two batches together, exactly (Chan et al.'s pairwise update: the between-
    batch term uses the difference of the means, never raw second moments)."""
    count = a.count + b.count
    if float(count) == 0:
        return a
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.count / count)
    return Moments(count, mean, a.m2 + b.m2 + delta * delta * (a.count * b.count / count))


def _centred_sums(x: Tensor, m0: Tensor, dims: list[int], acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """``sum(x - m0)`` and ``sum((x - m0)**2)`` per channel (float64), in cache-sized chunks for
    large inputs (one reused buffer instead of a centred copy of the whole input)."""
    c = x.shape[1]
    centre = _channel_view(m0, x.dim())
    per_sample = x.numel() // x.shape[0]
    step = max(1, CHUNK_ELEMENTS // max(per_sample, 1))
    if step >= x.shape[0]:
        d = x - centre  # promotes half/bf16 to float32, no extra cast pass
        return d.sum(dims, dtype=acc).double(), d.square_().sum(dims, dtype=acc).double()
    buf = torch.empty_like(x[:step], dtype=acc)
    s1 = torch.zeros(c, dtype=torch.float64, device=x.device)
    s2 = torch.zeros(c, dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[0], step):
        chunk = x[start:start + step]
        d = torch.sub(chunk, centre, out=buf[:chunk.shape[0]])
        s1 += d.sum(dims, dtype=acc)
        s2 += d.square_().sum(dims, dtype=acc)
    return s1, s2


def batch_moments_differentiable(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel ``(m0, residual, biased var)`` of ``x`` as differentiable tensor ops, float64;
    the mean is ``m0 + residual``.

    The same shifted two-pass numerics as :func:`batch_moments`; ``m0`` is a detached float32 (or
    float64) mean, so autograd differentiates through the centred sums only, and ``m0`` and the
    small residual stay apart (see :func:`local_stats_cpu`). An empty batch (a static shape) gives
    zeros, the identity of the merge, still connected to ``x`` in the autograd graph.
    """
    c = x.shape[1]
    if x.numel() == 0:  # zeros that depend on x: an empty rank joins the backward all_reduce too
        z = x.sum(reduce_dims(x)).double()
        return z.detach(), z, z
    acc = stats_dtype(x.dtype)
    dims = reduce_dims(x)
    n = x.numel() // c
    m0 = x.detach().mean(dims, dtype=acc)
    d = x.to(acc) - _channel_view(m0, x.dim())
    s1 = d.sum(dims).double()
    s2 = (d * d).sum(dims).double()
    q = s1 / n
    return m0.double(), q, s2 / n - q * q


FAST_STATS_RATIO_LIMIT = 64.0
"""Largest ``max |mean| / std`` over channels for which a float32 mean is precise enough: its
rounding moves the normalized values by at most ``6e-8 * 64 = 4e-6``. Above it the statistics and
the normalization take the exact (slower) composite paths."""


def local_stats_cpu(x: Tensor, exact: bool = False) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(mean, biased var, residual)`` per channel of a non-empty CPU batch, the mean being
    ``mean + residual`` (``residual`` is ``None`` or a small float64 correction).

    Not ``exact``: one fused pass of torch's CPU statistics kernel (double accumulation, float32 or
    float64 results), precise for data with a moderate offset (``|mean| / std <=
    FAST_STATS_RATIO_LIMIT``; the caller checks with the statistics it reads anyway). ``exact``:
    :func:`batch_moments`' two passes, whose rounded mean ``m0`` and exact correction
    ``sum(x - m0) / n`` stay apart, so that ``mean - shift`` keeps every digit even at mean 1e8 and
    std 1 in float64 (where ``m0 + correction`` would round to 1.5e-8), and whose variance is right
    where the fused kernel's is not (mean 1e4, std 1e-2 in float32).
    """
    if not exact and x.dtype in (torch.float32, torch.float64):
        mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
        return mean, var, None
    m0, residual, var = _moments_split(x)
    return m0, var, residual


def fast_shifted_sums(x: Tensor) -> bool:
    """Whether :func:`shifted_sums_cpu` is the faster way to this CPU batch's statistics: a standard
    contiguous ``(N, C, *)`` layout with at least 16 values per sample and channel. (torch's CPU
    statistics kernel is fastest below that, and 2-3 times slower above it: measured on 2 cores,
    e.g. 1.16 ms against 0.27 ms for (8, 256, 16, 16), 0.19 ms against 0.32 ms for (8, 2048, 2, 2).)"""
    return x.dim() >= 3 and x.numel() // max(x.shape[0] * x.shape[1], 1) >= 16 and x.is_contiguous()


def shifted_sums_cpu(x: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
    """Per channel ``sum(x - k)`` and ``sum((x - k)**2)`` (statistics dtype), ``k = shift``.

    Exactly the payload's ``n * d`` and ``n * (var + d**2)`` about the shift (see
    :func:`fill_payload`), with no mean taken first: one pass writes ``x - k`` as a contiguous
    ``(C, N * rest)`` block, whose row sums are the fast reduction. Centred on ``k``, so the sums keep
    their digits as long as ``k`` is near the mean (the caller checks ``(mean - k)**2 / var``), at
    any offset.
    """
    c = x.shape[1]
    xt = x.reshape(x.shape[0], c, -1).transpose(0, 1)
    d = torch.empty(xt.shape, dtype=shift.dtype, device=x.device)
    torch.sub(xt, shift.view(c, 1, 1), out=d)
    d = d.view(c, -1)
    return d.sum(1), d.square_().sum(1)


def _moments_split(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`batch_moments` as ``(m0, sum(x - m0) / n, biased var)``, ``m0`` the rounded mean."""
    c = x.shape[1]
    acc = stats_dtype(x.dtype)
    dims = reduce_dims(x)
    n = x.numel() // c
    m0 = x.mean(dims, dtype=acc)
    s1, s2 = _centred_sums(x, m0, dims, acc)
    q = s1 / n
    return m0.double(), q, (s2 / n - q * q).clamp_(min=0.0)


def offset_ratios(q: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """``[max (mean - shift)**2 / var, max mean**2 / var, max var]`` over channels, with
    ``q = mean - shift``: how far the shift was from the mean and how offset the data is (both
    squared; a channel with zero variance counts as ``0 / tiny``), and a value that is finite iff
    every variance is; any NaN statistic makes them NaN. Five kernels, one small tensor to read."""
    rows = torch.stack([q, mean, var])
    rows[:2].square_()
    return rows.div_(var + 1e-300).amax(1)


def fill_payload(head: Tensor, mean: Optional[Tensor], var: Optional[Tensor], shift: Tensor, n: int,
                 residual: Optional[Tensor] = None) -> Tensor:
    """``[head | n * d | n * (var + d**2)]`` (float64, a new tensor), with
    ``d = mean (+ residual) - shift``.

    ``head`` is copied unchanged (the caller's signature and count entries). ``n == 0`` (an empty
    batch; ``mean``/``var`` unused) gives zeros: the identity of the merge. Four tensor ops.
    """
    if n == 0:
        return torch.cat([head, head.new_zeros(2 * shift.numel())])
    # d in the statistics dtype (float64 when the exact path gives a residual)
    d = torch.sub(mean, shift)
    if residual is not None:  # (mean - shift) first: both near the offset, the difference is exact
        d = d.double().add_(residual)
    buf = torch.cat([head, d, torch.addcmul(var, d, d)])
    buf[head.numel():].mul_(n)
    return buf


def merge_payload(sums: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Global statistics from the summed payload body ``sums = [sum(n d) | sum(n (var + d**2))]``.

    ``counts = [N, N - 1]`` (summed too). Returns ``q = mean - shift`` (C,) and ``[var; unbiased
    var]`` (2, C), float64. Three tensor ops; the caller makes sure ``N > 1``.
    """
    c = sums.numel() // 2
    s1, s2 = sums[:c], sums[c:]
    q = s1 / counts[0]
    m2 = torch.addcmul(s2, s1, q, value=-1.0)
    return q, m2 / counts.view(2, 1)


def merge_sums_cpu(sums: np.ndarray, total: float, shift: np.ndarray, eps: float
                   ) -> tuple[np.ndarray, np.ndarray, float, float, bool]:
    """:func:`merge_payload` for CPU, on NumPy views of the summed payload (a per-channel NumPy
    operation costs about a microsecond where a torch one costs several): returns the group's mean
    and biased variance (float64), ``far = max (mean - shift)**2 / (var + eps')``, ``offset = max
    mean**2 / (var + eps')`` (``eps' = max(eps, 1e-30)``) and whether every statistic is finite."""
    c = shift.shape[0]
    if not np.isfinite(sums).all():  # NaN/inf statistics are reported by the caller, not warned about here
        with np.errstate(all="ignore"):
            mean, var, far, offset, _ = merge_sums_cpu(np.nan_to_num(sums), total, shift, eps)
            q = sums[:c] / total
            return q + shift, sums[c:] / total - q * q, far, offset, False
    q = sums[:c] / total
    var = sums[c:] / total - q * q
    mean = q + shift
    inv = 1.0 / (var + max(eps, 1e-30))
    far, offset = float((q * q * inv).max()), float((mean * mean * inv).max())
    return mean, var, far, offset, True


def elemt_coefficients_cpu(sum_dy: np.ndarray, sum_dy_xhat: np.ndarray, mean: np.ndarray, invstd: np.ndarray,
                           weight: Optional[np.ndarray], count: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-channel ``(a, k, c)`` with ``dx = a * dy + k * x + c`` (see :func:`backward_elemt`), in
    NumPy (the statistics dtype of the arrays)."""
    a = invstd if weight is None else invstd * weight
    k = a * invstd * (sum_dy_xhat * (-1.0 / count))
    return a, k, a * (sum_dy * (-1.0 / count)) - k * mean


def normalize(x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
              eps: float, fused: bool) -> Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` per channel, returned in ``x.dtype``.

    ``mean`` and ``var`` (biased) are float64 ``(C,)``. ``fused``: one pass of torch's inference
    kernel, for data with a moderate offset (``|mean| / std <= FAST_STATS_RATIO_LIMIT``). Otherwise
    (e.g. mean 1e4 and std 1e-2, where that kernel's ``x * a + b`` with ``b ~ -mean * a`` loses
    digits) the float32 rounding of the mean is subtracted first (exact near the mean) and its
    remainder folded into the shift, so the output keeps float32 precision. Differentiable when
    called with tensors that require grad (the traced path).
    """
    acc = stats_dtype(x.dtype)
    if fused:
        w, b, m, v = (t if t is None or t.dtype == acc else t.to(acc) for t in (weight, bias, mean, var))
        return torch.ops.aten._native_batch_norm_legit_no_training(x, w, b, m, v, 0.0, eps)[0]
    invstd = torch.rsqrt(var + eps)
    scale = invstd if weight is None else invstd * weight.double()
    mean_lo = mean.to(acc)
    shift = -(mean - mean_lo.double()) * scale
    if bias is not None:
        shift = shift + bias.double()
    nd = x.dim()
    traced = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, mean, var, weight, bias))
    if traced:
        out = (x - _channel_view(mean_lo, nd)) * _channel_view(scale.to(acc), nd) + _channel_view(shift.to(acc), nd)
        return out.to(x.dtype)
    out = x - _channel_view(mean_lo, nd)
    out = torch.addcmul(_channel_view(shift.to(acc), nd), out, _channel_view(scale.to(acc), nd), out=out)
    return out.to(x.dtype)


def backward_reduce(grad_out: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, fused: bool
                    ) -> tuple[Tensor, Tensor]:
    """Local per-channel ``sum(dy)`` and ``sum(dy * x_hat)``, ``x_hat = (x - mean) * invstd``, in
    the statistics dtype (CPU): torch's bias and weight gradients.

    One fused pass (torch's batch-norm backward reduction, given our statistics). Unless ``fused``
    (moderate offsets, where it does not matter), the rounding of the mean to the statistics dtype
    is corrected exactly.
    """
    acc = stats_dtype(x.dtype)
    c = x.shape[1]
    if x.numel() == 0:
        z = torch.zeros(c, dtype=acc, device=x.device)
        return z, z.clone()
    mean_lo, inv = mean.to(acc), invstd.to(acc)
    if x.dim() >= 3 and x.numel() // (x.shape[0] * c) < 16 and x.is_contiguous() and grad_out.is_contiguous():
        # tiny maps (2x2, 1x1): torch's backward reduction is slow there (1.0 ms against 0.3 ms for
        # (8, 2048, 2, 2) on 2 cores); the same sums over (C, N * rest) copies are row reductions
        xt = torch.empty((c, x.shape[0], x.numel() // (x.shape[0] * c)), dtype=acc, device=x.device)
        torch.sub(x.reshape(x.shape[0], c, -1).transpose(0, 1), mean_lo.view(c, 1, 1), out=xt)
        dt = grad_out.reshape(grad_out.shape[0], c, -1).transpose(0, 1).to(acc, memory_format=torch.contiguous_format)
        dt = dt.reshape(c, -1)
        sum_dy, sum_dy_xhat = dt.sum(1), torch.linalg.vecdot(dt, xt.view(c, -1)).mul_(inv)
    else:
        _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            grad_out, x, None, None, None, mean_lo, inv, True, 0.0, [False, True, True])
        sum_dy, sum_dy_xhat = sum_dy.to(acc), sum_dy_xhat.to(acc)
    if not fused and mean.dtype != acc:  # (x - mean) = (x - mean_lo) + (mean_lo - mean)
        sum_dy_xhat = sum_dy_xhat + ((mean_lo.double() - mean) * invstd * sum_dy.double()).to(acc)
    return sum_dy, sum_dy_xhat


def backward_elemt(grad_out: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
                   sum_dy: Tensor, sum_dy_xhat: Tensor, count: float, fused: bool = True) -> Tensor:
    """Input gradient of batch norm given the *global* ``sum(dy)``, ``sum(dy * x_hat)`` and count
    (CPU).

    ``dx = a * (dy - sum_dy / n - x_hat * sum_dy_xhat / n)`` with ``a = weight * invstd``, computed
    as ``x * k + c`` then ``+= dy * a`` per channel: two passes over the activations. ``fused``:
    per-channel coefficients in the statistics dtype (moderate offsets); otherwise in float64, around
    the rounded mean (see :func:`normalize`).
    """
    acc = stats_dtype(x.dtype)
    nd = x.dim()
    if fused:
        mean, invstd = mean.to(acc), invstd.to(acc)
        a = invstd if weight is None else invstd * weight.to(acc)
        # [-a * sum_dy / n; -a * sum_dy_xhat / n] in one kernel, then k and c from its rows
        kc = torch.stack([sum_dy, sum_dy_xhat]).mul_(a * (-1.0 / count))
        k = kc[1].mul_(invstd)
        c = kc[0].addcmul_(k, mean, value=-1.0)
        # three in-place-friendly passes (a broadcast first operand makes addcmul several times slower)
        grad = torch.mul(grad_out, _channel_view(a, nd))
        grad = grad.to(acc) if grad.dtype != acc else grad
        return grad.addcmul_(x, _channel_view(k, nd)).add_(_channel_view(c, nd)).to(x.dtype)
    a = invstd if weight is None else invstd * weight.double()
    k = -a * invstd * sum_dy_xhat.double() / count
    c = -a * sum_dy.double() / count
    mean_lo = mean.to(acc)
    t = x - _channel_view(mean_lo, nd)
    # the rounding of the mean moves (x - mean) by a per-channel constant: fold it into c
    c = c + k * (mean_lo.double() - mean)
    t.mul_(_channel_view(k.to(acc), nd)).add_(_channel_view(c.to(acc), nd))
    return t.addcmul_(grad_out, _channel_view(a.to(acc), nd)).to(x.dtype)


def renorm_correction(mean: Tensor, var: Tensor, running_mean: Tensor, running_var: Tensor, eps: float,
                      r_max: Tensor | float, d_max: Tensor | float) -> tuple[Tensor, Tensor]:
    """Batch Renormalization's ``r`` and ``d`` (Ioffe 2017), without gradient, in ``var``'s dtype.

    ``r = clip(sigma_B / sigma, 1/r_max, r_max)``, ``d = clip((mu_B - mu) / sigma, -d_max, d_max)``
    with ``sigma_B = sqrt(var_B + eps)`` from the batch and ``mu``, ``sigma = sqrt(running_var +
    eps)`` from the running statistics *before* this step's update. The limits are floats or
    0-dim tensors (a warm-up ramp computed on the device). Both come out of one stacked ``(2, C)``
    computation: eight kernels.
    """
    with torch.no_grad():
        dt = var.dtype
        inv_sigma = torch.rsqrt(running_var.to(dt) + eps)
        rd = torch.stack([torch.sqrt(var + eps), mean.to(dt) - running_mean.to(dt)]).mul_(inv_sigma)
        if isinstance(r_max, Tensor):  # a warm-up ramp: limits on the device
            low = torch.stack([r_max.reciprocal(), -d_max]).to(dt).view(2, 1)
            high = torch.stack([r_max, d_max + 0.0 * r_max]).to(dt).view(2, 1)
            rd = torch.clamp(rd, low, high)
        else:  # constant limits: no tensor built from host data
            rd[0].clamp_(1.0 / r_max, r_max)
            rd[1].clamp_(-d_max, d_max)
        return rd[0], rd[1]


def renorm_affine(weight: Optional[Tensor], bias: Optional[Tensor], r: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """Fold Batch Renorm's ``r``, ``d`` into the affine transform:
    ``w * (x_hat * r + d) + b = x_hat * (w * r) + (w * d + b)``."""
    if weight is None:
        return r, d if bias is None else d + bias
    scale = weight * r.to(weight.dtype)
    dd = d.to(weight.dtype)
    return scale, (weight * dd) if bias is None else torch.addcmul(bias, weight, dd)


def renorm_limits(r_max: float, d_max: float, step: Optional[Tensor], warmup_steps: int
                  ) -> tuple[Tensor | float, Tensor | float]:
    """Limits at training step ``step`` (counting from 0), ramped linearly over ``warmup_steps``.

    ``r_max_t = 1 + (r_max - 1) * min(1, t / T)``, ``d_max_t = d_max * min(1, t / T)``: 0-dim
    tensors computed on the device from the step tensor (no host sync); plain floats without a
    warm-up.
    """
    if warmup_steps <= 0 or step is None:
        return float(r_max), float(d_max)
    ramp = torch.clamp(step.double() / warmup_steps, max=1.0)
    return 1.0 + (r_max - 1.0) * ramp, d_max * ramp
