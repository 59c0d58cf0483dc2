"""The one table of norm kinds: name -> builder, options and their rules, sync, the way back.

Every part of syncnorm that takes a kind name reads this table: :func:`get_norm_layer` and
:func:`create_norm_layer` (the model builders), :func:`syncnorm.convert_norms` and
:func:`syncnorm.revert_norms`, the ``NormConversion`` callback, the ``SyncNormLayerSync`` plugin and
the app's config check. A row (:class:`NormKind`) says:

* ``builder(num_features, **options)``: the channel count first, whatever the torch class wants;
* ``options``: the options the kind accepts beyond what it takes over from a converted layer, each
  with its :class:`~syncnorm.rules.Rule`; ``required``: the ones without a default;
* ``inherits``: the settings a conversion carries over from the layer it replaces
  (``eps``, ``momentum``, ``affine``, ``track_running_stats``);
* ``synchronizes``: the kind takes a ``process_group`` (and so ``NormConversion``'s
  ``sync_group_size``);
* ``recognizes(module)``: which existing layers are of this kind, so a conversion can replace them
  (and convert them back): ``batch`` every ``_BatchNorm`` (timm's norm + activation subclasses
  included), ``frozen`` syncnorm's ``FrozenBatchNorm`` and other libraries' frozen batch norms
  (:func:`is_frozen_look_alike`). Every kind converts back through ``batch``, whose ``from_layer``
  rebuilds the class the layer had before its first conversion (:func:`build_original`).

Adding a kind is one file with the layer plus one :func:`register_norm` call; from then on the
kind works in every place above (``tests/e2e/test_new_kind.py`` proves it with the toy kind of
``tests/toy_norm.py``).

Example::

    >>> from syncnorm.factory import create_norm_layer, get_norm_layer
    >>> create_norm_layer("sync", 64)
    SyncBatchNorm(64, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True)
    >>> make = get_norm_layer("group", num_groups=8)
    >>> make(64)
    GroupNorm(8, 64, eps=1e-05, affine=True, bias=True)
"""

from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Union

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import rules
from .layers import BatchInstanceNorm, BatchRenorm, FrozenBatchNorm, GhostBatchNorm, SwitchableNorm, SyncBatchNorm
from .layers._base import ORIGINAL_CLASS_ATTR
from .rules import Rule

__all__ = ["CONVERSION_NOTE_ATTR", "NormKind", "NormSpec", "SETTINGS", "build_original", "create_norm_layer",
           "get_kind", "get_norm_layer", "is_frozen_look_alike", "layer_kinds", "layer_settings",
           "largest_divisor_at_most", "norm_kinds", "register_norm", "registered_rows", "synchronizing_kinds"]

CONVERSION_NOTE_ATTR = "_syncnorm_conversion_note"
"""Attribute a builder may set on a layer it made: a remark about the result (e.g. GroupNorm's lowered
group count). :func:`syncnorm.convert_norms` removes it and reports each distinct note once."""

NormSpec = Union[str, Callable[..., nn.Module], None]

SETTINGS = ("eps", "momentum", "affine", "track_running_stats")
"""What a conversion can carry over from the layer it replaces."""


@dataclass(frozen=True)
class NormKind:
    """One row of the table (see the module docstring)."""

    name: str
    builder: Optional[Callable[..., nn.Module]]
    options: Mapping[str, Rule] = field(default_factory=dict)
    required: tuple[str, ...] = ()
    inherits: tuple[str, ...] = SETTINGS
    synchronizes: bool = False
    recognizes: Optional[Callable[[nn.Module], bool]] = None
    from_layer: Optional[Callable[[nn.Module, dict], nn.Module]] = None

    def is_layer(self, module: nn.Module) -> bool:
        """Whether ``module`` is a layer of this kind (by default: an instance of the builder class)."""
        if self.recognizes is not None:
            return self.recognizes(module)
        return isinstance(self.builder, type) and isinstance(module, self.builder)

    def problems(self, options: Mapping[str, Any], require: bool = True) -> tuple[list[str], list[str], list[str]]:
        """``(unknown option names, missing required names, invalid-value messages)`` for ``options``."""
        unknown = sorted(set(options) - set(self.options))
        missing = [k for k in self.required if k not in options] if require else []
        invalid = [f"{k}={v!r}: expected {self.options[k].expected}" for k, v in options.items()
                   if k in self.options and not self.options[k].accepts(v)]
        return unknown, missing, invalid

    def check_options(self, options: Mapping[str, Any], where: str, require: bool = True) -> None:
        """``ValueError`` naming the first problem of ``options`` (see :meth:`problems`)."""
        unknown, missing, _ = self.problems(options, require)
        if unknown:
            raise ValueError(f"{where}: unknown options {unknown}; expected some of {sorted(self.options)}")
        if missing:
            rule = self.options[missing[0]]
            raise ValueError(f"{where}: expected option {missing[0]}=<{rule.expected}>, got none")
        for k, v in options.items():
            self.options[k].check(v, where)

    def replace(self, layer: nn.Module, options: Mapping[str, Any]) -> nn.Module:
        """A new layer of this kind for ``layer``: its channel count and inherited settings, then
        ``options`` (fresh tensors; the conversion moves the state in)."""
        if self.from_layer is not None:
            return self.from_layer(layer, dict(options))
        settings = layer_settings(layer)
        kw = {k: settings[k] for k in self.inherits}
        kw.update(options)
        return self.builder(settings["num_features"], **kw)


