"""Statistics exchange: the only module of syncnorm that talks to ``torch.distributed``.

Two collectives per synchronized layer and training step, both ``all_reduce(SUM)`` over an
explicit process group, with payloads of O(C) whatever the world size:

* forward: ``[sig, sig**2, count, sum(x), sum(x**2)]`` in float64 (``2C + 3`` values), see
  :func:`exchange_moments`. The two ``sig`` entries carry a small signature of the layer (name,
  channels, dtype, device type): every rank checks that the reduced values equal ``W * sig`` and
  ``W * sig**2``, which holds only if all ranks sent the same signature. A rank that skipped a layer
  and entered another, or a rank with a different dtype, is reported by name instead of silently
  mixing statistics of different layers.
* backward: ``[sum(dy), sum(dy * (x - mean))]`` (``2C`` values), see :func:`exchange_grad_sums`.

Blocking waits on CPU tensors are bounded by a timeout (``timeout_s``), so a rank that never arrives
(crashed, stuck, or skipped the layer and left the loop) makes the others fail with a message that
names the layer, instead of hanging for the process group's default 30 minutes. On CUDA the wait is
left to the stream and to the process group's own timeout (a host-side wait would be a sync).
"""

from __future__ import annotations

import datetime
import zlib
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "SyncError",
    "SyncSpec",
    "resolve_group",
    "group_size",
    "exchange_moments",
    "exchange_grad_sums",
    "all_reduce_traceable",
    "new_sync_groups",
    "handshake",
    "report_nonfinite",
]

DEFAULT_TIMEOUT_S = 300.0
"""Default bound, in seconds, on a blocking wait in a synchronized layer (gloo/CPU)."""

_HEADER = 2  # sig, sig**2


class SyncError(RuntimeError):
    """A collective of a synchronized layer failed, timed out, or found the ranks inconsistent."""


@dataclass(frozen=True)
class SyncSpec:
    """Everything the exchange needs to know about the calling layer; no tensors, no state.

    Args:
        label: how messages name the layer, e.g. ``SyncBatchNorm 'layer1.0.bn1'``.
        num_features: channel count C.
        group: the resolved process group (never ``None`` here).
        timeout_s: bound on a blocking wait for CPU tensors; ``None`` waits as long as the group does.
        verify: check the layer signature in the forward exchange (free on CPU, a host sync on CUDA).
        on_nonfinite: what a NaN/inf in the global statistics does to the running statistics:
            ``"skip"`` (those channels keep their running values; on CPU a warning names the layer,
            channels and ranks), ``"raise"`` (``SyncError`` naming them), ``"propagate"`` (torch's
            behaviour: the running statistics become NaN).
    """

    label: str
    num_features: int
    group: Any
    timeout_s: Optional[float] = DEFAULT_TIMEOUT_S
    verify: bool = True
    on_nonfinite: str = "skip"


def resolve_group(process_group: Optional[Any]) -> Optional[Any]:
    """The group to synchronize over: ``process_group``, else WORLD; ``None`` without a group."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return process_group if process_group is not None else dist.group.WORLD


def group_size(group: Optional[Any]) -> int:
    """Size of ``group``; 1 when there is none, so callers fall back to local batch norm."""
    if group is None:
        return 1
    return dist.get_world_size(group)


def new_sync_groups(k: int) -> Any:
    """This rank's subgroup when statistics are synchronized over groups of ``k`` ranks.

    Ranks ``[0, k)``, ``[k, 2k)``, ... form the groups (with one node of k GPUs per group under the
    usual rank layout, the all_reduce stays inside the node). Every rank must call this, in the
    same order relative to its other group creations: each group is created on every rank (torch's
    ``new_subgroups``). ``k`` equal to the world size gives the WORLD group.

    Trade-off: statistics over k ranks are those of a k * B batch (less noise than B, more than
    W * B) for a collective that stays within k ranks (one node): cheaper and less sensitive to
    slow links than a world-wide one, which matters at hundreds of ranks, while a batch of k * B is
    usually past the point where larger batches stop helping BN (16-32 samples).

    Raises:
        ValueError: no process group, or ``k`` does not divide the world size.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("new_sync_groups: expected an initialized process group, got none")
    world = dist.get_world_size()
    if not isinstance(k, int) or k < 1 or world % k:
        raise ValueError(f"new_sync_groups: expected a group size dividing the world size {world}, got {k!r}")
    if k == world:
        return dist.group.WORLD
    mine, _ = dist.new_subgroups(group_size=k)
    return mine


def _signature(spec: SyncSpec, x: Tensor) -> int:
    text = f"{spec.label}|{spec.num_features}|{x.dtype}|{x.device.type}"
    return zlib.crc32(text.encode()) & 0xFFFFF  # 20 bits: sums of squares stay exact in float64


