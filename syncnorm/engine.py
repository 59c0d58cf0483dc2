"""The engine of every synchronized layer: batch norm with the statistics of a process group.

:class:`~syncnorm.SyncBatchNorm`, :class:`~syncnorm.BatchRenorm`, and the batch branches of
:class:`~syncnorm.BatchInstanceNorm` and :class:`~syncnorm.SwitchableNorm` call :func:`batch_norm`
or :func:`batch_stats`; no layer issues a collective itself. One set of guarantees follows:

* **When it communicates.** Only in training with a group of more than one rank. Eval mode, no
  initialized process group, or a group of one: exactly torch's BatchNorm (same kernel), nothing
  sent. Batch Renorm without a group runs the same math locally.
* **Exact merge.** Per-rank moments travel as sums centred on a *shift* every rank holds (the
  previous step's global mean; see :mod:`syncnorm.functional`), in the one forward all_reduce. A
  layer's first synchronized call centres on 0, reads how far the mean is from it, and exchanges
  again centred on that mean when it matters: data with mean 1e8 and std 1 merges exactly from the
  first step. On CPU that check runs every step (host reads are free); elsewhere only at the first
  call, so a jump of the mean by more than ~1e3 standard deviations between two steps costs up to
  ``1e-16 * (jump / std)**2`` of the variance (relative) for that step.
* **Safety.** The first synchronized call of a layer exchanges a fixed-size head (the layer's
  signature: identity, class, C, dtype, device type) before any C-sized payload, so ranks with
  different models get :class:`~syncnorm.SyncError` instead of a gloo abort. Every payload carries
  the head, so a rank that runs a different layer than its peers is caught by the *name-free*
  identity: the qualified name a conversion gave the layer, else where the layer was built (call
  stack) and how many were built there before. On CPU the check is immediate and the error names
  what each rank ran; on other devices and under ``torch.compile`` it is recorded on the device
  and raised by :func:`check_sync_errors` (the Lightning callbacks call it on logging steps).
* **Counts.** An empty rank contributes the identity; a group whose batch has one value per
  channel raises ``ValueError`` on every rank (eager), or trips a device-side assert under
  ``torch.compile``; NaN/inf statistics follow the layer's ``on_nonfinite`` policy.
* **Host syncs.** Off CPU, a steady-state forward and backward read nothing back to the host and
  copy nothing from it: the heads are cached device tensors, the checks accumulate on the device.

Eager mode uses an autograd Function with an explicit backward (one all_reduce of ``2C`` values);
under ``torch.compile`` the same math is traced as differentiable tensor ops around a functional
all_reduce, without graph breaks.
"""

from __future__ import annotations

import copy
import sys
import warnings
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import distributed as D
from . import functional as SF

__all__ = ["Renorm", "EngineState", "batch_norm", "batch_stats", "local_batch_norm", "check_sync_errors",
           "engine_state_dict", "load_engine_state_dict",
           "construction_identity", "layer_label", "check_norm_input", "check_batch_size"]

HEAD = D.HEAD_SIZE
SHIFT_RATIO2_LIMITS = {torch.float32: 100.0, torch.float64: 1e6}
"""Exchange once more, centred on the new mean, when ``max((mean - shift)**2 / var)`` exceeds
this (by the shift's dtype): sums centred within 10 standard deviations keep the variance to a
few 1e-6 relative in float32 (typically 1e-7: a batch mean moves by a fraction of a standard
deviation between steps), within 1000 to ~1e-10 in float64 (see :mod:`syncnorm.functional`)."""

_BUILT: dict[int, int] = {}
"""How many synchronized layers each construction call stack has built in this process: the
occurrence index that, with the stack, identifies a layer built directly (not converted)."""


def construction_identity() -> str:
    """Identity of a layer being built: where (the call stack, as module:function:line) and the
    how-many-th from that stack. SPMD programs build their models alike on every rank, so this is
    the same on every rank without a name; a model only some ranks build (an evaluation copy) has
    other stacks and leaves the others' identities alone. Deep copies keep their original's."""
    frame = sys._getframe(1)
    parts, site = [], None
    while frame is not None:
        module = frame.f_globals.get("__name__", "?")
        code = frame.f_code
        parts.append(f"{module}:{getattr(code, 'co_qualname', code.co_name)}:{frame.f_lineno}")
        if site is None and not module.startswith(("syncnorm.layers", "syncnorm.engine", "torch.")):
            site = f"{module}:{frame.f_lineno}"
        frame = frame.f_back
    key = zlib.crc32("|".join(parts).encode())
    index = _BUILT.get(key, 0)
    _BUILT[key] = index + 1
    return f"built at {site} #{index} ({key:08x})"


def layer_identity(layer: nn.Module) -> str:
    """The qualified name a conversion set, else the construction identity."""
    name = getattr(layer, "layer_name", None)
    return f"'{name}'" if name else getattr(layer, "_built_at", type(layer).__name__)


@dataclass(frozen=True)
class Renorm:
    """Batch Renorm's settings, for :func:`batch_norm`."""

    r_max: float
    d_max: float
    warmup_steps: int