_REGISTRY: dict[str, NormKind] = {}


def register_norm(kind: str, builder: Callable[..., nn.Module], *,
                  options: Union[Mapping[str, Rule], Iterable[str], None] = None, required: Iterable[str] = (),
                  inherits: Iterable[str] = SETTINGS, synchronizes: bool = False,
                  recognizes: Optional[Callable[[nn.Module], bool]] = None,
                  from_layer: Optional[Callable[[nn.Module, dict], nn.Module]] = None) -> NormKind:
    """Register ``builder(num_features, **options)`` under the lowercase name ``kind``.

    Args:
        kind: the name (identifier-like; looked up case-insensitively).
        builder: a class or function taking the channel count first.
        options: the options the kind accepts, ``{name: Rule}`` (or just names: accepted unchecked).
            ``process_group`` is added for a kind that synchronizes.
        required: options without a default (conversions refuse to run without them).
        inherits: the settings of :data:`SETTINGS` the builder takes over from a converted layer.
        synchronizes: the builder takes ``process_group`` (statistics over a process group).
        recognizes: ``recognizes(module) -> bool``: the existing layers of this kind; default: the
            instances of ``builder`` when it is a class.
        from_layer: ``from_layer(layer, options) -> module``, when building from an existing layer
            needs more than the builder with the inherited settings.

    Returns:
        The table row.

    Example::

        >>> import torch, syncnorm
        >>> from syncnorm.rules import Rule
        >>> class ScaledBN(torch.nn.BatchNorm2d):
        ...     def __init__(self, num_features, scale=1.0, **kw):
        ...         super().__init__(num_features, **kw)
        ...         self.scale = scale
        ...     def forward(self, x):
        ...         return super().forward(x) * self.scale
        >>> _ = syncnorm.register_norm("scaled_doc", ScaledBN,
        ...                            options={"scale": Rule("scale", "a float", lambda v: isinstance(v, float))})
        >>> net = syncnorm.convert_norms(torch.nn.Sequential(torch.nn.BatchNorm2d(4)), "scaled_doc", scale=2.0)
        >>> type(net[0]).__name__, net[0].scale
        ('ScaledBN', 2.0)
    """
    key = kind.lower() if isinstance(kind, str) else kind
    if not isinstance(key, str) or not key.isidentifier():
        raise ValueError(f"register_norm: expected an identifier-like kind name, got {kind!r}")
    rows = dict(options) if isinstance(options, Mapping) else {k: rules.ANY for k in (options or ())}
    if synchronizes:
        rows.setdefault("process_group", rules.ANY)
    unknown = [k for k in required if k not in rows] + [s for s in inherits if s not in SETTINGS]
    if unknown:
        raise ValueError(f"register_norm({key!r}): expected required options among {sorted(rows)} and inherited "
                         f"settings among {list(SETTINGS)}, got {unknown}")
    row = NormKind(key, builder, rows, tuple(required), tuple(inherits), synchronizes, recognizes, from_layer)
    _REGISTRY[key] = row
    return row


def norm_kinds() -> list[str]:
    """The registered kind names, sorted."""
    return sorted(_REGISTRY)


def registered_rows() -> list[NormKind]:
    """Every row of the table, in registration order."""
    return list(_REGISTRY.values())


def synchronizing_kinds() -> list[str]:
    """The kinds that take a ``process_group`` (statistics over a group), in registration order."""
    return [row.name for row in _REGISTRY.values() if row.synchronizes]


def layer_kinds() -> list[str]:
    """The registered kind names in registration order (the built-in ones first), for messages."""
    return list(_REGISTRY)


