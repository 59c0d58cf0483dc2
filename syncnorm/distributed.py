"""Statistics exchange: the only module of syncnorm that talks to ``torch.distributed``.

The synchronized engine (:mod:`syncnorm.engine`) issues, per layer and training step, one
``all_reduce(SUM)`` in forward and one in backward over an explicit process group, with payloads of
O(C) whatever the world size. Every forward payload starts with a fixed *head*
(:func:`signature_head`): the constant 1, four 8-bit chunks ``a`` of the layer's signature with
their squares ``a**2``, and the counts ``n`` and ``n - 1/W``. After the sum, the
entries hold ``W``, ``sum a``, ``sum a**2`` and the global ``N`` and ``N - 1``; since
``sum (a_r - a)**2 = sum a_r**2 - 2 a sum a_r + W a**2`` is zero only if every rank sent this
rank's ``a``, each rank can tell, with exact integer arithmetic, whether all ranks are in the same
layer (:func:`head_mismatch`). On CPU the check reads the head at once (free); on other devices the
heads are summed on the device across calls and checked when the host reads anyway.

Blocking waits on CPU tensors are bounded by a timeout (``timeout_s``), so a rank that never
arrives (crashed, stuck, or skipped the layer and left the loop) makes the others fail with a
message that names the layer, instead of hanging for the process group's default 30 minutes. On
other devices the collective is only enqueued (a host-side wait would be a sync); its bound is the
process group's own timeout.
"""

from __future__ import annotations

import base64
import datetime
import io
import os
import pickle
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "SyncError",
    "SyncSpec",
    "DEFAULT_TIMEOUT_S",
    "HEAD_SIZE",
    "SIG_SIZE",
    "resolve_group",
    "group_size",
    "new_sync_groups",
    "layer_signature",
    "signature_head",
    "head_mismatch",
    "all_reduce_checked",
    "all_reduce_traceable",
    "all_reduce_differentiable",
    "report_mismatch",
    "report_nonfinite",
]

DEFAULT_TIMEOUT_S = 300.0
"""Default bound, in seconds, on a blocking wait in a synchronized layer (gloo/CPU)."""

_CHUNKS = 4  # 8-bit chunks of the 32-bit signature
SIG_SIZE = 1 + 2 * _CHUNKS
"""Head entries that carry the signature: ``[1, a_1, a_1**2, ..., a_4, a_4**2]``."""
HEAD_SIZE = SIG_SIZE + 2
"""Entries before the statistics: the signature part and ``[n, n - 1/W]`` (they sum to ``N, N - 1``)."""


class SyncError(RuntimeError):
    """A collective of a synchronized layer failed, timed out, or found the ranks inconsistent."""


@dataclass(frozen=True)
class SyncSpec:
    """Everything the exchange needs to know about the calling layer; no tensors, no state.

    Args:
        label: how messages name the layer, e.g. ``SyncBatchNorm 'layer1.0.bn1'``.
        identity: the layer's identity, the same on every rank (qualified name, or where it was
            built); part of the signature and of mismatch reports.
        num_features: channel count C.
        group: the resolved process group, or ``None`` (one process: nothing is exchanged).
        timeout_s: bound on a blocking wait for CPU tensors; ``None`` waits as long as the group does.
        on_nonfinite: what NaN/inf global statistics do: ``"skip"`` (those channels keep their running
            values; on CPU a warning names the layer, channels and ranks), ``"raise"``
            (``SyncError``), ``"propagate"`` (torch's behaviour: the running statistics become NaN).
    """

    label: str
    identity: str
    num_features: int
    group: Any
    timeout_s: Optional[float] = DEFAULT_TIMEOUT_S
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


def layer_signature(spec: SyncSpec, dtype: torch.dtype, device_type: str) -> int:
    """32-bit signature of what a rank runs: layer identity and class, C, dtype, device type.

    FNV-1a over the text, in plain Python (``torch.compile`` traces it; it runs once per layer)."""
    text = f"{spec.identity}|{spec.label.split(' ')[0]}|{spec.num_features}|{dtype}|{device_type}"
    h = 0x811C9DC5
    for byte in text.encode():
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h


