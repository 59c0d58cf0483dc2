"""Shared base of syncnorm's batch-norm family: input checks, momentum bookkeeping, state transfer.

Every layer subclasses :class:`BatchNormBase` (itself torch's ``_BatchNorm``, so ``isinstance(m,
torch.nn.modules.batchnorm._BatchNorm)`` holds and the parameter names, buffers, ``state_dict`` keys
and checkpoint-version migration are torch's own). It deliberately does *not* subclass
``torch.nn.SyncBatchNorm``: DistributedDataParallel refuses that class on CPU.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import rules
from .._autograd import SyncBatchNormFunction, sync_batch_norm_traceable
from ..distributed import DEFAULT_TIMEOUT_S, SyncSpec, group_size, handshake, resolve_group

NONFINITE_POLICIES = ("skip", "raise", "propagate")

ORIGINAL_CLASS_ATTR = "_syncnorm_original_cls"
"""Attribute in which conversions record the torch class a layer had before it was converted."""


def layer_label(module: nn.Module) -> str:
    """How messages name a layer: its class, and its qualified name when a conversion set one."""
    name = getattr(module, "layer_name", None)
    return f"{type(module).__name__} '{name}'" if name else type(module).__name__


def check_norm_input(module: nn.Module, x: Tensor, num_features: int) -> None:
    """``ValueError`` unless ``x`` is ``(N, num_features, *)`` with at least two dims."""
    if x.dim() < 2:
        raise ValueError(
            f"{layer_label(module)}: expected input (N, {num_features}, *) with at least 2 dims, "
            f"got {x.dim()}D input of shape {tuple(x.shape)}"
        )
    if x.shape[1] != num_features:
        raise ValueError(
            f"{layer_label(module)}: expected input with {num_features} channels, got {x.shape[1]} "
            f"(input shape {tuple(x.shape)})"
        )


def check_batch_size(module: nn.Module, x: Tensor) -> None:
    """``ValueError`` for a local training batch with at most one value per channel."""
    per_channel = x.numel() // x.shape[1] if x.shape[1] else 0
    if per_channel <= 1:
        raise ValueError(
            f"{layer_label(module)}: expected more than 1 value per channel when training, got "
            f"{per_channel} (input shape {tuple(x.shape)})"
        )


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

    Attributes (not in ``state_dict``):
        layer_name: qualified name used in error messages; set by the conversion functions.
        sync_timeout_s: bound, in seconds, on a blocking wait in a collective (CPU/gloo).
        on_nonfinite: ``"skip"`` (default), ``"raise"`` or ``"propagate"``: what NaN/inf batch
            statistics do to the running statistics in the synchronized path (see
            :class:`syncnorm.distributed.SyncSpec`).
    """

    layer_name: Optional[str]
    sync_timeout_s: Optional[float]
    on_nonfinite: str

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None) -> None:
        for rule, value in ((rules.NUM_FEATURES, num_features), (rules.EPS, eps), (rules.MOMENTUM, momentum)):
            rule.check(value, type(self).__name__)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.layer_name = None
        self.sync_timeout_s = DEFAULT_TIMEOUT_S
        self.on_nonfinite = "skip"

    def _sync_spec(self, group, verify: bool) -> "SyncSpec":
        """The exchange's view of this layer, validated."""
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"{layer_label(self)}: expected on_nonfinite in {list(NONFINITE_POLICIES)}, "
                             f"got {self.on_nonfinite!r}")
        return SyncSpec(layer_label(self), self.num_features, group, self.sync_timeout_s, verify,
                        self.on_nonfinite)

    def _check_input_dim(self, input: Tensor) -> None:
        check_norm_input(self, input, self.num_features)

    def _step_factor(self) -> float | Tensor:
        """Count the batch in ``num_batches_tracked`` when training; return the average factor.

        Same convention as torch: ``momentum`` is the weight of the new batch, ``None`` means a
        cumulative average (``1 / num_batches_tracked``).
        """
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                if torch.compiler.is_compiling():  # a tensor: no host read inside a graph
                    return 1.0 / self.num_batches_tracked.double()
                factor = 1.0 / float(self.num_batches_tracked)
        return factor

    def _uses_batch_stats(self) -> bool:
        """Batch statistics in training, and in eval when there are no running buffers."""
        return self.training or (self.running_mean is None and self.running_var is None)

    def _buffers_for_call(self) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """Running buffers to pass: in eval to normalize with, in training only if tracked."""
        if not self.training or self.track_running_stats:
            return self.running_mean, self.running_var
        return None, None

    def _local_batch_norm(self, x: Tensor, factor: float, weight: Optional[Tensor] = None,
                          bias: Optional[Tensor] = None, affine: bool = True) -> Tensor:
        """Exactly ``torch.nn.BatchNorm*d``'s forward (same kernel), with syncnorm's error messages.

        Uses the layer's own weight and bias unless ``affine=False`` (then ``weight``/``bias``).
        """
        bn_training = self._uses_batch_stats()
        if bn_training:
            check_batch_size(self, x)
        running_mean, running_var = self._buffers_for_call()
        if affine:
            weight, bias = self.weight, self.bias
        return torch.nn.functional.batch_norm(
            x, running_mean, running_var, weight, bias, bn_training, factor, self.eps
        )

    def _sync_batch_norm(self, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
        """Batch norm of ``x`` with statistics over ``self.process_group`` in training.

        The shared engine of the synchronized layers (SyncBatchNorm, and the batch branch of
        Batch-Instance Norm): plain BatchNorm without a group of size > 1 or in eval mode; the
        explicit-backward Function in eager mode; the traceable path under ``torch.compile``.
        Counts the step in ``num_batches_tracked``.
        """
        factor = self._step_factor()
        group = resolve_group(getattr(self, "process_group", None)) if self.training else None
        if group_size(group) <= 1:
            return self._local_batch_norm(x, factor, weight, bias, affine=False)
        compiling = torch.compiler.is_compiling()
        # Verifying the ranks' layer signature reads 2 numbers on the host: free for CPU tensors,
        # a sync on CUDA, where only the first synchronized call checks (the handshake).
        spec = self._sync_spec(group, x.device.type == "cpu" and not compiling)
        running_mean, running_var = self._buffers_for_call()
        if compiling:
            return sync_batch_norm_traceable(x, weight, bias, running_mean, running_var, self.eps, factor, spec)
        if not getattr(self, "_handshake_done", False):
            # a fixed-size exchange of the layer signature (name, C, dtype, device type) before the
            # first C-sized one: ranks whose models disagree on C get a clear error instead of a
            # gloo abort on mismatched buffer sizes
            handshake(dataclasses.replace(spec, verify=True), x)
            self._handshake_done = True
        return SyncBatchNormFunction.apply(x, weight, bias, running_mean, running_var, self.eps, factor, spec)