class EngineState:
    """Per layer, for one process group: the shift, the cached payload heads, the device-side
    accumulators of the signature check (one per signature: dtype and device type are part of it)
    and of deferred errors. Not in the ``state_dict``; a deep copy keeps it (same process, same
    groups), pickling drops it (a new process starts with a handshake)."""

    def __init__(self) -> None:
        self.group: Any = None

    def setup(self, group: Any, x: Tensor, num_features: int, signature: int) -> "EngineState":
        self.group, self.world = group, D.group_size(group)
        self.ready = False  # set after the first exchange: the shift is centred
        self.exact = False  # CPU: the data is offset, local statistics take the exact two passes
        self.device, self.dtype, self.signature = x.device, x.dtype, signature
        # the shift is kept in the statistics dtype: local sums centred on it are exact to that dtype
        self.shift = torch.zeros(num_features, dtype=SF.stats_dtype(x.dtype), device=x.device)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=x.device)
        self.sig_sums: dict[int, Tensor] = {}
        self.heads: dict[int, Tensor] = {}
        self.expected_sig = self._expected_sig()
        return self

    def _expected_sig(self) -> list[float]:
        """The signature entries every rank sees after the sum when all run this layer (CPU check)."""
        return [self.world * v for v in D.signature_head(self.signature, 0, self.world)[:D.SIG_SIZE]]

    def switch(self, x: Tensor, signature: int) -> "EngineState":
        """Follow the layer to another device or input dtype: the shift and the pending checks move
        along, the cached heads are rebuilt for the new signature."""
        self.device, self.dtype, self.signature, self.heads = x.device, x.dtype, signature, {}
        self.shift = self.shift.to(x.device, SF.stats_dtype(x.dtype))
        self.nonfinite = self.nonfinite.to(x.device)
        self.sig_sums = {k: v.to(x.device) for k, v in self.sig_sums.items()}
        self.expected_sig = self._expected_sig()
        return self

    @property
    def sig_sum(self) -> Tensor:
        """The accumulator of summed signature entries for the current signature."""
        acc = self.sig_sums.get(self.signature)
        if acc is None:
            acc = self.sig_sums[self.signature] = torch.zeros(D.SIG_SIZE, dtype=torch.float64, device=self.device)
        return acc

    def head(self, n: int) -> Tensor:
        """The payload head for a local count ``n``, cached on the device (no host copy per call)."""
        h = self.heads.get(n)
        if h is None:
            values = D.signature_head(self.signature, n, self.world)
            h = self.heads[n] = torch.tensor(values, dtype=torch.float64, device=self.device)
        return h

    def __deepcopy__(self, memo: dict) -> "EngineState":
        new = EngineState()
        for key, value in self.__dict__.items():
            new.__dict__[key] = value if key == "group" else copy.deepcopy(value, memo)
        return new

    def __reduce__(self):
        return (EngineState, ())


@dataclass
class _Call:
    """One synchronized call: the exchange's view of the layer and its buffers."""

    spec: D.SyncSpec
    state: Optional[EngineState]
    eps: float
    momentum: Optional[float]
    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    num_batches_tracked: Optional[Tensor]
    limits: Optional[tuple[Any, Any]]  # Batch Renorm's (r_max_t, d_max_t)


# ----------------------------------------------------------------------------------- entry points

def batch_norm(layer: nn.Module, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
               renorm: Optional[Renorm] = None) -> Tensor:
    """Batch norm of ``x`` (``(N, C, *)``, checked by the caller) for a syncnorm layer.

    Training: statistics of the whole ``layer.process_group`` (torch's BatchNorm without a group of
    more than one rank, unless ``renorm``); running statistics and ``num_batches_tracked`` updated
    as torch does. Eval: the running statistics, or the local batch's without buffers. ``weight``
    and ``bias`` may differ from the layer's own (``None`` for no affine).
    """
    if not layer.training:
        return local_batch_norm(layer, x, weight, bias, 0.0)
    group = D.resolve_group(getattr(layer, "process_group", None))
    if D.group_size(group) <= 1:
        group = None
        if renorm is None:
            return local_batch_norm(layer, x, weight, bias, _count_batch(layer))
    call = _prepare(layer, x, group, renorm)
    if torch.compiler.is_compiling():
        return _traced_batch_norm(x, weight, bias, call)
    return _SyncBatchNormFunction.apply(x, weight, bias, call)