def signature_head(signature: int, n: int, world: int) -> list[float]:
    """The payload head ``[1, a_1, a_1**2, ..., a_4, a_4**2, n, n - 1/W]`` (see the module
    docstring). Summed over the ``W`` ranks: exact in float64 for the signature entries, ``N`` and
    ``N - 1`` (to a rounding of ``1e-16 N`` when W is not a power of two)."""
    head = [1.0]
    for k in range(_CHUNKS):
        a = float((signature >> (8 * k)) & 0xFF)
        head += [a, a * a]
    return head + [float(n), n - 1.0 / world]


def head_mismatch(summed: Sequence[float], signature: int) -> bool:
    """Whether the summed signature entries (``SIG_SIZE`` values, possibly accumulated over many
    calls) show a rank with another signature than ``signature``: exact integer arithmetic."""
    total = [int(v) for v in summed[:SIG_SIZE]]
    calls = total[0]  # sum of the constant 1 over ranks (and calls)
    for k in range(_CHUNKS):
        a = (signature >> (8 * k)) & 0xFF
        if total[2 + 2 * k] - 2 * a * total[1 + 2 * k] + a * a * calls != 0:
            return True
    return False


def _describe(spec: SyncSpec, dtype: torch.dtype, device_type: str) -> str:
    """``SyncBatchNorm 'layer1.0.bn1' (C=64, float32, cpu)``; an unnamed layer shows its identity."""
    ident = "" if spec.identity in spec.label else f" [{spec.identity}]"
    return f"{spec.label}{ident} (C={spec.num_features}, {str(dtype).replace('torch.', '')}, {device_type})"


def all_reduce_checked(buf: Tensor, spec: SyncSpec, what: str) -> None:
    """``all_reduce(SUM)`` of ``buf`` in place over ``spec.group``.

    CPU tensors: waited for at most ``spec.timeout_s``; a failure or timeout raises
    :class:`SyncError` naming the layer. Other devices: enqueued, no host-side wait.
    """
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
            "a rank that skipped it (data-dependent branch), crashed, lost its network link, or has a "
            "different model leaves the others waiting. HINT: raise the layer's sync_timeout_s if a rank "
            "is just slow."
        ) from err


def report_mismatch(spec: SyncSpec, dtype: torch.dtype, device_type: str) -> SyncError:
    """The error for ranks in different layers, naming what each rank runs (a collective: call on
    every rank; every rank detects a mismatch together)."""
    mine = _describe(spec, dtype, device_type)
    gathered: list[Any] = [None] * group_size(spec.group)
    try:
        dist.all_gather_object(gathered, mine, group=spec.group)
        ranks = dist.get_process_group_ranks(spec.group)
        detail = "; ".join(f"rank {r}: {d}" for r, d in zip(ranks, gathered))
    except RuntimeError as err:  # the error path must not hang or hide the real problem
        detail = f"(could not gather the per-rank details: {err}); this rank: {mine}"
    return SyncError(
        f"{spec.label}: ranks disagree on the synchronized layer they are in: {detail}. "
        "All ranks must call the same synchronized norm layers in the same order with the same "
        "channel count, dtype and device type (did a rank skip a layer in a data-dependent branch?)."
    )


def report_nonfinite(spec: SyncSpec, local_bad: Tensor, global_bad: Tensor) -> str:
    """Describe which ranks fed NaN/inf into which channels (a collective; call on every rank).

    ``local_bad``/``global_bad``: boolean ``(C,)`` masks of this rank's and the group's non-finite
    channels. Only called when ``global_bad`` has a True entry, which every rank sees alike.
    """
    mine = local_bad.nonzero().flatten().tolist()
    if spec.group is None:
        per_rank, ranks = [mine], [0]
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
        # wait explicitly: every later use (a detached slice read by a device-side assert, say)
        # must see the reduced values, never the buffer before the collective completed
        return funcol.wait_tensor(funcol.all_reduce(t, "sum", group_name))

    @staticmethod
    def backward(ctx: Any, grad: Tensor):  # type: ignore[override]
        import torch.distributed._functional_collectives as funcol

        return funcol.wait_tensor(funcol.all_reduce(grad.contiguous(), "sum", ctx.group_name)), None


