"""Run a function on W ranks (gloo on 127.0.0.1, or NCCL) in fresh processes, with a hard timeout.

``run_distributed(fn, world_size, *args)`` starts ``world_size`` processes from a forkserver that
has torch preloaded (cheap starts, no fork of a process with live thread pools), rendezvous through
a ``FileStore`` in a private temporary folder (no port races), runs ``fn(rank, world_size, *args)``
on each and returns the per-rank results in rank order. A worker exception fails the test with
that worker's traceback; a worker still running at the deadline is killed and the test fails: no
test can hang the suite.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import tempfile
import time
import traceback
from typing import Any, Callable

import torch

_CTX = mp.get_context("forkserver")
_CTX.set_forkserver_preload(["torch", "torch.distributed"])


def _worker(fn: Callable, rank: int, world_size: int, folder: str, args: tuple, pg_timeout_s: float,
            clean_exit: bool, backend: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        if backend == "nccl":  # one GPU per rank
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(
            backend, init_method=f"file://{folder}/store", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout_s),
        )
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(folder, f"rank{rank}.pt"))
        if clean_exit:  # fault tests leave the group broken on purpose: just exit
            dist.barrier()
            dist.destroy_process_group()
    except BaseException:  # report everything to the parent, including SystemExit
        with open(os.path.join(folder, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        os._exit(1)
    os._exit(0)


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 120.0,
                    pg_timeout_s: float = 60.0, clean_exit: bool = True, backend: str = "gloo") -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` ranks; return results by rank.

    ``clean_exit=False`` skips the closing barrier, for tests that break the group on purpose.
    ``backend``: gloo (default) or nccl (rank r on GPU r).
    """
    with tempfile.TemporaryDirectory(prefix="syncnorm-dist-") as folder:
        procs = [
            _CTX.Process(target=_worker, args=(fn, r, world_size, folder, args, pg_timeout_s, clean_exit, backend), daemon=True)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        alive = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        errors = []
        for r in range(world_size):
            path = os.path.join(folder, f"rank{r}.err")
            if os.path.exists(path):
                errors.append(f"--- rank {r} ---\n" + open(path).read())
        if errors:
            raise AssertionError("distributed worker failed:\n" + "\n".join(errors))
        if alive:
            raise AssertionError(f"ranks {alive} still running after {timeout:.0f} s: killed (hang?)")
        bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
        if bad:
            raise AssertionError(f"workers exited abnormally (rank, exit code): {bad}")
        return [torch.load(os.path.join(folder, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
