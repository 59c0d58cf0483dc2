"""Model-wide conversion between normalization kinds: ``convert_norms``, ``revert_norms``, ``auto``.

Every conversion walks ``named_children`` recursively, replaces each layer that a kind of the table
(:mod:`syncnorm.factory`) recognizes (torch's ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm``, every
syncnorm layer, ``GroupNorm`` layers that a previous conversion made, and any registered kind's
layers) and leaves every other module alone. The new layer takes over the old one's settings
(``eps``, ``momentum``, ``affine``, ``track_running_stats``, as far as its kind has them) and its
tensors: a tensor both layers hold the same way (a trainable parameter, a running buffer) is
*shared* (same object, so an optimizer built before still sees it); a parameter that becomes a
buffer (``frozen``) or the reverse is *copied*, and the ``requires_grad`` flags come back on the way
back; what the new kind has no place for (``group``: the running statistics) is dropped. Device,
dtype and ``training`` are kept. Each new layer records the torch class it came from, so
``revert_norms`` restores exactly that class.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Mapping, Optional

from torch import nn

from . import distributed, rules
from .factory import CONVERSION_NOTE_ATTR, NormKind, get_kind, layer_kinds, registered_rows
from .layers import FrozenBatchNorm
from .layers._base import replace_modules, transfer_norm_state

__all__ = ["AUTO", "AUTO_CHOICES", "AUTO_MIN_GLOBAL_BATCH", "AUTO_MIN_LOCAL_BATCH", "AUTO_OPTIONS",
           "choose_auto_kind", "conversion_kind", "conversion_kinds", "convert_norms",
           "convert_norms_with_summary", "revert_norms"]

log = logging.getLogger(__name__)

AUTO = "auto"
"""Not a layer kind: the policy that picks one (:func:`choose_auto_kind`); accepted wherever a
conversion kind is."""

AUTO_CHOICES = ("batch", "sync", "group")
"""The kinds ``auto`` can pick; their options may be passed along."""

AUTO_OPTIONS: Mapping[str, rules.Rule] = {
    "per_device_batch": rules.PER_DEVICE_BATCH, "world_size": rules.WORLD_SIZE,
    "min_local_batch": rules.MIN_LOCAL_BATCH, "min_global_batch": rules.MIN_GLOBAL_BATCH,
}

AUTO_MIN_LOCAL_BATCH = 16
"""``auto``: a per-device batch of at least this many samples keeps plain (local) BatchNorm."""
AUTO_MIN_GLOBAL_BATCH = 16
"""``auto``: below the local threshold, a global batch of at least this many samples uses SyncBatchNorm;
smaller global batches use GroupNorm, whose statistics do not depend on the batch."""


def conversion_kinds() -> list[str]:
    """Every kind a conversion accepts: the table's, in registration order, then ``auto``."""
    return [*layer_kinds(), AUTO]


def conversion_kind(kind: Any, where: str) -> NormKind:
    """The table row of a conversion kind; for ``auto``, a row with its options and those of the kinds
    it may choose. ``ValueError`` listing :func:`conversion_kinds` for an unknown name."""
    name = rules.check_kind(kind, conversion_kinds(), where)
    if name != AUTO:
        return get_kind(name, where)
    merged: dict[str, rules.Rule] = {}
    for choice in AUTO_CHOICES:
        merged.update(get_kind(choice, where).options)
    return NormKind(AUTO, None, {**merged, **AUTO_OPTIONS}, required=("per_device_batch",))


def _is_family(m: nn.Module) -> bool:
    return any(row.is_layer(m) for row in registered_rows())


def _has_stats(m: nn.Module) -> bool:
    return getattr(m, "running_mean", None) is not None and getattr(m, "running_var", None) is not None


_TRAINABLE_ATTR = "_syncnorm_requires_grad"
"""Set on a layer whose parameters became buffers: each parameter's ``requires_grad``, for the way back."""


def _move_state(src: nn.Module, dst: nn.Module) -> None:
    """Carry ``src``'s tensors into the fresh layer ``dst`` (shared, copied or dropped, see the
    module docstring), with its device, dtype, ``training`` and recorded class."""
    ref = next((t for t in list(src.parameters()) + list(src.buffers())), None)
    if ref is not None:  # dst's own (unshared) tensors follow the source's device and dtype
        dst.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
    transfer_norm_state(src, dst)
    flags = {n: p.requires_grad for n, p in src.named_parameters(recurse=False)}
    if any(not isinstance(getattr(dst, n, None), nn.Parameter) for n in flags):
        setattr(dst, _TRAINABLE_ATTR, flags)  # parameters became buffers: remember for the way back
    for name, flag in getattr(src, _TRAINABLE_ATTR, {}).items():
        if isinstance(getattr(dst, name, None), nn.Parameter):
            getattr(dst, name).requires_grad_(flag)
    if isinstance(dst, FrozenBatchNorm) and not _has_stats(src):
        log.warning("convert_norms(kind='frozen'): %s has no running statistics; freezing mean 0, var 1",
                    type(src).__name__)


