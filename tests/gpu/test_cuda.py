"""The synchronized engine on CUDA: `python -m pytest -m gpu tests` (skipped where CUDA is absent).

With 2+ GPUs the ranks use NCCL, one GPU each; with one GPU, 2 ranks share it over gloo (which
moves CUDA tensors through the host: a correctness check, not a speed one). Checked:

* every synchronized layer kind, eager and compiled, even/uneven/empty ranks, against the float64
  full-batch reference on the CPU (tolerance 1e-4: the CUDA statistics kernels accumulate in
  float32, not in float64 as on CPU);
* syncnorm's SyncBatchNorm against ``torch.nn.SyncBatchNorm`` in the same DDP training run;
* no host sync in a steady-state forward and backward, with ``torch.cuda.set_sync_debug_mode
  ("error")`` (any synchronizing call raises), through the one-process scaled group.

Together with ``python -m benchmarks.gpu`` this takes about 3 minutes on one H100/H200-class GPU.
"""

from __future__ import annotations

import pytest
import torch

import syncnorm
from tests.distributed import test_engine_matrix as matrix
from tests.helpers.dist import run_distributed
from tests.helpers.scaled_pg import scaled_group

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CUDA_TOL = 1e-4


def _backend() -> str:
    return "nccl" if torch.cuda.device_count() >= 2 else "gloo"


def _device(rank: int) -> str:
    return f"cuda:{rank % torch.cuda.device_count()}"


def _matrix_worker(rank: int, world: int) -> dict:
    torch.cuda.set_device(_device(rank))
    results = {}
    for mode in matrix.MODES:
        model = matrix._Side(torch.float32, world).to(_device(rank))
        fn = torch.compile(model, fullgraph=True, backend="aot_eager") if mode == "compiled" else model
        for (split, kind), res in matrix._train(model, fn, world, rank, torch.float32, _device(rank)).items():
            results[kind, mode, split] = res
    syncnorm.check_sync_errors(model)  # nothing recorded on the device
    return results


def test_every_layer_kind_on_cuda_equals_the_full_batch_in_float64():
    per_rank = run_distributed(_matrix_worker, 2, timeout=600, backend=_backend())
    failures = matrix.compare(per_rank, 2, tol=CUDA_TOL)
    assert not failures, "\n".join(failures)


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                               torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 4))


def _versus_torch_worker(rank: int, world: int) -> dict:
    device = _device(rank)
    torch.cuda.set_device(device)
    out = {}
    for name, convert in (("torch", torch.nn.SyncBatchNorm.convert_sync_batchnorm),
                          ("syncnorm", syncnorm.SyncBatchNorm.convert_sync_batchnorm)):
        model = torch.nn.parallel.DistributedDataParallel(convert(_net()).to(device))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = []
        for step in range(4):
            g = torch.Generator().manual_seed(step * 10 + rank)
            x = torch.randn(6 + 2 * rank, 3, 8, 8, generator=g).to(device)  # uneven ranks
            y = torch.randint(0, 4, (x.shape[0],), generator=g).to(device)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        out[name] = {"losses": losses, "state": {k: v.cpu() for k, v in model.module.state_dict().items()}}
    return out


def test_sync_batchnorm_trains_like_torch_sync_batchnorm_on_cuda():
    for rank, res in enumerate(run_distributed(_versus_torch_worker, 2, timeout=300, backend=_backend())):
        for a, b in zip(res["torch"]["losses"], res["syncnorm"]["losses"]):
            assert abs(a - b) < CUDA_TOL, (rank, res["torch"]["losses"], res["syncnorm"]["losses"])
        for key, value in res["torch"]["state"].items():
            torch.testing.assert_close(res["syncnorm"]["state"][key].double(), value.double(), rtol=0, atol=CUDA_TOL,
                                       msg=lambda m: f"rank {rank} {key}: {m}")


@pytest.mark.parametrize("make", [lambda: syncnorm.SyncBatchNorm(64), lambda: syncnorm.BatchRenorm(64),
                                  lambda: syncnorm.BatchInstanceNorm(64), lambda: syncnorm.SwitchableNorm(64)])
def test_steady_state_never_syncs_with_the_host_on_cuda(make):
    with scaled_group(2):
        layer = make().cuda()
        x = torch.randn(8, 64, 16, 16, device="cuda", requires_grad=True)
        for _ in range(2):  # first call (handshake: reads the host), then the steady state
            layer(x).sum().backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            y = layer(x)
            y.backward(torch.ones_like(y))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        syncnorm.check_sync_errors(torch.nn.Sequential(layer))
