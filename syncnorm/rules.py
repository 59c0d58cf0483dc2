"""One rule per value: what every layer, conversion, callback and config accepts, and one error text.

Each value a user can set (``momentum``, ``num_groups``, ``virtual_batch_size``, a kind name, ...)
has exactly one :class:`Rule` here, checked once, where the value enters syncnorm: a layer's
``__init__``, :func:`syncnorm.convert_norms`, a callback's ``__init__``, the app's config check.
Code that raises says ``<where>: expected <name> to be <rule>, got <value>``; the app's config
check, which lists every problem at once, says ``<key>=<value>: expected <rule>``. Both read the
same ``expected`` text.

This module imports nothing from syncnorm (every other module may import it), only NumPy and torch.

Example::

    >>> from syncnorm import rules
    >>> rules.VIRTUAL_BATCH_SIZE.check(8, "GhostBatchNorm")
    8
    >>> rules.VIRTUAL_BATCH_SIZE.check(0, "GhostBatchNorm")
    Traceback (most recent call last):
    ...
    ValueError: GhostBatchNorm: expected virtual_batch_size to be an int >= 1, got 0
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

__all__ = [
    "Rule",
    "check_kind",
    "D_MAX",
    "DIM",
    "EPS",
    "MIN_GLOBAL_BATCH",
    "MIN_LOCAL_BATCH",
    "MOMENTUM",
    "NUM_FEATURES",
    "NUM_GROUPS",
    "PER_DEVICE_BATCH",
    "R_MAX",
    "SYNC_GROUP_SIZE",
    "SYNC_TIMEOUT_S",
    "VIRTUAL_BATCH_SIZE",
    "WARMUP_STEPS",
    "WORLD_SIZE",
    "ANY",
    "int_at_least",
    "is_torch_float",
    "number_above",
    "number_at_least",
    "one_of",
    "check_sync_group_size",
]


@dataclass(frozen=True)
class Rule:
    """What one named value must be.

    Args:
        name: the value's name in messages (the argument or option name).
        expected: the rule in words, completing "expected <name> to be ...", e.g. ``"an int >= 1"``.
        accepts: ``accepts(value) -> bool``.
    """

    name: str
    expected: str
    accepts: Callable[[Any], bool]

    def message(self, value: Any, where: str) -> str:
        """The one error text of this rule."""
        return f"{where}: expected {self.name} to be {self.expected}, got {value!r}"

    def check(self, value: Any, where: str) -> Any:
        """``value`` if the rule accepts it, else ``ValueError`` with :meth:`message`."""
        if not self.accepts(value):
            raise ValueError(self.message(value, where))
        return value


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def is_torch_float(v: Any) -> bool:
    """Exactly what torch's kernels take for a ``float`` argument (``momentum``, ``eps`` of
    ``torch.nn.functional.batch_norm``): a Python ``bool``/``int``/``float``, a NumPy bool, int or
    float scalar, or a 0-dim tensor of a real dtype. Not: ``Fraction``, ``Decimal``, complex numbers,
    strings, NumPy arrays (0-dim included), tensors with elements (torch raises ``TypeError`` in
    forward)."""
    if isinstance(v, (bool, int, float)):
        return True
    if isinstance(v, np.generic):
        return v.dtype.kind in "biuf"
    return isinstance(v, torch.Tensor) and v.dim() == 0 and not v.is_complex()


def _is_bool(v: Any) -> bool:
    return isinstance(v, (bool, np.bool_)) or (isinstance(v, torch.Tensor) and v.dtype == torch.bool)


def int_at_least(name: str, low: int, note: str = "") -> Rule:
    """An int (numpy ints included, bool excluded) ``>= low``."""
    return Rule(name, f"an int >= {low}{note}", lambda v: _is_int(v) and v >= low)


def number_at_least(name: str, low: float) -> Rule:
    """A real number (int or float, numpy scalars included, bool excluded) ``>= low``."""
    return Rule(name, f"a number >= {low:g}", lambda v: _is_real(v) and v >= low)


def number_above(name: str, low: float) -> Rule:
    """A real number ``> low``."""
    return Rule(name, f"a number > {low:g}", lambda v: _is_real(v) and v > low)


def one_of(name: str, values: Sequence[Any]) -> Rule:
    return Rule(name, f"one of {list(values)}", lambda v: v in values)


ANY = Rule("value", "anything", lambda v: True)
"""For options syncnorm passes on unchecked (``process_group``: torch checks it when it is used)."""

MOMENTUM = Rule(
    "momentum",
    "None or a real number: a Python or NumPy scalar or a 0-dim tensor (torch's convention: the weight "
    "of the new batch; torch accepts any real value, values outside [0, 1] included)",
    lambda v: v is None or is_torch_float(v),
)
"""``momentum`` of every batch-norm layer, exactly what ``torch.nn.BatchNorm*d`` accepts: ``None``
(cumulative average) or what :func:`is_torch_float` accepts (``bool``, NumPy scalars and 0-dim
tensors included: torch takes them). torch 2.13 stores the value unchecked and its batch-norm kernel
takes any real factor; a ``Fraction``, a string or an array fails there (in forward), syncnorm says
so at construction. Values outside [0, 1] extrapolate the running statistics; syncnorm does not
forbid what torch allows. The layers store it as a Python float (``None`` stays ``None``)."""

EPS = Rule("eps", "a real number >= 0 (a Python or NumPy scalar or a 0-dim tensor)",
           lambda v: is_torch_float(v) and not _is_bool(v) and bool(v >= 0))
"""``eps`` of every norm layer: torch's float types (:func:`is_torch_float`), and >= 0, the one
thing syncnorm forbids beyond torch: a negative ``eps`` makes ``var + eps`` negative for a
constant channel (NaN outputs)."""
NUM_FEATURES = int_at_least("num_features", 1)
NUM_GROUPS = int_at_least("num_groups", 1, " (lowered to the largest divisor of C)")
VIRTUAL_BATCH_SIZE = int_at_least("virtual_batch_size", 1)
R_MAX = number_at_least("r_max", 1.0)
D_MAX = number_at_least("d_max", 0.0)
WARMUP_STEPS = int_at_least("warmup_steps", 0)
DIM = one_of("dim", (1, 2, 3))
PER_DEVICE_BATCH = int_at_least("per_device_batch", 1)
WORLD_SIZE = int_at_least("world_size", 1)
MIN_LOCAL_BATCH = int_at_least("min_local_batch", 1)
MIN_GLOBAL_BATCH = int_at_least("min_global_batch", 1)
SYNC_GROUP_SIZE = Rule("sync_group_size", "None (all ranks) or an int >= 1 dividing the world size",
                       lambda v: v is None or (_is_int(v) and v >= 1))
"""Ranks per synchronization group (``NormConversion``, the app's ``norm.sync_group_size``). Where
the world size is known (the callback's ``setup``), :func:`check_sync_group_size` adds the
divisibility check with the same text."""


SYNC_TIMEOUT_S = Rule("sync_timeout_s", "None (the layers' default) or a number of seconds > 0",
                      lambda v: v is None or (_is_real(v) and v > 0))
"""Bound on a synchronized layer's wait for its peers on gloo (``NormConversion``, the app's
``norm.sync_timeout_s``); the default is :data:`syncnorm.distributed.DEFAULT_TIMEOUT_S`."""


def check_sync_group_size(k: Any, world_size: int, where: str) -> int:
    """:data:`SYNC_GROUP_SIZE` (not None), and ``world_size % k == 0`` (same error text)."""
    if k is None or world_size % SYNC_GROUP_SIZE.check(k, where):
        raise ValueError(f"{SYNC_GROUP_SIZE.message(k, where)} (world size {world_size})")
    return int(k)


def check_kind(kind: Any, known: Iterable[str], where: str) -> str:
    """The lowercase kind name, or ``ValueError`` listing the ``known`` ones (case-insensitive match).

    The one error text for a kind name, wherever it enters (``convert_norms``, ``get_norm_layer``,
    ``NormConversion``, ``SyncNormLayerSync``, the app's ``norm.kind``).
    """
    known = list(known)
    if isinstance(kind, str) and kind.lower() in known:
        return kind.lower()
    raise ValueError(f"{where}: unknown norm kind {kind!r}; expected one of {known}")
