"""The four norm variants the step benchmark compares, and what each one communicates.

All four start from the same ``torch.nn.BatchNorm2d`` model and reuse its ``Parameter`` and buffer
objects (no copies), so they have the same weights:

* ``local``: ``torch.nn.BatchNorm2d``, per-rank statistics, no communication.
* ``floor``: ``torch.nn.BatchNorm2d`` plus, per layer, the collectives syncnorm issues, with the same
  payload sizes and dtypes but carrying zeros: forward one ``all_reduce`` of ``2C + 11`` float64
  values, backward one ``all_reduce`` of ``2C`` float32 values. What no synchronized BN can avoid.
* ``syncnorm``: :class:`syncnorm.SyncBatchNorm` (explicit backward, float64 merged moments).
* ``naive``: :class:`NaiveSyncBatchNorm`, a reference in the style of detectron2's layer, written
  here: per-rank ``E[x]`` and ``E[x^2]``, count-weighted, summed by the differentiable
  ``torch.distributed.nn.functional.all_reduce`` with plain autograd through it, and
  ``Var = E[x^2] - E[x]^2`` in float32. Its backward is autograd's: one more ``all_reduce`` of the
  gradient of the ``2C + 1`` summed values.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import warnings
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import Tensor, nn

import syncnorm
from syncnorm.distributed import HEAD_SIZE

from ._resnet import bn_layers

__all__ = [
    "VARIANTS",
    "FloorBatchNorm2d",
    "NaiveSyncBatchNorm",
    "naive_allreduce_bn",
    "build_variant",
    "expected_comm",
    "count_collectives",
]

VARIANTS = ("local", "floor", "syncnorm", "naive")
"""Variant names, in report order; ``local`` is the baseline of the ratios."""

_WAIT = datetime.timedelta(seconds=300)


def _all_reduce_wait(buf: Tensor, group: Any) -> None:
    """``all_reduce(SUM)`` issued and awaited the way :mod:`syncnorm.distributed` does on CPU."""
    dist.all_reduce(buf, group=group, async_op=True).wait(timeout=_WAIT)


class _FloorBackward(torch.autograd.Function):
    """Identity whose backward all-reduces ``2C`` zeros in the gradient's dtype (float32 here).

    Applied to the *input* of the norm layer: its output is consumed by batch norm, never modified
    in place (an identity Function's output may not be), and its backward runs right after the
    layer's own backward, where syncnorm's backward collective sits.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, num_features: int, group: Any) -> Tensor:  # type: ignore[override]
        ctx.num_features, ctx.group = num_features, group
        return x

    @staticmethod
    def backward(ctx: Any, grad: Tensor):  # type: ignore[override]
        dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
        _all_reduce_wait(torch.zeros(2 * ctx.num_features, dtype=dtype, device=grad.device), ctx.group)
        return grad, None, None


class FloorBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` plus syncnorm's two collectives per training step, carrying zeros.

    Outputs and gradients are exactly ``BatchNorm2d``'s; the only difference is the communication:
    forward ``all_reduce`` of ``2C + 11`` float64 zeros, backward ``all_reduce`` of ``2C`` zeros in the
    statistics dtype. Nothing is sent in eval mode or without a process group of 2+ ranks.
    """

    def forward(self, input: Tensor) -> Tensor:
        group = dist.group.WORLD if dist.is_initialized() else None
        if not self.training or group is None or dist.get_world_size(group) <= 1:
            return super().forward(input)
        c = self.num_features
        _all_reduce_wait(torch.zeros(2 * c + HEAD_SIZE, dtype=torch.float64, device=input.device), group)
        if input.requires_grad:
            input = _FloorBackward.apply(input, c, group)
        return super().forward(input)


class NaiveSyncBatchNorm(nn.BatchNorm2d):
    """Synchronized BN by autograd through a differentiable ``all_reduce`` (detectron2's design).

    Per rank: ``count``, ``count * E[x]`` and ``count * E[x^2]`` per channel (float32), summed over
    WORLD with ``torch.distributed.nn.functional.all_reduce``; global ``mean = sum / count`` and
    ``var = E[x^2] - mean^2`` (biased, used to normalize); ``running_var`` gets the unbiased
    ``var * n / (n - 1)`` as in torch. Count-weighted, so uneven batches are exact. Eval mode, or no
    process group of 2+ ranks: plain ``BatchNorm2d``. A benchmark reference, not a library layer: the
    one-pass variance loses digits when ``|mean| >> std``.
    """

    def forward(self, input: Tensor) -> Tensor:
        group = dist.group.WORLD if dist.is_initialized() else None
        if not self.training or group is None or dist.get_world_size(group) <= 1:
            return super().forward(input)
        return naive_allreduce_bn(input, self, group)


def naive_allreduce_bn(input: Tensor, bn: nn.modules.batchnorm._BatchNorm, group: Any) -> Tensor:
    """:class:`NaiveSyncBatchNorm`'s training forward over ``group`` (any size, 1 included)."""
    c = input.shape[1]
    dims = [0] + list(range(2, input.dim()))
    x = input.float()
    n = float(x.numel() // c)
    count = torch.full((1,), n, dtype=torch.float32, device=x.device)
    vec = torch.cat([x.mean(dims) * n, (x * x).mean(dims) * n, count])
    with warnings.catch_warnings():  # deprecated for functional collectives; the point here
        warnings.simplefilter("ignore", FutureWarning)
        vec = dist_nn.all_reduce(vec, group=group)
    total = vec[-1].detach()
    mean = vec[:c] / total
    var = vec[c : 2 * c] / total - mean * mean
    invstd = torch.rsqrt(var + bn.eps)
    scale = invstd if bn.weight is None else bn.weight * invstd
    shift = -mean * scale if bn.bias is None else bn.bias - mean * scale
    if bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
        factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        with torch.no_grad():
            bn.running_mean.lerp_(mean.detach(), factor)
            bn.running_var.lerp_(var.detach() * total / (total - 1), factor)
    shape = [1, c] + [1] * (input.dim() - 2)
    return (x * scale.view(shape) + shift.view(shape)).to(input.dtype)


def _share_state(old: nn.modules.batchnorm._BatchNorm, new: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """Make ``new`` use ``old``'s Parameter and buffer objects and training flag."""
    for name, p in old._parameters.items():
        new._parameters[name] = p
    for name, b in old._buffers.items():
        new._buffers[name] = b
    return new.train(old.training)


def _replace_bn(module: nn.Module, cls: type) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``module`` by ``cls`` (same arguments, shared state)."""
    if type(module) is nn.BatchNorm2d:
        new = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        return _share_state(module, new)
    for name, child in module.named_children():
        new_child = _replace_bn(child, cls)
        if new_child is not child:
            module.add_module(name, new_child)
    return module


_CONVERTERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "local": lambda m: m,
    "floor": lambda m: _replace_bn(m, FloorBatchNorm2d),
    "syncnorm": syncnorm.SyncBatchNorm.convert_sync_batchnorm,
    "naive": lambda m: _replace_bn(m, NaiveSyncBatchNorm),
}


def build_variant(base: nn.Module, variant: str) -> nn.Module:
    """A deep copy of ``base`` (norm layers ``BatchNorm2d``) with its norms turned into ``variant``.

    Raises:
        ValueError: an unknown variant name.
    """
    if variant not in _CONVERTERS:
        raise ValueError(f"benchmarks: expected a variant in {list(VARIANTS)}, got {variant!r}")
    model = _CONVERTERS[variant](copy.deepcopy(base))
    return model


def expected_comm(model: nn.Module, variant: str, stats_bytes: int = 4) -> dict[str, int]:
    """Norm-layer collectives per training step and their payload bytes (per rank), analytically.

    Every layer of the model is assumed to need an input gradient (true for the benchmark's ResNet,
    where each norm follows a convolution with trainable weights). ``stats_bytes`` is the size of
    the backward statistics dtype (4: float32 input). Payload = elements passed to ``all_reduce`` x
    element size; on the wire a ring all-reduce moves about ``2 (W - 1) / W`` times that.
    """
    channels = [m.num_features for _, m in bn_layers(model)]
    if variant == "local":
        per_layer = []
    elif variant in ("floor", "syncnorm"):
        per_layer = [[(2 * c + HEAD_SIZE) * 8, 2 * c * stats_bytes] for c in channels]
    elif variant == "naive":
        per_layer = [[(2 * c + 1) * 4, (2 * c + 1) * 4] for c in channels]
    else:
        raise ValueError(f"benchmarks: expected a variant in {list(VARIANTS)}, got {variant!r}")
    sizes = [b for layer in per_layer for b in layer]
    return {"collectives": len(sizes), "bytes": sum(sizes)}


@contextlib.contextmanager
def count_collectives() -> Iterator[list[tuple[str, int]]]:
    """Record ``(name, payload bytes)`` of every Python-level collective issued inside the block.

    Wraps ``torch.distributed.all_reduce``, ``all_gather``, ``all_gather_into_tensor``,
    ``all_to_all`` and ``scatter`` (looked up on the module at call time by syncnorm and by
    ``torch.distributed.nn``, whose differentiable ``all_gather`` runs its backward as ``W``
    scatters on gloo). The payload is the input this rank passes (for ``scatter``: the tensor it
    receives). DDP's gradient buckets and buffer broadcasts go through its C++ reducer and are not
    seen: they are the same for every variant.
    """
    log: list[tuple[str, int]] = []
    names = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_to_all", "scatter")
    originals = {name: getattr(dist, name) for name in names}

    def nbytes(t: Any) -> int:
        if isinstance(t, Tensor):
            return t.numel() * t.element_size()
        if isinstance(t, (list, tuple)):
            return sum(nbytes(x) for x in t)
        return 0

    def wrap(name: str, fn: Callable) -> Callable:
        def counted(tensor: Any, *args: Any, **kwargs: Any) -> Any:
            payload: Any = tensor  # all_reduce(tensor), scatter(tensor, ...)
            if name not in ("all_reduce", "scatter"):  # (output, input, ...): the payload is the input
                payload = args[0] if args else None
            log.append((name, nbytes(payload)))
            return fn(tensor, *args, **kwargs)

        return counted

    try:
        for name, fn in originals.items():
            setattr(dist, name, wrap(name, fn))
        yield log
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
