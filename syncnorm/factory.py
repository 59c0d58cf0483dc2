"""Norm-layer factory: one registry from lowercase kind names to layer builders.

Shared by the conversion API, the model builders, the Hydra configs and the callbacks, so a kind
name means the same thing everywhere. Every builder takes the channel count first
(``builder(num_features, **options)``), whatever the underlying torch class wants.

Example::

    >>> from syncnorm.factory import create_norm_layer, get_norm_layer
    >>> create_norm_layer("sync", 64)
    SyncBatchNorm(64, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)
    >>> make = get_norm_layer("group", num_groups=8)
    >>> make(64)
    GroupNorm(8, 64, eps=1e-05, affine=True)
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Union

from torch import nn

log = logging.getLogger(__name__)

NormSpec = Union[str, Callable[..., nn.Module], None]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_norm(kind: str, builder: Callable[..., nn.Module]) -> None:
    """Register ``builder(num_features, **options)`` under the lowercase name ``kind``."""
    key = kind.lower()
    if not key.isidentifier():
        raise ValueError(f"register_norm: expected an identifier-like kind name, got {kind!r}")
    _REGISTRY[key] = builder


def norm_kinds() -> list[str]:
    """The registered kind names, sorted."""
    return sorted(_REGISTRY)


def get_norm_layer(norm: NormSpec, **options: Any) -> Callable[[int], nn.Module]:
    """A callable ``make(num_features) -> nn.Module`` for ``norm``.

    ``norm`` is a kind name (case-insensitive), a class or function taking ``num_features`` first,
    or a ``functools.partial`` of one (its keyword arguments are kept, ``options`` added on top).
    ``None`` or ``"none"`` gives ``nn.Identity``.

    Raises:
        ValueError: unknown kind name; the message lists the valid ones.
        TypeError: ``norm`` is neither a string nor a callable.
    """
    if norm is None or (isinstance(norm, str) and norm.lower() in ("", "none")):
        return lambda num_features: nn.Identity()
    if isinstance(norm, str):
        key = norm.lower()
        if key not in _REGISTRY:
            raise ValueError(f"unknown norm kind {norm!r}; expected one of {norm_kinds()}")
        builder = _REGISTRY[key]
    elif callable(norm):
        builder = norm
    else:
        raise TypeError(f"norm must be a kind name or a callable taking num_features, got {type(norm).__name__}")
    return functools.partial(builder, **options) if options else builder


def create_norm_layer(norm: NormSpec, num_features: int, **options: Any) -> nn.Module:
    """Build one norm layer: ``get_norm_layer(norm, **options)(num_features)``."""
    return get_norm_layer(norm, **options)(num_features)


def _batch(num_features: int, dim: int = 2, **kw: Any) -> nn.Module:
    classes = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
    if dim not in classes:
        raise ValueError(f"batch norm: expected dim in {sorted(classes)}, got {dim!r}")
    return classes[dim](num_features, **kw)


def largest_divisor_at_most(c: int, limit: int) -> int:
    """The largest divisor of ``c`` that is ``<= limit`` (GroupNorm's group count)."""
    limit = max(1, min(int(limit), c))
    return next(g for g in range(limit, 0, -1) if c % g == 0)


def _group(num_features: int, num_groups: int = 32, eps: float = 1e-5, affine: bool = True, **_: Any) -> nn.Module:
    if num_groups < 1:
        raise ValueError(f"group norm: expected num_groups >= 1, got {num_groups}")
    g = largest_divisor_at_most(num_features, num_groups)
    if g != num_groups:
        log.info("group norm: C=%d is not divisible by num_groups=%d; using %d groups (the largest divisor)",
                 num_features, num_groups, g)
    return nn.GroupNorm(g, num_features, eps=eps, affine=affine)


def _register_builtins() -> None:
    from .layers import (BatchInstanceNorm, BatchRenorm, FrozenBatchNorm, GhostBatchNorm, SwitchableNorm,
                         SyncBatchNorm)

    register_norm("batch", _batch)
    register_norm("sync", SyncBatchNorm)
    register_norm("ghost", GhostBatchNorm)
    register_norm("renorm", BatchRenorm)
    register_norm("frozen", FrozenBatchNorm)
    register_norm("group", _group)
    register_norm("batch_instance", BatchInstanceNorm)
    register_norm("switchable", SwitchableNorm)


_register_builtins()
