"""``PreciseBN``: replace the EMA running statistics by true population statistics."""

from __future__ import annotations

import itertools
from typing import Any, Callable, Optional, TYPE_CHECKING

import torch
from torch import Tensor, nn
from typing_extensions import override

from .._lightning_compat import CALLBACK_BASES, rank_zero_info
from .. import functional as SF
from ..distributed import min_over_ranks, sum_over_ranks, world_size
from ._select import Selection, has_frozen_stats, select_norm_layers

ForwardFn = Callable[[nn.Module, Any], Any]

if TYPE_CHECKING:  # annotations only: either namespace's classes
    import lightning.pytorch as pl


def _default_forward(module: pl.LightningModule, batch: Any) -> Any:
    x = batch[0] if isinstance(batch, (list, tuple)) else batch
    return module(x)


@torch.no_grad()
def recompute_population_stats(model: nn.Module, batches: Any, layers: dict[str, nn.Module],
                               forward: Callable[[Any], Any]) -> int:
    """Set each layer's running statistics to the population statistics of its inputs over ``batches``.

    The model runs in training mode (each layer's input is what it sees in training), without
    gradient. Per-layer moments are merged exactly over all batches, so every *sample* weighs the
    same (an EMA, or an average of per-batch statistics, would not), then over the ranks (two
    ``all_reduce`` calls when a process group is initialized; sums centred on a common shift, so data
    with a large offset keeps its digits).
    ``running_var`` gets the unbiased population variance, as BatchNorm stores it. Every other
    batch-norm layer's buffers and every module's training flag are restored. Returns the number of
    batches used on this rank.
    """
    moments: dict[str, SF.Moments] = {}

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            m = SF.batch_moments(args[0].detach())
            moments[name] = m if name not in moments else SF.merge_moments(moments[name], m)
        return hook

    modes = {m: m.training for m in model.modules()}
    saved = {m: {k: b.clone() for k, b in m.named_buffers(recurse=False)}
             for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    handles = [layer.register_forward_pre_hook(make_hook(name)) for name, layer in layers.items()]
    used = 0
    try:
        model.train()
        for batch in batches:
            forward(batch)
            used += 1
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
        for m, bufs in saved.items():  # undo the EMA updates the training-mode passes made
            for k, b in bufs.items():
                getattr(m, k).copy_(b)
    names = sorted(layers)
    if not names:
        return used
    device = next((b.device for b in layers[names[0]].buffers()), torch.device("cpu"))
    empty = {n: SF.batch_moments(torch.empty(0, layers[n].num_features, dtype=torch.float64, device=device))
             for n in names if n not in moments}
    merged = _merge_over_ranks([moments.get(n, empty.get(n)) for n in names], device)
    for n, (count, mean, unbiased) in zip(names, merged):
        layer = layers[n]
        if count > 1 and layer.running_mean is not None:
            layer.running_mean.copy_(mean.to(layer.running_mean.dtype))
            layer.running_var.copy_(unbiased.to(layer.running_var.dtype))
    return used


def _merge_over_ranks(parts: list[SF.Moments], device: torch.device) -> list[tuple[float, Tensor, Tensor]]:
    """``(N, mean, unbiased var)`` per layer over every rank, exactly: a first sum of counts and
    ``count * mean`` gives a common shift; the second sums moments centred on it (see
    :func:`syncnorm.functional.fill_payload`). Two collectives, whatever the number of layers."""
    counts = [float(m.count) for m in parts]
    first = sum_over_ranks(torch.cat([torch.stack([m.count, *(m.mean * m.count)]).to(device) for m in parts]))
    shifts, offset = [], 0
    for m in parts:
        c = m.mean.numel()
        total = first[offset]
        shifts.append(torch.where(total > 0, first[offset + 1:offset + 1 + c] / total, 0.0))
        offset += 1 + c
    world = world_size()
    payloads = [SF.fill_payload(torch.tensor([n, n - 1.0 / world], dtype=torch.float64, device=device),
                                m.mean.to(device), m.var.to(device) if n else None, shift, int(n))
                for m, n, shift in zip(parts, counts, shifts)]
    summed, out, offset = sum_over_ranks(torch.cat(payloads)), [], 0
    for shift, p in zip(shifts, payloads):
        part = summed[offset:offset + p.numel()]
        offset += p.numel()
        q, vu = SF.merge_payload(part[2:], part[:2])
        out.append((float(part[0]), shift + q, vu[1]))
    return out


class PreciseBN(*CALLBACK_BASES):
    """At the end of every training epoch, recompute running statistics as population statistics.

    Paper: https://arxiv.org/abs/2105.07576 (Wu & Johnson, "Rethinking Batch in BatchNorm"). The
    EMA of batch statistics lags the weights and weighs recent batches more; PreciseBN runs
    ``num_batches`` training batches through the model (training mode, no gradient) and sets
    ``running_mean``/``running_var`` of every batch-norm layer to the mean and unbiased variance of
    all samples its input saw, summed over all ranks (exact with uneven ranks). Layers with frozen
    statistics (``FreezeNormStats``, ``FrozenBatchNorm``) are skipped. Training flags and every
    other buffer are restored afterwards.

    Args:
        num_batches: training batches per rank to use (fewer if the epoch is shorter). Default: 200.
        layers: which layers (``None`` = all batch-norm layers without frozen statistics).
        forward_fn: ``forward_fn(pl_module, batch)``; default calls ``pl_module(batch[0])`` for a
            tuple/list batch and ``pl_module(batch)`` otherwise.

    Example::

        from pytorch_lightning import Trainer
        from syncnorm.callbacks import PreciseBN

        trainer = Trainer(callbacks=[PreciseBN(num_batches=200)])
    """

    def __init__(self, num_batches: int = 200, layers: Selection = None,
                 forward_fn: Optional[ForwardFn] = None) -> None:
        if not isinstance(num_batches, int) or num_batches < 1:
            raise ValueError(f"PreciseBN: expected num_batches to be an int >= 1, got {num_batches!r}")
        self.num_batches = num_batches
        self.layers = layers
        self.forward_fn = forward_fn or _default_forward

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loader = trainer.train_dataloader
        if loader is None:
            return
        layers = {n: m for n, m in select_norm_layers(pl_module, self.layers).items() if not has_frozen_stats(m)}
        # every rank must run as many (possibly synchronized) forwards
        n = min_over_ranks(min(self.num_batches, _length(loader, self.num_batches)))

        def batches():
            for i, batch in enumerate(itertools.islice(iter(loader), n)):
                yield trainer.strategy.batch_to_device(batch, pl_module.device)

        used = recompute_population_stats(pl_module, batches(), layers, lambda b: self.forward_fn(pl_module, b))
        rank_zero_info(f"PreciseBN: population statistics of {len(layers)} layers over {used} batches per rank")


def _length(loader: Any, default: int) -> int:
    try:
        return len(loader)
    except TypeError:
        return default