def get_kind(kind: Any, where: str) -> NormKind:
    """The table row of ``kind`` (case-insensitive); ``ValueError`` listing the kinds if unknown."""
    return _REGISTRY[rules.check_kind(kind, _REGISTRY, where)]


def get_norm_layer(norm: NormSpec, **options: Any) -> Callable[[int], nn.Module]:
    """A callable ``make(num_features) -> nn.Module`` for ``norm``.

    ``norm`` is a kind name (case-insensitive), a class or function taking ``num_features`` first,
    or a ``functools.partial`` of one (its keyword arguments are kept, ``options`` added on top).
    ``None`` or ``"none"`` gives ``nn.Identity``. Options of a kind are checked against its rules;
    other keywords (``eps``, ``momentum``, ...) go to the builder, which checks them.

    Raises:
        ValueError: unknown kind name (the message lists the valid ones), an invalid option value.
        TypeError: ``norm`` is neither a string nor a callable.
    """
    if norm is None or (isinstance(norm, str) and norm.lower() in ("", "none")):
        return lambda num_features: nn.Identity()
    if isinstance(norm, str):
        row = get_kind(norm, "get_norm_layer")
        for k, v in options.items():
            if k in row.options:
                row.options[k].check(v, f"get_norm_layer({row.name!r})")
        builder = row.builder
    elif callable(norm):
        builder = norm
    else:
        raise TypeError(f"norm must be a kind name or a callable taking num_features, got {type(norm).__name__}")
    return functools.partial(builder, **options) if options else builder


def create_norm_layer(norm: NormSpec, num_features: int, **options: Any) -> nn.Module:
    """Build one norm layer: ``get_norm_layer(norm, **options)(num_features)``."""
    return get_norm_layer(norm, **options)(num_features)


def layer_settings(layer: nn.Module) -> dict[str, Any]:
    """``num_features`` and the :data:`SETTINGS` of an existing norm layer (torch's defaults where the
    layer has no such setting: a FrozenBatchNorm or a GroupNorm; a frozen look-alike without
    ``num_features``, torchvision's, has its buffers' length)."""
    if isinstance(layer, nn.GroupNorm):
        num_features = layer.num_channels
    else:
        num_features = getattr(layer, "num_features", None) or layer.running_mean.numel()
    return {
        "num_features": num_features,
        "eps": layer.eps,
        "momentum": getattr(layer, "momentum", 0.1),
        "affine": getattr(layer, "affine", True),
        "track_running_stats": getattr(layer, "track_running_stats", True),
    }


# --------------------------------------------------------------------------------- built-in kinds

_TORCH_BATCH = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _batch(num_features: int, dim: int = 2, **kw: Any) -> nn.Module:
    return _TORCH_BATCH[dim](num_features, **kw)


def _is_syncnorm_layer(module: nn.Module) -> bool:
    return type(module).__module__.startswith("syncnorm.")


def is_frozen_look_alike(module: nn.Module) -> bool:
    """Another library's frozen batch norm: torchvision's ``FrozenBatchNorm2d`` (detection backbones),
    detectron2's, timm's ``FrozenBatchNormAct2d``.

    The rule (duck typing, no import of those libraries): the class name contains
    ``"FrozenBatchNorm"``, the module is not a ``_BatchNorm`` nor syncnorm's own, it has no parameters
    of its own, it has 1-D floating buffers ``weight``, ``bias``, ``running_mean`` and
    ``running_var`` of one length C >= 1, and a real ``eps``. Its forward must be batch norm's eval
    formula with those tensors (what the name promises; the tests check torchvision's).
    """
    if isinstance(module, (_BatchNorm, FrozenBatchNorm)) or "FrozenBatchNorm" not in type(module).__name__:
        return False
    if _is_syncnorm_layer(module) or next(module.parameters(recurse=False), None) is not None:
        return False
    tensors = [module._buffers.get(n) for n in ("weight", "bias", "running_mean", "running_var")]
    if any(t is None or t.dim() != 1 or not t.is_floating_point() for t in tensors):
        return False
    return len({t.numel() for t in tensors}) == 1 and tensors[0].numel() >= 1 and rules.is_torch_float(
        getattr(module, "eps", None))


def _is_frozen(module: nn.Module) -> bool:
    return isinstance(module, FrozenBatchNorm) or is_frozen_look_alike(module)