def _describe(spec: SyncSpec, x: Tensor) -> str:
    return f"{spec.label} (C={spec.num_features}, {str(x.dtype).replace('torch.', '')}, {x.device.type})"


def _all_reduce(buf: Tensor, spec: SyncSpec, what: str) -> None:
    try:
        if buf.device.type == "cpu" and spec.timeout_s is not None:
            work = dist.all_reduce(buf, group=spec.group, async_op=True)
            work.wait(timeout=datetime.timedelta(seconds=spec.timeout_s))
        else:
            dist.all_reduce(buf, group=spec.group)
    except RuntimeError as err:
        rank = dist.get_rank()
        timed_out = "timed out" in str(err).lower() or "timeout" in str(err).lower()
        cause = (f"no answer within {spec.timeout_s:g} s" if timed_out and spec.timeout_s is not None
                 else "the collective failed")
        raise SyncError(
            f"{spec.label}: {what} all_reduce on rank {rank} did not complete: {cause} ({err}). "
            "Every rank of the process group must run this layer in training mode, in the same order; "
            "a rank that skipped it (data-dependent branch), crashed, or has a different model "
            "leaves the others waiting. HINT: raise the layer's sync_timeout_s if a rank is just slow."
        ) from err


def _report_mismatch(spec: SyncSpec, x: Tensor) -> None:
    gathered: list[Any] = [None] * group_size(spec.group)
    try:
        dist.all_gather_object(gathered, _describe(spec, x), group=spec.group)
        ranks = dist.get_process_group_ranks(spec.group)
        detail = "; ".join(f"rank {r}: {d}" for r, d in zip(ranks, gathered))
    except RuntimeError as err:  # the error path must not hang or hide the real problem
        detail = f"(could not gather the per-rank details: {err}); this rank: {_describe(spec, x)}"
    raise SyncError(
        f"{spec.label}: ranks disagree on the synchronized layer they are in: {detail}. "
        "All ranks must call the same synchronized norm layers in the same order with the same "
        "channel count, dtype and device type (did a rank skip a layer in a data-dependent branch?)."
    )


def exchange_moments(packed: Tensor, spec: SyncSpec, x: Tensor) -> Tensor:
    """Sum packed per-rank moments ``[count, s1, s2]`` (float64, ``2C + 1``) over ``spec.group``.

    Returns the summed vector without the signature header. Raises :class:`SyncError` when the ranks
    are in different layers (signature mismatch) or the collective fails or times out.
    """
    sig = float(_signature(spec, x))
    header = torch.tensor([sig, sig * sig], dtype=torch.float64, device=packed.device)
    buf = torch.cat([header, packed])
    _all_reduce(buf, spec, "forward statistics")
    if spec.verify:
        world = float(group_size(spec.group))
        got = buf[:_HEADER].tolist()
        if got[0] != world * sig or got[1] != world * sig * sig:
            _report_mismatch(spec, x)
    return buf[_HEADER:]


def report_nonfinite(spec: SyncSpec, local_bad: Tensor, global_bad: Tensor) -> str:
    """Describe which ranks fed NaN/inf into which channels (a collective; call on every rank).

    ``local_bad``/``global_bad``: boolean ``(C,)`` masks of this rank's and the group's non-finite
    channels. Only called when ``global_bad`` has a True entry, which every rank sees alike.
    """
    mine = local_bad.nonzero().flatten().tolist()
    if spec.group is None:
        per_rank = [mine]
        ranks = [0]
    else:
        per_rank = [None] * group_size(spec.group)
        dist.all_gather_object(per_rank, mine, group=spec.group)
        ranks = dist.get_process_group_ranks(spec.group)
    sources = "; ".join(f"rank {r}: channels {chs}" for r, chs in zip(ranks, per_rank) if chs) or "no single rank"
    channels = global_bad.nonzero().flatten().tolist()
    return (f"{spec.label}: non-finite batch statistics (NaN/inf) in channels {channels}, from the input of "
            f"{sources}")


