"""A one-process stand-in for a process group of W ranks, and a harness for the non-CPU code path.

``scaled_group(W)`` initializes ``torch.distributed`` with the ``"scaledw"`` backend: a Python
``ProcessGroup`` whose ``all_reduce(SUM)`` multiplies by W (as if W ranks held the same tensor)
and whose ``all_gather`` copies. A synchronized layer then computes, in one process, exactly what W
ranks holding the same batch would: BatchNorm over the batch repeated W times. It works on CPU,
CUDA (its all_reduce is one in-place kernel: no host sync) and the ``meta`` device, and counts its
collectives.

``DeviceChecks`` is a ``TorchDispatchMode`` for the ``meta`` device (which runs the non-CPU branch
of the engine and fails on any host read of device data: ``.item()``, ``.tolist()``, ``bool()``): it
counts aten ops (views not counted), records copies from host tensors to the device, and, with
``torch.tensor`` patched, calls that would build a device tensor from Python data (a blocking host
to device copy that dispatch modes cannot see). torch's fused CUDA batch-norm kernels have no meta
implementation: :func:`register_meta_kernels` adds shape-only ones for the test.
"""

from __future__ import annotations

import contextlib
import datetime
from collections import Counter
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.futures import Future
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

BACKEND = "scaledw"


class _Done(dist.Work):
    def __init__(self, result: Any) -> None:
        super().__init__()
        self._result = result

    def wait(self, timeout: datetime.timedelta | None = None) -> bool:  # gloo-style bounded waits call this
        return True

    def is_completed(self) -> bool:
        return True

    def get_future(self) -> Future:
        fut: Future = Future()
        fut.set_result(self._result)
        return fut


class ScaledProcessGroup(dist.ProcessGroup):
    """``all_reduce(SUM)`` multiplies by the group size; ``all_gather`` copies; counts calls."""

    calls: Counter = Counter()

    def __init__(self, rank: int, size: int) -> None:
        super().__init__(rank, size)
        self._size = size

    def allreduce(self, tensors, opts=None):  # noqa: D102
        with _disable_current_modes():  # the stand-in's own arithmetic is not the code under test
            for t in tensors:
                t.mul_(self._size)
        ScaledProcessGroup.calls["all_reduce"] += 1
        return _Done(tensors)

    def allgather(self, output_lists, inputs, opts=None):  # noqa: D102
        with _disable_current_modes():
            for outs, inp in zip(output_lists, inputs):
                for o in outs:
                    o.copy_(inp)
        ScaledProcessGroup.calls["all_gather"] += 1
        return _Done(output_lists)

    def _allgather_base(self, output, input, opts=None):  # noqa: D102  (all_gather_into_tensor)
        with _disable_current_modes():
            output.view(self._size, -1).copy_(input.reshape(1, -1).expand(self._size, -1))
        ScaledProcessGroup.calls["all_gather"] += 1
        return _Done([output])

    def broadcast(self, tensors, opts=None):  # noqa: D102
        return _Done(tensors)

    def barrier(self, opts=None):  # noqa: D102
        return _Done([])

    def size(self) -> int:  # noqa: D102
        return self._size

    def getBackendName(self) -> str:  # noqa: N802, D102
        return BACKEND


def _create(store, rank, size, timeout):
    return ScaledProcessGroup(rank, size)


if BACKEND not in dist.Backend.backend_list:
    dist.Backend.register_backend(BACKEND, _create, devices=["cpu", "meta", "cuda"])


@contextlib.contextmanager
def scaled_group(world_size: int) -> Iterator[Any]:
    """An initialized one-process group that behaves as ``world_size`` ranks holding equal data."""
    assert not dist.is_initialized(), "a previous test leaked a process group"
    dist.init_process_group(BACKEND, store=dist.HashStore(), rank=0, world_size=world_size)
    ScaledProcessGroup.calls.clear()
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


_META_LIB = None


def register_meta_kernels() -> None:
    """Shape-only meta kernels for torch's fused CUDA batch-norm backward ops (test harness only)."""
    global _META_LIB
    if _META_LIB is not None:
        return
    lib = torch.library.Library("aten", "IMPL")

    def backward_reduce(grad_out, x, mean, invstd, weight, input_g, weight_g, bias_g):
        c = x.shape[1]
        new = lambda: torch.empty(c, dtype=mean.dtype, device=x.device)  # noqa: E731
        return (new() if input_g else None, new() if input_g else None,
                torch.empty(c, dtype=weight.dtype, device=x.device) if weight_g else None,
                torch.empty(c, dtype=weight.dtype if weight is not None else mean.dtype, device=x.device)
                if bias_g else None)

    def backward_elemt(grad_out, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
        return torch.empty_like(x)

    lib.impl("batch_norm_backward_reduce", backward_reduce, "Meta")
    lib.impl("batch_norm_backward_elemt", backward_elemt, "Meta")
    _META_LIB = lib


class DeviceChecks(TorchDispatchMode):
    """Counts aten ops (views excluded) and records host-to-device traffic inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.host_copies: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not func.is_view:
            self.ops.append(str(func.overloadpacket.__name__))
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if any(t.device.type == "cpu" and t.dim() > 0 for t in tensors) and any(t.device.type != "cpu" for t in tensors):
            self.host_copies.append(str(func))
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_tensor_from_host_data() -> Iterator[list[str]]:
    """Record calls that build a non-CPU tensor from Python data (a blocking host-to-device copy):
    ``torch.tensor``, ``torch.as_tensor`` and ``Tensor.new_tensor``."""
    seen: list[str] = []
    originals = [(torch, "tensor"), (torch, "as_tensor"), (torch.Tensor, "new_tensor")]
    saved = [getattr(owner, name) for owner, name in originals]

    def wrap(name, fn):
        def checked(*args, **kwargs):
            device = kwargs.get("device")
            if name == "new_tensor" and device is None:
                device = args[0].device
            if device is not None and torch.device(device).type != "cpu":
                seen.append(f"{name}(..., device={device})")
            return fn(*args, **kwargs)
        return checked

    try:
        for (owner, name), fn in zip(originals, saved):
            setattr(owner, name, wrap(name, fn))
        yield seen
    finally:
        for (owner, name), fn in zip(originals, saved):
            setattr(owner, name, fn)