def build_original(original: type, settings: Mapping[str, Any]) -> nn.Module:
    """A fresh ``original(num_features, ...)`` with those of :data:`SETTINGS` its constructor takes
    (all of them for ``**kwargs``): ``BatchNorm2d``, timm's ``BatchNormAct2d`` (whose own activation
    and drop the conversion then replaces by the layer's), torchvision's ``FrozenBatchNorm2d``
    (``num_features, eps``). ``RuntimeError`` when the constructor does not take that."""
    try:
        params = inspect.signature(original).parameters
    except (TypeError, ValueError):  # no signature to read: try all settings
        params = {}
    takes_all = not params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kw = {k: settings[k] for k in SETTINGS if takes_all or k in params}
    try:
        return original(settings["num_features"], **kw)
    except TypeError as e:
        raise RuntimeError(f"convert_norms: cannot rebuild the recorded class {original.__qualname__} as "
                           f"{original.__name__}({settings['num_features']}, **{kw}): {e}") from e


def _batch_from_layer(layer: nn.Module, options: dict) -> nn.Module:
    """The way back for every kind: the class recorded at the first conversion (or ``BatchNorm{dim}d``).

    A layer without a record that is not syncnorm's is kept as it is when it is a ``_BatchNorm``
    (torch's classes, their subclasses such as timm's ``BatchNormAct2d``, lazy ones): it already is
    an original. A frozen look-alike without a record becomes the trainable ``BatchNorm{dim}d``,
    ``dim`` from the option or the class name's ``1d``/``2d``/``3d``; a syncnorm layer without a
    record needs ``dim``.
    """
    original = getattr(layer, ORIGINAL_CLASS_ATTR, None)
    if original is None and isinstance(layer, _BatchNorm) and not _is_syncnorm_layer(layer):
        return layer
    if original is None:
        dim = options.get("dim")
        suffix = re.search(r"([123])d$", type(layer).__name__) if is_frozen_look_alike(layer) else None
        if dim is None and suffix:
            dim = int(suffix.group(1))
        if dim not in _TORCH_BATCH:
            name = getattr(layer, "layer_name", None) or ""
            raise ValueError(
                f"convert_norms(kind='batch'): {type(layer).__name__} '{name}' has no recorded torch class; "
                f"pass dim=1, 2 or 3 to choose BatchNorm1d/2d/3d (got dim={dim!r})")
        original = _TORCH_BATCH[dim]
    return build_original(original, layer_settings(layer))


def largest_divisor_at_most(c: int, limit: int) -> int:
    """The largest divisor of ``c`` that is ``<= limit`` (GroupNorm's group count)."""
    limit = max(1, min(int(limit), c))
    return next(g for g in range(limit, 0, -1) if c % g == 0)


def _group(num_features: int, num_groups: int = 32, eps: float = 1e-5, affine: bool = True) -> nn.Module:
    g = largest_divisor_at_most(num_features, num_groups)
    layer = nn.GroupNorm(g, num_features, eps=eps, affine=affine)
    if g != num_groups:  # reported once per distinct note in the conversion's summary (convert_norms)
        setattr(layer, CONVERSION_NOTE_ATTR,
                f"group norm: C={num_features} is not divisible by num_groups={num_groups}; using {g} groups "
                "(the largest divisor)")
    return layer


def _converted_group_norm(module: nn.Module) -> bool:
    """GroupNorm layers that a conversion made (a model's own GroupNorm is not of the family)."""
    return isinstance(module, nn.GroupNorm) and hasattr(module, ORIGINAL_CLASS_ATTR)


def _register_builtins() -> None:
    r = rules
    register_norm("batch", _batch, options={"dim": r.DIM}, recognizes=lambda m: isinstance(m, _BatchNorm),
                  from_layer=_batch_from_layer)
    register_norm("sync", SyncBatchNorm, synchronizes=True)
    register_norm("ghost", GhostBatchNorm, options={"virtual_batch_size": r.VIRTUAL_BATCH_SIZE},
                  required=("virtual_batch_size",))
    register_norm("renorm", BatchRenorm, options={"r_max": r.R_MAX, "d_max": r.D_MAX,
                                                  "warmup_steps": r.WARMUP_STEPS, "momentum": r.MOMENTUM},
                  inherits=("eps", "momentum", "affine"), synchronizes=True)
    register_norm("frozen", FrozenBatchNorm, inherits=("eps",), recognizes=_is_frozen)
    register_norm("group", _group, options={"num_groups": r.NUM_GROUPS}, inherits=("eps", "affine"),
                  recognizes=_converted_group_norm)
    register_norm("batch_instance", BatchInstanceNorm, synchronizes=True)
    register_norm("switchable", SwitchableNorm, synchronizes=True)


_register_builtins()
