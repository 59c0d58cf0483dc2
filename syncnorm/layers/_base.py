"""Shared base of syncnorm's batch-norm family: input checks, momentum bookkeeping, state transfer.

Every layer subclasses :class:`BatchNormBase` (itself torch's ``_BatchNorm``, so ``isinstance(m,
torch.nn.modules.batchnorm._BatchNorm)`` holds and the parameter names, buffers, ``state_dict`` keys
and checkpoint-version migration are torch's own). It deliberately does *not* subclass
``torch.nn.SyncBatchNorm``: DistributedDataParallel refuses that class on CPU.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import engine, rules
from ..distributed import DEFAULT_TIMEOUT_S
from ..engine import check_batch_size, check_norm_input, layer_label  # noqa: F401  (re-exported)

ORIGINAL_CLASS_ATTR = "_syncnorm_original_cls"
"""Attribute in which conversions record the torch class a layer had before it was converted."""


def transfer_norm_state(src: nn.Module, dst: nn.Module) -> nn.Module:
    """Make ``dst`` use ``src``'s parameters and buffers (the same objects, not copies).

    Copies ``training``, keeps ``requires_grad``, device and dtype (they live on the shared
    tensors), and records the torch class ``src`` came from so that a revert restores exactly that
    class. Returns ``dst``.
    """
    with torch.no_grad():
        for name in ("weight", "bias"):
            p = getattr(src, name, None)
            if p is None and name in dst._parameters:
                dst._parameters[name] = None
            elif isinstance(p, nn.Parameter) and isinstance(getattr(dst, name, None), nn.Parameter):
                setattr(dst, name, p)
            elif isinstance(p, Tensor) and getattr(dst, name, None) is not None:
                getattr(dst, name).copy_(p)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            b = getattr(src, name, None)
            if b is not None and name in dst._buffers and dst._buffers[name] is not None:
                dst._buffers[name] = b
    dst.train(src.training)
    record_origin(src, dst)
    return dst


def replace_modules(module: nn.Module, match: Callable[[nn.Module], bool],
                    make: Callable[[nn.Module, str], nn.Module], prefix: str = "") -> nn.Module:
    """Replace, recursively, every submodule ``m`` with ``match(m)`` by ``make(m, qualified_name)``.

    Matching modules are not descended into. Returns the root (``make``'s result when the root
    itself matches); replacements happen in place in their parents.
    """
    if match(module):
        return make(module, prefix)
    for name, child in module.named_children():
        new_child = replace_modules(child, match, make, f"{prefix}.{name}" if prefix else name)
        if new_child is not child:
            module.add_module(name, new_child)
    return module


def record_origin(src: nn.Module, dst: nn.Module) -> None:
    """Record on ``dst`` the original torch class (``src``'s own, or the one it recorded). The
    converters set ``dst.layer_name`` themselves (the qualified name in the converted model)."""
    original = getattr(src, ORIGINAL_CLASS_ATTR, None)
    if original is None and not type(src).__module__.startswith("syncnorm."):
        original = type(src)
    if original is not None:
        setattr(dst, ORIGINAL_CLASS_ATTR, original)


class BatchNormBase(_BatchNorm):
    """Dimension-agnostic ``_BatchNorm`` with syncnorm's checks; input ``(N, C, *)``.

    Takes torch's arguments, keyword-only ``bias`` included (``bias=False``: a learnable weight and no
    bias, as ``torch.nn.BatchNorm2d(C, bias=False)``). ``num_features``, ``eps`` and ``momentum`` are
    stored as Python ``int``/``float`` whatever scalar type they came as (:mod:`syncnorm.rules`).

    Attributes (not in ``state_dict``):
        layer_name: qualified name used in error messages and as the layer's identity across ranks;
            set by the conversion functions.
        sync_timeout_s: bound, in seconds, on a blocking wait in a collective (CPU/gloo).
        on_nonfinite: ``"skip"`` (default), ``"raise"`` or ``"propagate"``: what NaN/inf batch
            statistics do to the running statistics in the synchronized path (see
            :class:`syncnorm.distributed.SyncSpec`).
    """

    layer_name: Optional[str]
    sync_timeout_s: Optional[float]
    on_nonfinite: str

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None, *,
                 bias: bool = True) -> None:
        for rule, value in ((rules.NUM_FEATURES, num_features), (rules.EPS, eps), (rules.MOMENTUM, momentum)):
            rule.check(value, type(self).__name__)
        super().__init__(int(num_features), float(eps), None if momentum is None else float(momentum), affine,
                         track_running_stats, device=device, dtype=dtype)
        if affine and not bias:  # torch's keyword-only ``bias=False``: a weight but no bias (any torch version)
            self.register_parameter("bias", None)
        self.layer_name = None
        self.sync_timeout_s = DEFAULT_TIMEOUT_S
        self.on_nonfinite = "skip"
        self._built_at = engine.construction_identity()

    def _check_input_dim(self, input: Tensor) -> None:
        check_norm_input(self, input, self.num_features)

    def _uses_batch_stats(self) -> bool:
        """Batch statistics in training, and in eval when there are no running buffers."""
        return self.training or (self.running_mean is None and self.running_var is None)

    def _affine(self, out: Tensor) -> Tensor:
        """``out * weight + bias`` per channel (each part only where the layer has it)."""
        shape = [1, -1] + [1] * (out.dim() - 2)
        if self.weight is not None:
            out = out * self.weight.view(shape)
        if self.bias is not None:
            out = out + self.bias.view(shape)
        return out

    def _local_batch_norm(self, x: Tensor, factor: float) -> Tensor:
        """Exactly ``torch.nn.BatchNorm*d``'s forward (same kernel), with syncnorm's error messages."""
        return engine.local_batch_norm(self, x, self.weight, self.bias, factor)


class MixedNorm(BatchNormBase):
    """Base of the norms that mix the (synchronized) batch statistics with per-sample ones
    (:class:`~syncnorm.BatchInstanceNorm`, :class:`~syncnorm.SwitchableNorm`): :class:`SyncBatchNorm`'s
    arguments, and an input with at least one trailing dim. A subclass adds its mixing parameters in
    :meth:`_init_mix` and takes its batch statistics from :mod:`syncnorm.engine`.

    Args:
        num_features: C from an expected input of size ``(N, C, *)``.
        eps: added to the variance for numerical stability.
        momentum: running-statistics factor (``None``: cumulative average).
        affine: learnable per-channel weight and bias.
        track_running_stats: keep running statistics for eval.
        process_group: the group whose batch statistics are used in training (``None``: the world).
        device: device of the parameters and buffers.
        dtype: dtype of the parameters and buffers.
        bias: with ``affine``, ``False`` keeps the weight and drops the bias (keyword-only, as torch).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group: Optional[Any] = None,
                 device=None, dtype=None, *, bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         bias=bias)
        self.process_group = process_group
        self._init_mix(device, dtype)

    def _init_mix(self, device: Any, dtype: Any) -> None:
        """Register the subclass's mixing parameters (none here)."""

    def _check_input_dim(self, input: Tensor) -> None:
        super()._check_input_dim(input)
        if input.dim() < 3:
            raise ValueError(f"{type(self).__name__}: expected input (N, {self.num_features}, *) with at least one "
                             f"trailing dim for instance statistics, got shape {tuple(input.shape)}")