def all_reduce_traceable(t: Tensor, group: Any) -> Tensor:
    """Sum ``t`` over ``group`` with functional collectives: traced by ``torch.compile`` without
    graph breaks (no host sync, no Python branch on the result), differentiable (the gradient of a
    sum over ranks is the sum over ranks of the gradients: one all_reduce in backward)."""
    return _AllReduceSum.apply(t, group.group_name)


class _CheckedAllReduceSum(torch.autograd.Function):
    """Differentiable all_reduce(SUM) for eager mode, with :func:`all_reduce_checked`'s bounded
    waits and messages in forward and backward."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, spec: SyncSpec) -> Tensor:  # type: ignore[override]
        ctx.spec = spec
        out = t.clone()
        all_reduce_checked(out, spec, "forward statistics")
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor):  # type: ignore[override]
        out = grad.contiguous().clone()
        all_reduce_checked(out, ctx.spec, "backward statistics-gradient")
        return out, None


def all_reduce_differentiable(t: Tensor, spec: SyncSpec) -> Tensor:
    """Sum ``t`` over ``spec.group``, differentiably: the traceable collective under
    ``torch.compile``, the checked (bounded, named) one in eager mode."""
    if torch.compiler.is_compiling():
        return all_reduce_traceable(t, spec.group)
    return _CheckedAllReduceSum.apply(t, spec)


# --- Collectives for callbacks and the app ---
#
# Small named helpers over the default (WORLD) group for the Lightning callbacks, the conversion's
# ``auto`` policy, the training app and its demo. Each is a no-op (returns its input, or the
# one-process answer) without an initialized process group or with one process, so callers need
# no "is distributed" test of their own. Tensors travel on the device the backend reduces on: the
# current CUDA device for NCCL, the CPU otherwise; results come back on the input's device.

__all__ += ["is_distributed", "world_size", "rank", "sum_over_ranks", "min_over_ranks", "gather_rows",
            "gather_lists", "init_from_launcher", "RDZV_ENDPOINT_VAR", "rendezvous_round", "worker_generation",
            "init_on_fresh_store", "shutdown"]


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


RDZV_ENDPOINT_VAR = "SYNCNORM_RDZV_ENDPOINT"
"""Environment variable with torchrun's c10d rendezvous endpoint (``host:port``, what
``--rdzv-endpoint`` was given); ``launch/multinode.sh`` sets it. With it, every worker group of a
job gets its own store prefix even when the agents' restart counts differ (:func:`worker_generation`)."""

_STATE_CLASSES = {("torch.distributed.elastic.rendezvous.dynamic_rendezvous", "_RendezvousState"),
                  ("torch.distributed.elastic.rendezvous.dynamic_rendezvous", "_NodeDesc"),
                  ("datetime", "datetime"), ("datetime", "timezone"), ("datetime", "timedelta"),
                  ("builtins", "set"), ("builtins", "dict"), ("builtins", "tuple"), ("builtins", "list")}


