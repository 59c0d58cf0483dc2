"""``syncnorm.distributed.shutdown`` after a failure: bounded, even when destroying the group blocks (a peer
unreachable: gloo holds ``destroy_process_group`` until the process group's own timeout)."""

from __future__ import annotations

import threading
import time

import torch.distributed as dist

from syncnorm.distributed import shutdown as shutdown_distributed


def test_failed_run_teardown_is_bounded_when_destroy_blocks(one_rank_group, monkeypatch):
    release = threading.Event()
    real_destroy = dist.destroy_process_group
    monkeypatch.setattr(dist, "destroy_process_group", lambda: release.wait(30))  # a wedged gloo group
    start = time.monotonic()
    assert shutdown_distributed(False, timeout_s=0.5) is False  # gave up: the caller must exit at once
    assert 0.5 <= time.monotonic() - start < 5
    assert dist.is_initialized()
    release.set()
    monkeypatch.setattr(dist, "destroy_process_group", real_destroy)


def test_failed_run_teardown_destroys_a_healthy_group(tmp_path, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    assert shutdown_distributed(False) is True and not dist.is_initialized()
    assert shutdown_distributed(True) is True  # nothing left: a no-op