def batch_stats(layer: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Differentiable per-channel ``(mean, biased var)`` of ``x`` for a layer that mixes them with
    other statistics (Switchable Norm): the group's in training (running statistics updated), the
    running ones in eval, the local batch's in eval without buffers. In ``x``'s dtype."""
    if not layer.training:
        if layer.running_mean is not None:
            return layer.running_mean.to(x.dtype), layer.running_var.to(x.dtype)
        check_batch_size(layer, x)
        m0, residual, var = SF.batch_moments_differentiable(x)
        return (m0 + residual).to(x.dtype), var.to(x.dtype)
    group = D.resolve_group(getattr(layer, "process_group", None))
    call = _prepare(layer, x, group if D.group_size(group) > 1 else None, None)
    mean, var, unbiased = _group_moments_differentiable(x, call)
    _update_running(call, x, mean.detach(), torch.stack([var.detach(), unbiased.detach()]))
    return mean.to(x.dtype), var.to(x.dtype)


def check_sync_errors(module: nn.Module) -> None:
    """Raise the errors that synchronized layers on non-CPU devices (or under ``torch.compile``)
    recorded on the device instead of syncing: ranks that ran different layers at the same step,
    non-finite statistics under ``on_nonfinite="raise"``. One host read for all layers; call it
    where the host reads anyway (a logging step). Layers that never synchronized are skipped.

    Raises:
        SyncError: naming every layer with a recorded error and what was recorded.
    """
    states = [(name, m, m._engine_state) for name, m in module.named_modules()
              if getattr(getattr(m, "_engine_state", None), "group", None) is not None]
    rows = [(name, m, st, sig, acc) for name, m, st in states for sig, acc in st.sig_sums.items()]
    rows += [(name, m, st, None, st.nonfinite.double().reshape(1)) for name, m, st in states]
    if not rows:
        return
    values = torch.cat([acc.reshape(-1).cpu() for *_, acc in rows]).tolist()  # one host read
    problems, offset = [], 0
    for name, m, st, sig, acc in rows:
        row, offset = values[offset:offset + acc.numel()], offset + acc.numel()
        label = f"{type(m).__name__} '{name or getattr(m, 'layer_name', '') or '?'}' [{layer_identity(m)}]"
        if sig is not None and D.head_mismatch(row, sig):
            problems.append(f"{label}: ranks ran different synchronized layers at the same step")
        if sig is None and row[0]:
            problems.append(f"{label}: non-finite batch statistics (NaN/inf), on_nonfinite='raise'")
    if problems:
        raise D.SyncError("recorded on the device since the last check: " + "; ".join(problems)
                          + ". HINT: run a step on CPU (gloo) or in eager mode for per-rank details.")


def engine_state_dict(module: nn.Module) -> dict[str, dict[str, Any]]:
    """What the synchronized layers of ``module`` carry between steps and a ``state_dict`` does not:
    per layer (by qualified name) the shift the next merge is centred on, and whether the data took
    the exact local statistics. The same on every rank. With it, a resumed run's merges round
    exactly as the uninterrupted run's do (see :func:`load_engine_state_dict`); without it they
    agree to rounding. Layers that have not synchronized yet are left out.
    """
    out = {}
    for name, m in module.named_modules():
        state = getattr(m, "_engine_state", None)
        if getattr(state, "group", None) is not None and state.ready:
            out[name] = {"shift": state.shift.detach().cpu().clone(), "exact": bool(state.exact)}
    return out


def load_engine_state_dict(module: nn.Module, states: dict[str, dict[str, Any]]) -> int:
    """Give the synchronized layers of ``module`` what :func:`engine_state_dict` saved; a layer takes
    it at its next synchronized call (eager mode), when the shift's size and dtype match the
    layer's. Returns how many layers received one.

    Raises:
        ValueError: ``states`` is not a mapping of layer names to ``{"shift": Tensor, "exact": bool}``.
    """
    if not isinstance(states, dict):
        raise ValueError(f"load_engine_state_dict: expected a dict of layer names, got {type(states).__name__}")
    layers = dict(module.named_modules())
    given = 0
    for name, saved in states.items():
        if not (isinstance(saved, dict) and isinstance(saved.get("shift"), Tensor) and "exact" in saved):
            raise ValueError(f"load_engine_state_dict: expected {{'shift': Tensor, 'exact': bool}} for layer "
                             f"{name!r}, got {saved!r}")
        layer = layers.get(name)
        if layer is None or getattr(layer, "num_features", None) != saved["shift"].numel():
            continue
        layer._engine_resume = saved
        layer.__dict__.pop("_engine_state", None)  # the next call sets up afresh and takes it
        given += 1
    return given


def _resume(layer: nn.Module, state: EngineState) -> None:
    """Install a saved shift (see :func:`load_engine_state_dict`) into a new state, once."""
    saved = layer.__dict__.pop("_engine_resume", None)
    if saved is not None and saved["shift"].dtype == state.shift.dtype:
        state.shift.copy_(saved["shift"])
        state.exact, state.ready = bool(saved["exact"]), True


# ----------------------------------------------------------------------------------- preparation

def layer_label(layer: nn.Module) -> str:
    """How messages name a layer: its class, and its qualified name when a conversion set one."""
    name = getattr(layer, "layer_name", None)
    return f"{type(layer).__name__} '{name}'" if name else type(layer).__name__


def check_norm_input(layer: nn.Module, x: Tensor, num_features: int) -> None:
    """``ValueError`` unless ``x`` is ``(N, num_features, *)`` with at least two dims."""
    if x.dim() < 2:
        raise ValueError(
            f"{layer_label(layer)}: expected input (N, {num_features}, *) with at least 2 dims, "
            f"got {x.dim()}D input of shape {tuple(x.shape)}"
        )
    if x.shape[1] != num_features:
        raise ValueError(
            f"{layer_label(layer)}: expected input with {num_features} channels, got {x.shape[1]} "
            f"(input shape {tuple(x.shape)})"
        )


def check_batch_size(layer: nn.Module, x: Tensor) -> None:
    """``ValueError`` for a local training batch with at most one value per channel."""
    per_channel = x.numel() // x.shape[1] if x.shape[1] else 0
    if per_channel <= 1:
        raise ValueError(
            f"{layer_label(layer)}: expected more than 1 value per channel when training, got "
            f"{per_channel} (input shape {tuple(x.shape)})"
        )


def _count_batch(layer: nn.Module) -> float:
    """torch's bookkeeping for a local training step: count it; return the average factor."""
    if not layer.track_running_stats or layer.num_batches_tracked is None:
        return 0.0 if layer.momentum is None else layer.momentum
    layer.num_batches_tracked.add_(1)
    if layer.momentum is None:
        return 1.0 / float(layer.num_batches_tracked)
    return layer.momentum


def local_batch_norm(layer: nn.Module, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                     factor: float) -> Tensor:
    """Exactly ``torch.nn.BatchNorm*d``'s forward (same kernel), with syncnorm's error messages."""
    use_batch = layer.training or (layer.running_mean is None and layer.running_var is None)
    if use_batch:
        check_batch_size(layer, x)
    track = not layer.training or layer.track_running_stats
    rm, rv = (layer.running_mean, layer.running_var) if track else (None, None)
    return torch.nn.functional.batch_norm(x, rm, rv, weight, bias, use_batch, factor, layer.eps)


def _prepare(layer: nn.Module, x: Tensor, group: Any, renorm: Optional[Renorm]) -> _Call:
    """The call's spec, state (first call: handshake) and buffers."""
    policy = layer.on_nonfinite
    if policy not in NONFINITE_POLICIES:
        raise ValueError(f"{layer_label(layer)}: expected on_nonfinite in {list(NONFINITE_POLICIES)}, got {policy!r}")
    spec = D.SyncSpec(layer_label(layer), layer_identity(layer), layer.num_features, group,
                      layer.sync_timeout_s, policy)
    state = None if group is None else _state_for(layer, spec, x)
    track = layer.track_running_stats
    nbt = layer.num_batches_tracked if track else None
    limits = None
    if renorm is not None:
        limits = SF.renorm_limits(renorm.r_max, renorm.d_max, nbt, renorm.warmup_steps)
    return _Call(spec, state, layer.eps, layer.momentum, layer.running_mean if track else None,
                 layer.running_var if track else None, nbt, limits)


NONFINITE_POLICIES = ("skip", "raise", "propagate")


def _state_for(layer: nn.Module, spec: D.SyncSpec, x: Tensor) -> EngineState:
    """The layer's engine state for this group: a new one (after a fixed-size handshake in eager
    mode) at the layer's first synchronized call or when the group changed; moved along when the
    layer moved to another device."""
    state = getattr(layer, "_engine_state", None)
    if state is not None and state.group is spec.group:
        if state.device != x.device or state.dtype != x.dtype:
            state.switch(x, D.layer_signature(spec, x.dtype, x.device.type))
        return state
    signature = D.layer_signature(spec, x.dtype, x.device.type)
    state = EngineState().setup(spec.group, x, spec.num_features, signature)
    if not torch.compiler.is_compiling():
        head = state.head(x.numel() // spec.num_features).clone()
        D.all_reduce_checked(head, spec, "first-call handshake")
        if D.head_mismatch(head.tolist(), signature):
            raise D.report_mismatch(spec, x.dtype, x.device.type)
        _resume(layer, state)
    layer._engine_state = state
    return state


# ----------------------------------------------------------------------------------- the exchange

def _exchange(call: _Call, x: Tensor, n: int, payload: Callable[[Tensor, bool], Tensor]
              ) -> tuple[Tensor, Tensor, Tensor, Optional[list[float]]]:
    """The forward exchange. ``payload(shift, exact)`` builds and sums the payload (see
    :func:`functional.fill_payload`; ``exact``: the CPU's exact local statistics). Returns the summed
    payload, ``q = mean - shift``, ``[var; unbiased var]`` of the group (float64), and what the host
    read (``None`` where it did not): the head, then :func:`functional.offset_ratios`.

    CPU, eager: one host read per call (free) checks the head and the counts at once, and decides
    whether to exchange once more, centred on the new mean, because the shift was far from it (a
    layer's first call, a jump), or with exact local statistics because the data is offset (every
    rank sees the same sums, so all decide alike). Other devices, eager: the same at a layer's
    first call only; the head is accumulated on the device. Compiled: no host read; a layer's first
    compiled call always exchanges twice.
    """
    state, spec = call.state, call.spec
    compiling = torch.compiler.is_compiling()
    on_cpu = x.device.type == "cpu" and not compiling
    host = on_cpu or not (compiling or state.ready)
    exact, checks = state.exact, None
    for attempt in range(2):
        summed = payload(state.shift, exact)
        head = summed[:HEAD].detach()
        q, vu = SF.merge_payload(summed[HEAD:], summed[HEAD - 2:HEAD])
        if not on_cpu:
            state.sig_sum.add_(head[:D.SIG_SIZE])
        if not host:
            if n <= 1 and compiling:  # only then can the group's count be <= 1 (every such rank looks)
                torch._assert_async(head[HEAD - 2] > 1, f"{spec.label}: expected more than 1 value per "
                                    "channel over the whole process group when training")
            if compiling and not state.ready and not attempt:
                state.shift.add_(q.detach().nan_to_num(0.0, 0.0, 0.0))
                continue
            break
        mean = state.shift + q.detach()
        checks = head.tolist() + SF.offset_ratios(q.detach(), mean, vu[0].detach()).tolist()
        if on_cpu and D.head_mismatch(checks, state.signature):
            raise D.report_mismatch(spec, x.dtype, x.device.type)
        if n <= 1:
            _check_global_count(checks[HEAD - 2], spec.label, spec.num_features)
        far, offset = checks[HEAD], checks[HEAD + 1]
        state.exact = on_cpu and offset > SF.FAST_STATS_RATIO_LIMIT ** 2
        if attempt or not (far > SHIFT_RATIO2_LIMITS[state.shift.dtype] or state.exact > exact):
            break
        if far == far:  # not NaN: centre on this mean
            state.shift.copy_(mean)
        exact = state.exact
    state.ready = True
    return summed, q, vu, checks


def _check_global_count(total: float, label: str, num_features: int) -> None:
    if total == 0:
        raise ValueError(f"{label}: expected a non-empty batch in training mode, got 0 values per channel "
                         f"on every rank of the process group (num_features={num_features})")
    if total == 1:
        raise ValueError(f"{label}: expected more than 1 value per channel when training, got 1 value per "
                         f"channel over the whole process group (num_features={num_features})")


def _group_stats(call: _Call, x: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor, Optional[list[float]]]:
    """``(q, [var; unbiased var], summed counts, host checks)`` for the eager Function: the shift
    plus ``q`` is the group's mean. Local statistics: CPU, sums centred on the shift where that is
    the fast way (:func:`functional.shifted_sums_cpu`), else :func:`functional.local_stats_cpu`;
    other devices, one fused kernel. Without a group (Batch Renorm alone): the local batch's, with
    ``q`` the mean itself."""
    on_cpu = x.device.type == "cpu"
    cache: dict[bool, tuple] = {}

    def local(exact: bool) -> tuple:
        if exact not in cache:
            if n == 0:
                cache[exact] = (None, None, None)
            elif on_cpu:
                cache[exact] = SF.local_stats_cpu(x, exact)
            else:
                var, mean = torch.var_mean(x, SF.reduce_dims(x), correction=0)
                cache[exact] = (mean, var, None)
        return cache[exact]

    if call.state is None:
        return _local_group(call, x, n, local)
    state = call.state
    sums = on_cpu and n > 0 and SF.fast_shifted_sums(x)

    def payload(shift: Tensor, exact: bool) -> Tensor:
        if sums:
            buf = torch.cat([state.head(n), *SF.shifted_sums_cpu(x, shift)])
        else:
            mean, var, residual = local(exact)
            buf = SF.fill_payload(state.head(n), mean, var, shift, n, residual)
        D.all_reduce_checked(buf, call.spec, "forward statistics")
        return buf

    summed, q, vu, checks = _exchange(call, x, n, payload)
    return q, vu, summed[HEAD - 2:HEAD], checks


def _local_group(call: _Call, x: Tensor, n: int, local: Callable[[bool], tuple]
                 ) -> tuple[Tensor, Tensor, Tensor, Optional[list[float]]]:
    """:func:`_group_stats` when this rank is the whole 'group' (Batch Renorm without a group)."""
    if n <= 1:
        _check_global_count(float(n), call.spec.label, call.spec.num_features)
    mean, var, residual = local(False)
    checks = None
    if x.device.type == "cpu":  # exact statistics for offset data, as in a group
        mean64 = mean.double()
        checks = [float(n)] * HEAD + SF.offset_ratios(mean64, mean64, var.double()).tolist()
        if checks[HEAD + 1] > SF.FAST_STATS_RATIO_LIMIT ** 2:
            mean, var, residual = local(True)
    v = var.double()
    q = mean.double() if residual is None else mean + residual
    counts = torch.full((2,), float(n), dtype=torch.float64, device=x.device)  # no group: N = n
    return q, torch.stack([v, v * (n / (n - 1))]), counts, checks


# ----------------------------------------------------------------------------------- running stats

def _update_running_cpu(call: _Call, x: Tensor, mean: np.ndarray, var: np.ndarray, unbiased: np.ndarray,
                        finite: bool) -> None:
    """Running statistics on CPU, from the group's float64 mean, biased and unbiased variance: the host knows
    whether every channel is finite, and reports NaN/inf per the layer's policy (naming the channels
    and the ranks they came from)."""
    rm, rv, nbt = call.running_mean, call.running_var, call.num_batches_tracked
    policy = call.spec.on_nonfinite
    skip = not finite and policy != "propagate"
    if skip:
        glob_bad = torch.from_numpy(~(np.isfinite(mean) & np.isfinite(var)))
        local_bad = ~torch.isfinite(x.detach().sum(SF.reduce_dims(x))) if x.numel() else torch.zeros_like(glob_bad)
        message = D.report_nonfinite(call.spec, local_bad, glob_bad)
        if policy == "raise":
            raise D.SyncError(message + "; HINT: set the layer's on_nonfinite='skip' to keep training")
        warnings.warn(message + "; the running statistics of those channels were not updated "
                      "(on_nonfinite='skip')", RuntimeWarning, stacklevel=5)
    if rm is None:
        return
    if call.momentum is None:  # cumulative average: a skipped batch is not counted at all
        if skip:
            return
        nbt.add_(1)
        factor = 1.0 / float(nbt)
    else:
        if nbt is not None:
            nbt.add_(1)
        factor = call.momentum
    if skip:  # keep the running values of the bad channels
        ok = np.isfinite(mean) & np.isfinite(var)
        mean = np.where(ok, mean, rm.detach().double().numpy())
        unbiased = np.where(ok, unbiased, rv.detach().double().numpy())
    with torch.no_grad():
        torch._foreach_lerp_([rm, rv], [_as_tensor(mean, rm.dtype), _as_tensor(unbiased, rv.dtype)], factor)


def _update_running(call: _Call, x: Tensor, mean: Tensor, vu: Tensor) -> None:
    """Running statistics from the group's mean and ``[var; unbiased var]``: with immediate
    reports on CPU in eager mode, device-side masks otherwise."""
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        m, v, u = mean.double().numpy(), vu[0].double().numpy(), vu[1].double().numpy()
        _update_running_cpu(call, x, m, v, u, bool(np.isfinite(m).all() and np.isfinite(v).all()))
    else:
        _update_running_device(call, mean, vu[0], vu[1])


def _finite(t: Tensor) -> Tensor:
    """``torch.isfinite`` in two kernels (it is four on CUDA): ``|t| < inf`` is False for NaN/inf."""
    return torch.lt(t.abs(), float("inf"))


def _update_running_device(call: _Call, mean: Tensor, var: Tensor, unbiased: Tensor) -> None:
    """Running statistics without a host read: masks and factors computed on the device."""
    rm, rv, nbt = call.running_mean, call.running_var, call.num_batches_tracked
    policy = call.spec.on_nonfinite
    finite = None if policy == "propagate" else _finite(var)
    if policy == "raise" and call.state is not None:
        call.state.nonfinite.logical_or_(~finite.all())
    if rm is None:
        return
    with torch.no_grad():
        tm, tv = mean.to(rm.dtype), unbiased.to(rv.dtype)
        if finite is not None:
            tm, tv = torch.where(finite, tm, rm), torch.where(finite, tv, rv)
        if call.momentum is None:  # cumulative average: count the batch only if every channel is finite
            ok = finite.all() if finite is not None else torch.ones((), dtype=torch.bool, device=rm.device)
            nbt.add_(ok)
            factor = ok.to(rm.dtype) / nbt.clamp(min=1)
            torch._foreach_lerp_([rm, rv], [tm, tv], [factor, factor])  # tensor weights: no host read
            return
        if nbt is not None:
            nbt.add_(1)
        torch._foreach_lerp_([rm, rv], [tm, tv], call.momentum)


# ----------------------------------------------------------------------------------- eager Function

class _SyncBatchNormFunction(torch.autograd.Function):
    """Synchronized batch norm with an explicit backward; see the module docstring.

    Forward: local moments -> one all_reduce -> global mean/variance -> normalize (Batch Renorm:
    with ``r``, ``d`` folded into the affine) -> running statistics. Backward: local ``sum(dy)``,
    ``sum(dy * (x - mean))`` -> one all_reduce -> input gradient. Weight and bias gradients stay
    local (DDP averages parameter gradients itself). Saved: the input and per-channel vectors.
    Double backward is not supported (``once_differentiable`` says so).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], call: _Call
                ) -> Tensor:  # type: ignore[override]
        ctx.spec, ctx.eps, ctx.renorm = call.spec, call.eps, call.limits is not None
        ctx.weight_dtype = weight.dtype if weight is not None else None
        ctx.has_bias = bias is not None
        ctx.on_cpu = x.device.type == "cpu"
        if ctx.on_cpu:
            return _forward_cpu(ctx, x, weight, bias, call)
        return _forward_device(ctx, x, weight, bias, call)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor):  # type: ignore[override]
        if ctx.on_cpu:
            return _backward_cpu(ctx, grad_out)
        return _backward_device(ctx, grad_out)


def _cpu_moments(call: _Call, x: Tensor, n: int) -> tuple[np.ndarray, np.ndarray, float, float, bool]:
    """The group's ``(mean, biased var)`` (float64 NumPy), count, offset ratio and finiteness, on CPU.

    Host reads are free on CPU: after the one all_reduce, the head is checked (ranks in different
    layers raise at once), and when the shift was far from the mean (a layer's first call, a jump),
    or the data turned out offset for torch's statistics kernel, the exchange runs once more,
    centred on the new mean or with exact local statistics (every rank sees the same sums, so all
    decide alike). The per-channel arithmetic runs in NumPy on views of the payload.
    """
    state, spec = call.state, call.spec
    if state is None:  # Batch Renorm without a group: this batch alone
        if n <= 1:
            _check_global_count(float(n), spec.label, spec.num_features)
        mean_t, var_t, residual = SF.local_stats_cpu(x)
        zero = np.zeros(spec.num_features)
        mean, var, _, offset, finite = SF.merge_sums_cpu(
            np.concatenate([mean_t.double().numpy(), (var_t.double() + mean_t.double() ** 2).numpy()]), 1.0, zero,
            call.eps)
        if offset > SF.FAST_STATS_RATIO_LIMIT ** 2:
            m, var_t, residual = SF.local_stats_cpu(x, exact=True)
            mean, var = (m + residual).numpy(), var_t.numpy()
        return mean, var, float(n), offset, finite
    sums = n > 0 and SF.fast_shifted_sums(x)
    shift, exact, limit = state.shift.numpy(), state.exact, SHIFT_RATIO2_LIMITS[state.shift.dtype]
    for attempt in range(2):
        if sums:
            buf = torch.cat([state.head(n), *SF.shifted_sums_cpu(x, state.shift)])
        else:
            stats = SF.local_stats_cpu(x, exact) if n else (None, None, None)
            buf = SF.fill_payload(state.head(n), stats[0], stats[1], state.shift, n, stats[2])
        D.all_reduce_checked(buf, spec, "forward statistics")
        b = buf.numpy()
        if b[:D.SIG_SIZE].tolist() != state.expected_sig:
            raise D.report_mismatch(spec, x.dtype, x.device.type)
        total = float(b[HEAD - 2])
        if n <= 1:  # only then can the group's count be <= 1 (and every such rank looks)
            _check_global_count(total, spec.label, spec.num_features)
        mean, var, far, offset, finite = SF.merge_sums_cpu(b[HEAD:], total, shift, call.eps)
        state.exact = offset > SF.FAST_STATS_RATIO_LIMIT ** 2
        if attempt or not (far > limit or (not sums and state.exact > exact)):
            break
        np.copyto(shift, mean, where=np.isfinite(mean))  # centre on this mean, exchange again
        exact = state.exact
    state.ready = True
    return mean, var, total, offset, finite


def _as_tensor(a: np.ndarray, dtype: torch.dtype) -> Tensor:
    """A CPU tensor of ``dtype`` from a NumPy array (no copy when the dtypes agree)."""
    t = torch.from_numpy(a)
    return t if t.dtype == dtype else t.to(dtype)


def _forward_cpu(ctx: Any, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], call: _Call) -> Tensor:
    """CPU: host reads are free, so checks are immediate and precision guards choose the kernels."""
    n = x.numel() // call.spec.num_features
    mean, var, total, offset, finite = _cpu_moments(call, x, n)
    fused = x.dtype == torch.float64 or offset <= SF.FAST_STATS_RATIO_LIMIT ** 2
    # moderate offsets: every later per-channel step in the statistics dtype (float32 keeps all it
    # needs there); large offsets: float64 throughout
    dt = SF.stats_dtype(x.dtype) if fused else torch.float64
    mean_t, var_t = _as_tensor(mean, dt), _as_tensor(var, dt)
    scale, shift, r, d = weight, bias, None, None
    if call.limits is not None:
        r, d = SF.renorm_correction(mean_t, var_t, call.running_mean, call.running_var, call.eps, *call.limits)
        scale, shift = SF.renorm_affine(weight if fused or weight is None else weight.double(),
                                        bias if fused or bias is None else bias.double(), r, d)
    out = SF.normalize(x, mean_t, var_t, scale, shift, call.eps, fused)
    _update_running_cpu(call, x, mean, var, var * (total / (total - 1.0)), finite)
    if call.state is not None:
        np.copyto(call.state.shift.numpy(), mean, where=np.isfinite(mean) if not finite else True)
    ctx.total, ctx.fused = total, fused
    ctx.save_for_backward(x, scale, mean_t, var_t, r, d)
    return out


def _backward_cpu(ctx: Any, grad_out: Tensor):
    x, scale, mean, var, r, d = ctx.saved_tensors
    spec: D.SyncSpec = ctx.spec
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    invstd = torch.from_numpy(1.0 / np.sqrt(var.numpy() + ctx.eps))
    sum_dy, sum_dy_xhat = SF.backward_reduce(grad_out, x, mean, invstd, ctx.fused)
    grad_w = grad_b = grad_x = None
    if need_w and ctx.weight_dtype is not None:
        gw = sum_dy_xhat
        if ctx.renorm:  # y = w * (x_hat * r + d) + b
            gw = torch.addcmul(gw * r.to(gw.dtype), sum_dy, d.to(gw.dtype))
        grad_w = gw.to(ctx.weight_dtype)
    if need_b and ctx.has_bias:
        grad_b = sum_dy.to(ctx.weight_dtype or sum_dy.dtype)
    if need_x:
        sum_dy, sum_dy_xhat = _sum_gradients(spec, sum_dy, sum_dy_xhat)
        if ctx.fused:
            w = None if scale is None else scale.detach().to(mean.dtype).numpy()
            a, k, cc = (torch.from_numpy(v).view([1, -1] + [1] * (x.dim() - 2)) for v in SF.elemt_coefficients_cpu(
                sum_dy.numpy(), sum_dy_xhat.numpy(), mean.numpy(), invstd.numpy(), w, ctx.total))
            grad = torch.mul(grad_out, a)
            grad = grad if grad.dtype == a.dtype else grad.to(a.dtype)
            grad_x = grad.addcmul_(x, k).add_(cc).to(x.dtype)
        else:
            grad_x = SF.backward_elemt(grad_out, x, mean, invstd, scale, sum_dy, sum_dy_xhat, ctx.total, False)
    return grad_x, grad_w, grad_b, None


def _sum_gradients(spec: D.SyncSpec, sum_dy: Tensor, sum_dy_x: Tensor) -> tuple[Tensor, Tensor]:
    """The backward exchange: ``[sum(dy), sum(dy * x_centred)]`` summed over the group (one
    all_reduce of 2C values)."""
    if spec.group is None:
        return sum_dy, sum_dy_x
    sums = torch.cat([sum_dy, sum_dy_x])
    D.all_reduce_checked(sums, spec, "backward gradient-sum")
    return sums[:spec.num_features], sums[spec.num_features:]


def _forward_device(ctx: Any, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], call: _Call) -> Tensor:
    """Other devices: torch's fused kernels, nothing read back or copied from the host."""
    c = call.spec.num_features
    n = x.numel() // c
    q, vu, counts, _ = _group_stats(call, x, n)
    if call.state is None:
        mean_g = q
    else:  # the shift becomes this step's mean (channels with non-finite statistics keep theirs)
        mean_g = call.state.shift.add_(q.nan_to_num(0.0, 0.0, 0.0)).clone()
    acc = SF.stats_dtype(x.dtype)
    mean_a, vu_a = mean_g.to(acc), vu.to(acc)
    scale, shift, r, d = weight, bias, None, None
    if call.limits is not None:
        r, d = SF.renorm_correction(mean_a, vu_a[0], call.running_mean, call.running_var, call.eps, *call.limits)
        scale, shift = SF.renorm_affine(weight, bias, r, d)
    w, b = (t if t is None or t.dtype == acc else t.to(acc) for t in (scale, shift))
    out = torch.ops.aten._native_batch_norm_legit_no_training(x, w, b, mean_a, vu_a[0], 0.0, call.eps)[0]
    _update_running_device(call, mean_a, vu_a[0], vu_a[1])
    ctx.save_for_backward(x, scale, mean_a, vu_a[0], counts[:1], r, d)  # counts: a view of this call's payload
    return out


def _backward_device(ctx: Any, grad_out: Tensor):
    x, scale, mean, var, count, r, d = ctx.saved_tensors
    spec: D.SyncSpec = ctx.spec
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    invstd = torch.rsqrt(var + ctx.eps)
    want_w = need_w and ctx.weight_dtype is not None
    sum_dy, sum_dy_xmu, gw, gb = torch.batch_norm_backward_reduce(
        grad_out, x, mean, invstd, scale, need_x, want_w, need_b and ctx.has_bias)
    grad_w = grad_b = grad_x = None
    if want_w:  # gw is sum(dy * x_hat); Batch Renorm's weight also scales r and shifts by d
        grad_w = torch.addcmul(gw * r, sum_dy, d) if ctx.renorm else gw
        grad_w = grad_w.to(ctx.weight_dtype)
    if need_b and ctx.has_bias:
        grad_b = gb
    if need_x:
        sum_dy, sum_dy_xmu = _sum_gradients(spec, sum_dy, sum_dy_xmu)
        grad_x = torch.batch_norm_backward_elemt(grad_out, x, mean, invstd, scale, sum_dy, sum_dy_xmu,
                                                 count.to(torch.int32))
    return grad_x, grad_w, grad_b, None


# ----------------------------------------------------------------------------------- traced path

def _group_moments_differentiable(x: Tensor, call: _Call) -> tuple[Tensor, Tensor, Tensor]:
    """The group's ``(mean, biased var, unbiased var)`` of ``x`` as differentiable float64 ops
    around one differentiable all_reduce (eager: checked; compiled: a functional collective)."""
    c = call.spec.num_features
    n = x.numel() // c
    m0, residual, var_l = SF.batch_moments_differentiable(x)
    state = call.state
    if state is None:
        if n <= 1:
            _check_global_count(float(n), call.spec.label, c)
        return m0 + residual, var_l, var_l * (n / (n - 1))

    def payload(shift: Tensor, exact: bool) -> Tensor:  # these moments are exact already
        # (also for n = 0: zeros that depend on the shift, so that a compiled graph never merges
        # the two exchanges of a first call as common subexpressions on an empty rank)
        d = (m0 - _read(shift)) + residual
        body = torch.cat([d, var_l + d * d]) * n
        return D.all_reduce_differentiable(torch.cat([state.head(n), body]), call.spec)

    _, q, vu, _ = _exchange(call, x, n, payload)
    mean, var = _read(state.shift) + q, vu[0]
    with torch.no_grad():
        state.shift.copy_(torch.where(torch.isfinite(var), mean, state.shift))
    return mean, var, vu[1]


def _read(t: Tensor) -> Tensor:
    """``t`` for a computation autograd may replay, when ``t`` is updated in place later in the same
    compiled graph (see :func:`_define_snapshot`); ``t`` itself in eager mode."""
    return _snapshot(t) if torch.compiler.is_compiling() else t


def _traced_batch_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], call: _Call) -> Tensor:
    """:func:`batch_norm`'s training path as differentiable tensor ops (``torch.compile``)."""
    mean, var, unbiased = _group_moments_differentiable(x, call)
    scale, shift = weight, bias
    if call.limits is not None:
        r, d = SF.renorm_correction(mean.detach(), var.detach(), _read(call.running_mean),
                                    _read(call.running_var), call.eps, *call.limits)
        scale, shift = SF.renorm_affine(None if weight is None else weight.double(),
                                        None if bias is None else bias.double(), r, d)
    _update_running(call, x, mean.detach(), torch.stack([var.detach(), unbiased.detach()]))
    return SF.normalize(x, mean, var, scale, shift, call.eps, fused=False)


def _define_snapshot():
    """``snapshot(t)``: a copy of ``t`` that the compiler's partitioner never recomputes.

    The traced path reads the running buffers (for Batch Renorm's r and d) and then updates them in
    place in the same graph. AOTAutograd may recompute cheap values for the backward from graph
    inputs, and would then read the *updated* buffers (a wrong weight gradient; seen with torch 2.13).
    An opaque custom op is saved, not recomputed.
    """
    if not hasattr(torch.library, "custom_op"):  # torch < 2.4: no custom_op API
        return lambda t: t.clone()

    @torch.library.custom_op("syncnorm::snapshot", mutates_args=())
    def snapshot(t: Tensor) -> Tensor:
        return t.clone()

    @snapshot.register_fake
    def _(t: Tensor) -> Tensor:
        return torch.empty_like(t)

    return snapshot


_snapshot = _define_snapshot()