class _StateUnpickler(pickle.Unpickler):
    """Unpickles torchrun's rendezvous state and nothing else (no arbitrary classes from the store)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _STATE_CLASSES:
            raise pickle.UnpicklingError(f"unexpected {module}.{name} in the rendezvous state")
        return super().find_class(module, name)


def rendezvous_round(endpoint: str, run_id: str, timeout_s: float = 60.0) -> int:
    """The current round of torchrun's c10d rendezvous ``run_id`` whose store listens at ``endpoint``
    (``host:port``). Every agent's worker group of one generation was started in the same round, and
    each new generation (after a failure or a membership change) is a later round.

    Raises:
        RuntimeError: the store holds no such rendezvous, or its state could not be read (torch
            changed its format), naming the endpoint, the run id and what was found.
    """
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected {RDZV_ENDPOINT_VAR} as host:port, got {endpoint!r}")
    store = dist.TCPStore(host, int(port), is_master=False, timeout=datetime.timedelta(seconds=timeout_s),
                          wait_for_workers=False)
    key = "torch.rendezvous." + run_id
    try:
        if not store.check([key]):
            raise RuntimeError(f"no rendezvous {run_id!r} in the store at {endpoint} ({RDZV_ENDPOINT_VAR}); "
                               "expected torchrun's --rdzv-backend=c10d endpoint and TORCHELASTIC_RUN_ID of this job")
        raw = store.get(key)
    finally:
        del store
    try:
        state = _StateUnpickler(io.BytesIO(base64.b64decode(raw))).load()
        round_ = state.round
    except Exception as err:  # noqa: BLE001 - any format change ends here, with what was found
        raise RuntimeError(f"cannot read the round of rendezvous {run_id!r} at {endpoint} with torch "
                           f"{torch.__version__}: {type(err).__name__}: {err}; unset {RDZV_ENDPOINT_VAR} to use "
                           "torchrun's restart count instead") from err
    if not isinstance(round_, int):
        raise RuntimeError(f"rendezvous {run_id!r} at {endpoint}: expected an int round, got {round_!r}")
    return round_


def worker_generation() -> Optional[str]:
    """A name for this torchrun worker group that all its workers share and no other group of the job
    has, or ``None`` where the default initialization is right (outside torchrun, or torchrun's first
    attempt without :data:`RDZV_ENDPOINT_VAR`).

    With :data:`RDZV_ENDPOINT_VAR`: ``round_<r>``, the rendezvous round (:func:`rendezvous_round`).
    Without it: ``attempt_<n>`` from ``TORCHELASTIC_RESTART_COUNT`` when ``n > 0``. The restart count
    alone is not enough across hosts: an agent whose workers failed restarts with ``n + 1``, while an
    agent whose workers were still running restarts them for the waiting node and keeps ``n``
    (torchrun does not count membership changes), so the two groups would look for each other under
    different keys.
    """
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if not run_id or "MASTER_ADDR" not in os.environ:
        return None
    endpoint = os.environ.get(RDZV_ENDPOINT_VAR)
    if endpoint:
        return f"round_{rendezvous_round(endpoint, run_id)}"
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    return f"attempt_{attempt}" if attempt > 0 else None


def init_on_fresh_store(prefix: str, backend: str, timeout: Optional[datetime.timedelta] = None) -> None:
    """Create the default group from torchrun's environment (``MASTER_ADDR``/``PORT``, ``RANK``,
    ``WORLD_SIZE``) on the rendezvous store's keys under ``prefix``, so a restarted worker group does not
    read the previous group's keys (see :func:`worker_generation`). ``timeout`` (torch's default when
    ``None``) bounds the store connection and every collective of the group."""
    rank_, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    extra = {} if timeout is None else {"timeout": timeout}
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=(rank_ == 0 and not agent_store), multi_tenant=not agent_store, **extra)
    dist.init_process_group(backend, store=dist.PrefixStore(prefix, store), rank=rank_, world_size=world, **extra)


def shutdown(success: bool = True, timeout_s: float = 10.0) -> bool:
    """End the default process group, if one is alive: a barrier (on success), then
    ``destroy_process_group``. Without it, gloo can abort at interpreter exit with "terminate called
    without an active exception" while the group is still alive.

    After a failure the barrier is skipped (a peer may never reach it) and the group is destroyed in
    a helper thread, waited for at most ``timeout_s``: when a peer became unreachable (its link went
    down, its host froze), gloo's pending receive holds ``destroy_process_group`` (and the
    interpreter's exit) until the process group's own timeout, 30 minutes by default. The group is
    then left as it is and ``False`` returned: the process should end at once (``os._exit``).

    Returns:
        ``True`` when no group is left (none existed, or it was destroyed).
    """
    if not is_distributed():
        return True
    if success:
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
        return True
    import threading

    closer = threading.Thread(target=dist.destroy_process_group, name="syncnorm-destroy-pg", daemon=True)
    closer.start()
    closer.join(timeout_s)
    return not closer.is_alive()