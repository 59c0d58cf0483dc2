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
dtype and ``training`` are kept, and so is a ``qconfig`` attribute (as torch's
``convert_sync_batchnorm`` does). Each new layer records the class it came from, so
``revert_norms`` restores exactly that class (its constructor gets the channel count and the
settings it takes; see :func:`syncnorm.factory.build_original`).

Other libraries' layers (``docs/models.md``):

* **Norm + activation subclasses** (timm's ``BatchNormAct2d``, used by most timm CNNs): a
  batch-norm layer of a class from neither torch nor syncnorm whose child modules are named among
  :data:`TAIL` (``drop``, ``act``) applies them after the norm (timm's convention: norm, then drop,
  then act). A conversion moves those children (the same objects) to the new layer, which applies
  them in that order after its own norm (:func:`apply_tail`, a forward hook), so the function is
  kept; the way back rebuilds the original class and gives it back those children. Such a layer
  with any *other* child module is refused (``ValueError``): where it applies is unknown. Children
  of torch's and syncnorm's own classes, which their forward ignores, move along unapplied (as
  torch's ``convert_sync_batchnorm`` does).
* **Frozen look-alikes** (torchvision's ``FrozenBatchNorm2d``; the rule is
  :func:`syncnorm.factory.is_frozen_look_alike`) are of the ``frozen`` kind: they convert to any
  kind (``sync``, ``batch``: trainable again) and back.
* **Lazy layers** (``LazyBatchNorm2d``) with uninitialized parameters are refused (``ValueError``):
  their channel count is unknown until the first forward; run one forward pass first, which turns
  them into ``BatchNorm2d``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from typing import Any, Callable, Mapping, Optional

from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin

from . import distributed, rules
from .factory import CONVERSION_NOTE_ATTR, NormKind, get_kind, layer_kinds, registered_rows
from .layers import FrozenBatchNorm
from .layers._base import replace_modules, transfer_norm_state

__all__ = ["AUTO", "AUTO_CHOICES", "AUTO_MIN_GLOBAL_BATCH", "AUTO_MIN_LOCAL_BATCH", "AUTO_OPTIONS",
           "TAIL", "apply_tail", "choose_auto_kind", "conversion_kind", "conversion_kinds", "convert_norms",
           "convert_norms_with_summary", "convert_sync_batchnorm", "revert_norms"]

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


def _kinds_of(m: nn.Module) -> set[str]:
    return {row.name for row in registered_rows() if row.is_layer(m)}


# ------------------------------------------------------------------ extra submodules (norm + act)

TAIL = ("drop", "act")
"""The child modules a norm + activation layer applies after its norm, in this order (timm's
``BatchNormAct2d``, ``FrozenBatchNormAct2d``: ``x = act(drop(norm(x)))``)."""


def apply_tail(module: nn.Module, args: Any, output: Tensor) -> Tensor:
    """Forward hook of a converted layer that came from a norm + activation layer: its :data:`TAIL`
    children, in order, on the norm's output."""
    for name in TAIL:
        sub = module._modules.get(name)
        if sub is not None:
            output = sub(output)
    return output


def _hooks_tail(m: nn.Module) -> bool:
    return any(h is apply_tail for h in m._forward_hooks.values())


def _is_foreign(m: nn.Module) -> bool:
    """A class from neither torch nor syncnorm (its forward may apply its children)."""
    return not type(m).__module__.startswith(("torch.", "syncnorm."))


def _applies_tail(m: nn.Module, name: str) -> bool:
    """Whether ``m``'s forward applies its :data:`TAIL` children (see the module docstring);
    ``ValueError`` for a foreign layer with children it may apply anywhere."""
    if _hooks_tail(m):
        return True
    children = list(m._modules)
    if not _is_foreign(m) or not children:
        return False
    unknown = [c for c in children if c not in TAIL]
    if unknown:
        raise ValueError(
            f"convert_norms: {type(m).__qualname__} '{name}' has child modules {unknown}; a norm layer's "
            f"children are converted only under the names {list(TAIL)} (applied after the norm, in that "
            f"order, as timm's BatchNormAct2d does). Convert this layer's class yourself or register a "
            f"kind for it (syncnorm.register_norm)")
    return True


def _carry_children(src: nn.Module, dst: nn.Module, name: str) -> None:
    """Move ``src``'s child modules to ``dst`` (same objects); when ``src`` applied them after its
    norm and ``dst``'s own forward will not (its class is torch's or syncnorm's), ``dst`` applies
    them with :func:`apply_tail`."""
    applies = _applies_tail(src, name)
    for child_name, child in src._modules.items():
        dst.add_module(child_name, child)
    if applies and not _is_foreign(dst) and not _hooks_tail(dst):
        dst.register_forward_hook(apply_tail)


def _check_convertible(m: nn.Module, name: str) -> None:
    """``ValueError`` before anything changes: an uninitialized lazy layer, a foreign layer with
    children other than :data:`TAIL`."""
    if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params():
        target = getattr(m, "cls_to_become", None)
        becomes = f" (it becomes {target.__name__})" if target is not None else ""
        raise ValueError(
            f"convert_norms: {type(m).__name__} '{name}' has uninitialized parameters (a lazy layer learns "
            f"its channel count in its first forward); run one forward pass on an example batch first"
            f"{becomes}, then convert")
    _applies_tail(m, name)


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
    if hasattr(src, "qconfig"):  # quantization config, kept as torch's convert_sync_batchnorm keeps it
        dst.qconfig = src.qconfig
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
    root, changes, notes = _replace(module, row, options, _is_family)
    if changes:
        detail = ", ".join(f"{src} -> {dst} x{n}" for (src, dst), n in sorted(changes.items()))
        remarks = "".join(f"; {note} (x{n} layers)" for note, n in notes.items())
        return root, (f"convert_norms({row.name}): {reason}{sum(changes.values())} layers converted ({detail})"
                      f"{remarks}")
    return root, f"convert_norms({row.name}): {reason}no layer to convert"


def _replace(module: nn.Module, row: NormKind, options: Mapping[str, Any],
             match: Callable[[nn.Module], bool]) -> tuple[nn.Module, Counter, Counter]:
    """Every conversion: replace each layer with ``match`` by ``row``'s layer; ``(root, changes,
    notes)``, ``notes`` counting each builder's remark (``CONVERSION_NOTE_ATTR``), reported once."""
    changes: Counter = Counter()
    notes: Counter = Counter()

    def make(old: nn.Module, name: str) -> nn.Module:
        _check_convertible(old, name)
        new = row.replace(old, options)
        if new is old:
            return old
        _move_state(old, new)
        _carry_children(old, new, name)
        new.layer_name = name or getattr(old, "layer_name", None)
        changes[(type(old).__name__, type(new).__name__)] += 1
        note = new.__dict__.pop(CONVERSION_NOTE_ATTR, None)
        if note:
            notes[note] += 1
        return new

    return replace_modules(module, match, make), changes, notes


_TO_SYNC = frozenset({"batch", "sync"})


def convert_sync_batchnorm(module: nn.Module, process_group: Optional[Any] = None,
                           cls: Optional[type] = None) -> nn.Module:
    """:meth:`syncnorm.SyncBatchNorm.convert_sync_batchnorm`: torch's contract, syncnorm's kinds kept.

    Replaces the layers whose only kinds are ``batch``/``sync`` (torch's batch norms, their
    subclasses such as timm's ``BatchNormAct2d``, ``torch.nn.SyncBatchNorm``, syncnorm's
    ``SyncBatchNorm``, which gets ``process_group``) by ``cls`` (default :class:`SyncBatchNorm`),
    exactly as ``convert_norms(module, "sync", process_group=...)`` does. Every other kind's layer is
    kept as it is: ghost and frozen layers are local on purpose, renorm, batch_instance and
    switchable layers synchronize already (with their own ``process_group``), group layers have no
    batch statistics.
    """
    row = get_kind("sync", "convert_sync_batchnorm")
    if cls is not None and cls is not row.builder:
        row = dataclasses.replace(row, builder=cls)
    root, _, _ = _replace(module, row, {"process_group": process_group},
                       lambda m: _is_family(m) and _kinds_of(m) <= _TO_SYNC)
    return root


def revert_norms(module: nn.Module, dim: Optional[int] = None) -> nn.Module:
    """``convert_norms(module, "batch")``: back to the torch classes recorded at conversion.

    Layers without a recorded class become ``BatchNorm{dim}d``; without ``dim`` they raise
    ``ValueError``.
    """
    return convert_norms(module, "batch", **({"dim": dim} if dim is not None else {}))