def choose_auto_kind(per_device_batch: int, world_size: Optional[int] = None,
                     min_local_batch: int = AUTO_MIN_LOCAL_BATCH,
                     min_global_batch: int = AUTO_MIN_GLOBAL_BATCH) -> tuple[str, str]:
    """The ``auto`` policy: ``(kind, reason)`` from the per-device batch and the world size.

    * per-device batch >= ``min_local_batch`` (16): ``batch``; local statistics are good enough and
      cost no communication;
    * else, if ``world_size > 1`` and the global batch >= ``min_global_batch`` (16): ``sync``;
    * else: ``group`` (GroupNorm does not depend on the batch size at all).

    ``world_size`` defaults to the initialized process group's (1 without one).
    """
    if world_size is None:
        world_size = distributed.world_size()
    for name, value in (("per_device_batch", per_device_batch), ("world_size", world_size),
                        ("min_local_batch", min_local_batch), ("min_global_batch", min_global_batch)):
        AUTO_OPTIONS[name].check(value, "auto norm")
    glob = per_device_batch * world_size
    if per_device_batch >= min_local_batch:
        return "batch", f"per-device batch {per_device_batch} >= {min_local_batch}: local statistics suffice"
    if world_size > 1 and glob >= min_global_batch:
        return "sync", (f"per-device batch {per_device_batch} < {min_local_batch} but global batch "
                        f"{glob} (x{world_size} ranks) >= {min_global_batch}: synchronize statistics")
    return "group", (f"global batch {glob} < {min_global_batch}: batch statistics too noisy, "
                     "GroupNorm is batch-independent")


def convert_norms(module: nn.Module, kind: str, **options: Any) -> nn.Module:
    """Replace every normalization layer of the batch-norm family in ``module`` by ``kind``.

    Args:
        module: the model (or a single norm layer).
        kind: a kind of the table (``batch``, ``sync``, ``ghost``, ``renorm``, ``frozen``, ``group``,
            ``batch_instance``, ``switchable``, and any registered one) or ``auto``.
        **options: the kind's options: ``dim`` (batch), ``process_group`` (the synchronizing kinds:
            sync, renorm, batch_instance, switchable), ``virtual_batch_size`` (ghost),
            ``r_max``/``d_max``/``warmup_steps``/``momentum`` (renorm), ``num_groups`` (group,
            default 32, lowered to the largest divisor of C),
            ``per_device_batch``/``world_size``/``min_local_batch``/``min_global_batch`` (auto;
            the options of the kinds it may choose may be passed too).

    Returns:
        The root module (a new object only when ``module`` itself is a norm layer).

    Raises:
        ValueError: unknown kind or option, an invalid or missing option value.

    Example::

        >>> import torch, syncnorm
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> net = syncnorm.convert_norms(net, "ghost", virtual_batch_size=4)
        >>> type(net[1]).__name__
        'GhostBatchNorm'
        >>> type(syncnorm.revert_norms(net)[1]).__name__
        'BatchNorm2d'
    """
    root, summary = convert_norms_with_summary(module, kind, **options)
    log.info("%s", summary)
    return root


def convert_norms_with_summary(module: nn.Module, kind: str, **options: Any) -> tuple[nn.Module, str]:
    """:func:`convert_norms` that returns ``(root, summary)`` and logs nothing (for callers that
    log on rank zero only)."""
    row = conversion_kind(kind, "convert_norms")
    row.check_options(options, f"convert_norms(kind={row.name!r})")
    reason = ""
    if row.name == AUTO:
        chosen, why = choose_auto_kind(**{k: v for k, v in options.items() if k in AUTO_OPTIONS})
        row = get_kind(chosen, "convert_norms")
        options = {k: v for k, v in options.items() if k in row.options}
        reason = f"auto chose {chosen!r} because {why}; "
    changes: Counter = Counter()
    notes: Counter = Counter()  # a builder's remark (CONVERSION_NOTE_ATTR), reported once with its count

    def make(old: nn.Module, name: str) -> nn.Module:
        new = row.replace(old, options)
        if new is old:
            return old
        _move_state(old, new)
        new.layer_name = name or getattr(old, "layer_name", None)
        changes[(type(old).__name__, type(new).__name__)] += 1
        note = new.__dict__.pop(CONVERSION_NOTE_ATTR, None)
        if note:
            notes[note] += 1
        return new

    root = replace_modules(module, _is_family, make)
    if changes:
        detail = ", ".join(f"{src} -> {dst} x{n}" for (src, dst), n in sorted(changes.items()))
        remarks = "".join(f"; {note} (x{n} layers)" for note, n in notes.items())
        return root, (f"convert_norms({row.name}): {reason}{sum(changes.values())} layers converted ({detail})"
                      f"{remarks}")
    return root, f"convert_norms({row.name}): {reason}no layer to convert"


def revert_norms(module: nn.Module, dim: Optional[int] = None) -> nn.Module:
    """``convert_norms(module, "batch")``: back to the torch classes recorded at conversion.

    Layers without a recorded class become ``BatchNorm{dim}d``; without ``dim`` they raise
    ``ValueError``.
    """
    return convert_norms(module, "batch", **({"dim": dim} if dim is not None else {}))