class _AllReduceSum(torch.autograd.Function):
    """Differentiable, traceable all_reduce(SUM): functional collectives in forward and backward."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, group_name: str) -> Tensor:  # type: ignore[override]
        import torch.distributed._functional_collectives as funcol

        ctx.group_name = group_name
        return funcol.all_reduce(t, "sum", group_name)

    @staticmethod
    def backward(ctx: Any, grad: Tensor):  # type: ignore[override]
        import torch.distributed._functional_collectives as funcol

        return funcol.all_reduce(grad.contiguous(), "sum", ctx.group_name), None


def all_reduce_traceable(t: Tensor, group: Any) -> Tensor:
    """Sum ``t`` over ``group`` with functional collectives: traced by ``torch.compile`` without
    graph breaks (no host sync, no Python branch on the result), differentiable (the gradient of a
    sum over ranks is the sum over ranks of the gradients: one all_reduce in backward)."""
    return _AllReduceSum.apply(t, group.group_name)


def handshake(spec: SyncSpec, x: Tensor) -> None:
    """Check, with a fixed-size (2-value) all_reduce, that every rank is in the same layer with the
    same channel count, dtype and device type; :class:`SyncError` naming each rank's view if not."""
    exchange_moments(torch.empty(0, dtype=torch.float64, device=x.device), spec, x)


def exchange_grad_sums(sums: Tensor, spec: SyncSpec) -> Tensor:
    """Sum the backward per-channel sums ``[sum(dy), sum(dy * (x - mean))]`` over ``spec.group``."""
    buf = sums.contiguous()
    _all_reduce(buf, spec, "backward gradient-sum")
    return buf


# --- Collectives for callbacks and the app ---
#
# Small named helpers over the default (WORLD) group for the Lightning callbacks, the conversion's
# ``auto`` policy, the training app and its demo. Each is a no-op (returns its input, or the
# one-process answer) without an initialized process group or with one process, so callers need
# no "is distributed" test of their own. Tensors travel on the device the backend reduces on: the
# current CUDA device for NCCL, the CPU otherwise; results come back on the input's device.

import os  # noqa: E402  (this section's own import: the module's head belongs to the engine)

__all__ += ["is_distributed", "world_size", "rank", "sum_over_ranks", "min_over_ranks", "gather_rows",
            "gather_lists", "init_from_launcher", "init_on_fresh_store", "shutdown"]


def is_distributed() -> bool:
    """Whether a default process group is initialized (the one such test of the package)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Processes in the default group; 1 without a process group."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank in the default group; 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


def _on_backend_device(t: Tensor) -> Tensor:
    if dist.get_backend() == "nccl":
        return t.to(torch.device("cuda", torch.cuda.current_device()))
    return t.cpu()


def sum_over_ranks(t: Tensor) -> Tensor:
    """The element-wise sum of ``t`` over the ranks (``t`` itself with one process)."""
    if world_size() <= 1:
        return t
    buf = _on_backend_device(t).clone()
    dist.all_reduce(buf)
    return buf.to(t.device)


def min_over_ranks(value: int) -> int:
    """The smallest ``value`` of all ranks (e.g. how many batches every rank can run)."""
    if world_size() <= 1:
        return int(value)
    t = _on_backend_device(torch.tensor([int(value)], dtype=torch.int64))
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def gather_rows(t: Tensor) -> Tensor:
    """``(world size, len)``: every rank's 1-D ``t``, in rank order, on the CPU (one ``all_gather``)."""
    if world_size() <= 1:
        return t.unsqueeze(0).cpu()
    buf = _on_backend_device(t)
    out = [torch.empty_like(buf) for _ in range(world_size())]
    dist.all_gather(out, buf)
    return torch.stack(out).cpu()


def gather_lists(items: list[Any]) -> list[Any]:
    """Every rank's list of picklable items, concatenated in rank order (``items`` with one process)."""
    if world_size() <= 1:
        return items
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def init_from_launcher(backend: str = "gloo") -> bool:
    """Join the process group a launcher (torchrun) describes in the environment (``WORLD_SIZE`` > 1);
    returns whether this process is distributed. Without a launcher nothing happens."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1 or is_distributed():
        return is_distributed()
    dist.init_process_group(backend)
    return True


def init_on_fresh_store(prefix: str, backend: str) -> None:
    """Create the default group from torchrun's environment (``MASTER_ADDR``/``PORT``, ``RANK``,
    ``WORLD_SIZE``) on the rendezvous store's keys under ``prefix``, so a restarted worker group does not
    read the previous attempt's keys (see ``syncnorm.app.runtime.init_distributed_after_restart``)."""
    rank_, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=(rank_ == 0 and not agent_store), multi_tenant=not agent_store)
    dist.init_process_group(backend, store=dist.PrefixStore(prefix, store), rank=rank_, world_size=world)


def shutdown(success: bool = True) -> None:
    """End the default process group, if one is alive: a barrier (on success), then
    ``destroy_process_group``. Without it, gloo can abort at interpreter exit with "terminate called
    without an active exception" while the group is still alive. After a failure the barrier is
    skipped (a peer may never reach it)."""
    if not is_distributed():
        return
    try:
        if success:
            dist.barrier()
    finally:
        dist.destroy_process_group()
