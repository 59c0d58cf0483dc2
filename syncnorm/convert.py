"""Model-wide conversion between normalization kinds: ``convert_norms``, ``revert_norms``, ``auto``.

Every conversion walks ``named_children`` recursively, replaces each layer of the batch-norm family
(torch's ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm``, syncnorm's ``SyncBatchNorm``,
``GhostBatchNorm``, ``BatchRenorm``, ``FrozenBatchNorm``, and ``GroupNorm`` layers that a previous
conversion made) and leaves every other module alone. Trainable parameters are *shared* with the
new layer (same ``Parameter`` objects, so an optimizer built before still sees them); running
buffers are shared too, except for ``frozen`` (parameters become buffers: copied) and ``group``
(statistics dropped). Device, dtype, ``requires_grad`` and ``training`` are kept. Each new layer
records the torch class it came from, so ``revert_norms`` restores exactly that class.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .factory import create_norm_layer
from .layers import BatchRenorm, FrozenBatchNorm, GhostBatchNorm, SyncBatchNorm
from .layers._base import ORIGINAL_CLASS_ATTR, record_origin, replace_modules, transfer_norm_state

log = logging.getLogger(__name__)

KINDS = ("batch", "sync", "ghost", "renorm", "frozen", "group", "auto")

_OPTIONS = {
    "batch": {"dim"},
    "sync": {"process_group"},
    "ghost": {"virtual_batch_size"},
    "renorm": {"r_max", "d_max", "warmup_steps", "process_group"},
    "frozen": set(),
    "group": {"num_groups"},
}

AUTO_MIN_LOCAL_BATCH = 16
"""``auto``: a per-device batch of at least this many samples keeps plain (local) BatchNorm."""
AUTO_MIN_GLOBAL_BATCH = 16
"""``auto``: below the local threshold, a global batch of at least this many samples uses SyncBatchNorm;
smaller global batches use GroupNorm, whose statistics do not depend on the batch."""


def _is_family(m: nn.Module) -> bool:
    return isinstance(m, (_BatchNorm, FrozenBatchNorm)) or (
        isinstance(m, nn.GroupNorm) and hasattr(m, ORIGINAL_CLASS_ATTR))


def _channels(m: nn.Module) -> int:
    return m.num_channels if isinstance(m, nn.GroupNorm) else m.num_features


def _has_stats(m: nn.Module) -> bool:
    return getattr(m, "running_mean", None) is not None and getattr(m, "running_var", None) is not None


def _to_batch(m: nn.Module, dim: Optional[int]) -> nn.Module:
    original = getattr(m, ORIGINAL_CLASS_ATTR, None)
    if original is None and isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)):
        return m
    if original is None:
        classes = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
        if dim not in classes:
            raise ValueError(
                f"convert_norms(kind='batch'): {type(m).__name__} '{getattr(m, 'layer_name', '') or ''}' "
                f"has no recorded torch class; pass dim=1, 2 or 3 to choose BatchNorm1d/2d/3d (got dim={dim!r})")
        original = classes[dim]
    c = _channels(m)
    affine = getattr(m, "affine", True)
    if isinstance(m, FrozenBatchNorm):
        new = original(c, eps=m.eps, affine=True)
    else:
        track = getattr(m, "track_running_stats", True)
        new = original(c, eps=m.eps, momentum=getattr(m, "momentum", 0.1), affine=affine,
                       track_running_stats=track)
    return new


def _build(m: nn.Module, kind: str, options: dict[str, Any]) -> nn.Module:
    """The replacement layer for ``m`` (fresh tensors; state moved in by ``_move_state``)."""
    c, eps = _channels(m), m.eps
    momentum = getattr(m, "momentum", 0.1)
    affine = getattr(m, "affine", True) if not isinstance(m, FrozenBatchNorm) else True
    track = getattr(m, "track_running_stats", True) and not isinstance(m, nn.GroupNorm)
    if kind == "batch":
        return _to_batch(m, options.get("dim"))
    if kind == "sync":
        return SyncBatchNorm(c, eps, momentum, affine, track, process_group=options.get("process_group"))
    if kind == "ghost":
        if "virtual_batch_size" not in options:
            raise ValueError("convert_norms(kind='ghost'): expected option virtual_batch_size=<int >= 1>, got none")
        return GhostBatchNorm(c, options["virtual_batch_size"], eps, momentum, affine, track)
    if kind == "renorm":
        kw = {k: options[k] for k in ("r_max", "d_max", "warmup_steps", "process_group") if k in options}
        return BatchRenorm(c, eps, options.get("momentum", momentum if momentum is not None else 0.01), affine, **kw)
    if kind == "frozen":
        return FrozenBatchNorm(c, eps)
    if kind == "group":
        return create_norm_layer("group", c, num_groups=options.get("num_groups", 32), eps=eps, affine=affine)
    raise AssertionError(kind)


def _move_state(src: nn.Module, dst: nn.Module) -> None:
    """Carry parameters/buffers from ``src`` into ``dst`` as the target kind allows."""
    ref = next((t for t in list(src.parameters()) + list(src.buffers())), None)
    if isinstance(dst, FrozenBatchNorm):
        with torch.no_grad():
            if ref is not None:
                dst.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
            for name in ("weight", "bias", "running_mean", "running_var"):
                t = getattr(src, name, None)
                if t is not None:
                    getattr(dst, name).copy_(t.detach())
            if getattr(src, "num_batches_tracked", None) is not None:
                dst.num_batches_tracked.copy_(src.num_batches_tracked)
        # parameters become buffers; remember which were trainable, for a later revert
        dst._syncnorm_requires_grad = {n: p.requires_grad for n, p in src.named_parameters(recurse=False)}
        if not _has_stats(src):
            log.warning("convert_norms(kind='frozen'): %s has no running statistics; freezing mean 0, var 1",
                        type(src).__name__)
        dst.train(src.training)
        record_origin(src, dst)
        return
    if ref is not None:  # fresh tensors of the target follow the source's device/dtype
        dst.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
    if isinstance(src, FrozenBatchNorm) and not isinstance(dst, nn.GroupNorm):
        with torch.no_grad():  # buffers become trainable parameters again: copy values
            for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                if getattr(dst, name, None) is not None:
                    getattr(dst, name).copy_(getattr(src, name))
        for name, flag in getattr(src, "_syncnorm_requires_grad", {}).items():
            if isinstance(getattr(dst, name, None), nn.Parameter):
                getattr(dst, name).requires_grad_(flag)
        dst.train(src.training)
        record_origin(src, dst)
        return
    if isinstance(dst, nn.GroupNorm) or isinstance(src, nn.GroupNorm):
        for name in ("weight", "bias"):
            p = getattr(src, name, None)
            if isinstance(p, nn.Parameter) and getattr(dst, name, None) is not None:
                setattr(dst, name, p)
        dst.train(src.training)
        record_origin(src, dst)
        return
    transfer_norm_state(src, dst)


def choose_auto_kind(per_device_batch: int, world_size: Optional[int] = None,
                     min_local_batch: int = AUTO_MIN_LOCAL_BATCH,
                     min_global_batch: int = AUTO_MIN_GLOBAL_BATCH) -> tuple[str, str]:
    """The ``auto`` policy: ``(kind, reason)`` from the per-device batch and the world size.

    * per-device batch >= ``min_local_batch`` (16): ``batch``; local statistics are good enough and
      cost no communication;
    * else, if ``world_size > 1`` and the global batch >= ``min_global_batch`` (16): ``sync``;
    * else: ``group`` (GroupNorm does not depend on the batch size at all).
    """
    if world_size is None:
        import torch.distributed as dist

        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if per_device_batch < 1 or world_size < 1:
        raise ValueError(f"auto norm: expected per_device_batch >= 1 and world_size >= 1, got "
                         f"{per_device_batch} and {world_size}")
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
        kind: one of ``batch``, ``sync``, ``ghost``, ``renorm``, ``frozen``, ``group``, ``auto``.
        **options: the kind's options: ``dim`` (batch), ``process_group`` (sync, renorm),
            ``virtual_batch_size`` (ghost), ``r_max``/``d_max``/``warmup_steps`` (renorm),
            ``num_groups`` (group, default 32, lowered to the largest divisor of C),
            ``per_device_batch``/``world_size``/``min_local_batch``/``min_global_batch`` (auto;
            the chosen kind's options may be passed too).

    Returns:
        The root module (a new object only when ``module`` itself is a norm layer).

    Raises:
        ValueError: unknown kind or option, a missing required option.

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
    if not isinstance(kind, str) or kind.lower() not in KINDS:
        raise ValueError(f"convert_norms: unknown kind {kind!r}; expected one of {list(KINDS)}")
    kind = kind.lower()
    prefix = ""
    if kind == "auto":
        auto_keys = {"per_device_batch", "world_size", "min_local_batch", "min_global_batch"}
        if "per_device_batch" not in options:
            raise ValueError("convert_norms(kind='auto'): expected option per_device_batch=<int>, got none")
        kind, reason = choose_auto_kind(**{k: options[k] for k in auto_keys if k in options})
        options = {k: v for k, v in options.items() if k not in auto_keys and k in _OPTIONS[kind]}
        prefix = f"auto chose {kind!r} because {reason}; "
    unknown = set(options) - _OPTIONS[kind] - ({"momentum"} if kind == "renorm" else set())
    if unknown:
        raise ValueError(f"convert_norms(kind={kind!r}): unknown options {sorted(unknown)}; "
                         f"expected some of {sorted(_OPTIONS[kind])}")
    changes: Counter = Counter()
    root = _convert(module, kind, options, "", changes)
    if changes:
        detail = ", ".join(f"{src} -> {dst} x{n}" for (src, dst), n in sorted(changes.items()))
        summary = f"convert_norms({kind}): {prefix}{sum(changes.values())} layers converted ({detail})"
    else:
        summary = f"convert_norms({kind}): {prefix}no layer to convert"
    return root, summary


def _convert(m: nn.Module, kind: str, options: dict, prefix: str, changes: Counter) -> nn.Module:
    def make(old: nn.Module, name: str) -> nn.Module:
        new = _build(old, kind, options)
        if new is old:
            return old
        _move_state(old, new)
        new.layer_name = name or getattr(old, "layer_name", None)
        changes[(type(old).__name__, type(new).__name__)] += 1
        return new

    return replace_modules(m, _is_family, make, prefix)


def revert_norms(module: nn.Module, dim: Optional[int] = None) -> nn.Module:
    """``convert_norms(module, "batch")``: back to the torch classes recorded at conversion.

    Layers without a recorded class become ``BatchNorm{dim}d``; without ``dim`` they raise
    ``ValueError``.
    """
    return convert_norms(module, "batch", **({"dim": dim} if dim is not None else {}))
