"""Which norm layers a callback acts on: all of the batch-norm family, or a selection."""

from __future__ import annotations

import fnmatch
from typing import Iterable, Optional, Sequence, Union

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..layers import FrozenBatchNorm

Selection = Optional[Union[str, nn.Module, Sequence[Union[str, nn.Module]]]]

FROZEN_STATS_ATTR = "_syncnorm_frozen_stats"
"""Set (True) by FreezeNormStats on layers whose statistics it froze; other callbacks skip them."""


def is_batch_norm(m: nn.Module) -> bool:
    """Layers with batch statistics (torch's and syncnorm's ``_BatchNorm`` subclasses)."""
    return isinstance(m, _BatchNorm)


def has_frozen_stats(m: nn.Module) -> bool:
    return isinstance(m, FrozenBatchNorm) or bool(getattr(m, FROZEN_STATS_ATTR, False))


def select_norm_layers(root: nn.Module, selection: Selection = None) -> dict[str, nn.Module]:
    """``{qualified name: layer}`` of the batch-norm layers in ``root`` matching ``selection``.

    ``selection``: ``None`` (all), a glob pattern on qualified names (``"backbone.*"``), a module
    (its batch-norm layers, or itself), or a list of those. A pattern that matches nothing raises
    ``ValueError`` listing a few valid names, so a typo is not silently a no-op.
    """
    layers = {name: m for name, m in root.named_modules() if is_batch_norm(m)}
    if selection is None:
        return layers
    items: Iterable = [selection] if isinstance(selection, (str, nn.Module)) else selection
    chosen: dict[str, nn.Module] = {}
    for item in items:
        if isinstance(item, str):
            hits = {n: m for n, m in layers.items() if fnmatch.fnmatchcase(n, item) or n.startswith(item + ".")}
            if not hits:
                raise ValueError(f"no batch-norm layer matches {item!r}; layers are e.g. {list(layers)[:6]}")
            chosen.update(hits)
        elif isinstance(item, nn.Module):
            ids = {id(m) for m in item.modules()}
            hits = {n: m for n, m in layers.items() if id(m) in ids}
            if not hits:
                raise ValueError(f"the given {type(item).__name__} contains no batch-norm layer of this model")
            chosen.update(hits)
        else:
            raise TypeError(f"expected layer names/patterns or modules, got {type(item).__name__}")
    return chosen
